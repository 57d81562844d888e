"""bench.conv_kernels: the compiler's convolution kernels compute what ORT computes."""

from __future__ import annotations

import pytest

from bench.conv_kernels import main, parse_shape, run_shape


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shape", "64,64"], "--shape '64,64': expected 3 to 5 positive integers"),
        (["--shape", "64,0,56"], "--shape '64,0,56': expected 3 to 5 positive integers"),
        (["--shape", "64,64,x"], "expected 3 to 5 positive integers C,Co,H[,S[,K]]"),
        (["--shape", "64,64,56,3"], "--shape '64,64,56,3': the stride must be 1 or 2"),
        (["--shape", "64,64,56,1,5"], "and the kernel 1 or 3"),
        (["--group", "-1"], "--group -1: expected 0 or a positive number of tiles"),
        (
            ["--depthwise", "--shape", "32,64,14"],
            "--depthwise --shape 32,64,14,1,3: a depthwise convolution needs C == Co",
        ),
        (["--depthwise", "--shape", "32,32,14,1,1"], "needs C == Co and a 3x3 kernel"),
    ],
)
def test_bad_arguments_exit_2_naming_the_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_shape_defaults_to_stride_1_and_3x3() -> None:
    assert parse_shape("64,128,56") == [64, 128, 56, 1, 3]
    assert parse_shape("64,128,56,2,1") == [64, 128, 56, 2, 1]


@pytest.mark.parametrize(("unit", "block"), [("avx512", 8), ("avx2", 4)])
def test_a_group_that_does_not_divide_the_tiles_is_refused(
    unit: str, block: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--shape", "32,32,16", "--group", "12", "--unit", unit, "--rounds", "1"]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--repeat", "1"])
    assert info.value.code == 2
    assert f"--group 12: 3x3 32->32 at 16x16 + ReLU has 16 tiles in blocks of {block};" in (
        capsys.readouterr().err
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "group", "kernels"),
    [
        ([32, 32, 16, 1, 3], None, 2),  # direct and Winograd (2 groups of 8 tiles)
        ([32, 32, 16, 1, 3], 0, 2),  # Winograd stage by stage
        ([32, 48, 15, 2, 3], None, 1),  # stride 2: direct only
        ([32, 48, 14, 2, 1], None, 1),  # a 1x1 stride-2 shortcut
        ([256, 32, 14, 1, 1], None, 1),  # 1x1, 196 positions >= 32 channels: position-major
        ([256, 64, 7, 1, 1], None, 1),  # 1x1, 49 positions < 64 channels: channel-major
    ],
)
def test_kernels_match_onnxruntime(shape: list[int], group: int | None, kernels: int) -> None:
    rows = run_shape(shape, threads=1, rounds=1, repeat=2, group=group)
    assert len(rows) == kernels
    for row in rows:
        assert row["rel_err"] < 1e-4 and row["ratio"] > 0


def test_bf16_adds_the_kernels_this_cpu_runs() -> None:
    """``--bf16``: the vdpbf16ps kernel where the host has AVX-512 BF16, the AMX one where it
    has AMX tiles; both compute ORT's fp32 result to bf16's rounding (none on other CPUs)."""
    from compiler.execution import detect_host
    from compiler.fusion_plan import has_amx

    features = detect_host().cpu_features
    rows = run_shape([64, 64, 7, 1, 1], threads=1, rounds=1, repeat=2, bf16=True)
    labels = [row["kernel"] for row in rows]
    assert any(label.startswith("bf16 vdpbf16ps") for label in labels) is (
        "avx512_bf16" in features
    )
    assert any(label.startswith("bf16 AMX") for label in labels) is has_amx(
        "x86_64", sorted(features)
    )
    for row in rows:
        bound = 1e-2 if row["kernel"].startswith("bf16") else 1e-4
        assert row["rel_err"] < bound and row["ratio"] > 0


@pytest.mark.parametrize("shape", [[48, 48, 14, 1, 3], [40, 40, 13, 2, 3]])
def test_depthwise_kernel_matches_onnxruntime(shape: list[int]) -> None:
    rows = run_shape(shape, threads=1, rounds=1, repeat=2, depthwise=True)
    assert [row["kernel"].split(" (")[0] for row in rows] == ["depthwise"]
    assert rows[0]["rel_err"] < 1e-5 and rows[0]["ratio"] > 0
