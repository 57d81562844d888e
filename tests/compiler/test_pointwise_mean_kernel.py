"""The head kernel (a 1x1 convolution that only a global average pool reads, and the pool,
as one kernel): its pure plan, what it computes against torch, and the Relax rewrite."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compiler.fusion_plan import (
    AVX2,
    AVX512,
    PointwiseConfig,
    PointwiseShape,
    VectorUnit,
    blocked_weights,
    plan_pointwise_mean,
)

NO_MEAN = replace(AVX512, pointwise_mean=False)  # a unit the kernel is not measured on


@pytest.mark.parametrize(
    ("shape", "unit", "expected"),
    [
        (PointwiseShape(320, 1280, 7, 7, "relu6"), AVX512, PointwiseConfig(7, 2)),
        (PointwiseShape(64, 96, 14, 14, "relu"), AVX512, PointwiseConfig(7, 2)),
        (PointwiseShape(24, 48, 5, 5), AVX512, PointwiseConfig(5, 1)),  # 3 vectors: 1 a block
        # AVX2: 6 positions x 2 vectors of 8 channels, 4 x 3, 12 x 1; any number of positions
        (PointwiseShape(320, 1280, 7, 7, "relu6"), AVX2, PointwiseConfig(6, 2, lanes=8)),
        (PointwiseShape(32, 24, 11, 13), AVX2, PointwiseConfig(4, 3, lanes=8)),
        (PointwiseShape(32, 40, 7, 7), AVX2, PointwiseConfig(12, 1, lanes=8)),
        (PointwiseShape(32, 20, 7, 7), AVX2, None),  # 2.5 vectors
        (PointwiseShape(32, 64, 28, 28), AVX2, None),  # larger than 14x14
        (PointwiseShape(320, 1280, 7, 7, "relu6"), NO_MEAN, None),
        (PointwiseShape(32, 64, 28, 28), AVX512, None),  # larger than 14x14
        (PointwiseShape(32, 40, 7, 7), AVX512, None),  # not whole vectors
        (PointwiseShape(32, 64, 7, 7, kernel=3), AVX512, None),
        (PointwiseShape(32, 64, 14, 14, stride=2), AVX512, None),
        (PointwiseShape(64, 64, 7, 7, residual=True), AVX512, None),
        (PointwiseShape(32, 64, 11, 13), AVX512, None),  # 143 positions: no block size
    ],
    ids=lambda v: v.describe() if isinstance(v, PointwiseShape) else None,
)
def test_plan_pointwise_mean(
    shape: PointwiseShape, unit: VectorUnit, expected: PointwiseConfig | None
) -> None:
    assert plan_pointwise_mean(shape, unit=unit) == expected


@pytest.mark.parametrize(
    ("shape", "unit"),
    [
        (PointwiseShape(320, 1280, 7, 7, "relu6"), AVX512),  # MobileNetV2's head
        (PointwiseShape(64, 96, 14, 14, "relu"), AVX512),
        (PointwiseShape(24, 48, 5, 5), AVX512),
        # AVX2's 8-lane vectors: 49 positions, a last block of 1; 143, a last block of 3
        (PointwiseShape(320, 1280, 7, 7, "relu6"), AVX2),
        (PointwiseShape(32, 24, 11, 13, "relu"), AVX2),
    ],
    ids=lambda v: v.describe() if isinstance(v, PointwiseShape) else None,
)
def test_kernel_matches_torch(shape: PointwiseShape, unit: VectorUnit) -> None:
    import tvm

    from compiler.tvm_head import pointwise_mean_func

    config = plan_pointwise_mean(shape, unit=unit)
    assert config is not None
    func = pointwise_mean_func(shape, config).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), {"kind": "llvm", "num-cores": 2})
    c, co, h, w = shape.in_channels, shape.out_channels, shape.height, shape.width
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    weight = (rng.standard_normal((co, c)) * c**-0.5).astype(np.float32)
    bias = rng.standard_normal(co).astype(np.float32)
    y = nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(weight[:, :, None, None]), torch.from_numpy(bias)
    )
    y = {"relu6": y.clamp(0, 6), "relu": y.clamp(min=0), None: y}[shape.activation]
    out = tvm.runtime.tensor(np.full((1, co, 1, 1), np.nan, np.float32))
    args = [x, blocked_weights(np.ascontiguousarray(weight.T), config.vectors, config.lanes), bias]
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    expected = y.mean(dim=(2, 3), keepdim=True).numpy()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_misfit_shape_is_refused() -> None:
    from compiler.tvm_head import pointwise_mean_func

    with pytest.raises(ValueError, match="not whole blocks of 32 channels"):
        pointwise_mean_func(PointwiseShape(32, 48, 7, 7), PointwiseConfig(7, 2))
    with pytest.raises(ValueError, match="0 positions a block is not positive"):
        pointwise_mean_func(PointwiseShape(32, 48, 7, 7), PointwiseConfig(0, 1, lanes=8))
    with pytest.raises(ValueError, match="1x1 stride-1"):
        pointwise_mean_func(PointwiseShape(32, 64, 7, 7, kernel=3), PointwiseConfig(7, 2))


class _Heads(nn.Module):
    """Three heads: two whose 1x1 convolution only the pool reads (fused; ONNX's
    GlobalAveragePool keeps the spatial axes, a mean over them in torch does not), one
    whose convolution output is also added to the logits (left alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(32, 64, 1), nn.ReLU6())
        self.conv2 = nn.Sequential(nn.Conv2d(32, 64, 1), nn.ReLU6())
        self.conv3 = nn.Sequential(nn.Conv2d(32, 64, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.flatten(self.pool(self.conv1(x)), 1)
        b2 = self.conv2(x)
        b = b2.mean(dim=(2, 3)) + b2[:, :, 0, 0]
        c = self.conv3(x).mean(dim=(2, 3))
        out: torch.Tensor = self.fc(a + b + c)
        return out


def test_the_rewrite_takes_a_convolution_only_the_pool_reads(tmp_path: Path) -> None:
    from tvm import relax

    from compiler.frontends import load_model
    from compiler.tvm_fusion import fuse_pointwise_means
    from tests.compiler.test_depthwise_project_kernel import assert_same_outputs
    from tests.compiler.test_fused_blocks import _export

    path = _export(_Heads(), (1, 32, 7, 7), tmp_path / "heads.onnx")
    mod = relax.transform.FoldConstant()(load_model(path).to_relax())
    assert fuse_pointwise_means(mod, unit=NO_MEAN)[1] == []
    fused_mod, fused = fuse_pointwise_means(mod, unit=AVX512)
    assert sorted(fused) == [
        "1x1 32->64 at 7x7 + ReLU, then the mean over the map",
        "1x1 32->64 at 7x7 + ReLU6, then the mean over the map",
    ]
    assert_same_outputs(mod, fused_mod, (1, 32, 7, 7))
