"""Fused inverted-residual kernels in real builds: found, compiled, as accurate as ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bench.models import InvertedResidual, _conv_bn
from compiler.fusion_plan import AVX2
from compiler.pipeline import CompileRequest, compile_model
from compiler.settings import CompilerSettings
from edgeloop.cli import cli

pytestmark = pytest.mark.slow


class _Net(nn.Module):
    """A stem, then MobileNetV2 blocks of every kind the pass must tell apart (56x56 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(3, 16, 3, 1, relu6=True),
            InvertedResidual(16, 16, 1, 1),  # expansion 1 (no expand stage), residual: fused
            InvertedResidual(16, 24, 2, 6),  # stride 2, 56 -> 28: fused
            InvertedResidual(24, 24, 1, 6),  # residual: fused
            InvertedResidual(24, 32, 1, 6),  # no residual (24 -> 32): fused
            InvertedResidual(32, 32, 2, 6),  # stride 2, 28 -> 14: fused
            InvertedResidual(32, 32, 1, 6),  # 14 wide: too narrow to pay, left alone
        )
        # Logits, so that the accuracy gate's top-1 agreement compares classes, not the
        # arg max of each feature-map row (near ties there flip on rounding).
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


FUSED = [
    "16->16->16 at 56x56, no expansion (strips of 28 rows)",
    "16->96->24 at 56x56, stride 2 (strips of 14 rows)",
    "24->144->24 at 28x28 (strips of 14 rows)",
    "24->144->32 at 28x28 (strips of 14 rows)",
    "32->192->32 at 28x28, stride 2 (strips of 7 rows)",
]


def split_blocks(cores: int) -> list[str]:
    """The blocks of ``_Net`` the split-block kernel takes in fp32 builds for ``cores``
    cores on AVX-512 and AVX2: those whose expanded channels make whole vectors of 16 per
    core (192 on 2 or 4 cores, not 144 or 96) and whose shares' buffers fit."""
    return [split("32->192->32 at 28x28, stride 2", cores), split("32->192->32 at 14x14", cores)]


def split(block: str, cores: int) -> str:
    """How a build report names a block the split-block kernel takes."""
    return f"{block} (expanded channels in {cores} shares)"


# fp32 builds for 2 cores on AVX2 (generic/x86_64), whose 8-lane vectors also split 96 and
# 144 expanded channels into whole vectors on 2 cores (96 on 4), and on AVX-512, which
# computes such shares in 8-lane vectors too.
FUSED_AVX2 = [
    FUSED[0],
    split("16->96->24 at 56x56, stride 2", 2),
    split("24->144->24 at 28x28", 2),
    split("24->144->32 at 28x28", 2),
    *split_blocks(2),
]
FUSED_AVX512 = FUSED_AVX2
# bf16 builds on AVX-512 give the 14-wide block's depthwise convolution to the depthwise
# kernel (its expansion, of a short reduction, stays MetaSchedule's).
DEPTHWISE_AVX512 = "depthwise 3x3 192 at 14x14 + ReLU6 (14 rows x 16 columns)"


def export_with_batchnorm_stats(
    factory: type[nn.Module], input_shape: tuple[int, ...], path: Path
) -> Path:
    """``factory()`` (seeded, eval mode) with BatchNorm statistics that are not the identity,
    so that activations matter to the outputs, as an ONNX file."""
    torch.manual_seed(0)
    net = factory().eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        torch.onnx.export(
            net, (torch.randn(*input_shape),), str(path), dynamo=False, opset_version=17
        )
    return path


@pytest.fixture(scope="module")
def blocks_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fused") / "blocks.onnx"
    return export_with_batchnorm_stats(_Net, (1, 3, 56, 56), path)


def _compile(model: Path, out: Path, key: Path, **options: object) -> dict[str, object]:
    """Compile for generic/x86_64 (AVX2: the kernels sized for its 16 registers, on by
    default; asked for all the same) on any x86-64 host, for 2 cores (the profile names
    none: the split-block kernel's shares would follow this host's)."""
    from unittest import mock

    options.setdefault("fuse_blocks", True)
    request = CompileRequest(
        model=model,
        profile="generic/x86_64",
        output=out,
        trials=0,
        runtime="tvm",
        signing_key=key,
        **options,  # type: ignore[arg-type]
    )
    with mock.patch("psutil.cpu_count", return_value=2):
        report: dict[str, object] = compile_model(request, settings=CompilerSettings()).report
    return report


def _export(net: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """``net`` (seeded, eval mode) as an ONNX file, the way the exporter writes it."""
    torch.manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(
            net.eval(), (torch.randn(*input_shape),), str(path), dynamo=False, opset_version=17
        )
    return path


def _assert_matches_onnxruntime(report: dict[str, object]) -> None:
    """The accuracy gate ran the library natively against ONNX Runtime (over tolerance: exit 4)."""
    accuracy = report["accuracy"]
    assert isinstance(accuracy, dict)
    (output,) = accuracy.values()
    assert output["max_abs_error"] < 1e-4 and output["cosine"] > 0.99999


def test_blocks_are_fused_and_match_onnxruntime(
    blocks_onnx: Path, signing_key: Path, tmp_path: Path
) -> None:
    report = _compile(blocks_onnx, tmp_path / "fused", signing_key)
    tuning = report["tuning"]
    assert isinstance(tuning, dict) and tuning["fused_blocks"] == FUSED_AVX2
    # the accuracy gate ran the library natively against ONNX Runtime (over tolerance: exit 4)
    accuracy = report["accuracy"]
    assert isinstance(accuracy, dict)
    (output,) = accuracy.values()
    assert output["max_abs_error"] < 1e-4 and output["cosine"] > 0.99999


def test_no_fuse_blocks_builds_metaschedule_kernels_only(
    blocks_onnx: Path, signing_key: Path, tmp_path: Path
) -> None:
    report = _compile(blocks_onnx, tmp_path / "plain", signing_key, fuse_blocks=False)
    tuning = report["tuning"]
    assert isinstance(tuning, dict) and tuning["fused_blocks"] == []


def test_arm_profiles_fuse_only_when_asked(blocks_onnx: Path, signing_key: Path) -> None:
    from compiler import tvm_builder
    from compiler.frontends import load_model
    from compiler.profiles import ProfileRegistry

    settings = CompilerSettings()
    profile = ProfileRegistry(settings.profile_roots()).get("raspberry-pi/4b-aarch64")
    import tvm

    target = tvm.target.Target(tvm_builder.effective_target(profile))
    relax_mod = load_model(blocks_onnx).to_relax()
    _, fused = tvm_builder._prepare_fused(
        relax_mod, target, weight_prepack=False, fuse_blocks=True, unit=AVX2
    )
    # the profile names 4 cores; ARM runs the kernels sized as for AVX2
    assert fused == [
        FUSED[0],
        split("16->96->24 at 56x56, stride 2", 4),
        *FUSED[2:4],
        *split_blocks(4),
    ]


def _block_model(
    path: Path, outputs: list[str], *, h: int = 28, stride: int = 1, residual: bool = True
) -> Path:
    """One 8->48->8 block as the ONNX exporter writes it, with ``outputs`` as graph outputs."""
    c, m = 8, 48
    rng = np.random.default_rng(0)
    consts = {
        "We": rng.standard_normal((m, c, 1, 1)),
        "be": rng.standard_normal(m),
        "Wd": rng.standard_normal((m, 1, 3, 3)),
        "bd": rng.standard_normal(m),
        "Wp": rng.standard_normal((c, m, 1, 1)),
        "bp": rng.standard_normal(c),
        "lo": np.array(0.0),
        "hi": np.array(6.0),
    }
    nodes = [
        helper.make_node("Conv", ["x", "We", "be"], ["e0"], kernel_shape=[1, 1]),
        helper.make_node("Clip", ["e0", "lo", "hi"], ["e1"]),
        helper.make_node(
            "Conv",
            ["e1", "Wd", "bd"],
            ["d0"],
            kernel_shape=[3, 3],
            pads=[1] * 4,
            strides=[stride] * 2,
            group=m,
        ),
        helper.make_node("Clip", ["d0", "lo", "hi"], ["d1"]),
        helper.make_node(
            "Conv", ["d1", "Wp", "bp"], ["p0" if residual else "y"], kernel_shape=[1, 1]
        ),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["p0", "x"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, h])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _fused(path: Path) -> list[str]:
    import tvm

    from compiler import tvm_builder
    from compiler.frontends import load_model

    relax_mod = load_model(path).to_relax()
    target = tvm.target.Target({"kind": "llvm"})
    return tvm_builder._prepare_fused(relax_mod, target, weight_prepack=False, fuse_blocks=True)[1]


def test_an_activation_used_elsewhere_is_not_fused_away(tmp_path: Path) -> None:
    # 8 output channels: AVX-512's split-block kernel in 8-lane vectors
    assert _fused(_block_model(tmp_path / "y.onnx", ["y"])) == [
        "8->48->8 at 28x28 (expanded channels in 1 shares)"
    ]
    # the expanded activation is also an output of the model: the expand stage stays a
    # kernel of its own, and the depthwise and projection that read it still fuse (the
    # residual add, of the block's input, stays outside)
    assert _fused(_block_model(tmp_path / "y_e1.onnx", ["y", "e1"])) == [
        "48->48->8 at 28x28, no expansion (strips of 14 rows)"
    ]
    # the depthwise output is an output too: no block fuses; the depthwise convolution
    # alone gets the depthwise kernel (its ReLU6 output is the model's d1)
    assert _fused(_block_model(tmp_path / "y_d1.onnx", ["y", "d1"])) == [
        "depthwise 3x3 48 at 28x28 + ReLU6 (7 rows x 32 columns)"
    ]


def test_stride_2_blocks_are_fused_where_the_output_is_exactly_half(tmp_path: Path) -> None:
    even = _block_model(tmp_path / "even.onnx", ["y"], h=56, stride=2, residual=False)
    assert _fused(even) == ["8->48->8 at 56x56, stride 2 (expanded channels in 1 shares)"]
    # 57 -> 29 rounds up: the kernel's planes halve exactly, so the block is left alone
    # (its depthwise convolution gets the depthwise kernel, which takes odd maps)
    odd = _block_model(tmp_path / "odd.onnx", ["y"], h=57, stride=2, residual=False)
    assert _fused(odd) == ["depthwise 3x3 48 stride 2 at 57x57 + ReLU6 (1 rows x 32 columns)"]


def test_fuse_blocks_on_a_gpu_profile_is_refused(
    blocks_onnx: Path, signing_key: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gpu"
    result = CliRunner().invoke(
        cli,
        ["compile", str(blocks_onnx), "--profile", "nvidia/h100", "--trials", "0"]
        + ["--fuse-blocks", "--signing-key", str(signing_key), "-o", str(out)],
    )
    assert result.exit_code == 2, result.output
    assert "--fuse-blocks for nvidia/h100" in result.stderr
    assert not out.exists()


class _Pointwise(nn.Module):
    """1x1 convolutions on a 7x7 map: + ReLU6, + residual, plain; then logits."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(32, 64, 1)
        self.project = nn.Conv2d(64, 32, 1)
        self.widen = nn.Conv2d(32, 48, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.project(torch.clamp(self.expand(x), 0.0, 6.0))
        out: torch.Tensor = self.head(self.widen(y))
        return out


def test_pointwise_convolutions_on_small_maps_match_onnxruntime(
    signing_key: Path, tmp_path: Path
) -> None:
    path = _export(_Pointwise(), (1, 32, 7, 7), tmp_path / "pointwise.onnx")
    # the last one and the pool after it are one kernel
    assert _fused(path) == [
        "1x1 32->48 at 7x7, then the mean over the map",
        "1x1 32->64 at 7x7 + ReLU6",
        "1x1 64->32 at 7x7 + residual",
    ]
    report = _compile(path, tmp_path / "out", signing_key)  # AVX2: the same kernels
    tuning = report["tuning"]
    assert isinstance(tuning, dict)
    assert tuning["fused_blocks"] == _fused(path)
    _assert_matches_onnxruntime(report)


class _Stem(nn.Module):
    """Stride-2 first layers: 7x7 3->8 + ReLU, a max pool, 3x3 8->16 + ReLU6 and an
    expansion-1 block after it (one kernel: MobileNetV2's features.0 and .1), then 3x3 24->16
    (too many input channels for the first-convolution kernel: the direct one); logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 7, stride=2, padding=3),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),  # ResNet's: the padding is never the max
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU6(),
            InvertedResidual(16, 24, 1, 1),
            nn.Conv2d(24, 16, 3, stride=2, padding=1),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


def test_strided_first_convolutions_match_onnxruntime(signing_key: Path, tmp_path: Path) -> None:
    path = _export(_Stem(), (1, 3, 224, 224), tmp_path / "stem.onnx")
    assert _fused(path) == [
        "3x3 8->16 stride 2 at 56x56 + relu6, then 16->16->24 at 28x28, no expansion"
        " (strips of 14 rows)",
        "3x3 24->16 stride 2 at 28x28",
        "7x7 3->8 stride 2 at 224x224 + relu (strips of 56 rows)",
        "max pool 3x3/2 pad 1, 8 at 112x112",
    ]
    _assert_matches_onnxruntime(_compile(path, tmp_path / "out", signing_key))


class _Basic(nn.Module):
    """A 3x3 16->32 convolution (too few input channels for Winograd: the direct kernel), a
    ResNet basic block (BatchNorm folded by the exporter) of Winograd ones at 30x30, so that
    the 4x4 tiles overhang the map's edge, a downsampling block (3x3 stride 2, 1x1 stride-2
    shortcut), a 2x2 max pool, a 3x3 convolution at 7x7 (too few tiles for Winograd groups),
    then logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.down1 = nn.Conv2d(32, 48, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(48, 48, 3, padding=1)
        self.shortcut = nn.Conv2d(32, 48, 1, stride=2)
        self.last = nn.Conv2d(48, 48, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv0(x))
        y = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        z = torch.relu(self.shortcut(y) + self.down2(torch.relu(self.down1(y))))  # 30 -> 15
        z = nn.functional.max_pool2d(z, 2)  # 15 -> 7
        out: torch.Tensor = self.head(self.last(z))  # 4 tiles: Winograd stage by stage
        return out


def test_3x3_convolutions_match_onnxruntime(signing_key: Path, tmp_path: Path) -> None:
    path = _export(_Basic(), (1, 16, 30, 30), tmp_path / "basic.onnx")
    assert _fused(path) == [
        "3x3 16->32 at 30x30 + ReLU",
        "3x3 32->32 at 30x30 + ReLU (Winograd F(4x4, 3x3))",
        "3x3 32->32 at 30x30 + residual + ReLU (Winograd F(4x4, 3x3))",
        "3x3 32->48 stride 2 at 30x30 + ReLU",
        "1x1 32->48 stride 2 at 30x30",
        "3x3 48->48 at 15x15 + residual + ReLU (Winograd F(4x4, 3x3))",
        "3x3 48->48 at 7x7 (Winograd F(4x4, 3x3))",
        "max pool 2x2/2 pad 0, 48 at 15x15",
    ]
    _assert_matches_onnxruntime(_compile(path, tmp_path / "out", signing_key))
