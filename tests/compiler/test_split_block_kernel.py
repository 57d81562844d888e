"""The split-block kernel (an inverted-residual block on a small map as one kernel, its
expanded channels split over the cores): its pure plan, what it computes against torch,
and the Relax rewrite that puts it in a model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from torch import nn

from bench.models import InvertedResidual
from compiler.fusion_plan import (
    AVX2,
    AVX512,
    BlockShape,
    SplitBlockConfig,
    VectorUnit,
    plan_split_block,
    split_block_weights,
)

NO_SPLIT = replace(AVX512, split_blocks=False)  # a unit the kernel is not measured on


@pytest.mark.parametrize(
    ("shape", "cores", "unit", "expected"),
    [
        # MobileNetV2's blocks at 14x14 and 7x7 on 2 cores
        (BlockShape(96, 576, 96, 14, 14), 2, AVX512, SplitBlockConfig(2, 7, 2, 7, 2)),
        (BlockShape(64, 384, 96, 14, 14), 2, AVX512, SplitBlockConfig(2, 7, 2, 7, 2)),
        (BlockShape(96, 576, 160, 14, 14, 2), 2, AVX512, SplitBlockConfig(2, 7, 2, 7, 2)),
        (BlockShape(160, 960, 320, 7, 7), 2, AVX512, SplitBlockConfig(2, 7, 2, 7, 2)),
        (BlockShape(160, 960, 160, 7, 7), 1, AVX512, SplitBlockConfig(1, 7, 2, 7, 2)),
        # shares of 3 vectors (1 per block); 10 output vectors, an even number (2 per block)
        (BlockShape(24, 96, 160, 7, 7), 2, AVX512, SplitBlockConfig(2, 7, 1, 7, 2)),
        (BlockShape(32, 96, 48, 6, 10), 1, AVX512, SplitBlockConfig(1, 6, 2, 6, 1)),
        # 4 shares of 9 vectors (1 per block); 5 do not split 576; 8 shares of 4.5 vectors
        # go to 8-lane vectors, 4 positions x 3 of them (12 registers)
        (BlockShape(96, 576, 96, 14, 14), 4, AVX512, SplitBlockConfig(4, 7, 1, 7, 2)),
        (BlockShape(96, 576, 96, 14, 14), 5, AVX512, None),
        (BlockShape(96, 576, 96, 14, 14), 8, AVX512, SplitBlockConfig(8, 4, 3, 4, 3, lanes=8)),
        (BlockShape(96, 576, 96, 14, 14), 0, AVX512, None),
        # AVX2: its own vectors of 8 channels, 6 positions x 2 (12 registers), 4 x 3, 12 x 1
        (BlockShape(96, 576, 96, 14, 14), 2, AVX2, SplitBlockConfig(2, 6, 2, 6, 2, lanes=8)),
        (BlockShape(160, 960, 160, 7, 7), 2, AVX2, SplitBlockConfig(2, 6, 2, 6, 2, lanes=8)),
        (BlockShape(32, 80, 24, 14, 14), 2, AVX2, SplitBlockConfig(2, 12, 1, 4, 3, lanes=8)),
        # 8-channel vectors take outputs that 16-channel ones do not
        (BlockShape(96, 576, 40, 14, 14), 2, AVX2, SplitBlockConfig(2, 6, 2, 12, 1, lanes=8)),
        (BlockShape(24, 144, 24, 56, 56), 2, AVX2, None),  # 1.9 MB a share
        (BlockShape(24, 144, 32, 56, 56, 2), 2, AVX2, SplitBlockConfig(2, 4, 3, 6, 2, lanes=8)),
        (BlockShape(96, 576, 96, 14, 14), 2, NO_SPLIT, None),
        # 28x28: 2 x 96 channels, (30 x 30 + 28 x 28) x 96 x 4 bytes a share
        (BlockShape(32, 192, 32, 28, 28), 2, AVX512, SplitBlockConfig(2, 7, 2, 7, 2)),
        (BlockShape(32, 192, 64, 28, 28, 2), 2, AVX512, SplitBlockConfig(2, 7, 2, 7, 2)),
        # AVX-512 in 8-lane vectors where 16-lane ones do not divide shares or outputs
        (BlockShape(24, 144, 32, 56, 56, 2), 2, AVX512, SplitBlockConfig(2, 4, 3, 6, 2, 8)),
        (BlockShape(96, 576, 40, 14, 14), 2, AVX512, SplitBlockConfig(2, 4, 3, 12, 1, 8)),
        (BlockShape(96, 576, 36, 14, 14), 2, AVX512, None),  # outputs not whole vectors
        (BlockShape(24, 144, 24, 56, 56), 2, AVX512, None),  # 1.9 MB a share
        (BlockShape(16, 96, 24, 112, 112, 2), 2, AVX512, None),  # 3.1 MB a share
        (BlockShape(96, 96, 96, 14, 14, expand=False), 2, AVX512, None),  # no expansion
        (BlockShape(96, 576, 160, 7, 7, 2), 2, AVX512, None),  # an odd map at stride 2
        (BlockShape(16, 96, 32, 11, 13), 2, AVX512, None),  # 143 positions: no block size
        # a share's buffers over the budget: 2 x 2880 channels at 14x14
        (BlockShape(96, 5760, 96, 14, 14), 2, AVX512, None),
    ],
    ids=lambda v: v.describe() if isinstance(v, BlockShape) else None,
)
def test_plan_split_block(
    shape: BlockShape, cores: int, unit: VectorUnit, expected: SplitBlockConfig | None
) -> None:
    assert plan_split_block(shape, cores=cores, unit=unit) == expected


def _torch_block(x: np.ndarray, weights: list[np.ndarray], shape: BlockShape) -> np.ndarray:
    f = nn.functional
    we, be, wd, bd, wp, bp = (torch.from_numpy(w) for w in weights)
    xt = torch.from_numpy(x)
    e = f.conv2d(xt, we[:, :, None, None], be).clamp(0, 6)
    d = f.conv2d(e, wd[:, None], bd, stride=shape.stride, padding=1, groups=shape.expanded)
    y = f.conv2d(d.clamp(0, 6), wp[:, :, None, None], bp)
    return (y + xt if shape.residual else y).numpy()


@pytest.mark.parametrize(
    ("shape", "cores", "unit"),
    [
        (BlockShape(96, 576, 96, 14, 14), 2, AVX512),  # MobileNetV2's, with the residual
        (BlockShape(96, 576, 160, 14, 14, 2), 2, AVX512),  # stride 2
        (BlockShape(160, 960, 320, 7, 7), 2, AVX512),
        (BlockShape(32, 192, 64, 28, 28, 2), 2, AVX512),
        (BlockShape(32, 96, 32, 6, 10), 1, AVX512),  # one share; 6-position blocks
        (BlockShape(16, 64, 32, 8, 8, 2), 4, AVX512),  # 4 shares of 1 vector
        (BlockShape(5, 48, 16, 5, 7), 3, AVX512),  # 3 shares, 1 vector each way; short sums
        # AVX-512 in 8-lane vectors: 169 positions, a last block of 1; stride 2, 6 x 2 blocks
        (BlockShape(24, 144, 24, 13, 13), 2, AVX512),
        (BlockShape(24, 144, 32, 14, 14, 2), 2, AVX512),
        # AVX2's 8-lane vectors; 49 and 196 positions: a last block of 1 and of 4
        (BlockShape(160, 960, 160, 7, 7), 2, AVX2),
        (BlockShape(96, 576, 96, 14, 14), 2, AVX2),
        (BlockShape(32, 80, 24, 14, 14, 2), 2, AVX2),  # 12 x 1 and 4 x 3 blocks, stride 2
        (BlockShape(8, 24, 8, 5, 3), 3, AVX2),  # 15 positions: 6 + 6 + 3; 8 outputs
    ],
    ids=lambda v: v.describe() if isinstance(v, BlockShape) else str(v),
)
def test_kernel_matches_torch(shape: BlockShape, cores: int, unit: VectorUnit) -> None:
    import tvm

    from compiler.tvm_split_block import split_block_func

    config = plan_split_block(shape, cores=cores, unit=unit)
    assert config is not None
    func = split_block_func(shape, config).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), {"kind": "llvm", "num-cores": 2})
    c, m, co = shape.in_channels, shape.expanded, shape.out_channels
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c, shape.height, shape.width)).astype(np.float32)
    weights = [
        rng.standard_normal(s).astype(np.float32) * scale
        for s, scale in (
            ((m, c), c**-0.5),
            ((m,), 1.0),
            ((m, 3, 3), 1.0),
            ((m,), 1.0),
            ((co, m), m**-0.5),
            ((co,), 1.0),
        )
    ]
    args = [x, *split_block_weights(weights, config)]
    out = tvm.runtime.tensor(
        np.full((1, co, shape.out_height, shape.out_width), np.nan, np.float32)
    )
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    np.testing.assert_allclose(out.numpy(), _torch_block(x, weights, shape), rtol=1e-4, atol=1e-4)


def test_a_misfit_configuration_is_refused() -> None:
    from compiler.tvm_split_block import split_block_func

    with pytest.raises(ValueError, match="in 5 shares"):
        split_block_func(BlockShape(96, 576, 96, 14, 14), SplitBlockConfig(5, 7, 2, 7, 2))


def test_the_kernel_survives_weight_prepackings_layout_pass() -> None:
    """Tuned builds with weight prepacking run SplitLayoutRewritePreproc over every kernel."""
    import tvm
    from tvm import relax

    from compiler.tvm_split_block import split_block_func

    shape = BlockShape(96, 576, 96, 14, 14)
    config = plan_split_block(shape, cores=2)
    assert config is not None
    func = split_block_func(shape, config).with_attr("layout_free_buffers", [1, 2, 3, 4, 5, 6])
    relax.transform.SplitLayoutRewritePreproc()(tvm.IRModule({tvm.ir.GlobalVar("k"): func}))


class _SmallMaps(nn.Module):
    """MobileNetV2's blocks below 28x28: at 14x14 with and without a residual, stride 2 to
    7x7, and at 7x7."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            InvertedResidual(32, 32, 1, 6),
            InvertedResidual(32, 48, 1, 6),
            InvertedResidual(48, 64, 2, 6),
            InvertedResidual(64, 64, 1, 6),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def test_the_rewrite_takes_the_small_blocks_and_matches_the_unfused_model(
    tmp_path: Path,
) -> None:
    from tvm import relax

    from compiler.frontends import load_model
    from compiler.tvm_fusion import fuse_inverted_residuals
    from tests.compiler.test_depthwise_project_kernel import assert_same_outputs
    from tests.compiler.test_fused_blocks import export_with_batchnorm_stats

    path = export_with_batchnorm_stats(_SmallMaps, (1, 32, 14, 14), tmp_path / "small.onnx")
    mod = relax.transform.FoldConstant()(load_model(path).to_relax())
    assert fuse_inverted_residuals(mod, unit=NO_SPLIT, cores=2)[1] == []
    assert fuse_inverted_residuals(mod, unit=AVX512, cores=2, split=False)[1] == []
    fused_mod, fused = fuse_inverted_residuals(mod, unit=AVX512, cores=2)
    assert fused == [
        "32->192->32 at 14x14 (expanded channels in 2 shares)",
        "32->192->48 at 14x14 (expanded channels in 2 shares)",
        "48->288->64 at 14x14, stride 2 (expanded channels in 2 shares)",
        "64->384->64 at 7x7 (expanded channels in 2 shares)",
    ]
    assert_same_outputs(mod, fused_mod, (1, 32, 14, 14))


def _host_runs(profile_name: str) -> bool:
    from compiler.execution import detect_host, plan_execution
    from compiler.profiles import ProfileRegistry
    from compiler.settings import CompilerSettings

    profile = ProfileRegistry(CompilerSettings().profile_roots()).get(profile_name)
    return plan_execution(profile, detect_host()).mode == "native"


class _Tail(nn.Module):
    """MobileNetV2's last stages in small: blocks at 14x14 and 7x7, the 1x1 head
    convolution + ReLU6, the global average pool, logits."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = _SmallMaps()
        self.head = nn.Sequential(nn.Conv2d(64, 128, 1), nn.BatchNorm2d(128), nn.ReLU6())
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.head(self.blocks(x)))
        return out


@pytest.mark.slow
@pytest.mark.skipif(
    not _host_runs("intel/x86_64-avx512"),
    reason="this CPU cannot run intel/x86_64-avx512 artifacts natively",
)
def test_an_avx512_build_with_split_blocks_and_the_head_kernel_passes_the_gate(
    signing_key: Path, tmp_path: Path
) -> None:
    """Through ``edgeloop compile``'s pipeline: the kernels in a build for this host's core
    count, its accuracy gate run natively against ONNX Runtime."""
    from compiler.pipeline import CompileRequest, compile_model
    from compiler.settings import CompilerSettings
    from tests.compiler.test_fused_blocks import export_with_batchnorm_stats

    path = export_with_batchnorm_stats(_Tail, (1, 32, 14, 14), tmp_path / "tail.onnx")
    request = CompileRequest(
        model=path,
        profile="intel/x86_64-avx512",
        output=tmp_path / "out",
        trials=0,
        runtime="tvm",
        signing_key=signing_key,
    )
    report = compile_model(request, settings=CompilerSettings()).report
    kernels = report["tuning"]["fused_blocks"]
    assert "1x1 64->128 at 7x7 + ReLU6, then the mean over the map" in kernels
    cores = psutil.cpu_count(logical=False) or 1  # the profile names none: this host's
    blocks = [
        BlockShape(32, 192, 32, 14, 14),
        BlockShape(32, 192, 48, 14, 14),
        BlockShape(48, 288, 64, 14, 14, 2),
        BlockShape(64, 384, 64, 7, 7),
    ]
    split = [b for b in blocks if plan_split_block(b, cores=cores) is not None]  # 2 cores: all
    assert [k for k in kernels if "expanded channels in" in k] == [
        f"{b.describe()} (expanded channels in {cores} shares)" for b in split
    ]
    (output,) = report["accuracy"].values()
    assert output["max_abs_error"] < 1e-4 and output["cosine"] > 0.99999
