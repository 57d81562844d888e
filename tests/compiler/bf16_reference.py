"""What a bf16 1x1 kernel must compute, for the vdpbf16ps and AMX kernels' tests: operands,
and numpy's result on the same bf16-rounded operands."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from compiler.fusion_plan import PointwiseShape, bf16_bits


def from_bits(bits: np.ndarray) -> np.ndarray:
    """The fp32 values of bf16 bit patterns."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class Operands(NamedTuple):
    x: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    residual: np.ndarray


def operands(shape: PointwiseShape) -> Operands:
    c, co, h, w = shape.in_channels, shape.out_channels, shape.height, shape.width
    rng = np.random.default_rng(1)
    return Operands(
        rng.standard_normal((1, c, h, w)).astype(np.float32),
        (rng.standard_normal((co, c)) / np.sqrt(c)).astype(np.float32),
        rng.standard_normal(co).astype(np.float32),
        rng.standard_normal((1, co, h, w)).astype(np.float32),
    )


def assert_bf16_convolution(shape: PointwiseShape, ops: Operands, out: np.ndarray) -> None:
    """``out`` is the convolution of the bf16-rounded operands (+ bias, residual, activation),
    summed in fp32, and (where nothing follows the sums) not the fp32 convolution."""
    xb = from_bits(bf16_bits(ops.x)).astype(np.float64)
    wb = from_bits(bf16_bits(ops.weight)).astype(np.float64)
    expected = np.einsum("oc,chw->ohw", wb, xb[0])[None] + ops.bias[None, :, None, None]
    if shape.residual:
        expected += ops.residual
    if shape.activation == "relu6":
        expected = np.clip(expected, 0, 6)
    elif shape.activation == "relu":
        expected = np.maximum(expected, 0)
    # The products are exact in fp32; only the order of the fp32 sums differs.
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    if shape.activation is None and not shape.residual:  # and bf16, not fp32, products
        exact = np.einsum("oc,chw->ohw", ops.weight.astype(np.float64), ops.x[0].astype(np.float64))
        assert np.abs(exact + ops.bias[:, None, None] - out[0]).max() > 1e-3


def bf16_report(model: Path, profile: str, out: Path, signing_key: Path) -> dict[str, Any]:
    """``model`` compiled for ``profile`` in bf16 (untuned, TVM shipped) to ``out``: the
    report, its accuracy gate run on this host."""
    from compiler.pipeline import CompileRequest, compile_model
    from compiler.settings import CompilerSettings

    request = CompileRequest(
        model=model,
        profile=profile,
        output=out,
        trials=0,
        runtime="tvm",
        precision="bf16",
        signing_key=signing_key,
    )
    return compile_model(request, settings=CompilerSettings()).report
