"""Drift sketches: the math both the cloud (training baseline) and the device (live sketches) run.

Drift is measured by comparing histograms of live data against the training baseline *on the
baseline's bin edges*, so the two sides must reduce inputs to features and bin them in exactly
the same way. This module is that one definition; it is pure (numpy and pydantic only) so the
agent can import it without any cloud dependency.

* :class:`FeatureReduction`: how an input tensor becomes a feature vector. Small inputs are
  flattened (one feature per element, e.g. the 64 pixels of 8x8 digits); images are average-pooled
  to a small grid per channel (the "per embedding dimension" view of an image) so a sketch stays a
  few KiB whatever the resolution.
* :func:`quantile_edges`: bin edges from the training data's quantiles (equal-mass bins).
* :func:`bin_counts`: counts with an underflow and an overflow bin, so mass outside the
  training range is visible as drift instead of being clipped away.
* :class:`SketchSpec`: what the device needs to compute sketches (reduction, edges per
  feature, number of classes, confidence edges); it travels in the capture policy.
* :class:`SketchAccumulator`: accumulates one window's :class:`SketchCounts`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Default largest feature count of a sketch (a 3x224x224 image pools to 3 x 9 x 9 = 243).
DEFAULT_MAX_FEATURES = 256
#: Default confidence bins: ten equal bins over [0, 1].
DEFAULT_CONFIDENCE_EDGES = [round(i / 10, 1) for i in range(11)]


class SketchError(ValueError):
    """A reduction, spec or batch that does not fit; the message names the values."""


class FeatureReduction(BaseModel):
    """How one input (without the batch axis) becomes a feature vector.

    ``flatten``: every element is a feature. ``avgpool``: the input is ``(C, H, W)`` (or
    ``(H, W)``) and each channel is average-pooled to ``grid`` = ``(gh, gw)`` cells.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["flatten", "avgpool"] = "flatten"
    input_shape: tuple[int, ...] = Field(min_length=1)
    grid: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _check(self) -> FeatureReduction:
        if any(d < 1 for d in self.input_shape):
            raise ValueError(f"input_shape {list(self.input_shape)} has a dimension < 1")
        if self.kind == "avgpool":
            if self.grid is None or min(self.grid) < 1:
                raise ValueError(f"avgpool needs a grid of two positive ints, got {self.grid}")
            if len(self.input_shape) not in (2, 3):
                raise ValueError(
                    "avgpool needs an input of shape (C, H, W) or (H, W), "
                    f"got {list(self.input_shape)}"
                )
            h, w = self.input_shape[-2:]
            if self.grid[0] > h or self.grid[1] > w:
                raise ValueError(f"grid {list(self.grid)} is larger than the image {[h, w]}")
        return self

    @property
    def num_features(self) -> int:
        """Length of the feature vector."""
        if self.kind == "flatten":
            return math.prod(self.input_shape)
        assert self.grid is not None
        channels = self.input_shape[0] if len(self.input_shape) == 3 else 1
        return channels * self.grid[0] * self.grid[1]


def choose_reduction(
    input_shape: tuple[int, ...] | list[int], max_features: int = DEFAULT_MAX_FEATURES
) -> FeatureReduction:
    """Flatten when the input has at most ``max_features`` elements, else pool per channel.

    Raises:
        SketchError: a large input that is not image-like (cannot be pooled).
    """
    shape = tuple(int(d) for d in input_shape)
    if math.prod(shape) <= max_features:
        return FeatureReduction(kind="flatten", input_shape=shape)
    if len(shape) not in (2, 3):
        raise SketchError(
            f"input shape {list(shape)} has {math.prod(shape)} elements (> {max_features}) and is "
            "not an image (C, H, W) or (H, W) that could be pooled; pass a reduction explicitly"
        )
    channels = shape[0] if len(shape) == 3 else 1
    side = max(1, math.isqrt(max(1, max_features // channels)))
    grid = (min(side, shape[-2]), min(side, shape[-1]))
    return FeatureReduction(kind="avgpool", input_shape=shape, grid=grid)


def _pool_axis(x: npt.NDArray[np.float64], axis: int, cells: int) -> npt.NDArray[np.float64]:
    # np.array_split keeps every element (uneven cells differ by one), unlike a reshape.
    parts = np.array_split(x, cells, axis=axis)
    return np.stack([p.mean(axis=axis) for p in parts], axis=axis)


def reduce_features(batch: npt.ArrayLike, reduction: FeatureReduction) -> npt.NDArray[np.float64]:
    """``(N, *input_shape)`` → ``(N, num_features)`` as float64.

    Raises:
        SketchError: the batch's shape is not ``(N, *reduction.input_shape)``.
    """
    x = np.asarray(batch, dtype=np.float64)
    if x.shape[1:] != tuple(reduction.input_shape):
        raise SketchError(
            f"batch of shape {list(x.shape)} does not match the sketch's input shape "
            f"(N, {', '.join(str(d) for d in reduction.input_shape)})"
        )
    n = x.shape[0]
    if reduction.kind == "flatten":
        return x.reshape(n, -1)
    assert reduction.grid is not None
    if len(reduction.input_shape) == 2:
        x = x[:, None]
    pooled = _pool_axis(_pool_axis(x, 2, reduction.grid[0]), 3, reduction.grid[1])
    return pooled.reshape(n, -1)


def quantile_edges(values: npt.ArrayLike, bins: int = 10) -> list[float]:
    """Strictly increasing edges at the quantiles of ``values`` (equal-mass bins).

    Repeated quantiles (a feature with few distinct values) collapse; a constant feature gets
    the edges ``[v - 0.5, v + 0.5]`` so any change of its value shows up as drift.

    Raises:
        SketchError: ``bins`` < 1 or no finite value.
    """
    if bins < 1:
        raise SketchError(f"bins must be >= 1, got {bins}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise SketchError("cannot compute bin edges: no finite value")
    edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:
        return [float(edges[0]) - 0.5, float(edges[0]) + 0.5]
    return [float(e) for e in edges]


def bin_counts(values: npt.ArrayLike, edges: list[float]) -> list[int]:
    """Counts of ``values`` in ``[underflow, bin_1 .. bin_k, overflow]`` (``k = len(edges)-1``).

    Bins are ``[e_i, e_i+1)`` except the last, which includes its upper edge; values below
    ``edges[0]`` go to underflow, above ``edges[-1]`` (and NaN) to overflow.

    Raises:
        SketchError: fewer than two edges, or edges not strictly increasing.
    """
    e = np.asarray(edges, dtype=np.float64)
    if e.size < 2 or not np.all(np.diff(e) > 0):
        raise SketchError(f"edges must be >= 2 strictly increasing numbers, got {list(edges)}")
    v = np.asarray(values, dtype=np.float64).ravel()
    idx = np.searchsorted(e, v, side="right")  # 0 = underflow, len(e) = overflow
    idx[v == e[-1]] = e.size - 1  # the last bin is closed
    idx[np.isnan(v)] = e.size
    return [int(c) for c in np.bincount(idx, minlength=e.size + 1)]


def confidence_top1(
    outputs: npt.ArrayLike,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Top-1 probability and class per row of ``(N, K)`` outputs.

    Rows that are already probabilities (in [0, 1], summing to 1) are used as they are; other
    rows are treated as logits and soft-maxed.
    """
    y = np.asarray(outputs, dtype=np.float64)
    y = y.reshape(y.shape[0], -1)
    is_prob = np.all((y >= 0) & (y <= 1), axis=1) & np.isclose(y.sum(axis=1), 1.0, atol=1e-3)
    z = y - y.max(axis=1, keepdims=True)
    soft = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    probs = np.where(is_prob[:, None], y, soft)
    top1 = probs.argmax(axis=1).astype(np.int64)
    return probs[np.arange(probs.shape[0]), top1], top1


def entropy(outputs: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Normalized prediction entropy per row (0 = certain, 1 = uniform), logits or probs."""
    y = np.asarray(outputs, dtype=np.float64)
    y = y.reshape(y.shape[0], -1)
    is_prob = np.all((y >= 0) & (y <= 1), axis=1) & np.isclose(y.sum(axis=1), 1.0, atol=1e-3)
    z = y - y.max(axis=1, keepdims=True)
    probs = np.where(is_prob[:, None], y, np.exp(z) / np.exp(z).sum(axis=1, keepdims=True))
    k = probs.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1)
    return h / math.log(k) if k > 1 else np.zeros_like(h)


class SketchSpec(BaseModel):
    """What a device needs to sketch one model's traffic (part of the capture policy)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    reduction: FeatureReduction
    feature_edges: list[list[float]]
    num_classes: int = Field(ge=1)
    confidence_edges: list[float] = Field(default_factory=lambda: list(DEFAULT_CONFIDENCE_EDGES))

    @model_validator(mode="after")
    def _check(self) -> SketchSpec:
        if len(self.feature_edges) != self.reduction.num_features:
            raise ValueError(
                f"{len(self.feature_edges)} feature edge lists for "
                f"{self.reduction.num_features} features"
            )
        for i, edges in enumerate([*self.feature_edges, self.confidence_edges]):
            if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
                name = f"feature {i}" if i < len(self.feature_edges) else "confidence"
                raise ValueError(f"{name} edges must be >= 2 strictly increasing numbers")
        return self


class SketchCounts(BaseModel):
    """One window's counts, all on the spec's edges (each with underflow and overflow bins)."""

    model_config = ConfigDict(extra="forbid")

    n_samples: int = Field(ge=0)
    feature_counts: list[list[int]]
    class_counts: list[int]
    confidence_counts: list[int]


class SketchAccumulator:
    """Accumulates counts for one window; :meth:`take` returns them and starts a new one."""

    def __init__(self, spec: SketchSpec) -> None:
        self.spec = spec
        self._reset()

    def _reset(self) -> None:
        spec = self.spec
        self._n = 0
        self._features = np.zeros(
            (spec.reduction.num_features, max(len(e) for e in spec.feature_edges) + 1), np.int64
        )
        self._classes = np.zeros(spec.num_classes, np.int64)
        self._confidence = np.zeros(len(spec.confidence_edges) + 1, np.int64)

    def update(self, inputs: npt.ArrayLike, outputs: npt.ArrayLike | None) -> None:
        """Add a batch of inputs ``(N, *input_shape)`` and, if known, outputs ``(N, K)``.

        Raises:
            SketchError: shapes that do not match the spec (nothing is counted then).
        """
        feats = reduce_features(inputs, self.spec.reduction)
        rows = [bin_counts(feats[:, j], e) for j, e in enumerate(self.spec.feature_edges)]
        if outputs is not None:
            out = np.asarray(outputs)
            if out.shape[0] != feats.shape[0]:
                raise SketchError(f"{out.shape[0]} outputs for {feats.shape[0]} inputs")
            conf, top1 = confidence_top1(out)
            if top1.size and int(top1.max()) >= self.spec.num_classes:
                raise SketchError(
                    f"output has class {int(top1.max())}, the sketch knows "
                    f"{self.spec.num_classes} classes"
                )
            self._classes += np.bincount(top1, minlength=self.spec.num_classes)
            self._confidence += np.asarray(bin_counts(conf, self.spec.confidence_edges))
        for j, row in enumerate(rows):
            self._features[j, : len(row)] += np.asarray(row)
        self._n += feats.shape[0]

    @property
    def n_samples(self) -> int:
        """Samples counted in the current window."""
        return self._n

    def take(self) -> SketchCounts:
        """The current window's counts; the accumulator starts a new window."""
        counts = SketchCounts(
            n_samples=self._n,
            feature_counts=[
                [int(c) for c in self._features[j, : len(e) + 1]]
                for j, e in enumerate(self.spec.feature_edges)
            ],
            class_counts=[int(c) for c in self._classes],
            confidence_counts=[int(c) for c in self._confidence],
        )
        self._reset()
        return counts


def baseline_spec(
    inputs: npt.ArrayLike,
    num_classes: int,
    *,
    bins: int = 10,
    reduction: FeatureReduction | None = None,
    max_features: int = DEFAULT_MAX_FEATURES,
) -> SketchSpec:
    """A :class:`SketchSpec` whose feature edges are the quantiles of training ``inputs``."""
    x = np.asarray(inputs)
    red = reduction or choose_reduction(tuple(x.shape[1:]), max_features)
    feats = reduce_features(x, red)
    edges = [quantile_edges(feats[:, j], bins) for j in range(feats.shape[1])]
    return SketchSpec(reduction=red, feature_edges=edges, num_classes=num_classes)
