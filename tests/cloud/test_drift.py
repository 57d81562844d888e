"""cloud.drift: the statistics against hand-computed values and scipy, windows and merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from agent.sketches import SketchAccumulator, SketchCounts, bin_counts
from cloud.drift import (
    METRICS,
    PSI_EPSILON,
    DriftError,
    bin_positions,
    js_distance,
    ks_binned,
    merge_counts,
    psi,
    score_window,
    wasserstein_binned,
)
from tests.cloud.dataloop_helpers import logits, make_baseline, training_inputs


@pytest.mark.parametrize(
    ("expected", "actual", "value"),
    [
        ([50, 50], [50, 50], 0.0),
        ([1, 1], [100, 100], 0.0),  # proportions, not counts
        # 0.3 ln(0.8/0.5) + (-0.3) ln(0.2/0.5)
        ([50, 50], [80, 20], 0.3 * math.log(1.6) - 0.3 * math.log(0.4)),
        # the empty bin is floored at PSI_EPSILON: (0.5-1) ln(0.5) + (0.5-eps) ln(0.5/eps)
        (
            [100, 0],
            [50, 50],
            -0.5 * math.log(0.5) + (0.5 - PSI_EPSILON) * math.log(0.5 / PSI_EPSILON),
        ),
        (
            [25, 25, 25, 25],
            [10, 20, 30, 40],
            sum((a - 0.25) * math.log(a / 0.25) for a in (0.1, 0.2, 0.3, 0.4)),
        ),
    ],
)
def test_psi_hand_computed(expected: list[int], actual: list[int], value: float) -> None:
    assert psi(expected, actual) == pytest.approx(value, rel=1e-12, abs=1e-12)


def test_psi_is_asymmetric_and_non_negative() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        e, a = rng.integers(0, 20, 8), rng.integers(0, 20, 8)
        e[0] += 1
        a[0] += 1
        assert psi(e, a) >= 0


@pytest.mark.parametrize(
    ("expected", "actual", "value"),
    [
        ([1, 1, 1, 1], [1, 1, 1, 1], 0.0),
        ([1, 1, 1, 1], [0, 0, 2, 2], 0.5),  # CDFs .25 .5 .75 1 vs 0 0 .5 1
        ([1, 0], [0, 1], 1.0),
        ([3, 1], [1, 3], 0.5),
    ],
)
def test_ks_binned_hand_computed(expected: list[int], actual: list[int], value: float) -> None:
    assert ks_binned(expected, actual) == pytest.approx(value)


def test_ks_binned_equals_scipy_on_values_at_bin_positions() -> None:
    # Integer data binned one value per bin: the binned KS is the exact two-sample KS.
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, 400)
    y = rng.integers(1, 8, 300)
    edges = [v - 0.5 for v in range(9)]
    ex, ey = bin_counts(x, edges), bin_counts(y, edges)
    assert ks_binned(ex, ey) == pytest.approx(stats.ks_2samp(x, y).statistic, abs=1e-12)


@pytest.mark.parametrize(
    ("expected", "actual", "value"),
    [
        ([1, 1], [1, 1], 0.0),
        ([1, 0], [0, 1], 1.0),  # disjoint: the maximum, base 2
        # JSD([1,0],[.5,.5]) = 1/2 KL(p||m) + 1/2 KL(q||m), m = [.75, .25]
        (
            [2, 0],
            [1, 1],
            math.sqrt(
                0.5 * math.log2(1 / 0.75)
                + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
            ),
        ),
    ],
)
def test_js_distance_hand_computed(expected: list[int], actual: list[int], value: float) -> None:
    assert js_distance(expected, actual) == pytest.approx(value, abs=1e-12)


def test_js_distance_equals_scipy() -> None:
    rng = np.random.default_rng(2)
    e, a = rng.integers(1, 50, 12), rng.integers(1, 50, 12)
    assert js_distance(e, a) == pytest.approx(
        jensenshannon(e / e.sum(), a / a.sum(), base=2), abs=1e-12
    )


def test_bin_positions() -> None:
    assert list(bin_positions([0.0, 1.0, 3.0])) == [-0.75, 0.5, 2.0, 3.75]
    with pytest.raises(DriftError, match="strictly increasing"):
        bin_positions([1.0, 1.0])


@pytest.mark.parametrize(
    ("expected", "actual", "value"),
    [
        ([0, 1, 0, 0], [0, 1, 0, 0], 0.0),
        ([0, 1, 0, 0], [0, 0, 1, 0], 0.5),  # one bin (width 1) over a range of 2
        ([0, 1, 0, 0], [0, 0, 0, 1], 1.0),  # into overflow: 2 over a range of 2
        ([1, 0, 0, 0], [0, 0, 0, 1], 1.5),  # underflow to overflow: 3 over 2
    ],
)
def test_wasserstein_hand_computed(expected: list[int], actual: list[int], value: float) -> None:
    assert wasserstein_binned(expected, actual, [0.0, 1.0, 2.0]) == pytest.approx(value)


def test_wasserstein_equals_scipy_on_midpoint_values() -> None:
    rng = np.random.default_rng(3)
    edges = [0.0, 0.5, 2.0, 3.0, 7.0]
    positions = bin_positions(edges)
    e, a = rng.integers(0, 30, 6), rng.integers(0, 30, 6)
    u = np.repeat(positions, e)
    v = np.repeat(positions, a)
    expected = stats.wasserstein_distance(u, v) / (edges[-1] - edges[0])
    assert wasserstein_binned(e, a, edges) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: psi([1, 2], [1, 2, 3]), "histograms of 2 and 3 bins"),
        (lambda: psi([0, 0], [1, 1]), "without counts"),
        (lambda: ks_binned([1, -1], [1, 1]), "must not be negative"),
        (lambda: js_distance([], []), "empty histograms"),
        (lambda: wasserstein_binned([1, 1, 1], [1, 1, 1], [0.0, 1.0, 2.0]), "do not fit 3 edges"),
    ],
)
def test_histogram_errors(call: object, message: str) -> None:
    with pytest.raises(DriftError, match=message):
        call()  # type: ignore[operator]


# ---------------------------------------------------------------- windows


@pytest.fixture(scope="module")
def baseline():  # type: ignore[no-untyped-def]
    return make_baseline()


def window(baseline, x):  # type: ignore[no-untyped-def]
    acc = SketchAccumulator(baseline.sketch)
    acc.update(x, logits(x))
    return acc.take()


def test_same_distribution_does_not_drift(baseline) -> None:  # type: ignore[no-untyped-def]
    counts = window(baseline, training_inputs(500, seed=7))
    for metric in METRICS:
        result = score_window(baseline, counts, metric=metric)
        assert not result.drifted, (metric, result.score)
    result = score_window(baseline, counts)
    assert result.metric == "psi" and result.threshold == 0.25
    assert result.n_samples == 500
    assert result.drifted_features == []
    assert 0 <= result.metrics["psi_mean"] <= result.metrics["psi"] < 0.25
    assert set(result.metrics) >= {"ks", "js", "wasserstein", "output_psi", "confidence_psi"}
    assert [f.index for f in result.features] == [0, 1, 2, 3]


def test_shifted_features_drift_and_are_named(baseline) -> None:  # type: ignore[no-untyped-def]
    x = training_inputs(500, seed=8)
    x[:, 1] += 2.0
    x[:, 3] *= 3.0
    counts = window(baseline, x)
    for metric in ("psi", "ks", "js", "wasserstein"):
        result = score_window(baseline, counts, metric=metric)
        assert result.drifted, metric
        assert set(result.drifted_features) == {1, 3}, (metric, result.drifted_features)
    psi_result = score_window(baseline, counts)
    by_index = {f.index: f.psi for f in psi_result.features}
    assert psi_result.drifted_features[0] == max(by_index, key=by_index.__getitem__)
    assert psi_result.score == max(by_index.values())
    # the shift moved predictions too
    assert score_window(baseline, counts, metric="output_psi").score > 0.05


def test_output_drift_alone(baseline) -> None:  # type: ignore[no-untyped-def]
    counts = window(baseline, training_inputs(500, seed=9))
    skewed = counts.model_copy(update={"class_counts": [500, 0, 0]})
    result = score_window(baseline, skewed, metric="output_js", threshold=0.3)
    assert result.drifted and result.drifted_features == []
    assert result.score == pytest.approx(
        jensenshannon(np.array(baseline.class_counts) / baseline.n_samples, [1, 0, 0], base=2)
    )


def test_window_without_outputs_scores_output_metric_zero(baseline) -> None:  # type: ignore[no-untyped-def]
    acc = SketchAccumulator(baseline.sketch)
    acc.update(training_inputs(100, seed=4), None)
    result = score_window(baseline, acc.take(), metric="output_psi")
    assert result.score == 0.0 and not result.drifted
    assert "output_psi" not in result.metrics


@pytest.mark.parametrize(
    ("change", "metric", "message"),
    [
        ({}, "kl", "unknown drift metric 'kl'; choose from: psi, ks, js, wasserstein"),
        ({"n_samples": 0}, "psi", "empty window"),
        ({"feature_counts": [[1, 2]]}, "psi", "the window has 1 features, the baseline 4"),
        ({"class_counts": [1, 2]}, "psi", "the window has 2 classes, the baseline 3"),
    ],
)
def test_window_errors(baseline, change, metric, message) -> None:  # type: ignore[no-untyped-def]
    counts = window(baseline, training_inputs(50, seed=5)).model_copy(update=change)
    with pytest.raises(DriftError, match=message):
        score_window(baseline, counts, metric=metric)


def test_other_bins_are_refused(baseline) -> None:  # type: ignore[no-untyped-def]
    counts = window(baseline, training_inputs(50, seed=5))
    rows = [list(r) for r in counts.feature_counts]
    rows[2] = rows[2][:-1]
    with pytest.raises(DriftError, match="feature 2: the window has"):
        score_window(baseline, counts.model_copy(update={"feature_counts": rows}))


def test_merge_counts_sums_bins(baseline) -> None:  # type: ignore[no-untyped-def]
    a = window(baseline, training_inputs(100, seed=10))
    b = window(baseline, training_inputs(300, seed=11))
    merged = merge_counts([a, b])
    assert merged.n_samples == 400
    assert (
        merged.feature_counts == (np.array(a.feature_counts) + np.array(b.feature_counts)).tolist()
    )
    assert merged.class_counts == [
        x + y for x, y in zip(a.class_counts, b.class_counts, strict=True)
    ]
    # merging then scoring equals scoring the union of the inputs
    both = window(
        baseline,
        np.concatenate([training_inputs(100, seed=10), training_inputs(300, seed=11)]),
    )
    assert score_window(baseline, merged).score == pytest.approx(score_window(baseline, both).score)


def test_merge_errors() -> None:
    with pytest.raises(DriftError, match="no windows"):
        merge_counts([])
    a = SketchCounts(n_samples=1, feature_counts=[[1, 0]], class_counts=[1], confidence_counts=[1])
    b = SketchCounts(
        n_samples=1, feature_counts=[[1, 0, 0]], class_counts=[1], confidence_counts=[1]
    )
    with pytest.raises(DriftError, match="window 1 has other bins than window 0"):
        merge_counts([a, b])
