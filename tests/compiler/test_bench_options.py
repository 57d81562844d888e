"""bench.compile_vs_ort's command line: bad values are refused with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.compile_vs_ort import parse_args


def test_max_trials_per_task_overrides_the_profile_cap() -> None:
    assert parse_args(["--max-trials-per-task", "640"]).max_trials_per_task == 640
    assert parse_args([]).max_trials_per_task is None  # the profile's own cap


def test_retune_continues_a_given_database(tmp_path: Path) -> None:
    opts = parse_args(["--retune", "--tuning-db", str(tmp_path)])
    assert opts.retune and opts.tuning_db == tmp_path
    assert not parse_args([]).retune


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-trials-per-task", "0"], "--max-trials-per-task 0: must be at least 1"),
        (["--trials", "cnn=5"], "unknown model 'cnn'"),
        (["--trials", "mlp=-1"], "--trials mlp=-1: must be 0 or more"),
        (["--retune"], "--retune continues the tuning in --tuning-db DIR"),
    ],
)
def test_bad_options_exit_2_naming_the_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
