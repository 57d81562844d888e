"""Table tests of the pure performance decisions: threads, runtime, trial budget, progress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from compiler.profiles import HardwareProfile, parse_profile
from compiler.runtime_choice import decide_runtime, plan_threads, runs_per_block
from compiler.tuning_plan import (
    FLOPS_PER_BYTE,
    ProgressTracker,
    TaskCost,
    choose_weight_prepack,
    split_budget,
    warm_start_sample,
)

ROOT = Path(__file__).resolve().parents[2] / "hw-profiles"


def _profile(name: str, **changes: Any) -> HardwareProfile:
    data = yaml.safe_load((ROOT / f"{name}.yaml").read_text())
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if value is None:
            data[section].pop(field, None)
        else:
            data[section][field] = value
    return parse_profile(data)


# ---------------------------------------------------------------- threads


@pytest.mark.parametrize(
    ("name", "changes", "host_cpus", "count", "source"),
    [
        # generic/x86_64 names no num-cores: resources.cpu_cores (2)
        ("generic/x86_64", {}, 2, 2, "resources.cpu_cores 2, capped by 2"),
        ("generic/x86_64", {}, 1, 1, "capped by 1 CPU"),
        ("generic/x86_64", {}, 16, 2, "resources.cpu_cores 2"),
        ("generic/x86_64", {"tvm.num-cores": 8}, 4, 4, "tvm num-cores 8, capped by 4"),
        ("intel/x86_64-avx512", {}, 2, 2, "resources.cpu_cores 16, capped by 2"),
        # Raspberry Pi profiles name num-cores 4 in the target
        ("raspberry-pi/4b-aarch64", {}, 2, 2, "tvm num-cores 4, capped by 2"),
        ("raspberry-pi/4b-aarch64", {}, None, 4, "tvm num-cores 4"),
        # GPU profiles: the host CPU's count
        ("nvidia/jetson-orin-nano", {}, None, 6, "resources.cpu_cores 6"),
    ],
)
def test_thread_count(
    name: str, changes: dict[str, Any], host_cpus: int | None, count: int, source: str
) -> None:
    plan = plan_threads(_profile(name, **changes), host_cpus=host_cpus)
    assert plan.count == count
    assert source in plan.source
    assert plan.to_dict()["count"] == count


def test_thread_count_rejects_zero_host_cpus() -> None:
    with pytest.raises(ValueError, match="host_cpus 0"):
        plan_threads(_profile("generic/x86_64"), host_cpus=0)


# ---------------------------------------------------------------- runtime choice

FAST, SLOW = [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    ("rounds", "margin", "runtime", "phrase"),
    [
        ([(FAST, SLOW)] * 3, 0.05, "tvm", "faster by at least 5%"),
        ([(SLOW, FAST)] * 3, 0.05, "onnxruntime", "ONNX Runtime is faster"),
        # a tie ships ONNX Runtime
        ([([1.0], [1.0])] * 3, 0.05, "onnxruntime", "ONNX Runtime is faster"),
        # 3 % faster is inside the 5 % margin: ONNX Runtime
        ([([0.97], [1.0])] * 5, 0.05, "onnxruntime", "less than the 5% margin"),
        # ... but enough without a margin
        ([([0.97], [1.0])] * 5, 0.0, "tvm", "faster by at least 0%"),
        # exactly the margin ships TVM
        ([([0.95], [1.0])] * 3, 0.05, "tvm", "at least 5%"),
        # one disturbed round (ORT preempted) does not flip the median of 3
        ([([1.2], [1.0]), ([1.2], [1.0]), ([1.2], [10.0])], 0.05, "onnxruntime", "faster"),
        # load hitting both halves of a round alike cancels in the ratio
        ([([0.8], [1.0]), ([8.0], [10.0]), ([0.8], [1.0])], 0.05, "tvm", "0.800"),
        # per-round medians, not means: one slow TVM run in each round is ignored
        ([([0.5, 0.5, 50.0], [1.0, 1.0, 1.0])] * 3, 0.05, "tvm", "TVM/ORT = 0.500"),
    ],
)
def test_decide_runtime(
    rounds: list[tuple[list[float], list[float]]], margin: float, runtime: str, phrase: str
) -> None:
    decision = decide_runtime(rounds, margin=margin)
    assert decision.runtime == runtime
    assert phrase in decision.reason
    assert decision.rounds == len(rounds)
    assert decision.to_dict()["runtime"] == runtime


def test_decide_runtime_counts_rounds_won() -> None:
    decision = decide_runtime([([0.5], [1.0]), ([0.5], [1.0]), ([0.99], [1.0])], margin=0.05)
    assert (decision.runtime, decision.tvm_wins) == ("tvm", 2)
    assert "2/3 rounds" in decision.reason


@pytest.mark.parametrize(
    ("rounds", "margin", "message"),
    [
        ([], 0.05, "no measurement rounds"),
        ([([], [1.0])], 0.05, "round 0 lacks timings"),
        ([([1.0], [0.0])], 0.05, "timing <= 0"),
        ([([1.0], [1.0])], 1.0, "margin 1.0 is outside"),
        ([([1.0], [1.0])], -0.1, "margin -0.1 is outside"),
    ],
)
def test_decide_runtime_rejects(
    rounds: list[tuple[list[float], list[float]]], margin: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        decide_runtime(rounds, margin=margin)


@pytest.mark.parametrize(
    ("latency_ms", "minimum", "expected"),
    [
        # mobilenet_v2 at 8 ms: 0.4 s of calls is 50 runs
        ([8.0, 7.9, 8.3], 6, 50),
        # the median, not the first or the mean: one slow first call changes nothing
        ([80.0, 8.0, 8.0], 6, 50),
        # a 0.05 ms MLP: capped at 200 runs
        ([0.05] * 6, 6, 200),
        # a model slower than the block: the minimum
        ([900.0], 6, 6),
        # a minimum above the cap wins
        ([0.05], 300, 300),
    ],
)
def test_runs_per_block(latency_ms: list[float], minimum: int, expected: int) -> None:
    assert runs_per_block(latency_ms, minimum=minimum) == expected


@pytest.mark.parametrize(
    ("latency_ms", "minimum", "message"),
    [
        ([], 6, "latencies \\[\\] must be"),
        ([8.0, 0.0], 6, "must be a non-empty list of times > 0"),
        ([8.0], 0, "minimum 0, maximum 200 and seconds 0.4 must be positive"),
    ],
)
def test_runs_per_block_rejects(latency_ms: list[float], minimum: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        runs_per_block(latency_ms, minimum=minimum)


# ---------------------------------------------------------------- trial budget


def _t(
    name: str,
    flops: float,
    *,
    weight: float = 1,
    useful: int | None = None,
    nbytes: float = 0.0,
) -> TaskCost:
    return TaskCost(name=name, weight=weight, flops=flops, max_useful=useful, bytes_moved=nbytes)


@pytest.mark.parametrize(
    ("tasks", "total", "per_task", "expected"),
    [
        # proportional to FLOPs
        ([_t("conv", 300), _t("dense", 100)], 82, 64, [61, 21]),
        # roofline: a memory-bound task counts FLOPS_PER_BYTE (4) FLOPs per byte it moves
        ([_t("conv", 300, nbytes=10), _t("pool", 5, nbytes=25)], 82, 64, [61, 21]),
        # ... and a compute-bound one by its FLOPs, whatever its bytes
        ([_t("conv", 300, nbytes=75), _t("dense", 100)], 82, 64, [61, 21]),
        # weight multiplies FLOPs: a layer used twice counts twice
        ([_t("a", 100, weight=2), _t("b", 200)], 42, 64, [21, 21]),
        # a task with one possible schedule (reshape) gets exactly one trial
        (
            [_t("conv", 1e6), _t("reshape", 0, useful=1), _t("add", 1e3, useful=1)],
            40,
            64,
            [38, 1, 1],
        ),
        # zero-FLOP tasks get their one trial and nothing more
        ([_t("conv", 1e6), _t("reshape", 0)], 50, 64, [49, 1]),
        # the per-task cap: the surplus goes to the others (water-filling)
        ([_t("big", 1e9), _t("mid", 1e6), _t("small", 1e6)], 100, 64, [64, 18, 18]),
        # everybody capped: budget nobody can use stays unspent
        ([_t("a", 10), _t("b", 10)], 500, 64, [64, 64]),
        # a limited design space caps a task below the per-task limit
        ([_t("a", 10, useful=3), _t("b", 10)], 50, 64, [3, 47]),
        # fewer trials than tasks: one each anyway (a task without a record is re-tuned)
        ([_t("a", 10), _t("b", 20), _t("c", 30)], 2, 64, [1, 1, 1]),
        # zero trials is still one each: the caller does not tune with 0
        ([_t("a", 10)], 0, 64, [1]),
        # largest remainder, ties to the earlier task
        ([_t("a", 1), _t("b", 1), _t("c", 1)], 5, 64, [2, 2, 1]),
        ([], 100, 64, []),
    ],
)
def test_split_budget(
    tasks: list[TaskCost], total: int, per_task: int, expected: list[int]
) -> None:
    budget = split_budget(tasks, total, max_trials_per_task=per_task)
    assert budget == expected
    if tasks and total >= len(tasks):
        assert sum(budget) <= total


def test_split_budget_spends_the_whole_budget_when_it_can() -> None:
    tasks = [_t(f"t{i}", flops=float(i * i + 1), weight=1 + i % 3) for i in range(33)]
    budget = split_budget(tasks, 264, max_trials_per_task=64)
    assert sum(budget) == 264 and min(budget) >= 1 and max(budget) <= 64
    # more arithmetic never means fewer trials
    order = sorted(range(33), key=lambda i: tasks[i].score)
    assert [budget[i] for i in order] == sorted(budget)


@pytest.mark.parametrize(
    ("total", "per_task", "message"),
    [(-1, 64, "total trials -1 is negative"), (10, 0, "max_trials_per_task 0")],
)
def test_split_budget_rejects(total: int, per_task: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_budget([_t("a", 1)], total, max_trials_per_task=per_task)


@pytest.mark.parametrize(
    ("costs", "cap", "expected"),
    [
        ([], 4, []),
        ([3.0, 1.0, 2.0], 4, [1, 2, 0]),  # under the cap: all, fastest first
        ([2.0, 2.0, 1.0], 3, [2, 0, 1]),  # ties keep the database order
        # over the cap: evenly over the ranking, the fastest (index 7) and slowest (0) in
        ([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], 2, [7, 0]),
        ([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], 4, [7, 5, 2, 0]),
        ([1e10, 0.5, 1e10, 0.25], 4, [3, 1, 0, 2]),  # failed runs (1e10 s) rank last
    ],
)
def test_warm_start_sample(costs: list[float], cap: int, expected: list[int]) -> None:
    assert warm_start_sample(costs, cap) == expected


def test_warm_start_sample_spreads_without_repeats() -> None:
    costs = [float((i * 37) % 101) for i in range(500)]
    picked = warm_start_sample(costs, 64)
    assert len(set(picked)) == 64
    ranks = sorted(range(500), key=lambda i: (costs[i], i))
    assert picked[0] == ranks[0] and picked[-1] == ranks[-1]


def test_warm_start_sample_rejects_a_cap_below_two() -> None:
    with pytest.raises(ValueError, match="warm-start cap 1 must be at least 2"):
        warm_start_sample([1.0, 2.0, 3.0], 1)


@pytest.mark.parametrize(
    ("requested", "trials", "eligible", "covered", "expected", "checks_records"),
    [
        # The default: on whenever it can take effect.
        (None, 64, True, False, True, False),  # tuning: prepacked tasks get the records
        (None, 0, True, True, True, True),  # a --trials 0 rebuild after a prepacked tuning
        (None, 0, True, False, False, True),  # no prepacked records: the plain build
        (None, 64, False, True, False, False),  # cross-compiled, GPU or no database
        # An explicit choice wins where the build allows it.
        (True, 0, True, False, True, False),
        (True, 64, False, True, False, False),
        (False, 64, True, True, False, False),
        (False, 0, True, True, False, False),
    ],
)
def test_choose_weight_prepack(
    requested: bool | None,
    trials: int,
    eligible: bool,
    covered: bool,
    expected: bool,
    checks_records: bool,
) -> None:
    asked: list[bool] = []

    def records_cover() -> bool:
        asked.append(True)
        return covered

    got = choose_weight_prepack(
        requested, trials=trials, eligible=eligible, records_cover=records_cover
    )
    assert got is expected
    assert bool(asked) is checks_records  # the database is read only when it decides


def test_task_score_is_the_roofline_estimate() -> None:
    assert _t("pool", 8_192, nbytes=163_840).score == FLOPS_PER_BYTE * 163_840
    assert _t("conv", 9.4e6, nbytes=344_576, weight=2).score == 2 * 9.4e6
    assert _t("odd", -5, nbytes=-1, weight=-1).score == 0.0


# ---------------------------------------------------------------- tuning progress


def _events(planned: int, events: list[tuple[str, int]]) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    tracker = ProgressTracker(planned, lambda done, total: seen.append((done, total)))
    tracker.start()
    for kind, n in events:
        if kind == "m":
            tracker.measured(n)
        else:
            tracker.batch_done(n)
    tracker.finish()
    return seen


@pytest.mark.parametrize(
    ("planned", "events", "expected"),
    [
        # one task tuned in one batch of 4: the bar moves per trial, not 0 -> 4 at the end
        (4, [("m", 1)] * 4 + [("b", 4)], [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]),
        # two tasks, one batch each
        (3, [("m", 1), ("b", 1), ("m", 1), ("m", 1), ("b", 2)], [(0, 3), (1, 3), (2, 3), (3, 3)]),
        # a batch where one candidate failed to build (never reached the runner)
        (4, [("m", 1), ("m", 1), ("m", 1), ("b", 4)], [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]),
        # the search ran out of candidates: finish still ends at the total
        (10, [("m", 1), ("m", 1), ("b", 2)], [(0, 10), (1, 10), (2, 10), (10, 10)]),
        # more measured than planned: one short of the total until tuning has returned
        (2, [("m", 3), ("b", 3)], [(0, 2), (1, 2), (2, 2)]),
        # no events: start and finish
        (5, [], [(0, 5), (5, 5)]),
    ],
)
def test_progress_sequence(
    planned: int, events: list[tuple[str, int]], expected: list[tuple[int, int]]
) -> None:
    seen = _events(planned, events)
    assert seen == expected
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_progress_waits_one_short_until_tuning_returns() -> None:
    seen: list[int] = []
    tracker = ProgressTracker(3, lambda done, _total: seen.append(done))
    tracker.start()
    tracker.measured(3)
    tracker.batch_done(3)  # every trial counted, MetaSchedule still searching and building
    assert (seen[-1], tracker.done) == (2, 2)
    tracker.finish()
    assert seen == [0, 2, 3]


# ---------------------------------------------------------------- settings and options


@pytest.mark.parametrize("value", ["1.5", "-0.1", "five"])
def test_bad_margin_setting_is_a_usage_error(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from edgeloop.cli import cli

    monkeypatch.setenv("EDGELOOP_RUNTIME_MARGIN", value)
    result = CliRunner().invoke(
        cli, ["compile", str(tmp_path / "m.onnx"), "--profile", "generic/x86_64", "-o", "x"]
    )
    assert result.exit_code == 2, result.output
    assert f"EDGELOOP_RUNTIME_MARGIN={value!r}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runtime_margin": 1.0}, "runtime margin 1.0 is outside"),
        ({"latency_rounds": 0}, "latency rounds 0 must be at least 1"),
    ],
)
def test_bad_request_values(changes: dict[str, Any], message: str, tmp_path: Path) -> None:
    from compiler.errors import UsageError
    from compiler.pipeline import CompileRequest, compile_model
    from compiler.settings import CompilerSettings

    request = CompileRequest(
        model=tmp_path / "m.onnx", profile="generic/x86_64", output=tmp_path / "out", **changes
    )
    with pytest.raises(UsageError, match=message):
        compile_model(request, settings=CompilerSettings())
    assert not (tmp_path / "out").exists()
