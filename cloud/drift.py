"""Drift statistics: a device's sketch window against the model's training baseline (pure).

Both sides count on the baseline's bin edges (:mod:`agent.sketches`), so every statistic here
compares two histograms of the same bins ``[underflow, bin_1 .. bin_k, overflow]``:

* :func:`psi`: population stability index ``sum((a_i - e_i) * ln(a_i / e_i))`` over the
  bins' proportions. An empty bin would make the log infinite, so every proportion is floored
  at :data:`PSI_EPSILON` (``1e-4``, i.e. "less than one in ten thousand") before the sum; the
  floored proportions are not renormalized. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate,
  > 0.25 major shift.
* :func:`ks_binned`: Kolmogorov-Smirnov statistic on the binned CDFs, ``max |A_i - E_i|``
  (the exact KS statistic of the two samples where it is evaluated at the bin edges, a lower
  bound of the unbinned one). In [0, 1].
* :func:`js_distance`: Jensen-Shannon distance (base 2, :func:`scipy.spatial.distance.
  jensenshannon`), in [0, 1].
* :func:`wasserstein_binned`: earth mover's distance between the histograms with each bin's
  mass at its midpoint (under/overflow half a mean bin width beyond the outer edges, so mass
  outside the training range counts as at least that far), divided by the training range
  ``edges[-1] - edges[0]``: 1.0 means all mass moved across the whole training range.
  :func:`scipy.stats.wasserstein_distance` with weights.

Per window (:func:`score_window`) every feature metric is computed per feature; the
window's value of a feature metric is the **maximum over features** (``<metric>``, which
thresholds compare) and the mean is reported too (``<metric>_mean``). Output drift compares
the window's predicted-class counts with the model's predictions on the training set
(``output_psi``, ``output_js``) and the top-1 confidence histogram (``confidence_psi``). A
window drifts when the policy's metric reaches its threshold; ``drifted_features`` lists the
features whose own value of a feature metric reaches it, worst first.

:func:`merge_counts` sums windows (devices of a group, or every device of a model version)
into one, which is then scored like a single window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from agent.sketches import SketchCounts
from cloud.baseline import TrainingBaseline

#: Floor of every bin proportion in :func:`psi` (an empty bin would make it infinite).
PSI_EPSILON = 1e-4
FEATURE_METRICS = ("psi", "ks", "js", "wasserstein")
OUTPUT_METRICS = ("output_psi", "output_js", "confidence_psi")
METRICS = FEATURE_METRICS + OUTPUT_METRICS
Metric = Literal["psi", "ks", "js", "wasserstein", "output_psi", "output_js", "confidence_psi"]
#: Default thresholds per metric (PSI's "major shift"; the others roughly matched to it).
DEFAULT_THRESHOLDS: dict[str, float] = {
    "psi": 0.25,
    "ks": 0.2,
    "js": 0.2,
    "wasserstein": 0.1,
    "output_psi": 0.25,
    "output_js": 0.2,
    "confidence_psi": 0.25,
}
#: Most features listed in ``drifted_features``.
MAX_DRIFTED_FEATURES = 32

Counts = Sequence[int] | Sequence[float] | npt.NDArray[np.int64] | npt.NDArray[np.float64]


class DriftError(ValueError):
    """Histograms or windows that cannot be compared; the message names the mismatch."""


def check_metric(metric: str) -> str:
    """``metric`` if known, else DriftError naming it and the choices."""
    if metric not in METRICS:
        raise DriftError(f"unknown drift metric {metric!r}; choose from: {', '.join(METRICS)}")
    return metric


def _pair(expected: Counts, actual: Counts) -> tuple[npt.NDArray[np.float64], ...]:
    e = np.asarray(expected, dtype=np.float64).ravel()
    a = np.asarray(actual, dtype=np.float64).ravel()
    if e.shape != a.shape:
        raise DriftError(f"histograms of {e.size} and {a.size} bins cannot be compared")
    if e.size == 0:
        raise DriftError("empty histograms cannot be compared")
    if np.any(e < 0) or np.any(a < 0):
        raise DriftError("histogram counts must not be negative")
    if e.sum() <= 0 or a.sum() <= 0:
        raise DriftError(
            f"a histogram without counts cannot be compared (expected {e.sum():g}, "
            f"actual {a.sum():g})"
        )
    return e / e.sum(), a / a.sum()


def psi(expected: Counts, actual: Counts, *, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of ``actual`` against ``expected`` (counts of the same bins).

    Raises:
        DriftError: different bin counts, negative or no counts.
    """
    e, a = _pair(expected, actual)
    e = np.maximum(e, epsilon)
    a = np.maximum(a, epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_binned(expected: Counts, actual: Counts) -> float:
    """KS statistic of the two histograms' CDFs at the bin edges, in [0, 1].

    Raises:
        DriftError: different bin counts, negative or no counts.
    """
    e, a = _pair(expected, actual)
    return float(np.max(np.abs(np.cumsum(a) - np.cumsum(e))))


def js_distance(expected: Counts, actual: Counts) -> float:
    """Jensen-Shannon distance (base 2) of the two histograms, in [0, 1].

    Raises:
        DriftError: different bin counts, negative or no counts.
    """
    from scipy.spatial.distance import jensenshannon  # type: ignore[import-untyped]

    e, a = _pair(expected, actual)
    return float(jensenshannon(e, a, base=2.0))


def bin_positions(edges: Sequence[float]) -> npt.NDArray[np.float64]:
    """Where :func:`wasserstein_binned` puts each bin's mass: midpoints, and the under/overflow
    bins half a mean bin width beyond the outer edges."""
    e = np.asarray(edges, dtype=np.float64)
    if e.size < 2 or not np.all(np.diff(e) > 0):
        raise DriftError(f"edges must be >= 2 strictly increasing numbers, got {list(edges)}")
    half = float(np.mean(np.diff(e))) / 2
    return np.concatenate([[e[0] - half], (e[:-1] + e[1:]) / 2, [e[-1] + half]])


def wasserstein_binned(expected: Counts, actual: Counts, edges: Sequence[float]) -> float:
    """Earth mover's distance of two histograms on ``edges`` over the range of ``edges``.

    Raises:
        DriftError: bins that do not fit the edges (``len(edges) + 1`` with under/overflow),
            negative or no counts.
    """
    from scipy.stats import wasserstein_distance  # type: ignore[import-untyped]

    e, a = _pair(expected, actual)
    positions = bin_positions(edges)
    if positions.size != e.size:
        raise DriftError(f"{e.size} bins do not fit {len(edges)} edges (need {positions.size})")
    width = float(edges[-1]) - float(edges[0])
    return float(wasserstein_distance(positions, positions, e, a)) / width


class FeatureDrift(BaseModel):
    """The feature metrics of one feature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    psi: float
    ks: float
    js: float
    wasserstein: float


class WindowDrift(BaseModel):
    """A window's drift: aggregate metric values, the policy's score and drifted features."""

    model_config = ConfigDict(extra="forbid")

    n_samples: int
    metric: str
    threshold: float
    score: float = Field(description="The window's value of ``metric``.")
    drifted: bool
    metrics: dict[str, float] = Field(
        description="Per feature metric its max (name) and mean (name_mean) over features; "
        "output_psi, output_js and confidence_psi when the window has outputs."
    )
    drifted_features: list[int] = Field(
        description="Features whose value of the (feature) metric reaches the threshold, "
        "worst first."
    )
    features: list[FeatureDrift]


def feature_drift(baseline: TrainingBaseline, counts: SketchCounts) -> list[FeatureDrift]:
    """Every feature metric of every feature of ``counts`` against ``baseline``.

    Raises:
        DriftError: ``counts`` has another number of features or bins than the baseline.
    """
    expected = baseline.feature_counts
    if len(counts.feature_counts) != len(expected):
        raise DriftError(
            f"the window has {len(counts.feature_counts)} features, the baseline {len(expected)}"
        )
    out = []
    for j, (e, a) in enumerate(zip(expected, counts.feature_counts, strict=True)):
        if len(e) != len(a):
            raise DriftError(
                f"feature {j}: the window has {len(a)} bins, the baseline {len(e)} "
                "(sketched on other edges?)"
            )
        edges = baseline.sketch.feature_edges[j]
        out.append(
            FeatureDrift(
                index=j,
                psi=psi(e, a),
                ks=ks_binned(e, a),
                js=js_distance(e, a),
                wasserstein=wasserstein_binned(e, a, edges),
            )
        )
    return out


def output_drift(baseline: TrainingBaseline, counts: SketchCounts) -> dict[str, float]:
    """``output_psi``, ``output_js`` (predicted classes) and ``confidence_psi`` (top-1
    confidence) of ``counts`` against the baseline; empty when the window saw no outputs.

    Raises:
        DriftError: another number of classes or confidence bins than the baseline.
    """
    if sum(counts.class_counts) == 0:
        return {}
    if len(counts.class_counts) != len(baseline.class_counts):
        raise DriftError(
            f"the window has {len(counts.class_counts)} classes, the baseline "
            f"{len(baseline.class_counts)}"
        )
    result = {
        "output_psi": psi(baseline.class_counts, counts.class_counts),
        "output_js": js_distance(baseline.class_counts, counts.class_counts),
    }
    if sum(counts.confidence_counts) > 0:
        result["confidence_psi"] = psi(baseline.confidence_counts, counts.confidence_counts)
    return result


def score_window(
    baseline: TrainingBaseline,
    counts: SketchCounts,
    *,
    metric: str = "psi",
    threshold: float | None = None,
) -> WindowDrift:
    """Score one window (or merged windows) against the baseline under a policy.

    Args:
        baseline: the model version's training baseline.
        counts: the window's counts on the baseline's edges.
        metric: one of :data:`METRICS`; the window's ``score`` is its value.
        threshold: the window drifts when ``score >= threshold`` (default:
            :data:`DEFAULT_THRESHOLDS`).

    Returns:
        The window's drift. An output metric on a window without outputs scores 0.

    Raises:
        DriftError: an unknown metric, an empty window, or counts on other bins.
    """
    check_metric(metric)
    limit = DEFAULT_THRESHOLDS[metric] if threshold is None else float(threshold)
    if counts.n_samples < 1:
        raise DriftError("an empty window (0 samples) has no drift score")
    features = feature_drift(baseline, counts)
    metrics: dict[str, float] = {}
    for name in FEATURE_METRICS:
        values = [getattr(f, name) for f in features]
        metrics[name] = max(values) if values else 0.0
        metrics[f"{name}_mean"] = float(np.mean(values)) if values else 0.0
    metrics.update(output_drift(baseline, counts))
    score = metrics.get(metric, 0.0)
    drifted_features: list[int] = []
    if metric in FEATURE_METRICS:
        worst = sorted(features, key=lambda f: getattr(f, metric), reverse=True)
        drifted_features = [f.index for f in worst if getattr(f, metric) >= limit][
            :MAX_DRIFTED_FEATURES
        ]
    return WindowDrift(
        n_samples=counts.n_samples,
        metric=metric,
        threshold=limit,
        score=score,
        drifted=score >= limit,
        metrics=metrics,
        drifted_features=drifted_features,
        features=features,
    )


def merge_counts(windows: Sequence[SketchCounts]) -> SketchCounts:
    """The bin-wise sum of windows on the same edges (for group or model aggregation).

    Raises:
        DriftError: no window, or windows of different shapes.
    """
    if not windows:
        raise DriftError("nothing to merge: no windows")
    first = windows[0]

    def shape(c: SketchCounts) -> tuple[object, ...]:
        return (
            tuple(len(r) for r in c.feature_counts),
            len(c.class_counts),
            len(c.confidence_counts),
        )

    for i, window in enumerate(windows[1:], start=1):
        if shape(window) != shape(first):
            raise DriftError(f"window {i} has other bins than window 0; cannot merge them")
    return SketchCounts(
        n_samples=sum(w.n_samples for w in windows),
        feature_counts=[
            [sum(col) for col in zip(*rows, strict=True)]
            for rows in zip(*(w.feature_counts for w in windows), strict=True)
        ],
        class_counts=[sum(col) for col in zip(*(w.class_counts for w in windows), strict=True)],
        confidence_counts=[
            sum(col) for col in zip(*(w.confidence_counts for w in windows), strict=True)
        ],
    )
