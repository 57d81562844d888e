"""The depthwise kernel for the 3x3 depthwise convolutions the fused blocks leave (maps up to
28 wide): its pure plan, what it computes against torch, and the Relax rewrite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compiler.fusion_plan import (
    AVX2,
    AVX512,
    DepthwiseConfig,
    DepthwiseShape,
    VectorUnit,
    plan_depthwise,
)


@pytest.mark.parametrize(
    ("shape", "unit", "expected"),
    [
        # MobileNetV2's: 14 wide is 2 AVX2 registers a row; next to the 9 weights, 3 rows
        # fit in its 16 registers and 2 divide 14; AVX-512's 32 hold all 14 rows of 1.
        (DepthwiseShape(576, 14, 14, 1, "relu6"), AVX2, DepthwiseConfig(16, 2, 14)),
        (DepthwiseShape(576, 14, 14, 1, "relu6"), AVX512, DepthwiseConfig(16, 14, 14)),
        (DepthwiseShape(960, 7, 7, 1, "relu6"), AVX2, DepthwiseConfig(8, 7, 7)),
        (DepthwiseShape(576, 14, 14, 2, "relu6"), AVX2, DepthwiseConfig(8, 7, 7)),
        # 9 rows, at most 3 a block: 3 blocks of 3
        (DepthwiseShape(8, 9, 9), AVX2, DepthwiseConfig(16, 3, 9)),
        (DepthwiseShape(8, 11, 11), AVX512, DepthwiseConfig(16, 11, 11)),
        # 11 rows (a prime above the limit): row by row
        (DepthwiseShape(8, 11, 11), AVX2, DepthwiseConfig(16, 1, 11)),
        (DepthwiseShape(8, 28, 28), AVX2, DepthwiseConfig(32, 1, 28)),
        (DepthwiseShape(8, 28, 28), AVX512, DepthwiseConfig(32, 7, 28)),
        (DepthwiseShape(8, 29, 29), AVX2, None),  # wider: fused blocks or MetaSchedule
        # AVX-512 (bf16 AMX builds' split blocks): up to 112 wide, 7 registers a row
        (DepthwiseShape(144, 56, 56, 1, "relu6"), AVX512, DepthwiseConfig(64, 4, 56)),
        (DepthwiseShape(96, 112, 112, 2, "relu6"), AVX512, DepthwiseConfig(64, 4, 56)),
        (DepthwiseShape(32, 112, 112), AVX512, DepthwiseConfig(112, 2, 112)),
        (DepthwiseShape(8, 113, 113), AVX512, None),
        (DepthwiseShape(8, 14, 14, 3), AVX2, None),
        (DepthwiseShape(0, 14, 14), AVX2, None),
    ],
    ids=str,
)
def test_plan_depthwise(shape: DepthwiseShape, unit: VectorUnit, expected: object) -> None:
    assert plan_depthwise(shape, unit=unit) == expected


def test_plane_columns_reach_every_tap() -> None:
    config = DepthwiseConfig(columns=16, rows=2, padded_rows=14)
    # stride 1: output column j reads j .. j + 2; stride 2: phase kw % 2 at j + kw // 2
    assert config.plane_columns(1) == 18 and config.plane_columns(2) == 17
    assert config.plane_rows == 16


def test_depthwise_description() -> None:
    assert DepthwiseShape(576, 14, 14, 2, "relu6").describe() == (
        "depthwise 3x3 576 stride 2 at 14x14 + ReLU6"
    )
    assert DepthwiseShape(8, 7, 7).describe() == "depthwise 3x3 8 at 7x7"


def _torch_depthwise(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, shape: DepthwiseShape
) -> np.ndarray:
    y = nn.functional.conv2d(
        torch.from_numpy(x),
        torch.from_numpy(weight[:, None]),
        torch.from_numpy(bias),
        stride=shape.stride,
        padding=1,
        groups=shape.channels,
    )
    if shape.activation == "relu6":
        y = y.clamp(0, 6)
    elif shape.activation == "relu":
        y = y.clamp(min=0)
    return y.numpy()


@pytest.mark.parametrize("unit", [AVX2, AVX512], ids=lambda u: u.name)
@pytest.mark.parametrize(
    "shape",
    [
        DepthwiseShape(64, 14, 14, 1, "relu6"),
        DepthwiseShape(48, 7, 7, 1, "relu6"),
        DepthwiseShape(40, 14, 14, 2, "relu6"),
        DepthwiseShape(13, 11, 9, 2, "relu"),  # odd sizes: the last column and row padded
        DepthwiseShape(5, 5, 3),  # narrower than a register
        DepthwiseShape(6, 11, 11),  # row by row; fewer channels than a job takes
        DepthwiseShape(13, 9, 9),  # 3 blocks of 3 rows; a last job of 5 channels
        DepthwiseShape(8, 28, 28, 1, "relu6"),
        DepthwiseShape(7, 15, 21, 2),
    ],
    ids=lambda s: s.describe(),
)
def test_kernel_matches_torch(shape: DepthwiseShape, unit: VectorUnit) -> None:
    """Either unit's blocks on this CPU (LLVM splits AVX-512's 16 lanes where it has 8)."""
    import tvm

    from compiler.tvm_depthwise import depthwise_func

    config = plan_depthwise(shape, unit=unit)
    assert config is not None
    func = depthwise_func(shape, config).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), {"kind": "llvm", "num-cores": 2})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, shape.channels, shape.height, shape.width)).astype(np.float32)
    weight = rng.standard_normal((shape.channels, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(shape.channels).astype(np.float32)
    out_shape = (1, shape.channels, shape.out_height, shape.out_width)
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, weight, bias)], out)
    np.testing.assert_allclose(
        out.numpy(), _torch_depthwise(x, weight, bias, shape), rtol=1e-5, atol=1e-5
    )


def test_the_kernel_survives_weight_prepackings_layout_pass() -> None:
    """Tuned builds with weight prepacking run SplitLayoutRewritePreproc over every kernel."""
    import tvm
    from tvm import relax

    from compiler.tvm_depthwise import depthwise_func

    for shape in (DepthwiseShape(16, 14, 14, 1, "relu6"), DepthwiseShape(16, 14, 14, 2)):
        config = plan_depthwise(shape, unit=AVX2)
        func = depthwise_func(shape, config).with_attr("layout_free_buffers", [1, 2])
        relax.transform.SplitLayoutRewritePreproc()(tvm.IRModule({tvm.ir.GlobalVar("k"): func}))


def test_a_padding_row_in_the_last_block_is_not_written() -> None:
    """A configuration may compute more rows than the output has (4 blocks of 4 for 14)."""
    import tvm

    from compiler.tvm_depthwise import depthwise_func

    shape = DepthwiseShape(9, 14, 14, 1, "relu6")
    func = depthwise_func(shape, DepthwiseConfig(16, 4, 16)).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), {"kind": "llvm"})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 9, 14, 14)).astype(np.float32)
    weight = rng.standard_normal((9, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(9).astype(np.float32)
    out = tvm.runtime.tensor(np.full((1, 9, 14, 14), np.nan, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, weight, bias)], out)
    np.testing.assert_allclose(
        out.numpy(), _torch_depthwise(x, weight, bias, shape), rtol=1e-5, atol=1e-5
    )


class _Depthwise(nn.Module):
    """MobileNetV2's 14x14 and 7x7 layers outside a fused block: 1x1 expand + ReLU6, 3x3
    depthwise + ReLU6 (stride 1, then stride 2 to 7x7, then + ReLU, then plain), logits."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU6())
        self.dw1 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU6())
        self.dw2 = nn.Sequential(nn.Conv2d(32, 32, 3, 2, padding=1, groups=32), nn.ReLU6())
        self.dw3 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU())
        self.dw4 = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.dw4(self.dw3(self.dw2(self.dw1(self.expand(x))))))
        return out


@pytest.mark.slow
def test_depthwise_convolutions_are_fused_and_match_onnxruntime(
    signing_key: Path, tmp_path: Path
) -> None:
    from tests.compiler.test_fused_blocks import _assert_matches_onnxruntime, _compile, _export

    path = _export(_Depthwise(), (1, 16, 14, 14), tmp_path / "depthwise.onnx")
    report = _compile(path, tmp_path / "out", signing_key)
    tuning = report["tuning"]
    assert isinstance(tuning, dict)
    assert tuning["fused_blocks"] == [
        "1x1 16->32 at 14x14 + ReLU6",
        "depthwise 3x3 32 at 14x14 + ReLU6 (2 rows x 16 columns)",
        "depthwise 3x3 32 stride 2 at 14x14 + ReLU6 (7 rows x 8 columns)",
        "depthwise 3x3 32 at 7x7 + ReLU (7 rows x 8 columns)",
        "depthwise 3x3 32 at 7x7 (7 rows x 8 columns)",
    ]
    _assert_matches_onnxruntime(report)
