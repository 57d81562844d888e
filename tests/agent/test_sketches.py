"""Table tests of the drift-sketch math shared by the device and the cloud."""

from __future__ import annotations

import numpy as np
import pytest

from agent.sketches import (
    FeatureReduction,
    SketchAccumulator,
    SketchError,
    SketchSpec,
    baseline_spec,
    bin_counts,
    choose_reduction,
    confidence_top1,
    entropy,
    quantile_edges,
    reduce_features,
)


@pytest.mark.parametrize(
    ("values", "edges", "expected"),
    [
        ([0.5, 1.5, 2.5], [0, 1, 2, 3], [0, 1, 1, 1, 0]),
        ([-1, 0, 3, 4], [0, 1, 2, 3], [1, 1, 0, 1, 1]),  # 3 is in the closed last bin
        ([1, 1, 1], [0, 1, 2], [0, 0, 3, 0]),
        ([float("nan")], [0, 1], [0, 0, 1]),
        ([], [0, 1], [0, 0, 0]),
    ],
)
def test_bin_counts(values: list[float], edges: list[float], expected: list[int]) -> None:
    assert bin_counts(values, edges) == expected


@pytest.mark.parametrize("edges", [[1.0], [0.0, 0.0], [2.0, 1.0]])
def test_bin_counts_refuses_bad_edges(edges: list[float]) -> None:
    with pytest.raises(SketchError, match="strictly increasing"):
        bin_counts([1.0], edges)


@pytest.mark.parametrize(
    ("values", "bins", "expected"),
    [
        (list(range(11)), 10, [float(i) for i in range(11)]),
        ([3, 3, 3], 4, [2.5, 3.5]),
        ([0, 0, 0, 1], 4, [0.0, 0.25, 1.0]),
    ],
)
def test_quantile_edges(values: list[float], bins: int, expected: list[float]) -> None:
    assert quantile_edges(values, bins) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("shape", "kind", "features"),
    [
        ((64,), "flatten", 64),
        ((1, 8, 8), "flatten", 64),
        ((3, 224, 224), "avgpool", 243),
        ((28, 28), "avgpool", 256),
    ],
)
def test_choose_reduction(shape: tuple[int, ...], kind: str, features: int) -> None:
    red = choose_reduction(shape)
    assert (red.kind, red.num_features) == (kind, features)
    x = np.random.default_rng(0).normal(size=(2, *shape))
    assert reduce_features(x, red).shape == (2, features)


def test_choose_reduction_refuses_large_non_image() -> None:
    with pytest.raises(SketchError, match=r"\[4, 100, 10, 10\]"):
        choose_reduction((4, 100, 10, 10))


def test_avgpool_is_block_mean() -> None:
    red = FeatureReduction(kind="avgpool", input_shape=(1, 4, 4), grid=(2, 2))
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    assert reduce_features(x, red).tolist() == [[2.5, 4.5, 10.5, 12.5]]


def test_reduce_refuses_wrong_shape() -> None:
    red = FeatureReduction(input_shape=(8,))
    with pytest.raises(SketchError, match=r"\[3, 9\].*\(N, 8\)"):
        reduce_features(np.zeros((3, 9)), red)


def test_confidence_of_probabilities_and_logits() -> None:
    conf, top1 = confidence_top1([[0.1, 0.9], [0.0, 0.0]])
    assert top1.tolist() == [1, 0]
    assert conf == pytest.approx([0.9, 0.5])
    assert entropy([[1.0, 0.0], [0.5, 0.5]]) == pytest.approx([0.0, 1.0])


def test_accumulator_window_counts_and_reset() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(500, 4))
    spec = baseline_spec(train, num_classes=3, bins=5)
    acc = SketchAccumulator(spec)
    acc.update(train[:100], np.eye(3)[rng.integers(0, 3, 100)])
    acc.update(train[100:150] + 100.0, None)  # shifted far right: overflow bins
    counts = acc.take()
    assert counts.n_samples == 150
    assert all(sum(row) == 150 for row in counts.feature_counts)
    assert all(row[-1] >= 50 for row in counts.feature_counts)
    assert sum(counts.class_counts) == 100 == sum(counts.confidence_counts)
    assert acc.take().n_samples == 0


def test_spec_validates_edges_against_features() -> None:
    red = FeatureReduction(input_shape=(2,))
    with pytest.raises(ValueError, match="1 feature edge lists for 2 features"):
        SketchSpec(reduction=red, feature_edges=[[0.0, 1.0]], num_classes=2)
    with pytest.raises(SketchError, match="class 2"):
        acc = SketchAccumulator(
            SketchSpec(reduction=red, feature_edges=[[0.0, 1.0]] * 2, num_classes=2)
        )
        acc.update(np.zeros((1, 2)), np.array([[0.0, 0.0, 1.0]]))
