"""bench.fused_block: the hand-scheduled inverted-residual kernel computes what ORT computes."""

from __future__ import annotations

import pytest

from bench.fused_block import main, run_shape


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shape", "16,96,16"], "--shape '16,96,16': expected 4 positive integers"),
        (["--shape", "16,96,0,112"], "--shape '16,96,0,112': expected 4 positive integers"),
        (["--config", "4,2,x,2,1,1,1"], "--config '4,2,x,2,1,1,1': expected 7 positive integers"),
        (["--config", "4,2,2,2"], "--config '4,2,2,2': expected 7 positive integers"),
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
    configs = [[2, 4, 2, 2, 2, 4, 1], [3, 2, 2, 2, 2, 2, 2], [2, 2, 3, 2, 2, 2, 2]]
    rows = run_shape(shape, configs, threads=1, rounds=1, repeat=2)
    assert len(rows) == 1  # R=3 does not divide the side, 3 vectors is no block: skipped
    (row,) = rows
    assert row["max_abs_err"] < 1e-4
    assert row["tvm_us"] > 0 and row["ort_us"] > 0
