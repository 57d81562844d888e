"""Quantization parameters of int8 post-training quantization (pure, numpy only).

The scheme is TFLite's int8 spec: activations per-tensor asymmetric int8 (zero point in
[-128, 127], the range always contains 0), weights per-channel symmetric int8 in
[-127, 127] with zero point 0, biases int32 with scale ``input_scale * weight_scale[c]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

_EPS = 1e-8


@dataclass(frozen=True)
class QParams:
    """Scale(s) and zero point(s) of one tensor; ``axis`` is set for per-channel params."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0


def activation_qparams(lo: float, hi: float) -> QParams:
    """Per-tensor asymmetric int8 params covering ``[lo, hi]`` (widened to contain 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / 255.0, _EPS)
    zero_point = int(np.clip(round(-128.0 - lo / scale), -128, 127))
    return QParams((scale,), (zero_point,))


def fixed_qparams(scale: float, zero_point: int) -> QParams:
    """Params the TFLite kernel prescribes (softmax: 1/256, -128; log-softmax: 16/256, 127)."""
    return QParams((scale,), (zero_point,))


def quantize_weights(
    weights: npt.NDArray[np.float32], *, axis: int
) -> tuple[npt.NDArray[np.int8], QParams]:
    """Per-channel symmetric int8 weights along ``axis``."""
    moved = np.moveaxis(weights, axis, 0).reshape(weights.shape[axis], -1)
    scales = np.maximum(np.abs(moved).max(axis=1) / 127.0, _EPS)
    shape = [1] * weights.ndim
    shape[axis] = -1
    q = np.clip(np.round(weights / scales.reshape(shape)), -127, 127).astype(np.int8)
    return q, QParams(tuple(float(s) for s in scales), (0,) * len(scales), axis)


def quantize_bias(
    bias: npt.NDArray[np.float32], *, input_scale: float, weight: QParams
) -> tuple[npt.NDArray[np.int32], QParams]:
    """int32 bias with per-channel scale ``input_scale * weight_scale[c]``."""
    scales = np.asarray(weight.scale, dtype=np.float64) * input_scale
    q = np.clip(np.round(bias.astype(np.float64) / scales), -(2**31), 2**31 - 1)
    return q.astype(np.int32), QParams(tuple(float(s) for s in scales), (0,) * len(scales), 0)


def quantize_tensor(values: npt.NDArray[Any], params: QParams) -> npt.NDArray[np.int8]:
    """Quantize a float tensor with per-tensor params (used for int8 constant operands)."""
    q = np.round(values / params.scale[0]) + params.zero_point[0]
    return np.clip(q, -128, 127).astype(np.int8)
