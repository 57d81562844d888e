"""The training baseline: the statistics of a model's training data that drift is measured
against (issue #6 compares device sketches with it).

It is computed with :mod:`agent.sketches`, the very code a device runs, so device and cloud
reduce inputs to features and bin them identically:

* ``sketch``: the :class:`~agent.sketches.SketchSpec` (reduction, per-feature edges at the
  training inputs' quantiles, confidence edges); it travels to devices in the capture policy.
* ``feature_counts``, ``class_counts`` (the model's top-1 predictions),
  ``confidence_counts``: the training set counted on those edges by
  :class:`~agent.sketches.SketchAccumulator`; ``label_counts``: the true labels.
* ``feature_quantiles``: per feature, the values at ``quantile_levels``.
* ``reservoir``: up to ``reservoir_size`` rows of reduced training features (a seeded uniform
  sample, 7 significant digits) for two-sample tests (KS, Wasserstein) on the cloud side.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.sketches import (
    SketchAccumulator,
    SketchError,
    SketchSpec,
    baseline_spec,
    reduce_features,
)
from cloud.errors import CloudError, DatasetError

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DEFAULT_RESERVOIR = 2000
MAX_RESERVOIR = 2000

Outputs = npt.NDArray[np.floating] | Callable[[npt.NDArray[np.float32]], npt.ArrayLike]


class TrainingBaseline(BaseModel):
    """Statistics of the training set, on the sketch's edges (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    sketch: SketchSpec
    classes: list[str]
    n_samples: int = Field(ge=1)
    feature_counts: list[list[int]]
    class_counts: list[int]
    label_counts: list[int]
    confidence_counts: list[int]
    quantile_levels: list[float]
    feature_quantiles: list[list[float]]
    reservoir: list[list[float]] = Field(max_length=MAX_RESERVOIR)

    @model_validator(mode="after")
    def _check(self) -> TrainingBaseline:
        k = len(self.classes)
        if self.sketch.num_classes != k or len(self.class_counts) != k:
            raise ValueError(f"class counts/sketch do not match the {k} classes")
        if len(self.label_counts) != k:
            raise ValueError(f"{len(self.label_counts)} label counts for {k} classes")
        n_feat = self.sketch.reduction.num_features
        if len(self.feature_counts) != n_feat or len(self.feature_quantiles) != n_feat:
            raise ValueError(f"feature counts/quantiles do not match the {n_feat} features")
        if any(len(row) != n_feat for row in self.reservoir):
            raise ValueError(f"reservoir rows must have {n_feat} features")
        return self

    @property
    def num_features(self) -> int:
        """Features per sample after the sketch's reduction."""
        return self.sketch.reduction.num_features

    def reservoir_array(self) -> npt.NDArray[np.float64]:
        """The reservoir as ``(rows, num_features)``."""
        return np.asarray(self.reservoir, dtype=np.float64).reshape(-1, self.num_features)


def compute_baseline(
    outputs: Outputs,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    classes: Sequence[str],
    *,
    bins: int = 10,
    quantile_levels: Sequence[float] = DEFAULT_QUANTILES,
    reservoir_size: int = DEFAULT_RESERVOIR,
    seed: int = 0,
    batch_size: int = 512,
) -> TrainingBaseline:
    """The baseline of training inputs ``x`` (``(N, *input_shape)``), labels ``y`` and the
    model's ``outputs`` on ``x``: an ``(N, K)`` array of logits/probabilities, or a function
    from a float32 batch to such an array (called on batches of ``batch_size``).

    Raises:
        DatasetError: empty data, mismatched lengths, labels or outputs that do not fit the
            classes, or a reservoir size outside 0..2000.
    """
    xs = np.asarray(x, dtype=np.float32)
    ys = np.asarray(y, dtype=np.int64).ravel()
    k = len(classes)
    if xs.ndim < 2 or xs.shape[0] == 0:
        raise DatasetError(f"baseline needs a non-empty batch (N, ...), got {list(xs.shape)}")
    if ys.shape[0] != xs.shape[0]:
        raise DatasetError(f"baseline: {xs.shape[0]} inputs but {ys.shape[0]} labels")
    if ys.size and (ys.min() < 0 or ys.max() >= k):
        raise DatasetError(f"baseline: labels must be in 0..{k - 1} ({k} classes)")
    if not 0 <= reservoir_size <= MAX_RESERVOIR:
        raise DatasetError(f"reservoir_size must be in 0..{MAX_RESERVOIR}, got {reservoir_size}")
    if callable(outputs):
        fn = outputs
        parts = [
            np.asarray(fn(xs[i : i + batch_size]), dtype=np.float64)
            for i in range(0, xs.shape[0], batch_size)
        ]
        out = np.concatenate(parts)
    else:
        out = np.asarray(outputs, dtype=np.float64)
    out = out.reshape(out.shape[0], -1) if out.ndim else out
    if out.shape != (xs.shape[0], k):
        raise DatasetError(
            f"baseline: model outputs have shape {list(out.shape)}, expected "
            f"[{xs.shape[0]}, {k}] ({k} classes)"
        )
    try:
        spec = baseline_spec(xs, k, bins=bins)
        acc = SketchAccumulator(spec)
        acc.update(xs, out)
        counts = acc.take()
        feats = reduce_features(xs, spec.reduction)
    except SketchError as err:
        raise DatasetError(f"baseline: {err}") from err
    levels = [float(q) for q in quantile_levels]
    quantiles = np.quantile(feats, levels, axis=0).T  # (features, levels)
    rng = np.random.default_rng(seed)
    n_res = min(reservoir_size, feats.shape[0])
    rows = np.sort(rng.choice(feats.shape[0], size=n_res, replace=False))
    sample = feats[rows]
    return TrainingBaseline(
        sketch=spec,
        classes=list(classes),
        n_samples=int(xs.shape[0]),
        feature_counts=counts.feature_counts,
        class_counts=counts.class_counts,
        label_counts=[int(c) for c in np.bincount(ys, minlength=k)],
        confidence_counts=counts.confidence_counts,
        quantile_levels=levels,
        feature_quantiles=[[float(v) for v in row] for row in quantiles],
        reservoir=[[float(f"{v:.7g}") for v in row] for row in sample],
    )


def save_baseline(baseline: TrainingBaseline, path: Path) -> Path:
    """Write ``baseline`` as JSON at ``path`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(baseline.model_dump_json())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would survive the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_baseline(path: Path) -> TrainingBaseline:
    """Read a baseline written by :func:`save_baseline`.

    Raises:
        CloudError: the file is missing or not a valid baseline (naming the file).
    """
    try:
        return TrainingBaseline.model_validate_json(path.read_bytes())
    except FileNotFoundError as err:
        raise CloudError(f"baseline file {str(path)!r} does not exist") from err
    except (ValidationError, json.JSONDecodeError) as err:
        raise CloudError(f"baseline file {str(path)!r} is not a valid baseline: {err}") from err
