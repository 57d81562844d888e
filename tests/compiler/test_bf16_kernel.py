"""The bf16 1x1 kernel: its pure planning and packing, and (on CPUs with AVX-512 BF16) what
it computes against numpy on the same bf16-rounded operands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from compiler.execution import read_cpu_features
from compiler.fusion_plan import (
    BlockShape,
    PointwiseConfig,
    PointwiseShape,
    StemBlockShape,
    StridedConvShape,
    bf16_bits,
    bf16_conv_pairs,
    bf16_pairs,
    bf16_stages,
    paired_bf16_weights,
    plan_pointwise_bf16,
    precision_refusal,
)
from compiler.settings import CompilerSettings
from edgeloop.cli import cli
from tests.compiler.bf16_reference import (
    assert_bf16_convolution,
    bf16_report,
    from_bits,
    operands,
)

ZEN4 = ["avx512f", "avx512bw", "avx512_bf16"]


def _host_has_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in read_cpu_features(text)


needs_bf16 = pytest.mark.skipif(
    not _host_has_bf16(), reason="this CPU has no AVX-512 BF16 (vdpbf16ps) to run the kernel on"
)


def _host_runs_zen4() -> bool:
    from compiler.execution import detect_host, plan_execution
    from compiler.profiles import ProfileRegistry

    profile = ProfileRegistry(CompilerSettings().profile_roots()).get("amd/epyc-zen4")
    return plan_execution(profile, detect_host()).mode == "native"


# The builds' accuracy gate runs the artifact: only on a CPU with every feature the profile lists
# (an Intel CPU with AVX-512 BF16 lacks Zen 4's clzero).
needs_zen4 = pytest.mark.skipif(
    not _host_runs_zen4(), reason="this CPU cannot run amd/epyc-zen4 artifacts natively"
)


@pytest.mark.parametrize(
    ("value", "bits"),
    [
        (1.0, 0x3F80),
        (-2.0, 0xC000),
        (0.0, 0x0000),
        (1.0 + 2.0**-8, 0x3F80),  # a tie: to the even neighbour, 1.0
        (1.0 + 3 * 2.0**-8, 0x3F82),  # a tie: up to the even one
        (1.0 + 2.0**-8 + 2.0**-20, 0x3F81),  # above the tie: up
        (3.0e38, 0x7F62),
    ],
)
def test_bf16_bits_round_to_nearest_even(value: float, bits: int) -> None:
    assert int(bf16_bits(np.array([value], np.float32))[0]) == bits


def test_paired_weights_put_each_channels_pair_side_by_side() -> None:
    weight = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)  # Co 32, C 3 (odd)
    packed = paired_bf16_weights(weight, 1)  # blocks of 16 output channels
    assert packed.shape == (2, 2, 32) and packed.dtype == np.uint16
    values = from_bits(packed)
    # block 1, pair 0: output channels 16..31, input channels 0 and 1 side by side
    assert values[1, 0, 0:4].tolist() == [48.0, 49.0, 51.0, 52.0]
    # pair 1 holds input channel 2 and the zero channel an odd C gets
    assert values[0, 1, 0:4].tolist() == [2.0, 0.0, 5.0, 0.0]
    with pytest.raises(ValueError, match="48 output channels are not whole blocks of 32"):
        paired_bf16_weights(np.zeros((48, 4), np.float32), 2)


def test_bf16_conv_pairs_give_an_odd_channel_count_a_zero_channel() -> None:
    weight = np.array([1.0, -2.0, 0.5], np.float32).reshape(1, 3, 1, 1)  # Co 1, C 3, 1x1
    pairs = bf16_conv_pairs(weight)
    assert pairs.shape == (1, 2, 1, 1) and pairs.dtype == np.uint32
    assert pairs[0, :, 0, 0].tolist() == [0xC0003F80, 0x00003F00]


def test_bf16_pairs_hold_the_even_channel_in_the_low_half() -> None:
    weight = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
    assert bf16_pairs(weight).tolist() == [[0xC0003F80, 0x40403F00]]
    with pytest.raises(ValueError, match="3 input channels do not pair up"):
        bf16_pairs(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize(
    ("shape", "stages"),
    [
        (BlockShape(24, 144, 24, 56, 56), (True, True)),
        (BlockShape(16, 96, 24, 112, 112, 2), (True, True)),
        (BlockShape(32, 32, 16, 112, 112, expand=False), (False, True)),  # no expand stage
        (BlockShape(3, 18, 8, 28, 28), (False, True)),  # an odd reduction stays fp32
        (BlockShape(4, 9, 8, 28, 28), (True, False)),
        (
            StemBlockShape(
                StridedConvShape(3, 32, 224, 224, 3, "relu6"),
                BlockShape(32, 32, 16, 112, 112, expand=False),
            ),
            (True, True),  # the first convolution (the expand stage): 3 channels, 2 pairs
        ),
    ],
)
def test_bf16_stages(shape: BlockShape | StemBlockShape, stages: tuple[bool, bool]) -> None:
    assert bf16_stages(shape) == stages


@pytest.mark.parametrize(
    ("shape", "config"),
    [
        (PointwiseShape(64, 384, 14, 14, "relu6"), PointwiseConfig(7, 2)),  # fp32 leaves it
        (PointwiseShape(960, 160, 7, 7, residual=True), PointwiseConfig(7, 2)),
        (PointwiseShape(32, 48, 7, 7), PointwiseConfig(7, 1)),  # 3 vectors: one per block
        (PointwiseShape(32, 40, 7, 7), None),  # not whole vectors
        (PointwiseShape(32, 64, 28, 28), None),  # a large map: MetaSchedule vectorizes it well
        (PointwiseShape(32, 64, 7, 7, kernel=3), None),  # 3x3 stays fp32
        (PointwiseShape(32, 64, 14, 14, stride=2), None),
        (PointwiseShape(32, 64, 11, 11), None),  # no position block divides 121
    ],
)
def test_plan_pointwise_bf16(shape: PointwiseShape, config: PointwiseConfig | None) -> None:
    assert plan_pointwise_bf16(shape) == config


@pytest.mark.parametrize(
    ("precision", "isa", "features", "mcpu", "fused", "message"),
    [
        ("fp32", "aarch64", [], None, False, None),
        ("bf16", "x86_64", ZEN4, "znver4", True, None),
        ("bf16", "x86_64", ZEN4 + ["amx_tile", "amx_bf16"], "sapphirerapids", True, None),
        ("fp16", "x86_64", ZEN4, "znver4", True, "--precision 'fp16': expected one of fp32, bf16"),
        (
            "bf16",
            "x86_64",
            ["avx512f"],
            "znver4",
            True,
            "x86-64 profile whose cpu_features list avx512_bf16",
        ),
        ("bf16", "aarch64", ["asimd", "bf16"], None, True, "this one is aarch64 with asimd, bf16"),
        ("bf16", "x86_64", ZEN4, "znver4", False, "cannot be combined with --no-fuse-blocks"),
        # Intel without AMX (Cooper Lake): vdpbf16ps at a quarter of the FMA rate, no tiles
        ("bf16", "x86_64", ZEN4, "cooperlake", True, "would compute nothing in bf16 for CPU"),
    ],
)
def test_precision_refusal(
    precision: str,
    isa: str,
    features: list[str],
    mcpu: str | None,
    fused: bool,
    message: str | None,
) -> None:
    refusal = precision_refusal(precision, isa=isa, features=features, mcpu=mcpu, fused=fused)
    if message is None:
        assert refusal is None
    else:
        assert refusal is not None and message in refusal


@needs_bf16
@pytest.mark.parametrize(
    "shape",
    [
        PointwiseShape(5, 32, 7, 7, "relu6"),  # an odd reduction, 2 vectors per block
        PointwiseShape(64, 48, 14, 14, "relu", residual=True),  # 1 vector, activation late
        PointwiseShape(96, 64, 7, 7),
        PointwiseShape(32, 48, 14, 14, "relu6"),  # written back by rows of 14
        PointwiseShape(16, 32, 4, 4),  # a map narrower than a vector
    ],
    ids=lambda s: s.describe(),
)
def test_kernel_computes_the_bf16_rounded_convolution(shape: PointwiseShape) -> None:
    import tvm

    from compiler.tvm_bf16 import pointwise_bf16_func

    config = plan_pointwise_bf16(shape)
    assert config is not None
    ops = operands(shape)
    co, h, w = shape.out_channels, shape.height, shape.width
    func = pointwise_bf16_func(shape, config).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), {"kind": "llvm", "mcpu": "znver4"})
    args = [ops.x, paired_bf16_weights(ops.weight, config.vectors), ops.bias]
    args += [ops.residual] if shape.residual else []
    out = tvm.runtime.tensor(np.zeros((1, co, h, w), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)

    assert_bf16_convolution(shape, ops, out.numpy())


class _SmallMaps(nn.Module):
    """1x1 convolutions at 14x14 (a reduction of 32, which fp32 builds leave to MetaSchedule)
    and at 7x7: + ReLU6, + residual, plain; BatchNorm statistics that are not the identity,
    so that activations (and bf16's rounding of them) matter to the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(64, 32, 1), nn.BatchNorm2d(32))
        self.pool = nn.MaxPool2d(2)
        self.widen = nn.Conv2d(32, 48, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(x + self.project(self.expand(x)))
        out: torch.Tensor = self.head(self.widen(y))
        return out


@pytest.fixture(scope="module")
def small_maps_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.compiler.test_fused_blocks import export_with_batchnorm_stats

    path = tmp_path_factory.mktemp("bf16") / "small_maps.onnx"
    return export_with_batchnorm_stats(_SmallMaps, (1, 32, 14, 14), path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--profile", "generic/x86_64"], "cpu_features list avx512_bf16"),
        (["--profile", "raspberry-pi/4b-aarch64"], "this one is aarch64"),
        (["--profile", "intel/x86_64-avx512"], "(profile intel/x86_64-avx512)"),
        (
            ["--profile", "amd/epyc-zen4", "--no-fuse-blocks"],
            "cannot be combined with --no-fuse-blocks",
        ),
        (
            ["--profile", "amd/epyc-zen4", "--runtime", "onnxruntime"],
            "--runtime onnxruntime ships the fp32 ONNX model",
        ),
    ],
)
def test_bf16_where_it_cannot_be_built_is_refused(
    options: list[str], message: str, small_maps_onnx: Path, signing_key: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        ["compile", str(small_maps_onnx), "--precision", "bf16", "--trials", "0", *options]
        + ["--signing-key", str(signing_key), "-o", str(out)],
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not out.exists()


def test_an_unknown_precision_is_refused_naming_the_choices(
    small_maps_onnx: Path, signing_key: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        cli,
        ["compile", str(small_maps_onnx), "--profile", "amd/epyc-zen4", "--precision", "fp16"]
        + ["--signing-key", str(signing_key), "-o", str(tmp_path / "out")],
    )
    assert result.exit_code == 2
    assert "'fp16' is not one of 'fp32', 'bf16'" in result.stderr


def test_the_kernel_survives_weight_prepackings_layout_pass() -> None:
    """Tuned builds with --weight-prepack run SplitLayoutRewritePreproc over every kernel; it
    needs blocks under every loop and block-owned buffers (the kernel is TVMScript)."""
    import tvm
    from tvm import relax

    from compiler.tvm_bf16 import pointwise_bf16_func

    for shape in (PointwiseShape(9, 32, 7, 7, "relu6"), PointwiseShape(8, 32, 7, 7, residual=True)):
        config = plan_pointwise_bf16(shape)
        assert config is not None
        func = pointwise_bf16_func(shape, config).with_attr("layout_free_buffers", [1, 2])
        relax.transform.SplitLayoutRewritePreproc()(tvm.IRModule({tvm.ir.GlobalVar("k"): func}))


@pytest.mark.slow
@needs_zen4
def test_fused_blocks_expand_and_project_with_bf16_products(
    signing_key: Path, tmp_path: Path
) -> None:
    from tests.compiler.test_fused_blocks import (
        DEPTHWISE_AVX512,
        FUSED,
        _Net,
        export_with_batchnorm_stats,
    )

    path = export_with_batchnorm_stats(_Net, (1, 3, 56, 56), tmp_path / "blocks.onnx")
    report = bf16_report(path, "amd/epyc-zen4", tmp_path / "out", signing_key)
    assert (
        report["tuning"]["fused_blocks"]
        == [
            FUSED[0].replace(" rows)", " rows, bf16 projection)"),  # expansion 1: no expand stage
            *(f.replace(" rows)", " rows, bf16 expansion and projection)") for f in FUSED[1:]),
            "1x1 32->192 at 14x14 + ReLU6 (bf16)",  # the 14-wide block, left to fuse_pointwise
            "1x1 192->32 at 14x14 + residual (bf16)",
            DEPTHWISE_AVX512,  # its depthwise convolution (fp32)
        ]
    )
    assert report["precision"] == "bf16"
    (output,) = report["accuracy"].values()
    # within the profile's bf16 gate (over it: exit 4, no artifact), and not fp32's result
    assert output["cosine"] > 0.99999 and output["top1_agreement"] == 1.0
    assert 1e-5 < output["max_rel_error"] < 0.01
    shown = CliRunner().invoke(cli, ["artifact", "inspect", str(tmp_path / "out")])
    assert shown.exit_code == 0, shown.output
    assert "bf16 products in 7 kernel(s) of the TVM library" in shown.stdout


def test_the_first_convolution_block_expands_and_projects_in_bf16_too(tmp_path: Path) -> None:
    """The stem block's wiring (no execution: any x86-64 host builds the kernels)."""
    import tvm

    from compiler import tvm_builder
    from compiler.frontends import load_model
    from compiler.profiles import ProfileRegistry
    from tests.compiler.test_fused_blocks import _export, _Stem

    settings = CompilerSettings()
    profile = ProfileRegistry(settings.profile_roots()).get("amd/epyc-zen4")
    target = tvm.target.Target(tvm_builder.effective_target(profile))
    relax_mod = load_model(_export(_Stem(), (1, 3, 224, 224), tmp_path / "stem.onnx")).to_relax()
    _, fused = tvm_builder._prepare_fused(
        relax_mod, target, weight_prepack=False, fuse_blocks=True, precision="bf16"
    )
    assert fused[0] == (
        "3x3 8->16 stride 2 at 56x56 + relu6, then 16->16->24 at 28x28, no expansion "
        "(strips of 14 rows, bf16 expansion and projection)"
    )


@needs_bf16
def test_the_first_convolution_in_bf16_pairs_its_three_channels() -> None:
    """The stem kernel's bf16 expand stage (a 3x3 stride-2 convolution of 3 channels, paired
    with a zero channel, tensorized to vdpbf16ps) against torch in fp32: within bf16's
    rounding, and not fp32's result (the pairs are in use)."""
    import tvm

    from compiler.fusion_plan import plan_stem_block
    from compiler.tvm_fusion import block_mask, scheduled_block

    shape = StemBlockShape(
        StridedConvShape(3, 16, 112, 112, 3, "relu6"),
        BlockShape(16, 16, 8, 56, 56, expand=False),
    )
    config = plan_stem_block(shape)
    assert config is not None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 112, 112)).astype(np.float32)
    we, wd, wp = (
        rng.standard_normal(s).astype(np.float32) * 0.3
        for s in [(16, 3, 3, 3), (16, 3, 3), (8, 16)]
    )
    be, bd, bp = (rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16, 16, 8))
    f = torch.nn.functional
    ref = f.conv2d(
        torch.from_numpy(x), torch.from_numpy(we), torch.from_numpy(be), stride=2, padding=1
    )
    ref = f.conv2d(
        ref.clamp(0, 6), torch.from_numpy(wd)[:, None], torch.from_numpy(bd), padding=1, groups=16
    )
    ref = f.conv2d(ref.clamp(0, 6), torch.from_numpy(wp)[:, :, None, None], torch.from_numpy(bp))
    func = scheduled_block(shape, config, bf16=True).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), {"kind": "llvm", "mcpu": "znver4"})
    mask = block_mask(shape.expanded_view, config)
    args = [x, bf16_conv_pairs(we), be, wd, bd, bf16_pairs(wp), bp, mask]
    out = tvm.runtime.tensor(np.zeros((1, 8, 56, 56), np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    expected = ref.numpy()
    rel = np.abs(out.numpy() - expected).max() / np.abs(expected).max()
    assert 1e-5 < rel < 2e-2
