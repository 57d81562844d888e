"""The depthwise + projection kernel (a 3x3 depthwise convolution and the 1x1 projection of
its output as one kernel, in bands of rows): its pure plan, what it computes against torch,
and the Relax rewrite that puts it in a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compiler.fusion_plan import (
    AVX2,
    AVX512,
    DepthwiseProjectConfig,
    DepthwiseShape,
    PointwiseShape,
    VectorUnit,
    blocked_weights,
    plan_depthwise_project,
)

DW14 = DepthwiseShape(576, 14, 14, 1, "relu6")
PROJECT14 = PointwiseShape(576, 96, 14, 14, residual=True)


@pytest.mark.parametrize(
    ("depthwise", "project", "cores", "unit", "expected"),
    [
        # MobileNetV2's 14x14 blocks on 2 cores: bands of 7 rows, 7 positions x 2 vectors
        (DW14, PROJECT14, 2, AVX512, DepthwiseProjectConfig(7, 7, 2)),
        (DW14, PointwiseShape(576, 160, 14, 14), 2, AVX512, DepthwiseProjectConfig(7, 7, 2)),
        (DW14, PROJECT14, 1, AVX512, DepthwiseProjectConfig(14, 7, 2)),  # one band
        # 3 vectors of output channels: 1 vector per block
        (DW14, PointwiseShape(576, 48, 14, 14), 2, AVX512, DepthwiseProjectConfig(7, 7, 1)),
        # 4 cores: bands of 3.5 rows; 7 cores: of 2, too few for the projection's weight
        (DW14, PROJECT14, 4, AVX512, None),
        (DW14, PROJECT14, 7, AVX512, None),
        # 7x7 on 2 cores: no even split
        (
            DepthwiseShape(960, 7, 7, 1, "relu6"),
            PointwiseShape(960, 160, 7, 7, residual=True),
            2,
            AVX512,
            None,
        ),
        # 7x7 on 1 core: one band of 7 rows
        (
            DepthwiseShape(960, 7, 7, 1, "relu6"),
            PointwiseShape(960, 160, 7, 7),
            1,
            AVX512,
            DepthwiseProjectConfig(7, 7, 2),
        ),
        (DW14, PROJECT14, 2, AVX2, None),  # measured on AVX-512 only
        (DepthwiseShape(576, 14, 14, 2, "relu6"), PROJECT14, 2, AVX512, None),  # stride 2
        # wider than a vector of 16 lanes
        (
            DepthwiseShape(96, 28, 28, 1, "relu6"),
            PointwiseShape(96, 32, 28, 28),
            2,
            AVX512,
            None,
        ),
        (DW14, PointwiseShape(576, 96, 14, 14, kernel=3), 2, AVX512, None),  # not a 1x1
        (DW14, PointwiseShape(512, 96, 14, 14), 2, AVX512, None),  # other channels
        (DW14, PointwiseShape(576, 40, 14, 14), 2, AVX512, None),  # not whole vectors
        (DW14, PROJECT14, 0, AVX512, None),
    ],
)
def test_plan_depthwise_project(
    depthwise: DepthwiseShape,
    project: PointwiseShape,
    cores: int,
    unit: VectorUnit,
    expected: DepthwiseProjectConfig | None,
) -> None:
    assert plan_depthwise_project(depthwise, project, cores=cores, unit=unit) == expected


def _torch_reference(
    x: np.ndarray,
    dw: tuple[np.ndarray, np.ndarray],
    pw: tuple[np.ndarray, np.ndarray],
    residual: np.ndarray | None,
    activation: str | None,
) -> np.ndarray:
    f = nn.functional
    m = x.shape[1]
    y = f.conv2d(
        torch.from_numpy(x),
        torch.from_numpy(dw[0][:, None]),
        torch.from_numpy(dw[1]),
        padding=1,
        groups=m,
    ).clamp(0, 6)
    out = f.conv2d(y, torch.from_numpy(pw[0][:, :, None, None]), torch.from_numpy(pw[1]))
    if residual is not None:
        out = out + torch.from_numpy(residual)
    if activation == "relu6":
        out = out.clamp(0, 6)
    return out.numpy()


@pytest.mark.parametrize(
    ("channels", "out_channels", "height", "width", "config", "residual", "activation"),
    [
        (576, 96, 14, 14, DepthwiseProjectConfig(7, 7, 2), True, None),  # MobileNetV2's
        (384, 64, 14, 14, DepthwiseProjectConfig(14, 7, 2), False, None),  # one band
        (48, 32, 9, 8, DepthwiseProjectConfig(3, 8, 2), True, "relu6"),  # 3 bands, 1 inside
        (40, 48, 10, 5, DepthwiseProjectConfig(5, 5, 1), False, "relu6"),  # narrow, odd vectors
        (16, 16, 16, 16, DepthwiseProjectConfig(8, 8, 1), True, None),  # a whole vector wide
    ],
)
def test_kernel_matches_torch(
    channels: int,
    out_channels: int,
    height: int,
    width: int,
    config: DepthwiseProjectConfig,
    residual: bool,
    activation: str | None,
) -> None:
    import tvm

    from compiler.tvm_depthwise import depthwise_project_func

    depthwise = DepthwiseShape(channels, height, width, 1, "relu6")
    project = PointwiseShape(
        channels, out_channels, height, width, activation=activation, residual=residual
    )
    func = depthwise_project_func(depthwise, project, config).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), {"kind": "llvm", "num-cores": 2})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, channels, height, width)).astype(np.float32)
    dw = (rng.standard_normal((channels, 3, 3)), rng.standard_normal(channels))
    pw = (
        rng.standard_normal((out_channels, channels)) / channels**0.5,
        rng.standard_normal(out_channels),
    )
    dw = tuple(a.astype(np.float32) for a in dw)  # type: ignore[assignment]
    pw = tuple(a.astype(np.float32) for a in pw)  # type: ignore[assignment]
    r = (
        rng.standard_normal((1, out_channels, height, width)).astype(np.float32)
        if residual
        else None
    )
    args = [x, *dw, blocked_weights(pw[0].T, config.vectors), pw[1], *([r] if residual else [])]
    out = tvm.runtime.tensor(np.full((1, out_channels, height, width), np.nan, np.float32))
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    np.testing.assert_allclose(
        out.numpy(), _torch_reference(x, dw, pw, r, activation), rtol=1e-4, atol=1e-4
    )


def test_a_misfit_configuration_is_refused() -> None:
    from compiler.tvm_depthwise import depthwise_project_func

    with pytest.raises(ValueError, match="in jobs of 5 rows x 7 positions"):
        depthwise_project_func(DW14, PROJECT14, DepthwiseProjectConfig(5, 7, 2))


def test_the_kernel_survives_weight_prepackings_layout_pass() -> None:
    """Tuned builds with weight prepacking run SplitLayoutRewritePreproc over every kernel."""
    import tvm
    from tvm import relax

    from compiler.tvm_depthwise import depthwise_project_func

    config = DepthwiseProjectConfig(7, 7, 2)
    func = depthwise_project_func(DW14, PROJECT14, config).with_attr(
        "layout_free_buffers", [1, 2, 3, 4]
    )
    relax.transform.SplitLayoutRewritePreproc()(tvm.IRModule({tvm.ir.GlobalVar("k"): func}))


class _Blocks(nn.Module):
    """Two MobileNetV2-style blocks at 14x14 without their expansion's ReLU6 fused away: the
    first one's depthwise output also read by the second (not fused), the second's only by
    its projection (fused, with the residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.dw1 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU6())
        self.pw1 = nn.Conv2d(32, 32, 1)
        self.dw2 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU6())
        self.pw2 = nn.Conv2d(32, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.dw1(x)
        y = self.pw1(d1) + d1.mean()
        out: torch.Tensor = self.pw2(self.dw2(y)) + y
        return out


def test_the_rewrite_fuses_a_depthwise_output_only_its_projection_reads(tmp_path: Path) -> None:
    from tvm import relax

    from compiler.frontends import load_model
    from compiler.tvm_fusion import fuse_depthwise_projections
    from tests.compiler.test_fused_blocks import _export

    path = _export(_Blocks(), (1, 32, 14, 14), tmp_path / "blocks.onnx")
    mod = relax.transform.FoldConstant()(load_model(path).to_relax())
    for cores, unit in ((4, AVX512), (2, AVX2)):
        assert fuse_depthwise_projections(mod, unit=unit, cores=cores)[1] == []
    fused_mod, fused = fuse_depthwise_projections(mod, unit=AVX512, cores=2)
    assert fused == [
        "depthwise 3x3 32 at 14x14 + ReLU6, then 1x1 32->32 at 14x14 + residual (7 rows a job)"
    ]
    assert_same_outputs(mod, fused_mod, (1, 32, 14, 14))


def assert_same_outputs(mod: object, fused_mod: object, input_shape: tuple[int, ...]) -> None:
    """``fused_mod`` computes what ``mod`` does on a random input (both built for this CPU)."""
    import tvm
    from tvm import relax

    x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
    outputs = []
    for module in (mod, fused_mod):
        lib = tvm.compile(module, target=tvm.target.Target({"kind": "llvm", "num-cores": 2}))
        vm = relax.VirtualMachine(lib, tvm.cpu())
        outputs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
