"""The pure rollout planner: policy, targets, variants, stages, gates, commands, simulation."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from pydantic import TypeAdapter

from agent import jobs as agent_jobs
from agent.protocol import JobState, JobUpdate, LatencySummary
from fleet.errors import FleetError
from fleet.rollout import (
    Abort,
    Action,
    CancelJob,
    CannotRollback,
    CommandError,
    Complete,
    DeviceInfo,
    HealthReport,
    JobTransitionError,
    Pause,
    Phase,
    PlanError,
    PolicyError,
    RatePolicy,
    RollbackDevice,
    RolloutPolicy,
    RolloutState,
    Size,
    StartJob,
    Target,
    UnknownDeviceError,
    Unmatched,
    apply_update,
    apply_updates,
    cancel,
    device_counts,
    gate_violations,
    health_from_latency,
    job_transition,
    next_due,
    parse_policy,
    pause,
    plan_rollout,
    rate_allowed,
    resolve_targets,
    resume,
    rollback,
    select_variants,
    step,
)

X86 = "generic/x86_64"
ARM = "raspberry-pi/4b-aarch64"
NEW = "new-x86"
OLD = "old-x86"
IDS = [f"d{i:02d}" for i in range(10)]

S = JobState.SUCCEEDED
F = JobState.FAILED
IP = JobState.IN_PROGRESS


# ---------------------------------------------------------------- helpers


def devices(n: int = 10, *, previous: str | None = OLD, **kw: Any) -> list[DeviceInfo]:
    """``n`` x86 devices d00, d01, ... running ``previous``."""
    return [DeviceInfo(f"d{i:02d}", X86, current_artifact_id=previous, **kw) for i in range(n)]


def policy(**kw: Any) -> RolloutPolicy:
    """A policy with ``waves=['100%']`` unless waves or rate is given."""
    if "rate" not in kw:
        kw.setdefault("waves", ["100%"])
    return parse_policy(kw)


def plan(n: int = 10, *, seed: int | None = None, **kw: Any) -> RolloutState:
    """A PENDING rollout of NEW to ``n`` devices, planned at time 0."""
    return plan_rollout(
        "r1", policy(**kw), devices=devices(n), variants={X86: NEW}, now=0.0, seed=seed
    )


def report(
    rollout: RolloutState,
    device_id: str,
    state: JobState,
    *,
    now: float,
    reason: str | None = None,
    job_id: str | None = None,
    rollback_job: bool = False,
) -> RolloutState:
    """Apply the device's update for its current deploy (or rollback) job."""
    job = rollout.devices[device_id]
    run = job.rollback if rollback_job else job.deploy
    assert run is not None
    update = JobUpdate(
        job_id=job_id or run.job_id,
        device_id=device_id,
        artifact_id=job.artifact_id,
        state=state,
        reason=reason,
    )
    return apply_update(rollout, update, now=now)


def report_all(
    rollout: RolloutState, ids: Iterable[str], state: JobState, *, now: float
) -> RolloutState:
    for device_id in ids:
        rollout = report(rollout, device_id, state, now=now)
    return rollout


def started(actions: Iterable[Action]) -> list[str]:
    return [a.device_id for a in actions if isinstance(a, StartJob)]


def touched(rollout: RolloutState) -> set[str]:
    return {d for d, job in rollout.devices.items() if job.touched}


def canary_passed(n: int = 10, *, now: float = 10.0, **kw: Any) -> RolloutState:
    """A rollout whose canary (default 1 device) started at 0 and succeeded at ``now``."""
    rollout, _ = step(plan(n, **kw), now=0.0)
    return report_all(rollout, rollout.canary_devices, S, now=now)


def healthy(samples: int = 500) -> HealthReport:
    return HealthReport(
        samples=samples, p95_latency_ms=10.0, error_rate=0.0, drift=0.0, shadow_disagreement=0.0
    )


# ---------------------------------------------------------------- policy


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, ["set exactly one of 'waves' or 'rate' (got neither)"]),
        ({"waves": [1], "rate": {"base_per_minute": 1}}, ["(got both)"]),
        ({"waves": []}, ["waves:", "at least 1 item"]),
        ({"waves": ["x"]}, ["waves.0: size 'x' is neither a count nor a percent", "'10%'"]),
        ({"waves": [True]}, ["waves.0: size True"]),
        ({"waves": [2.5]}, ["waves.0: size 2.5"]),
        ({"waves": [0]}, ["waves.0.count", "greater than or equal to 1", "(got 0)"]),
        ({"waves": ["150%"]}, ["waves.0.percent", "less than or equal to 100"]),
        ({"waves": [1], "canary": {}}, ["canary: set exactly one of 'count' or 'percent'"]),
        (
            {"waves": [1], "canary": {"count": 1, "percent": 5}},
            ["canary: set exactly one of 'count' or 'percent'"],
        ),
        (
            {"waves": [1], "wavez": [1]},
            ["unknown field 'wavez'; choose from: canary, waves, rate, success_threshold"],
        ),
        (
            {"rate": {"base_per_minute": 1, "factor": 2}},
            ["unknown field 'rate.factor'; choose from: base_per_minute, increment_factor"],
        ),
        ({"rate": {"base_per_minute": 0}}, ["rate.base_per_minute", "greater than 0"]),
        ({"rate": {"base_per_minute": 1, "increment_factor": 0.5}}, ["rate.increment_factor"]),
        (
            {"rate": {"base_per_minute": 5, "max_per_minute": 2}},
            ["rate: max_per_minute 2 is below base_per_minute 5"],
        ),
        ({"waves": [1], "success_threshold": 1.5}, ["success_threshold", "less than or equal"]),
        ({"waves": [1], "success_threshold": 0}, ["success_threshold", "greater than 0"]),
        ({"waves": [1], "abort_failures": 0}, ["abort_failures"]),
        ({"waves": [1], "abort_failure_ratio": 2}, ["abort_failure_ratio"]),
        ({"waves": [1], "job_timeout_s": -1}, ["job_timeout_s"]),
        ({"waves": [1], "max_retries": -1}, ["max_retries"]),
        ({"waves": [1], "observe_s": -5}, ["observe_s"]),
        (
            {"waves": [1], "health_gates": {"action": "stop"}},
            ["health_gates.action: Input should be 'abort' or 'pause' (got 'stop')"],
        ),
        (
            {"waves": [1], "health_gates": {"max_latency": 5}},
            ["unknown field 'health_gates.max_latency'; choose from: max_p95_latency_ms"],
        ),
        ({"waves": [1], "health_gates": {"min_samples": 0}}, ["health_gates.min_samples"]),
        ({"waves": [1], "health_gates": {"max_error_rate": 1.5}}, ["health_gates.max_error_rate"]),
        (
            {"waves": ["x"], "max_retries": -1},  # every problem is named, not only the first
            ["waves.0: size 'x'", "max_retries"],
        ),
    ],
)
def test_policy_errors_name_field_and_choices(data: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(data)
    assert str(info.value).startswith("invalid rollout policy: ")
    for fragment in expected:
        assert fragment in str(info.value)
    assert isinstance(info.value.__cause__, Exception)  # raised from the ValidationError
    assert isinstance(info.value, FleetError)  # the fleet API's one handler maps it
    assert (PolicyError.http_status, PolicyError.exit_code) == (422, 2)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (2, Size(count=2)),
        ("5%", Size(percent=5)),
        (" 12.5 % ", Size(percent=12.5)),
        ({"count": 3}, Size(count=3)),
        ({"percent": 40}, Size(percent=40)),
    ],
)
def test_size_input_forms(given: Any, expected: Size) -> None:
    assert parse_policy({"canary": given, "waves": [given]}) == RolloutPolicy(
        canary=expected, waves=[expected]
    )


def test_policy_defaults() -> None:
    parsed = parse_policy({"rate": {"base_per_minute": 2}})
    assert parsed.canary == Size(count=1)
    assert parsed.rate == RatePolicy(base_per_minute=2, increment_factor=2.0)
    assert (parsed.success_threshold, parsed.max_retries, parsed.observe_s) == (1.0, 0, 0.0)
    assert parsed.health_gates.action == "abort"
    assert parsed.health_gates.min_samples == 100


@pytest.mark.parametrize(
    ("size", "total", "expected"),
    [
        (Size(count=3), 10, 3),
        (Size(count=20), 10, 10),  # at most everyone
        (Size(percent=10), 10, 1),
        (Size(percent=1), 10, 1),  # rounds up: at least one device
        (Size(percent=25), 10, 3),
        (Size(percent=7), 100, 7),  # no float fuzz: 7% of 100 is 7, not 8
        (Size(percent=0.5), 1000, 5),
        (Size(percent=100), 7, 7),
        (Size(count=1), 0, 0),
    ],
)
def test_size_of(size: Size, total: int, expected: int) -> None:
    assert size.of(total) == expected


@pytest.mark.parametrize(
    ("rate", "elapsed_s", "limit", "expected"),
    [
        # base 1, factor 2: minutes release 1, 2, 4, 8 … → 1, 3, 7, 15 cumulative
        ((1, 2, None), 0, 100, 1),
        ((1, 2, None), 59.9, 100, 1),
        ((1, 2, None), 60, 100, 3),
        ((1, 2, None), 120, 100, 7),
        ((1, 2, None), 180, 100, 15),
        ((1, 2, None), 180, 10, 10),  # capped by the devices left
        ((1, 2, 4), 180, 100, 11),  # 1 + 2 + 4 + 4 with max_per_minute 4
        ((1, 2, 4), 240, 100, 15),
        ((2.5, 1.5, None), 0, 100, 2),
        ((2.5, 1.5, None), 60, 100, 6),  # 2.5 + 3.75
        ((0.5, 1, None), 0, 100, 0),
        ((0.5, 1, None), 60, 100, 1),
        ((0.5, 1, None), 179, 100, 1),
        ((0.5, 1, None), 180, 100, 2),
        ((10, 10, None), 10**7, 1000, 1000),  # no overflow after days
        ((1, 2, None), -1, 100, 0),
    ],
)
def test_rate_schedule(
    rate: tuple[float, float, float | None], elapsed_s: float, limit: int, expected: int
) -> None:
    base, factor, cap = rate
    schedule = RatePolicy(base_per_minute=base, increment_factor=factor, max_per_minute=cap)
    assert rate_allowed(schedule, elapsed_s, limit=limit) == expected


# ---------------------------------------------------------------- targets and variants

FLEET = [
    DeviceInfo("cam-1", X86, groups=frozenset({"factory-a"}), tags={"site": "lyon", "hw": "v2"}),
    DeviceInfo("cam-2", X86, groups=frozenset({"factory-b"}), tags={"site": "lyon"}),
    DeviceInfo("cam-3", ARM, groups=frozenset({"factory-a", "lab"}), tags={"site": "oslo"}),
    DeviceInfo("cam-4", ARM, tags={"site": "oslo", "hw": "v2"}),
]


@pytest.mark.parametrize(
    ("target", "expected", "missing"),
    [
        (Target(device_ids=["cam-2", "cam-4"]), ["cam-2", "cam-4"], []),
        (Target(device_ids=["cam-2", "ghost"]), ["cam-2"], ["ghost"]),
        (Target(groups=["factory-a"]), ["cam-1", "cam-3"], []),
        (Target(groups=["nowhere"]), [], []),
        (Target(tags={"site": "lyon"}), ["cam-1", "cam-2"], []),
        (Target(tags={"site": "oslo", "hw": "v2"}), ["cam-4"], []),  # every pair must match
        (Target(groups=["lab"], tags={"hw": "v2"}), ["cam-1", "cam-3", "cam-4"], []),  # union
        (Target(device_ids=["cam-1"], groups=["factory-a"]), ["cam-1", "cam-3"], []),
    ],
)
def test_resolve_targets(target: Target, expected: list[str], missing: list[str]) -> None:
    chosen, absent = resolve_targets(FLEET, target)
    assert [d.device_id for d in chosen] == expected
    assert absent == missing


def test_target_needs_a_selector() -> None:
    with pytest.raises(ValueError, match="set at least one of 'device_ids', 'groups' or 'tags'"):
        Target()


@pytest.mark.parametrize(
    ("variants", "assigned", "unmatched"),
    [
        (
            {X86: "art-x86", ARM: "art-arm"},
            {"cam-1": "art-x86", "cam-2": "art-x86", "cam-3": "art-arm", "cam-4": "art-arm"},
            [],
        ),
        (
            {X86: "art-x86"},
            {"cam-1": "art-x86", "cam-2": "art-x86"},
            [Unmatched("cam-3", ARM), Unmatched("cam-4", ARM)],
        ),
        ({"nvidia/jetson-orin-nano": "art-j"}, {}, [(d.device_id, d.profile) for d in FLEET]),
        ({}, {}, [(d.device_id, d.profile) for d in FLEET]),
    ],
)
def test_select_variants(
    variants: dict[str, str], assigned: dict[str, str], unmatched: list[Unmatched]
) -> None:
    got_assigned, got_unmatched = select_variants(list(reversed(FLEET)), variants)
    assert got_assigned == assigned
    assert got_unmatched == unmatched


def test_plan_lists_unmatched_devices() -> None:
    rollout = plan_rollout("r1", policy(), devices=FLEET, variants={ARM: "art-arm"}, now=0.0)
    assert set(rollout.devices) == {"cam-3", "cam-4"}
    assert rollout.unmatched == (Unmatched("cam-1", X86), Unmatched("cam-2", X86))
    assert rollout.devices["cam-3"].artifact_id == "art-arm"


@pytest.mark.parametrize(
    ("rollout_id", "fleet", "variants", "expected"),
    [
        ("r1", FLEET, {"x/y": "a"}, "device profiles: generic/x86_64, raspberry-pi/4b-aarch64"),
        ("r1", FLEET, {"x/y": "a"}, "variants built for: x/y"),
        ("r1", [], {X86: "a"}, "device profiles: none (no devices)"),
        ("r1", [FLEET[0], FLEET[1], FLEET[0]], {X86: "a"}, "listed more than once: cam-1"),
        ("", FLEET, {X86: "a"}, "rollout id '' is invalid"),
        ("r.1", FLEET, {X86: "a"}, "rollout id 'r.1' is invalid"),
        ("x" * 41, FLEET, {X86: "a"}, "is invalid; use 1-40 of"),
    ],
)
def test_plan_errors(
    rollout_id: str, fleet: list[DeviceInfo], variants: dict[str, str], expected: str
) -> None:
    with pytest.raises(PlanError) as info:
        plan_rollout(rollout_id, policy(), devices=fleet, variants=variants, now=0.0)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("n", "kw", "ends"),
    [
        (10, {"canary": 1, "waves": ["100%"]}, (1, 10)),
        (10, {"canary": "20%", "waves": [3, "50%"]}, (2, 5, 9, 10)),  # rest forms a last wave
        (10, {"canary": "1%", "waves": ["10%"]}, (1, 2, 10)),  # 10% of the 9 others: 1
        (10, {"canary": 10, "waves": [1]}, (10,)),  # the canary is everyone
        (3, {"canary": 5, "waves": [1]}, (3,)),
        (10, {"canary": 2, "waves": [4, 4, 4]}, (2, 6, 10)),  # waves past the end are dropped
        (10, {"canary": 1, "rate": {"base_per_minute": 1}}, (1, 10)),
        (1, {"canary": 1, "rate": {"base_per_minute": 1}}, (1,)),
    ],
)
def test_stage_cuts(n: int, kw: dict[str, Any], ends: tuple[int, ...]) -> None:
    assert plan(n, **kw).stage_ends == ends


def test_order_is_sorted_seeded_and_online_first() -> None:
    assert plan().order == tuple(IDS)
    shuffled = plan(seed=7).order
    assert shuffled == plan(seed=7).order != tuple(IDS)
    assert sorted(shuffled) == IDS
    assert plan(seed=8).order != shuffled
    fleet = [DeviceInfo(d, X86, online=d not in {"d00", "d03"}) for d in IDS]
    rollout = plan_rollout("r1", policy(), devices=fleet, variants={X86: NEW}, now=0.0)
    assert rollout.order[-2:] == ("d00", "d03")
    assert rollout.canary_devices == ("d01",)


def test_previous_artifact_recorded_per_device() -> None:
    fleet = [DeviceInfo("a", X86, current_artifact_id="v1"), DeviceInfo("b", X86)]
    rollout = plan_rollout("r1", policy(), devices=fleet, variants={X86: NEW}, now=0.0)
    assert rollout.devices["a"].previous_artifact_id == "v1"
    assert rollout.devices["b"].previous_artifact_id is None


# ---------------------------------------------------------------- job state machine


@pytest.mark.parametrize(("current", "new"), list(itertools.product(JobState, JobState)))
def test_job_transitions_mirror_the_agent(current: JobState, new: JobState) -> None:
    try:
        expected: JobState | None = agent_jobs.transition(current, new)
    except agent_jobs.TransitionError:
        expected = None
    if expected is None:
        with pytest.raises(JobTransitionError, match=f"{current.value} cannot become {new.value}"):
            job_transition(current, new)
    else:
        assert job_transition(current, new) is new


@pytest.mark.parametrize(
    ("current", "new", "choices"),
    [
        (S, IP, "SUCCEEDED can become: nothing (terminal)"),
        (IP, JobState.QUEUED, "IN_PROGRESS can become: IN_PROGRESS, SUCCEEDED, FAILED, CANCELED"),
        (JobState.QUEUED, JobState.QUEUED, "QUEUED can become: IN_PROGRESS, SUCCEEDED"),
    ],
)
def test_illegal_transition_names_choices(current: JobState, new: JobState, choices: str) -> None:
    with pytest.raises(JobTransitionError, match=re.escape(choices)):
        job_transition(current, new)


def test_apply_update_rules() -> None:
    rollout, _ = step(plan(), now=0.0)
    rollout = report(rollout, "d00", IP, now=1.0)
    assert rollout.devices["d00"].state is IP
    assert rollout.devices["d00"].deploy is not None
    assert rollout.devices["d00"].deploy.last_update == 1.0
    rollout = report(rollout, "d00", S, now=2.0)
    again = report(rollout, "d00", S, now=3.0)  # QoS 1 redelivery: only last_update moves
    assert again.devices["d00"].state is S
    assert again.devices["d00"].deploy is not None
    assert again.devices["d00"].deploy.last_update == 3.0
    with pytest.raises(JobTransitionError, match="device 'd00' job 'r1.d00.1': job state SUCC"):
        report(rollout, "d00", IP, now=4.0)
    assert report(rollout, "d00", F, now=4.0, job_id="other-job") is rollout  # not ours
    with pytest.raises(UnknownDeviceError, match="device 'ghost' is not part of rollout 'r1'"):
        apply_update(
            rollout,
            JobUpdate(job_id="x", device_id="ghost", artifact_id=NEW, state=S),
            now=5.0,
        )


# ---------------------------------------------------------------- canary and waves


@pytest.mark.parametrize(
    ("n", "canary", "expected"),
    [
        (10, 1, ["d00"]),
        (10, 3, ["d00", "d01", "d02"]),
        (10, "20%", ["d00", "d01"]),
        (10, "1%", ["d00"]),  # at least one
        (10, "15%", ["d00", "d01"]),  # rounds up
        (2, 5, ["d00", "d01"]),
    ],
)
def test_first_step_starts_exactly_the_canary(n: int, canary: Any, expected: list[str]) -> None:
    rollout, actions = step(plan(n, canary=canary), now=0.0)
    assert rollout.phase is Phase.CANARY
    assert actions == [StartJob(d, f"r1.{d}.1", NEW, 1) for d in expected]
    assert touched(rollout) == set(expected)
    again, more = step(rollout, now=5.0)
    assert more == []
    assert touched(again) == set(expected)


@pytest.mark.parametrize(
    ("threshold", "successes", "wave_starts"),
    [
        (1.0, 2, False),
        (1.0, 3, True),
        (0.6, 1, False),
        (0.6, 2, True),  # ceil(0.6 × 3) = 2
        (0.34, 1, False),  # ceil(1.02) = 2
        (0.33, 1, True),
    ],
)
def test_wave_needs_success_threshold(threshold: float, successes: int, wave_starts: bool) -> None:
    rollout = canary_passed(success_threshold=threshold, canary=1, waves=[3, "100%"])
    rollout, actions = step(rollout, now=20.0)
    assert started(actions) == ["d01", "d02", "d03"]
    assert rollout.phase is Phase.ROLLING
    rollout = report_all(rollout, ["d01", "d02", "d03"][:successes], S, now=30.0)
    rollout, actions = step(rollout, now=40.0)
    assert started(actions) == (IDS[4:] if wave_starts else [])
    assert rollout.stage == (2 if wave_starts else 1)


@pytest.mark.parametrize(
    ("observe_s", "at", "proceeds"),
    [(0, 10.0, True), (60, 69.0, False), (60, 70.0, True), (600, 609.0, False)],
)
def test_next_stage_waits_observe_time(observe_s: float, at: float, proceeds: bool) -> None:
    rollout = canary_passed(observe_s=observe_s, waves=["100%"])
    rollout, actions = step(rollout, now=10.0)  # the canary passed at 10: observation starts
    if at > 10.0:
        assert started(actions) == []
        rollout, actions = step(rollout, now=at)
    assert started(actions) == (IDS[1:] if proceeds else [])
    assert rollout.phase is (Phase.ROLLING if proceeds else Phase.CANARY)


def test_waves_progress_in_order() -> None:
    rollout, actions = step(plan(canary=1, waves=[2, 3], observe_s=30), now=0.0)
    seen = [started(actions)]
    now = 0.0
    while rollout.phase is not Phase.SUCCEEDED:
        now += 10.0
        rollout = report_all(
            rollout,
            [d for d in IDS if rollout.devices[d].state is not S and rollout.devices[d].touched],
            S,
            now=now,
        )
        rollout, actions = step(rollout, now=now)
        if started(actions):
            seen.append(started(actions))
        assert now < 1000
    assert seen == [["d00"], ["d01", "d02"], ["d03", "d04", "d05"], ["d06", "d07", "d08", "d09"]]
    assert actions[-1] == Complete(Phase.SUCCEEDED, 10, 0)


@pytest.mark.parametrize(
    ("at", "total_started"),
    [(10.0, 2), (69.0, 2), (70.0, 4), (130.0, 8), (190.0, 10), (1500.0, 10)],
)
def test_rate_stage_follows_schedule(at: float, total_started: int) -> None:
    kw: dict[str, Any] = {"rate": {"base_per_minute": 1, "increment_factor": 2}}
    rollout, actions = step(canary_passed(**kw), now=10.0)  # rate stage starts at 10
    assert started(actions) == ["d01"]
    rollout, actions = step(rollout, now=at)
    assert len(touched(rollout)) == total_started
    assert sorted(touched(rollout)) == IDS[:total_started]  # in order


# ---------------------------------------------------------------- abort rules


def rolled_to_wave(**kw: Any) -> RolloutState:
    """Canary d00 succeeded, then wave 1 (d01-d09) started at t=10."""
    rollout, _ = step(canary_passed(**kw), now=10.0)
    return rollout


@pytest.mark.parametrize(
    ("kw", "failures", "aborts", "message"),
    [
        ({"abort_failures": 2, "success_threshold": 0.5}, 1, False, ""),
        ({"abort_failures": 2, "success_threshold": 0.5}, 2, True, "2 devices failed, abort_fail"),
        ({"abort_failure_ratio": 0.3, "success_threshold": 0.5}, 2, False, ""),
        ({"abort_failure_ratio": 0.3, "success_threshold": 0.5}, 3, True, "3 of 10 started"),
        ({"success_threshold": 0.8}, 1, False, ""),  # 8 of 9 may still succeed
        ({"success_threshold": 0.8}, 2, True, "wave 1 cannot reach its success threshold"),
        ({"success_threshold": 1.0}, 1, True, "1 of 9 devices failed and 9 must succeed"),
        ({"abort_failures": 1, "max_retries": 1}, 1, False, ""),  # a retry is not a failure
    ],
)
def test_abort_on_failures(kw: dict[str, Any], failures: int, aborts: bool, message: str) -> None:
    rollout = rolled_to_wave(**kw)
    for device_id in IDS[1 : 1 + failures]:
        rollout = report(rollout, device_id, F, now=20.0, reason="verification failed")
    rollout, actions = step(rollout, now=30.0)
    assert (rollout.phase is Phase.ABORTED) == aborts
    if aborts:
        assert isinstance(actions[0], Abort)
        assert message in actions[0].reason
        assert "d01 (verification failed)" in actions[0].reason
        assert rollout.reason == actions[0].reason
        # every job still in flight is withdrawn
        in_flight = IDS[1 + failures :]
        assert [a.device_id for a in actions if isinstance(a, CancelJob)] == in_flight
        assert all(rollout.devices[d].state is JobState.CANCELED for d in in_flight)
        assert not started(actions)


# ---------------------------------------------------------------- health gates

GATE_FIELDS = {
    "max_p95_latency_ms": ("p95_latency_ms", 100.0),
    "max_error_rate": ("error_rate", 0.05),
    "max_drift": ("drift", 0.2),
    "max_shadow_disagreement": ("shadow_disagreement", 0.1),
}


@pytest.mark.parametrize("gate", list(GATE_FIELDS))
@pytest.mark.parametrize(
    ("factor", "samples", "action", "outcome"),
    [
        (2.0, 500, "abort", Phase.ABORTED),
        (2.0, 500, "pause", Phase.PAUSED),
        (1.0, 500, "abort", Phase.ROLLING),  # at the threshold is not above it
        (2.0, 99, "abort", Phase.ROLLING),  # too few samples to judge (min_samples 100)
        (2.0, 100, "pause", Phase.PAUSED),
    ],
)
def test_health_gate(gate: str, factor: float, samples: int, action: str, outcome: Phase) -> None:
    metric, limit = GATE_FIELDS[gate]
    gates = {gate: limit, "action": action, "min_samples": 100}
    rollout = canary_passed(health_gates=gates, waves=[2, "100%"])
    values: dict[str, Any] = {metric: limit * factor}
    report_ = HealthReport(samples=samples, **values)
    rollout, actions = step(rollout, now=20.0, health={"d00": report_})
    assert rollout.phase is outcome
    if outcome is Phase.ROLLING:
        assert started(actions) == ["d01", "d02"]
        return
    assert touched(rollout) == {"d00"}  # nothing outside the canary
    assert not started(actions)
    kind = Abort if outcome is Phase.ABORTED else Pause
    assert len(actions) == 1 and isinstance(actions[0], kind)
    assert "health gate: d00: " in actions[0].reason
    assert f"is above {gate} {limit:g} ({samples} samples)" in actions[0].reason


@pytest.mark.parametrize(
    ("health", "violated"),
    [
        ({"d00": HealthReport(samples=500, p95_latency_ms=500.0)}, True),
        ({"d00": HealthReport(samples=500, p95_latency_ms=500.0, artifact_id=NEW)}, True),
        ({"d00": HealthReport(samples=500, p95_latency_ms=500.0, artifact_id=OLD)}, False),
        ({"d01": HealthReport(samples=500, p95_latency_ms=500.0)}, False),  # not updated yet
        ({"d00": HealthReport(samples=500, p95_latency_ms=None, error_rate=0.9)}, False),
        ({"d00": healthy()}, False),
        ({}, False),
    ],
)
def test_gates_judge_only_updated_devices(health: dict[str, HealthReport], violated: bool) -> None:
    rollout = canary_passed(health_gates={"max_p95_latency_ms": 100}, waves=["100%"])
    assert bool(gate_violations(rollout, health)) == violated


def test_gate_also_judges_wave_devices() -> None:
    rollout = rolled_to_wave(health_gates={"max_error_rate": 0.1}, waves=[2, "100%"])
    rollout = report(rollout, "d02", S, now=20.0)
    bad = HealthReport(samples=1000, error_rate=0.5)
    rollout, actions = step(rollout, now=30.0, health={"d00": healthy(), "d02": bad})
    assert rollout.phase is Phase.ABORTED
    assert "d02: error rate 0.5 is above max_error_rate 0.1" in (rollout.reason or "")
    assert touched(rollout) == {"d00", "d01", "d02"}
    assert [a.device_id for a in actions if isinstance(a, CancelJob)] == ["d01"]


@pytest.mark.parametrize(
    ("summary", "expected"),
    [
        (LatencySummary(count=90, errors=10, p95_ms=12.5), HealthReport(100, 12.5, 0.1)),
        (LatencySummary(count=0, errors=0), HealthReport(0, None, None)),
        (LatencySummary(count=0, errors=4), HealthReport(4, None, 1.0)),
    ],
)
def test_health_from_latency(summary: LatencySummary, expected: HealthReport) -> None:
    assert health_from_latency(summary) == expected
    extra = health_from_latency(summary, artifact_id=NEW, drift=0.3, shadow_disagreement=0.02)
    assert (extra.artifact_id, extra.drift, extra.shadow_disagreement) == (NEW, 0.3, 0.02)


# ---------------------------------------------------------------- failing canary


def bad_artifact(rollout: RolloutState, now: float) -> tuple[RolloutState, dict[str, HealthReport]]:
    return report(rollout, "d00", F, now=now, reason="signature does not verify"), {}


def slow_inference(
    rollout: RolloutState, now: float
) -> tuple[RolloutState, dict[str, HealthReport]]:
    rollout = report_all(rollout, ["d00", "d01"], S, now=now)
    return rollout, {"d01": HealthReport(samples=1000, p95_latency_ms=900.0)}


def slow_inference_paused(
    rollout: RolloutState, now: float
) -> tuple[RolloutState, dict[str, HealthReport]]:
    rollout, health = slow_inference(rollout, now)
    rollout, _ = pause(rollout, now=now)  # an abort gate still fires while paused
    return rollout, health


@pytest.mark.parametrize("failure", [bad_artifact, slow_inference, slow_inference_paused])
@pytest.mark.parametrize("max_retries", [0, 2])
def test_failed_canary_touches_nobody_else(
    failure: Callable[[RolloutState, float], tuple[RolloutState, dict[str, HealthReport]]],
    max_retries: int,
) -> None:
    rollout, _ = step(
        plan(
            canary=2,
            waves=["100%"],
            max_retries=max_retries,
            health_gates={"max_p95_latency_ms": 200},
            job_timeout_s=100,
        ),
        now=0.0,
    )
    canary = {"d00", "d01"}
    now = 0.0
    for attempt in range(max_retries + 1):  # a bad artifact fails on every retry
        now += 10.0
        rollout, health = failure(rollout, now)
        rollout, actions = step(rollout, now=now, health=health)
        if rollout.phase is Phase.ABORTED:
            break
        assert started(actions) == ["d00"] and attempt < max_retries
    assert rollout.phase is Phase.ABORTED
    assert touched(rollout) == canary
    attempts = {d: rollout.devices[d].attempts for d in IDS}
    # Whatever happens next, nothing is started again, anywhere.
    for i in range(1, 50):
        now += 37.0 * i
        for device_id in IDS:
            job = rollout.devices[device_id]
            if job.deploy is not None and not job.deploy.state.terminal:
                rollout = report(rollout, device_id, S, now=now)
        rollout, actions = step(rollout, now=now, health={d: healthy() for d in IDS})
        assert actions == []
    assert touched(rollout) == canary
    assert {d: rollout.devices[d].attempts for d in IDS} == attempts
    with pytest.raises(CommandError):
        resume(rollout, now=now)


# ---------------------------------------------------------------- timeouts and retries


@pytest.mark.parametrize(
    ("state_at_timeout", "max_retries"),
    [(JobState.QUEUED, 0), (IP, 0), (JobState.QUEUED, 2), (IP, 1)],
)
def test_timeouts_and_retries(state_at_timeout: JobState, max_retries: int) -> None:
    rollout, _ = step(plan(canary=1, job_timeout_s=100, max_retries=max_retries), now=0.0)
    now = 0.0
    for attempt in range(1, max_retries + 2):
        job_id = f"r1.d00.{attempt}"
        if state_at_timeout is IP:
            rollout = report(rollout, "d00", IP, now=now + 50)
        rollout, actions = step(rollout, now=now + 100)  # exactly the timeout: still waits
        assert actions == []
        now += 101
        rollout, actions = step(rollout, now=now)
        reason = f"timed out after 100 s in {state_at_timeout.value}"
        assert actions[0] == CancelJob("d00", job_id, reason)
        if attempt <= max_retries:
            assert actions[1:] == [StartJob("d00", f"r1.d00.{attempt + 1}", NEW, attempt + 1)]
            assert rollout.devices["d00"].attempts == attempt + 1
            # a late answer to the superseded attempt changes nothing
            assert report(rollout, "d00", S, now=now, job_id=job_id) is rollout
        else:
            assert isinstance(actions[1], Abort)
            assert "canary cannot reach its success threshold" in actions[1].reason
            assert f"d00 ({reason})" in actions[1].reason
            assert rollout.devices["d00"].state is F
    assert rollout.devices["d00"].attempts == max_retries + 1


def test_device_failure_is_retried_then_succeeds() -> None:
    rollout, _ = step(plan(canary=1, max_retries=1), now=0.0)
    rollout = report(rollout, "d00", JobState.ROLLED_BACK, now=5.0, reason="health check")
    rollout, actions = step(rollout, now=6.0)
    assert actions == [StartJob("d00", "r1.d00.2", NEW, 2)]
    rollout = report(rollout, "d00", S, now=7.0)
    rollout, actions = step(rollout, now=8.0)
    assert started(actions) == IDS[1:]
    assert device_counts(rollout)["QUEUED"] == 9


# ---------------------------------------------------------------- pause, resume, cancel


def test_pause_stops_starts_and_resume_continues() -> None:
    rollout, _ = step(plan(canary=1, waves=["100%"], job_timeout_s=100), now=0.0)
    rollout, actions = pause(rollout, now=1.0, reason="maintenance window")
    assert actions == [Pause("maintenance window")]
    assert (rollout.phase, rollout.reason, rollout.paused_from) == (
        Phase.PAUSED,
        "maintenance window",
        Phase.CANARY,
    )
    rollout = report(rollout, "d00", S, now=2.0)  # updates are still recorded
    rollout, actions = step(rollout, now=3.0)
    assert actions == []
    rollout, actions = resume(rollout, now=4.0)
    assert (actions, rollout.phase, rollout.reason) == ([], Phase.CANARY, None)
    rollout, actions = step(rollout, now=5.0)
    assert started(actions) == IDS[1:]


def test_timeouts_still_count_while_paused_and_retry_after_resume() -> None:
    rollout, _ = step(plan(canary=1, job_timeout_s=100, max_retries=1), now=0.0)
    rollout, _ = pause(rollout, now=1.0)
    rollout, actions = step(rollout, now=200.0)
    assert actions == [CancelJob("d00", "r1.d00.1", "timed out after 100 s in QUEUED")]
    rollout, _ = resume(rollout, now=300.0)
    rollout, actions = step(rollout, now=300.0)
    assert actions == [StartJob("d00", "r1.d00.2", NEW, 2)]


def test_rate_schedule_skips_the_pause() -> None:
    rollout, _ = step(canary_passed(rate={"base_per_minute": 1, "increment_factor": 2}), now=10.0)
    rollout, _ = pause(rollout, now=20.0)
    rollout, actions = step(rollout, now=500.0)
    assert actions == []
    rollout, _ = resume(rollout, now=1000.0)  # paused 980 s: the stage began at 990 in effect
    rollout, actions = step(rollout, now=1000.0)
    assert started(actions) == []
    rollout, actions = step(rollout, now=1050.0)
    assert started(actions) == ["d02", "d03"]


def test_gate_pause_then_resume() -> None:
    rollout = canary_passed(
        health_gates={"max_drift": 0.2, "action": "pause"}, observe_s=60, waves=["100%"]
    )
    drifting = {"d00": HealthReport(samples=500, drift=0.5)}
    rollout, actions = step(rollout, now=20.0, health=drifting)
    assert rollout.phase is Phase.PAUSED
    assert isinstance(actions[0], Pause)
    rollout, actions = step(rollout, now=30.0, health=drifting)  # no second Pause
    assert actions == []
    rollout, _ = resume(rollout, now=40.0)
    rollout, actions = step(rollout, now=41.0, health=drifting)  # still drifting: paused again
    assert rollout.phase is Phase.PAUSED and isinstance(actions[0], Pause)
    rollout, _ = resume(rollout, now=50.0)
    rollout, actions = step(rollout, now=51.0, health={"d00": healthy()})
    assert (rollout.phase, actions) == (Phase.CANARY, [])  # observation restarts at 51
    rollout, actions = step(rollout, now=110.0, health={"d00": healthy()})
    assert actions == []
    rollout, actions = step(rollout, now=111.0, health={"d00": healthy()})
    assert started(actions) == IDS[1:]


def test_cancel_withdraws_jobs_in_flight() -> None:
    rollout = rolled_to_wave(waves=["100%"])
    rollout = report(rollout, "d01", S, now=15.0)
    rollout, actions = cancel(rollout, now=20.0)
    assert rollout.phase is Phase.CANCELED
    assert rollout.reason == "canceled by the operator"
    assert actions == [CancelJob(d, f"r1.{d}.1", "canceled by the operator") for d in IDS[2:]]
    assert rollout.devices["d01"].state is S  # what succeeded stays
    assert step(rollout, now=30.0) == (rollout, [])
    with pytest.raises(JobTransitionError, match="CANCELED cannot become SUCCEEDED"):
        report(rollout, "d05", S, now=31.0)


def succeeded_rollout() -> RolloutState:
    rollout, _ = step(plan(canary=10, waves=[1]), now=0.0)
    rollout = report_all(rollout, IDS, S, now=1.0)
    rollout, _ = step(rollout, now=2.0)
    assert rollout.phase is Phase.SUCCEEDED
    return rollout


def rolling_back() -> RolloutState:
    rollout, _ = rollback(rolled_to_wave(), now=20.0)
    return rollout


@pytest.mark.parametrize(
    ("make", "command", "allowed"),
    [
        (succeeded_rollout, pause, "pause is allowed in: PENDING, CANARY, ROLLING"),
        (succeeded_rollout, cancel, "cancel is allowed in: PENDING, CANARY, ROLLING, PAUSED"),
        (succeeded_rollout, resume, "resume is allowed in: PAUSED"),
        (rolled_to_wave, resume, "in phase ROLLING; resume is allowed in: PAUSED"),
        (rolling_back, rollback, "cannot roll back rollout 'r1' in phase ROLLING_BACK"),
        (rolling_back, cancel, "in phase ROLLING_BACK"),
        (rolling_back, pause, "in phase ROLLING_BACK"),
    ],
)
def test_commands_refused_in_wrong_phase(
    make: Callable[[], RolloutState],
    command: Callable[..., tuple[RolloutState, list[Action]]],
    allowed: str,
) -> None:
    with pytest.raises(CommandError, match=re.escape(allowed)) as info:
        command(make(), now=100.0)
    assert (info.value.http_status, info.value.exit_code) == (409, 1)


def test_pause_and_cancel_before_start() -> None:
    rollout, actions = pause(plan(), now=0.0)
    assert rollout.paused_from is Phase.PENDING
    assert step(rollout, now=1.0) == (rollout, [])
    rollout, _ = resume(rollout, now=2.0)
    assert rollout.phase is Phase.PENDING
    canceled, actions = cancel(plan(), now=0.0)
    assert (canceled.phase, actions) == (Phase.CANCELED, [])


# ---------------------------------------------------------------- rollback


def test_rollback_every_touched_device() -> None:
    fleet = devices(10)
    fleet[3] = DeviceInfo("d03", X86)  # nothing installed before: cannot roll back
    rollout = plan_rollout(
        "r1", policy(canary=1, waves=[4, "100%"]), devices=fleet, variants={X86: NEW}, now=0.0
    )
    rollout, _ = step(rollout, now=0.0)
    rollout = report(rollout, "d00", S, now=1.0)
    rollout, _ = step(rollout, now=2.0)  # wave 1: d01-d04
    rollout = report(rollout, "d01", S, now=3.0)
    rollout = report(rollout, "d02", F, now=3.0, reason="disk full")
    rollout = report(rollout, "d03", IP, now=3.0)
    rollout, actions = rollback(rollout, now=4.0)
    assert rollout.phase is Phase.ROLLING_BACK
    assert actions == [
        CancelJob("d03", "r1.d03.1", "rollout rolled back"),
        CancelJob("d04", "r1.d04.1", "rollout rolled back"),
        RollbackDevice("d00", "r1.d00.rollback", OLD),
        RollbackDevice("d01", "r1.d01.rollback", OLD),
        RollbackDevice("d02", "r1.d02.rollback", OLD),
        CannotRollback(
            "d03", "no previous artifact recorded for the device; nothing to roll back to"
        ),
        RollbackDevice("d04", "r1.d04.rollback", OLD),
    ]
    assert all(rollout.devices[d].rollback is None for d in IDS[5:])  # never touched
    for device_id in ["d00", "d01", "d02"]:
        rollout = report(rollout, device_id, S, now=5.0, rollback_job=True)
    rollout, actions = step(rollout, now=6.0)
    assert (rollout.phase, actions) == (Phase.ROLLING_BACK, [])  # d04 still rolling back
    rollout = report(rollout, "d04", IP, now=7.0, rollback_job=True)
    rollout = report(rollout, "d04", F, now=8.0, rollback_job=True, reason="no space")
    rollout, actions = step(rollout, now=9.0)
    assert rollout.phase is Phase.ROLLED_BACK
    assert actions == [Complete(Phase.ROLLED_BACK, 3, 2)]
    assert rollout.reason == (
        "rolled back 3 of 5 touched devices; not rolled back: d03 (no previous artifact "
        "recorded for the device; nothing to roll back to); d04 (no space)"
    )
    assert step(rollout, now=10.0) == (rollout, [])


@pytest.mark.parametrize(
    "make", [succeeded_rollout, rolled_to_wave, lambda: cancel(rolled_to_wave(), now=11.0)[0]]
)
def test_rollback_from_any_phase(make: Callable[[], RolloutState]) -> None:
    before = make()
    rollout, actions = rollback(before, now=100.0)
    targets = [a.device_id for a in actions if isinstance(a, RollbackDevice)]
    assert targets == sorted(touched(before))
    assert all(a.to_artifact_id == OLD for a in actions if isinstance(a, RollbackDevice))


def test_rollback_of_aborted_canary_only_touches_the_canary() -> None:
    rollout, _ = step(plan(canary=2), now=0.0)
    rollout = report(rollout, "d00", F, now=1.0)
    rollout, _ = step(rollout, now=2.0)
    assert rollout.phase is Phase.ABORTED
    rollout, actions = rollback(rollout, now=3.0)
    assert [a.device_id for a in actions if isinstance(a, RollbackDevice)] == ["d00", "d01"]


def test_rollback_before_anything_started() -> None:
    rollout, actions = rollback(plan(), now=0.0)
    assert rollout.phase is Phase.ROLLED_BACK
    assert actions == [Complete(Phase.ROLLED_BACK, 0, 0)]


def test_rollback_jobs_time_out() -> None:
    rollout, _ = rollback(rolled_to_wave(job_timeout_s=100), now=20.0)
    for device_id in IDS:
        if device_id != "d05":
            rollout = report(rollout, device_id, S, now=30.0, rollback_job=True)
    rollout, actions = step(rollout, now=121.0)
    assert actions[0] == CancelJob("d05", "r1.d05.rollback", "timed out after 100 s in QUEUED")
    assert actions[1] == Complete(Phase.ROLLED_BACK, 9, 1)


# ---------------------------------------------------------------- simulations


def simulate(
    rollout: RolloutState,
    *,
    outcome: Callable[[str, int], JobState],
    health: Callable[[RolloutState], dict[str, HealthReport]] = lambda r: {},
    tick: float = 10.0,
) -> tuple[RolloutState, list[Action], list[tuple[float, str]]]:
    """Step every ``tick``; a device answers IN_PROGRESS a tick after its job, then the outcome."""
    now = 0.0
    log: list[Action] = []
    starts: list[tuple[float, str]] = []
    while not rollout.phase.final:
        rollout, actions = step(rollout, now=now, health=health(rollout))
        log += actions
        starts += [(now, a.device_id) for a in actions if isinstance(a, StartJob)]
        now += tick
        for device_id in rollout.order:
            job = rollout.devices[device_id]
            if job.state is JobState.QUEUED:
                rollout = report(rollout, device_id, IP, now=now)
            elif job.state is IP:
                state = outcome(device_id, job.attempts)
                rollout = report(rollout, device_id, state, now=now, reason=state.value)
        assert now < 100_000, "the rollout never ended"
    return rollout, log, starts


@pytest.mark.parametrize(
    "kw",
    [
        {"canary": 1, "waves": [2, "50%"], "observe_s": 30},
        {"canary": "20%", "waves": ["100%"], "observe_s": 0},
        {"canary": 1, "rate": {"base_per_minute": 1, "increment_factor": 2}},
        {"canary": 2, "rate": {"base_per_minute": 2, "increment_factor": 1.5, "max_per_minute": 3}},
    ],
)
@pytest.mark.parametrize("seed", [None, 42])
def test_whole_rollout_reaches_succeeded(kw: dict[str, Any], seed: int | None) -> None:
    kw = {**kw, "health_gates": {"max_p95_latency_ms": 50.0}}
    rollout, log, starts = simulate(
        plan(seed=seed, **kw),
        outcome=lambda d, attempt: S,
        health=lambda r: {d: healthy() for d in r.order},
    )
    assert rollout.phase is Phase.SUCCEEDED
    assert log[-1] == Complete(Phase.SUCCEEDED, 10, 0)
    assert device_counts(rollout) == {
        "NOT_STARTED": 0,
        "QUEUED": 0,
        "IN_PROGRESS": 0,
        "SUCCEEDED": 10,
        "FAILED": 0,
        "CANCELED": 0,
        "ROLLED_BACK": 0,
    }
    assert [d for _, d in starts] == list(rollout.order)  # each device once, in order
    canary = set(rollout.canary_devices)
    first_wave = min(t for t, d in starts if d not in canary)
    assert first_wave > max(t for t, d in starts if d in canary)


def test_whole_rollout_with_flaky_devices_and_tolerated_failure() -> None:
    def outcome(device_id: str, attempt: int) -> JobState:
        if device_id == "d07":
            return F  # always fails
        return F if device_id in {"d02", "d05"} and attempt == 1 else S

    rollout, log, _ = simulate(
        plan(canary=1, waves=[3, "100%"], success_threshold=0.8, max_retries=1), outcome=outcome
    )
    assert rollout.phase is Phase.SUCCEEDED
    assert log[-1] == Complete(Phase.SUCCEEDED, 9, 1)
    assert rollout.devices["d02"].attempts == 2
    assert rollout.devices["d07"].attempts == 2
    assert rollout.reason == "9 of 10 devices succeeded"


def test_state_round_trips_as_json() -> None:
    rollout, _ = step(canary_passed(observe_s=5, waves=[2, "100%"]), now=20.0)
    rollout, _ = pause(rollout, now=21.0)
    adapter = TypeAdapter(RolloutState)
    assert adapter.validate_json(adapter.dump_json(rollout)) == rollout


@pytest.mark.parametrize("done", [JobState.SUCCEEDED, JobState.ROLLED_BACK])
def test_a_rollback_job_ending_rolled_back_counts_as_rolled_back(done: JobState) -> None:
    """The agent ends a finished rollback job in ROLLED_BACK (agent/daemon.py)."""
    rollout = plan_rollout(
        "r1", policy(canary=1, waves=["100%"]), devices=devices(1), variants={X86: NEW}, now=0.0
    )
    rollout, _ = step(rollout, now=0.0)
    rollout = report(rollout, "d00", S, now=1.0)
    rollout, _ = rollback(rollout, now=2.0)
    rollout = report(rollout, "d00", done, now=3.0, rollback_job=True)
    rollout, actions = step(rollout, now=4.0)
    assert actions == [Complete(Phase.ROLLED_BACK, 1, 0)]
    assert rollout.reason == "rolled back 1 of 1 touched devices"


@pytest.mark.parametrize(
    ("drift_samples", "samples", "outcome"),
    [
        (500, 0, Phase.PAUSED),  # a posted score with enough inputs, no heartbeat yet
        (50, 500, Phase.ROLLING),  # plenty of requests, but the score rests on 50 inputs
        (None, 500, Phase.PAUSED),  # no separate count: judged with the report's samples
        (None, 50, Phase.ROLLING),
    ],
)
def test_drift_is_judged_on_its_own_samples(
    drift_samples: int | None, samples: int, outcome: Phase
) -> None:
    gates = {"max_drift": 0.2, "action": "pause", "min_samples": 100}
    rollout = canary_passed(health_gates=gates, waves=["100%"])
    drifting = HealthReport(samples=samples, drift=0.5, drift_samples=drift_samples)
    rollout, _ = step(rollout, now=20.0, health={"d00": drifting})
    assert rollout.phase is outcome
    if outcome is Phase.PAUSED:
        shown = drift_samples if drift_samples is not None else samples
        assert (
            rollout.reason
            == f"health gate: d00: drift 0.5 is above max_drift 0.2 ({shown} samples)"
        )


def test_latency_is_not_judged_on_drift_samples() -> None:
    gates = {"max_p95_latency_ms": 10, "min_samples": 100}
    rollout = canary_passed(health_gates=gates, waves=["100%"])
    slow = HealthReport(samples=5, p95_latency_ms=99.0, drift_samples=5000)
    rollout, _ = step(rollout, now=20.0, health={"d00": slow})
    assert rollout.phase is Phase.ROLLING


# ---------------------------------------------------------------- timers (next_due)


@pytest.mark.parametrize(
    ("case", "kw", "expected"),
    [
        ("pending: now", {}, 0.0),
        ("canary in flight: its job timeout", {"job_timeout_s": 30}, 30.0),
        ("canary passed, observing: the window's end", {"observe_s": 60}, 70.0),
        ("rate stage waiting: the next minute", {"rate": {"base_per_minute": 1}}, 70.0),
        ("final: never", {}, None),
        ("paused with a job in flight: still its timeout", {"job_timeout_s": 30}, 30.0),
    ],
)
def test_next_due(case: str, kw: dict[str, Any], expected: float | None) -> None:
    if "rate" in kw:
        kw = {**kw, "waves": None}
    pending = plan(3, **kw)
    if case.startswith("pending"):
        assert next_due(pending, now=0.0) == expected
        return
    rollout, _ = step(pending, now=0.0)  # the canary d00 starts at 0
    if case.startswith("canary in flight"):
        assert next_due(rollout, now=5.0) == expected
    elif case.startswith("paused"):
        paused, _ = pause(rollout, now=5.0)
        assert next_due(paused, now=5.0) == expected
    elif case.startswith("final"):
        canceled, _ = cancel(rollout, now=5.0)
        assert next_due(canceled, now=5.0) is expected
    elif case.startswith("canary passed"):
        rollout = report_all(rollout, rollout.canary_devices, S, now=10.0)
        rollout, actions = step(rollout, now=10.0)
        assert not started(actions) and rollout.stage_passed_at == 10.0
        assert next_due(rollout, now=10.0) == expected
    else:  # rate: minute 0 released 1 device at 10 s; the next is released at 60 s after 10 s
        rollout = report_all(rollout, rollout.canary_devices, S, now=10.0)
        rollout, actions = step(rollout, now=10.0)
        assert started(actions) == ["d01"]
        assert next_due(rollout, now=10.0) == min(expected, 10.0 + 1800.0)
        rollout, actions = step(rollout, now=next_due(rollout, now=10.0) or 0.0)
        assert started(actions) == ["d02"]  # stepping at the due time starts the next one


def test_apply_updates_equals_apply_update_one_by_one() -> None:
    rollout, _ = step(plan(4, canary=4), now=0.0)
    job = {d: rollout.devices[d].deploy for d in IDS[:4]}

    def update(device_id: str, state: JobState, job_id: str | None = None) -> JobUpdate:
        run = job[device_id]
        assert run is not None
        return JobUpdate(
            job_id=job_id or run.job_id, device_id=device_id, artifact_id=NEW, state=state
        )

    batch = [
        update("d00", JobState.IN_PROGRESS),
        update("d00", S),
        update("d01", F),
        update("d01", S),  # FAILED is terminal: refused, the rest still applies
        update("d02", JobState.IN_PROGRESS, job_id="r1.d02.9"),  # an old attempt: ignored
        JobUpdate(job_id="r1.zz.1", device_id="zz", artifact_id=NEW, state=S),  # not ours
        update("d03", JobState.IN_PROGRESS),
    ]
    batched, refused = apply_updates(rollout, batch, now=5.0)
    one_by_one = rollout
    for u in batch:
        try:
            one_by_one = apply_update(one_by_one, u, now=5.0)
        except (JobTransitionError, UnknownDeviceError):
            pass
    assert batched == one_by_one
    assert [(u.device_id, type(e)) for u, e in refused] == [
        ("d01", JobTransitionError),
        ("zz", UnknownDeviceError),
    ]
    assert [batched.devices[d].state for d in IDS[:4]] == [
        S,
        F,
        JobState.QUEUED,
        JobState.IN_PROGRESS,
    ]
    assert apply_updates(rollout, [], now=5.0) == (rollout, [])
