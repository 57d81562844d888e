"""Table tests of the pure parts: accuracy metrics, shape options, execution plans, ELF checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from compiler.accuracy import compare_output, make_inputs
from compiler.elfcheck import ElfFacts, check_elf
from compiler.errors import UsageError
from compiler.execution import HostFacts, normalize_isa, plan_execution, read_cpu_features
from compiler.profiles import AccuracySpec, HardwareProfile, parse_profile
from compiler.shapes import parse_input_shape, parse_input_shapes

ROOT = Path(__file__).resolve().parents[2] / "hw-profiles"


def _profile(name: str) -> HardwareProfile:
    return parse_profile(yaml.safe_load((ROOT / f"{name}.yaml").read_text()))


# ---------------------------------------------------------------- accuracy


def test_identical_outputs_are_perfect() -> None:
    a = [np.array([[0.1, 0.9, -0.3]], dtype=np.float32)] * 3
    result = compare_output("y", a, a)
    assert (result.max_abs_error, result.max_rel_error, result.top1_agreement) == (0.0, 0.0, 1.0)
    assert result.cosine == pytest.approx(1.0)
    assert result.violations(AccuracySpec()) == []


@pytest.mark.parametrize(
    ("actual", "reference", "violation"),
    [
        ([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.1]], "max abs error"),
        ([[3.0, 2.0, 1.0]], [[1.0, 2.0, 3.0]], "top-1 agreement"),
        ([[-1.0, -2.0, -3.0]], [[1.0, 2.0, 3.0]], "cosine"),
        ([[np.nan, 0.0, 0.0]], [[1.0, 0.0, 0.0]], "max abs error inf"),
    ],
)
def test_violations_are_named(
    actual: list[list[float]], reference: list[list[float]], violation: str
) -> None:
    result = compare_output("logits", [np.array(actual)], [np.array(reference)])
    problems = result.violations(AccuracySpec())
    assert any(violation in p and "output 'logits'" in p for p in problems), problems


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        compare_output("y", [np.zeros((1, 3))], [np.zeros((1, 4))])


def test_relative_error_uses_reference_scale() -> None:
    result = compare_output("y", [np.array([1000.5, 0.0])], [np.array([1000.0, 0.0])])
    assert result.max_rel_error == pytest.approx(0.5 / 1000.0)


def test_make_inputs_is_seeded_and_typed() -> None:
    specs = [("x", [1, 3], "float32"), ("ids", [1, 4], "int64")]
    a, b = make_inputs(specs, samples=2, seed=1), make_inputs(specs, samples=2, seed=1)
    assert len(a) == 2 and a[0][0].dtype == np.float32 and a[0][1].dtype == np.int64
    assert np.array_equal(a[1][0], b[1][0])


# ---------------------------------------------------------------- --input-shape


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("input:1x3x224x224", ("input", [1, 3, 224, 224])),
        ("x:8", ("x", [8])),
        ("serving_default:0:1x4", ("serving_default:0", [1, 4])),
    ],
)
def test_parse_input_shape(text: str, expected: tuple[str, list[int]]) -> None:
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize(
    "text", ["input", "input:", "input:1x-3", "input:1x0", ":1x3", "input:1,3"]
)
def test_parse_input_shape_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="input-shape"):
        parse_input_shape(text)


def test_input_shape_given_twice() -> None:
    with pytest.raises(UsageError, match="given twice for input 'x'"):
        parse_input_shapes(["x:1x2", "x:1x3"])


# ---------------------------------------------------------------- execution plans

X86_AVX512 = frozenset(
    {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
)
X86_AVX2 = frozenset({"avx2", "fma"})
SYSROOT = Path("/cache/sysroots/aarch64")
RUNNER = Path("/cache/armv7-runtime/edgeloop-armv7-runner")


@pytest.mark.parametrize(
    ("profile", "host", "mode", "reason"),
    [
        ("generic/x86_64", HostFacts("x86_64", X86_AVX2), "native", None),
        ("intel/x86_64-avx512", HostFacts("x86_64", X86_AVX512), "native", None),
        ("intel/x86_64-avx512", HostFacts("x86_64", X86_AVX2), "none", "lacks avx512f"),
        (
            "raspberry-pi/4b-aarch64",
            HostFacts("x86_64", X86_AVX2, aarch64_sysroot=SYSROOT),
            "qemu-python",
            None,
        ),
        (
            "raspberry-pi/4b-aarch64",
            HostFacts("x86_64", X86_AVX2),
            "none",
            "no aarch64 Python sysroot",
        ),
        ("raspberry-pi/4b-aarch64", HostFacts("aarch64", frozenset({"asimd"})), "native", None),
        (
            "raspberry-pi/5-aarch64",
            HostFacts("aarch64", frozenset({"asimd"})),
            "none",
            "lacks asimddp",
        ),
        ("raspberry-pi/3b-armv7", HostFacts("x86_64", X86_AVX2), "none", "not executed on armv7"),
        (
            "raspberry-pi/3b-armv7",
            HostFacts("x86_64", X86_AVX2, armv7_runner=RUNNER),
            "qemu-armv7-runner",
            None,
        ),
        ("nvidia/h100", HostFacts("x86_64", X86_AVX512), "none", "no CUDA GPU"),
        (
            "nvidia/jetson-orin-nano",
            HostFacts("x86_64", X86_AVX512, aarch64_sysroot=SYSROOT),
            "none",
            "cuda sm_87",
        ),
    ],
)
def test_plan_execution(profile: str, host: HostFacts, mode: str, reason: str | None) -> None:
    plan = plan_execution(_profile(profile), host)
    assert plan.mode == mode
    if reason is None:
        assert plan.reason is None
    else:
        assert plan.reason is not None and reason in plan.reason
    assert plan.emulated == mode.startswith("qemu")


@pytest.mark.parametrize(
    ("machine", "isa"),
    [("x86_64", "x86_64"), ("AMD64", "x86_64"), ("arm64", "aarch64"), ("armv7l", "armv7")],
)
def test_normalize_isa(machine: str, isa: str) -> None:
    assert normalize_isa(machine) == isa


def test_read_cpu_features() -> None:
    x86 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"
    assert read_cpu_features(x86) == {"fpu", "sse", "avx2", "fma"}
    assert "asimd" in read_cpu_features(arm)
    assert read_cpu_features("") == frozenset()


# ---------------------------------------------------------------- ELF checks


@pytest.mark.parametrize(
    ("facts", "isa", "problem"),
    [
        (ElfFacts("EM_X86_64", 64, ["libc.so.6"]), "x86_64", None),
        (ElfFacts("EM_AARCH64", 64, ["libc.so.6"]), "aarch64", None),
        (
            ElfFacts("EM_ARM", 32, ["libgcc_s.so.1", "libc.so.6"], "hard", "cortex-a53"),
            "armv7",
            None,
        ),
        (ElfFacts("EM_ARM", 32, ["libc.so.6"], "soft"), "armv7", "soft-float ABI"),
        (ElfFacts("EM_X86_64", 64, ["libc.so.6"]), "aarch64", "needs EM_AARCH64"),
        (
            ElfFacts("EM_AARCH64", 64, ["libc.so.6", "libcudart.so.12"]),
            "aarch64",
            "libcudart.so.12",
        ),
    ],
)
def test_check_elf(facts: ElfFacts, isa: str, problem: str | None) -> None:
    problems = check_elf(facts, isa)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems
