"""bench.fused_block: the compiler's fused block kernel computes what ORT computes."""

from __future__ import annotations

import pytest

from bench.fused_block import main, parse_shape, run_shape
from compiler.fusion_plan import BlockConfig


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shape", "16,96,16"], "--shape '16,96,16': expected 4 positive integers"),
        (["--shape", "16,96,0,112"], "--shape '16,96,0,112': expected 4 positive integers"),
        (["--config", "4,2,x,2"], "--config '4,2,x,2': expected 4 positive integers"),
        (["--config", "planned"], "--config 'planned': expected 4 positive integers"),
        (["--config", "4,2,2,2,0"], "--config '4,2,2,2,0': expected 5 positive integers"),
        (["--shape", "16,96,24,112,3"], "--shape '16,96,24,112,3': the stride must be 1 or 2"),
        (["--shape", "16,96,24,111,2"], "2 needs an even side H"),
        (["--shape", "16,96,24,112,2,1"], "expected 4 positive integers"),
    ],
)
def test_bad_shapes_and_configs_exit_2_naming_the_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape",
    [
        [8, 16, 8, 16],  # residual block
        [8, 24, 12, 10],  # no residual (C != Co); rows of 10, not a whole vector
    ],
)
def test_fused_block_matches_onnxruntime(shape: list[int]) -> None:
    shape = [*shape, 1]
    configs = [
        BlockConfig(rows=2, expand_channels=4, depthwise_channels=2, project_channels=2),
        BlockConfig(rows=3, expand_channels=2, depthwise_channels=2, project_channels=2),
        # AVX2-sized: half the vectors of positions per accumulator block
        BlockConfig(rows=2, expand_channels=3, depthwise_channels=1, project_channels=3, vectors=2),
        None,  # the compiler's plan: images this narrow are not fused
    ]
    rows = run_shape(shape, configs, threads=1, rounds=1, repeat=2)
    # R=3 does not divide the side: skipped, not miscomputed; 3 channels divide only 24 and 12
    expected = [[2, 4, 2, 2, 4]] + ([[2, 3, 1, 3, 2]] if shape[1:3] == [24, 12] else [])
    assert [row["config"] for row in rows] == expected
    assert all(row["max_abs_err"] < 1e-4 for row in rows)
    assert all(row["tvm_us"] > 0 and row["ort_us"] > 0 for row in rows)


def test_shapes_name_the_stride_and_the_missing_expand_stage() -> None:
    assert parse_shape("24,144,24,56") == [24, 144, 24, 56, 1]
    assert parse_shape("16,96,24,112,2") == [16, 96, 24, 112, 2]
    assert parse_shape("32,-,16,112") == [32, 0, 16, 112, 1]


@pytest.mark.slow
@pytest.mark.parametrize("stride", [1, 2])
def test_a_block_without_expand_stage_matches_onnxruntime(stride: int) -> None:
    config = BlockConfig(rows=4, expand_channels=4, depthwise_channels=2, project_channels=4)
    (row,) = run_shape([16, 0, 8, 16, stride], [config], threads=1, rounds=1, repeat=2)
    assert row["max_abs_err"] < 1e-4


@pytest.mark.slow
def test_stride_2_fused_block_matches_onnxruntime() -> None:
    configs = [
        BlockConfig(rows=2, expand_channels=4, depthwise_channels=2, project_channels=4),
        BlockConfig(rows=4, expand_channels=2, depthwise_channels=2, project_channels=2),
    ]
    rows = run_shape([8, 24, 12, 16, 2], configs, threads=1, rounds=1, repeat=2)
    assert [row["config"][:4] for row in rows] == [[2, 4, 2, 4], [4, 2, 2, 2]]
    assert all(row["max_abs_err"] < 1e-4 for row in rows)


def test_the_host_target_names_the_bf16_features_the_cpu_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A VM may mask the CPU model (LLVM then names a CPU without BF16 or AMX) while its
    flags still list them: the target adds them as LLVM features."""
    from types import SimpleNamespace

    import compiler.execution as execution
    from bench.fused_block import host_target

    def host(*flags: str) -> object:
        return lambda: SimpleNamespace(cpu_features=frozenset(("avx2", "fma", *flags)))

    monkeypatch.setattr(
        execution, "detect_host", host("avx512f", "amx_bf16", "avx512_bf16", "amx_tile")
    )
    target = host_target(2)
    assert target["mattr"] == ["+avx512bf16", "+amx-tile", "+amx-bf16"]
    assert target["kind"] == "llvm" and target["num-cores"] == 2 and target["mcpu"]
    monkeypatch.setattr(execution, "detect_host", host("avx512f"))
    assert "mattr" not in host_target(1)


def test_the_host_target_turns_off_the_vector_isas_the_cpu_hides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Zen 4 VM without AVX-512 is named znver4 by LLVM: AVX-512 code would not run."""
    from types import SimpleNamespace

    import compiler.execution as execution
    from bench.fused_block import host_target

    flags = frozenset(("avx", "avx2", "fma"))
    monkeypatch.setattr(execution, "detect_host", lambda: SimpleNamespace(cpu_features=flags))
    assert host_target(2)["mattr"] == ["-avx512f"]
    flags = frozenset(("avx",))
    assert host_target(2)["mattr"] == ["-avx2", "-fma", "-avx512f"]
