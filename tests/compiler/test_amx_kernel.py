"""The AMX 1x1 kernel: its pure plan and weight packing, what it computes against numpy on
the same bf16-rounded operands (on CPUs with AMX), and its wiring into a bf16 build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compiler.execution import read_cpu_features
from compiler.fusion_plan import (
    AVX2,
    AmxPlan,
    BlockShape,
    PointwiseShape,
    amx_weights,
    bf16_bits,
    bf16_kernels,
    has_amx,
    plan_pointwise_amx,
    splits_for_amx,
)
from compiler.settings import CompilerSettings
from tests.compiler.bf16_reference import (
    assert_bf16_convolution,
    bf16_report,
    from_bits,
    operands,
)

SPR = ["avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]


def _host_has_amx() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return has_amx("x86_64", sorted(read_cpu_features(text)))


needs_amx = pytest.mark.skipif(
    not _host_has_amx(), reason="this CPU has no AMX bf16 tiles to run the kernel on"
)


@pytest.mark.parametrize(
    ("isa", "features", "expected"),
    [
        ("x86_64", SPR, True),
        ("x86_64", ["avx512f", "avx512_bf16", "amx_tile"], False),  # tiles without bf16
        ("x86_64", ["avx512f", "avx512_bf16"], False),  # Zen 4
        ("aarch64", ["amx_tile", "amx_bf16"], False),
    ],
)
def test_has_amx(isa: str, features: list[str], expected: bool) -> None:
    assert has_amx(isa, features) is expected


@pytest.mark.parametrize(
    ("shape", "plan"),
    [
        # more output than input: 18 blocks of 32 channels, one job each with all 14 rows
        (PointwiseShape(96, 576, 14, 14, "relu6"), AmxPlan(96, 14, 196)),
        # more input: rows in 2, 4, ... groups until there are 8 jobs (2 blocks x 4 groups)
        (PointwiseShape(384, 64, 14, 14), AmxPlan(384, 14, 56)),
        (PointwiseShape(576, 96, 14, 14), AmxPlan(576, 14, 56)),  # 3 x 4 (2 x 3 < 8)
        (PointwiseShape(192, 128, 10, 12), AmxPlan(192, 12, 60)),  # 4 x 2 groups of 5 rows
        # 8 or fewer columns: runs of 16 positions of the flattened map, one group
        (PointwiseShape(320, 1280, 7, 7, "relu6"), AmxPlan(320, 16, 49)),
        (PointwiseShape(960, 160, 7, 7, residual=True), AmxPlan(960, 16, 49)),
        (PointwiseShape(5, 32, 7, 7), AmxPlan(32, 16, 49)),  # input padded to a step
        # wider than a tile's 16 columns: runs of 16 flattened positions, jobs as above
        (PointwiseShape(32, 192, 28, 28, "relu6"), AmxPlan(32, 16, 784)),
        (PointwiseShape(192, 32, 28, 28, residual=True), AmxPlan(192, 16, 112)),  # 8 groups
        (PointwiseShape(64, 64, 28, 28), AmxPlan(64, 16, 196)),  # 2 blocks x 4 groups
        (PointwiseShape(64, 64, 8, 32), AmxPlan(64, 16, 64)),
        # a last block of fewer than 32 output channels: as many tile rows
        (PointwiseShape(64, 48, 7, 7), AmxPlan(64, 16, 49)),
        (PointwiseShape(24, 144, 56, 56), AmxPlan(32, 16, 3136)),
        (PointwiseShape(144, 24, 56, 56), AmxPlan(160, 16, 392)),  # 1 block x 8 groups
        (PointwiseShape(64, 8, 7, 7), None),  # fewer than 16
        (PointwiseShape(64, 64, 0, 7), None),
        (PointwiseShape(64, 64, 7, 7, kernel=3), None),
        (PointwiseShape(64, 64, 14, 14, stride=2), None),
    ],
    ids=lambda v: v.describe() if isinstance(v, PointwiseShape) else str(v),
)
def test_plan_pointwise_amx(shape: PointwiseShape, plan: AmxPlan | None) -> None:
    assert plan_pointwise_amx(shape) == plan


@pytest.mark.parametrize(
    ("shape", "split", "split_avx2"),
    [
        # MobileNetV2's 28x28 blocks, and its 56x56 ones (the depthwise kernel takes maps up
        # to 112 wide on AVX-512, 28 on AVX2)
        (BlockShape(32, 192, 32, 28, 28), True, True),
        (BlockShape(32, 192, 64, 28, 28, stride=2), True, True),  # projection at 14x14
        (BlockShape(24, 144, 24, 56, 56), True, False),  # a last block of 16, one of 24
        (BlockShape(24, 144, 32, 56, 56, stride=2), True, False),
        # an expansion from 16 channels fills half of its 32-channel steps: stays fused
        (BlockShape(16, 96, 24, 112, 112, stride=2), False, False),
        (BlockShape(32, 192, 32, 120, 120), False, False),  # wider than 112
        (BlockShape(32, 192, 8, 28, 28), False, False),  # a projection to fewer than 16
        (BlockShape(32, 32, 32, 28, 28, expand=False), False, False),  # no expand stage
    ],
    ids=lambda v: v.describe() if isinstance(v, BlockShape) else str(v),
)
def test_splits_for_amx(shape: BlockShape, split: bool, split_avx2: bool) -> None:
    assert splits_for_amx(shape) is split
    assert splits_for_amx(shape, unit=AVX2) is split_avx2


def test_amx_weights_are_bf16_blocks_of_32_by_32_padded_along_input_channels() -> None:
    weight = np.arange(64 * 40, dtype=np.float32).reshape(64, 40)  # Co 64, C 40
    packed = amx_weights(weight, AmxPlan(64, 16, 49))
    assert packed.shape == (2, 2, 32, 32) and packed.dtype == np.uint16
    values = from_bits(packed)
    # block 1 (output channels 32..63), step 0 (input channels 0..31), row 0: channel 32
    assert values[1, 0, 0, :3].tolist() == [1280.0, 1280.0, 1280.0]  # bf16 of 1280, 1281, 1282
    # step 1 holds input channels 32..39, then the zero padding
    assert values[0, 1, 1, :8].tolist() == from_bits(bf16_bits(weight[1, 32:40])).tolist()
    assert not packed[:, 1, :, 8:].any()
    with pytest.raises(ValueError, match="70 input channels do not fit the plan's 64"):
        amx_weights(np.zeros((32, 70), np.float32), AmxPlan(64, 16, 49))
    # output channels padded to whole blocks of 32 with zeros
    padded = amx_weights(np.ones((48, 32), np.float32), AmxPlan(32, 16, 49))
    assert padded.shape == (2, 1, 32, 32)
    assert from_bits(padded[1, 0, :16]).min() == 1.0 and not padded[1, 0, 16:].any()


def test_a_shape_the_plan_refuses_is_refused_by_the_kernel() -> None:
    from compiler.tvm_amx import pointwise_amx_func

    with pytest.raises(ValueError, match="does not compute 1x1 64->8 at 7x7"):
        pointwise_amx_func(PointwiseShape(64, 8, 7, 7))


@needs_amx
@pytest.mark.parametrize(
    "shape",
    [
        PointwiseShape(5, 32, 7, 7, "relu6"),  # odd reduction padded to 32; flattened runs
        PointwiseShape(64, 64, 14, 14, "relu", residual=True),  # rows split into 4 groups
        PointwiseShape(96, 96, 14, 14),  # 3 steps of 32
        PointwiseShape(200, 128, 5, 9, residual=True),  # non-square, odd, padded
        PointwiseShape(192, 128, 10, 12, "relu6"),  # groups of 5 rows: an odd run count
        PointwiseShape(64, 96, 11, 11, "relu", residual=True),  # more output: 11 row runs
        PointwiseShape(64, 64, 3, 3),  # one run of 9
        # a last block of 16, of 8 (tiles 2 and 3 of 8 rows), of 8 of 40 (not stored)
        PointwiseShape(24, 144, 28, 28, "relu6"),
        PointwiseShape(144, 24, 28, 28, residual=True),
        PointwiseShape(32, 40, 14, 14, "relu"),
        PointwiseShape(64, 16, 7, 7),
        # wider than 16: flattened runs of 16 (a split block's 1x1 stages at 28x28)
        PointwiseShape(32, 192, 28, 28, "relu6"),  # channel blocks, 49 runs
        PointwiseShape(192, 32, 28, 28, residual=True),  # groups of 4 rows: 7 runs each
        PointwiseShape(40, 64, 9, 30, "relu"),  # 3 groups of 90 positions, a run of 10 last
    ],
    ids=lambda s: s.describe(),
)
def test_kernel_computes_the_bf16_rounded_convolution(shape: PointwiseShape) -> None:
    import tvm

    from compiler.tvm_amx import pointwise_amx_func

    plan = plan_pointwise_amx(shape)
    assert plan is not None
    ops = operands(shape)
    co, h, w = shape.out_channels, shape.height, shape.width
    func = pointwise_amx_func(shape).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), {"kind": "llvm", "mcpu": "sapphirerapids"})
    args = [ops.x, amx_weights(ops.weight, plan), ops.bias]
    args += [ops.residual] if shape.residual else []
    out = tvm.runtime.tensor(np.full((1, co, h, w), np.nan, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)

    assert_bf16_convolution(shape, ops, out.numpy())


def test_the_kernel_survives_weight_prepackings_layout_pass() -> None:
    """Tuned builds with weight prepacking run SplitLayoutRewritePreproc over every kernel."""
    import tvm
    from tvm import relax

    from compiler.tvm_amx import pointwise_amx_func

    for shape in (PointwiseShape(9, 32, 7, 7, "relu6"), PointwiseShape(8, 32, 7, 7, residual=True)):
        func = pointwise_amx_func(shape).with_attr("layout_free_buffers", [1, 2])
        relax.transform.SplitLayoutRewritePreproc()(tvm.IRModule({tvm.ir.GlobalVar("k"): func}))


def _fused(model: Path, profile_name: str, precision: str) -> list[str]:
    """The kernels a build of ``model`` for ``profile_name`` in ``precision`` gets for 2
    cores (the wiring, no execution: any x86-64 host builds the kernels)."""
    import tvm

    from compiler import tvm_builder
    from compiler.frontends import load_model
    from compiler.profiles import ProfileRegistry

    profile = ProfileRegistry(CompilerSettings().profile_roots()).get(profile_name)
    target = tvm.target.Target(tvm_builder.effective_target(profile) | {"num-cores": 2})
    kernels = bf16_kernels(profile.isa, profile.cpu_features, profile.tvm.get("mcpu"))
    return tvm_builder._prepare_fused(
        load_model(model).to_relax(),
        target,
        weight_prepack=False,
        fuse_blocks=True,
        precision=precision,
        amx=kernels.amx,
        dot=kernels.dot,
    )[1]


def test_a_bf16_build_for_an_amx_profile_puts_the_small_maps_on_tiles(tmp_path: Path) -> None:
    """The 14x14 and 7x7 1x1 convolutions get the AMX kernel (vdpbf16ps stays unused:
    Intel's is slower than its FMAs); an fp32 build gets no AMX, and a Zen 4 bf16 build
    the vdpbf16ps kernels instead."""
    from tests.compiler.test_bf16_kernel import _SmallMaps
    from tests.compiler.test_fused_blocks import export_with_batchnorm_stats

    path = export_with_batchnorm_stats(_SmallMaps, (1, 32, 14, 14), tmp_path / "small.onnx")
    assert _fused(path, "intel/xeon-sapphire-rapids", "bf16") == [
        "1x1 32->64 at 14x14 + ReLU6 (bf16, AMX)",
        "1x1 64->32 at 14x14 + residual (bf16, AMX)",
        "1x1 32->48 at 7x7 (bf16, AMX)",  # a block of 32 and one of 16
        "max pool 2x2/2 pad 0, 32 at 14x14",
    ]
    assert not any("AMX" in k for k in _fused(path, "intel/xeon-sapphire-rapids", "fp32"))
    assert _fused(path, "amd/epyc-zen4", "bf16")[:3] == [
        "1x1 32->64 at 14x14 + ReLU6 (bf16)",
        "1x1 64->32 at 14x14 + residual (bf16)",
        "1x1 32->48 at 7x7 (bf16)",
    ]


def test_a_bf16_build_for_an_amx_profile_splits_the_blocks_it_can_tile(tmp_path: Path) -> None:
    """Blocks whose 1x1 stages tile (``splits_for_amx``) become two AMX kernels and the
    depthwise kernel (which also takes the 14-wide block's depthwise convolution); the
    others stay fused and fp32, as in an fp32 build."""
    from tests.compiler.test_fused_blocks import (
        FUSED,
        FUSED_AVX512,
        _Net,
        export_with_batchnorm_stats,
    )

    path = export_with_batchnorm_stats(_Net, (1, 3, 56, 56), tmp_path / "net.onnx")
    assert _fused(path, "intel/xeon-sapphire-rapids", "bf16") == [
        *FUSED[:2],  # no expand stage; an expansion from 16 channels
        "1x1 24->144 at 28x28 + ReLU6 (bf16, AMX)",  # FUSED[2:], split
        "1x1 144->24 at 28x28 + residual (bf16, AMX)",
        "1x1 24->144 at 28x28 + ReLU6 (bf16, AMX)",
        "1x1 144->32 at 28x28 (bf16, AMX)",
        "1x1 32->192 at 28x28 + ReLU6 (bf16, AMX)",
        "1x1 192->32 at 14x14 (bf16, AMX)",
        "1x1 32->192 at 14x14 + ReLU6 (bf16, AMX)",  # the 14-wide block
        "1x1 192->32 at 14x14 + residual (bf16, AMX)",
        "depthwise 3x3 144 at 28x28 + ReLU6 (7 rows x 32 columns)",
        "depthwise 3x3 144 at 28x28 + ReLU6 (7 rows x 32 columns)",
        "depthwise 3x3 192 stride 2 at 28x28 + ReLU6 (14 rows x 16 columns)",
        "depthwise 3x3 192 at 14x14 + ReLU6 (14 rows x 16 columns)",
    ]
    assert _fused(path, "intel/xeon-sapphire-rapids", "fp32") == FUSED_AVX512


@pytest.mark.slow
@needs_amx
def test_a_bf16_build_with_split_blocks_passes_the_gate(signing_key: Path, tmp_path: Path) -> None:
    from tests.compiler.test_fused_blocks import _Net, export_with_batchnorm_stats

    path = export_with_batchnorm_stats(_Net, (1, 3, 56, 56), tmp_path / "net.onnx")
    report = bf16_report(path, "intel/xeon-sapphire-rapids", tmp_path / "out", signing_key)
    kernels = report["tuning"]["fused_blocks"]
    assert sum("AMX" in k for k in kernels) == 8 and sum("depthwise" in k for k in kernels) == 4
    (output,) = report["accuracy"].values()
    assert output["cosine"] > 0.9999 and output["top1_agreement"] == 1.0
    assert 1e-5 < output["max_rel_error"] < 0.02


@pytest.mark.slow
@needs_amx
def test_a_bf16_build_on_amx_passes_the_gate(signing_key: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgeloop.cli import cli
    from tests.compiler.test_bf16_kernel import _SmallMaps
    from tests.compiler.test_fused_blocks import export_with_batchnorm_stats

    path = export_with_batchnorm_stats(_SmallMaps, (1, 32, 14, 14), tmp_path / "small.onnx")
    report = bf16_report(path, "intel/xeon-sapphire-rapids", tmp_path / "out", signing_key)
    assert sum("AMX" in k for k in report["tuning"]["fused_blocks"]) == 3
    (output,) = report["accuracy"].values()
    assert output["cosine"] > 0.9999 and output["top1_agreement"] == 1.0
    assert 1e-5 < output["max_rel_error"] < 0.02  # bf16's rounding, within the gate
    shown = CliRunner().invoke(cli, ["artifact", "inspect", str(tmp_path / "out")])
    assert shown.exit_code == 0, shown.output
    assert "bf16 products in 3 kernel(s) of the TVM library" in shown.stdout
