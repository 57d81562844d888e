"""The rollout planner (pure): targets, artifact variants, policy and the rollout machine.

No I/O and no clock: every function takes the time as ``now`` (seconds on any monotonic
scale) and returns a new, immutable state plus the :data:`Action` values to carry out. The
MQTT, database and HTTP sides are adapters that turn actions into ``JobNotify`` messages and
feed ``JobUpdate``s and heartbeats back through :func:`apply_update` and :func:`step`.

A rollout runs its devices in a fixed order (sorted ids, or a seeded shuffle; online
devices first), cut into stages: stage 0 is the canary, then the policy's waves (or, with
an exponential ``rate``, one stage whose starts are throttled by the schedule). A stage
passes when all of its devices have started and ``success_threshold`` of them succeeded;
the next one starts ``observe_s`` later if no health gate fired meanwhile::

    PENDING ──→ CANARY ──→ ROLLING ──→ SUCCEEDED
                  │    ↖ ↙    │
                  │   PAUSED  │            (operator, or a health gate with action "pause")
                  ├───────────┴──→ ABORTED     (failures, unreachable threshold, health gate)
                  └──────────────→ CANCELED    (operator)
    every phase but ROLLING_BACK / ROLLED_BACK ──→ ROLLING_BACK ──→ ROLLED_BACK  (operator)

An aborted, canceled or paused rollout never starts a job; after an abort or cancel, no
device outside the set already started is ever touched.

Errors (``http_status`` for the fleet API, ``exit_code`` for the CLI), under the fleet's root
:class:`fleet.errors.FleetError`::

    RolloutError (400, exit 1)
    ├── PolicyError (422, exit 2): an invalid rollout policy, naming the field and choices
    ├── PlanError (422, exit 2): bad rollout id, duplicate devices, no device to deploy to
    ├── UnknownDeviceError (404, exit 2): a job update from a device outside the rollout
    ├── JobTransitionError (409, exit 1): a job state change the machine does not allow
    └── CommandError (409, exit 1): pause/resume/cancel/rollback in a phase that forbids it
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from fractions import Fraction
from typing import Any, ClassVar, Literal, NamedTuple, TypeAlias, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.protocol import JobState, JobUpdate, LatencySummary
from fleet.errors import FleetError

# ---------------------------------------------------------------- errors


class RolloutError(FleetError):
    """Root of the rollout planner's errors."""

    http_status = 400
    exit_code: ClassVar[int] = 1


class PolicyError(RolloutError):
    """A rollout policy that does not validate."""

    http_status = 422
    exit_code = 2


class PlanError(RolloutError):
    """A rollout that cannot be planned."""

    http_status = 422
    exit_code = 2


class UnknownDeviceError(RolloutError):
    """A job update from a device that is not part of the rollout."""

    http_status = 404
    exit_code = 2


class JobTransitionError(RolloutError):
    """A per-device job state change that the state machine forbids."""

    http_status = 409
    exit_code = 1


class CommandError(RolloutError):
    """An operator command that the rollout's phase does not allow."""

    http_status = 409
    exit_code = 1


# ---------------------------------------------------------------- policy

_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_SIZE_HINT = "use a count like 5 or a percent like '10%'"


def _fraction(value: float) -> Fraction:
    # The decimal the user wrote (0.07, not 0.07000000000000000666), so 7% of 100 is 7.
    return Fraction(repr(value))


class Size(BaseModel):
    """A number of devices: a ``count`` or a ``percent`` of a population (exactly one).

    Also accepts the shorthands ``5`` (count) and ``"10%"`` (percent).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int | None = Field(default=None, ge=1)
    percent: float | None = Field(default=None, gt=0, le=100)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict | Size):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return {"count": value}
        if isinstance(value, str) and (match := _PERCENT_RE.match(value)):
            return {"percent": float(match.group(1))}
        raise ValueError(f"size {value!r} is neither a count nor a percent; {_SIZE_HINT}")

    @model_validator(mode="after")
    def _exactly_one(self) -> Size:
        if (self.count is None) == (self.percent is None):
            raise ValueError(f"set exactly one of 'count' or 'percent'; {_SIZE_HINT}")
        return self

    def of(self, total: int) -> int:
        """Devices out of ``total``: percents round up; at least 1, at most ``total``."""
        if total <= 0:
            return 0
        if self.count is not None:
            wanted = self.count
        else:
            wanted = math.ceil(_fraction(self.percent or 0.0) * total / 100)
        return max(1, min(total, wanted))


class RatePolicy(BaseModel):
    """Exponential rollout rate: ``base_per_minute × increment_factor^minute``, capped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_per_minute: float = Field(gt=0)
    increment_factor: float = Field(default=2.0, ge=1)
    max_per_minute: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _cap_above_base(self) -> RatePolicy:
        if self.max_per_minute is not None and self.max_per_minute < self.base_per_minute:
            raise ValueError(
                f"max_per_minute {self.max_per_minute:g} is below base_per_minute "
                f"{self.base_per_minute:g}"
            )
        return self


class HealthGates(BaseModel):
    """ML health thresholds judged on devices that run the new version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_p95_latency_ms: float | None = Field(default=None, gt=0)
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_drift: float | None = Field(default=None, ge=0)
    max_shadow_disagreement: float | None = Field(default=None, ge=0, le=1)
    action: Literal["abort", "pause"] = "abort"
    min_samples: int = Field(default=100, ge=1, description="reports with fewer are not judged")


class RolloutPolicy(BaseModel):
    """How a rollout proceeds: canary, then waves or an exponential rate, with abort rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    canary: Size = Field(default_factory=lambda: Size(count=1))
    waves: list[Size] | None = Field(
        default=None, min_length=1, description="sizes of the non-canary devices; the rest last"
    )
    rate: RatePolicy | None = None
    success_threshold: float = Field(default=1.0, gt=0, le=1)
    abort_failures: int | None = Field(default=None, ge=1)
    abort_failure_ratio: float | None = Field(default=None, gt=0, le=1)
    job_timeout_s: float = Field(default=1800.0, gt=0)
    max_retries: int = Field(default=0, ge=0, le=10)
    health_gates: HealthGates = Field(default_factory=HealthGates)
    observe_s: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _waves_or_rate(self) -> RolloutPolicy:
        if (self.waves is None) == (self.rate is None):
            got = "neither" if self.waves is None else "both"
            raise ValueError(f"set exactly one of 'waves' or 'rate' (got {got})")
        return self


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _model_at(loc: Sequence[int | str]) -> type[BaseModel]:
    model: type[BaseModel] = RolloutPolicy
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        sub = _model_in(info.annotation) if info is not None else None
        if sub is None:
            break
        model = sub
    return model


def parse_policy(data: Mapping[str, Any]) -> RolloutPolicy:
    """Validate a rollout policy, naming every bad field and its allowed values.

    Raises:
        PolicyError: one message listing each problem as ``field: what is wrong``.
    """
    try:
        return RolloutPolicy.model_validate(data)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            where = ".".join(str(p) for p in error["loc"]) or "policy"
            if error["type"] == "extra_forbidden":
                allowed = ", ".join(_model_at(error["loc"][:-1]).model_fields)
                problems.append(f"unknown field {where!r}; choose from: {allowed}")
                continue
            message = error["msg"].removeprefix("Value error, ")
            value = error.get("input")
            got = f" (got {value!r})" if isinstance(value, str | int | float) else ""
            problems.append(f"{where}: {message}{got}")
        raise PolicyError("invalid rollout policy: " + "; ".join(problems)) from err


def rate_allowed(rate: RatePolicy, elapsed_s: float, *, limit: int) -> int:
    """Devices allowed to have started ``elapsed_s`` after the rate stage began.

    Minute ``k`` (counted from 0) releases ``min(base × factor^k, max)`` devices at its
    start; the result is the floor of the running sum, at most ``limit``.
    """
    if elapsed_s < 0 or limit <= 0:
        return 0
    minutes = int(elapsed_s // 60)
    total = 0.0
    per_minute = rate.base_per_minute
    for _ in range(minutes + 1):
        cap = rate.max_per_minute if rate.max_per_minute is not None else per_minute
        total += min(per_minute, cap)
        if total >= limit:
            return limit
        per_minute *= rate.increment_factor
    return min(limit, math.floor(total + 1e-9))


# ---------------------------------------------------------------- targets and variants


@dataclass(frozen=True)
class DeviceInfo:
    """What the fleet knows of a device when a rollout is planned."""

    device_id: str
    profile: str
    online: bool = True
    current_artifact_id: str | None = None
    groups: frozenset[str] = frozenset()
    tags: Mapping[str, str] = field(default_factory=dict)


class Target(BaseModel):
    """Which devices a deployment is for: the union of ids, group members and tag matches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_ids: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(
        default_factory=dict, description="a device matches when it has every key=value"
    )

    @model_validator(mode="after")
    def _something(self) -> Target:
        if not (self.device_ids or self.groups or self.tags):
            raise ValueError("set at least one of 'device_ids', 'groups' or 'tags'")
        return self


def resolve_targets(
    devices: Sequence[DeviceInfo], target: Target
) -> tuple[list[DeviceInfo], list[str]]:
    """The devices a target selects (sorted by id), and its device ids the fleet lacks."""
    ids = set(target.device_ids)
    groups = set(target.groups)
    chosen = [
        d
        for d in devices
        if d.device_id in ids
        or d.groups & groups
        or (target.tags and all(d.tags.get(k) == v for k, v in target.tags.items()))
    ]
    known = {d.device_id for d in devices}
    missing = sorted(ids - known)
    return sorted(chosen, key=lambda d: d.device_id), missing


class Unmatched(NamedTuple):
    """A targeted device for whose hardware profile no artifact variant was built."""

    device_id: str
    profile: str


def select_variants(
    devices: Sequence[DeviceInfo], variants: Mapping[str, str]
) -> tuple[dict[str, str], list[Unmatched]]:
    """Pick for each device the artifact built for its profile.

    Args:
        devices: the targeted devices.
        variants: artifact id per hardware profile.

    Returns:
        ``(assignments, unmatched)``: artifact id per device id, and every device (sorted by
        id) whose profile has no variant, so that none is skipped silently.
    """
    assignments: dict[str, str] = {}
    unmatched: list[Unmatched] = []
    for device in sorted(devices, key=lambda d: d.device_id):
        artifact = variants.get(device.profile)
        if artifact is None:
            unmatched.append(Unmatched(device.device_id, device.profile))
        else:
            assignments[device.device_id] = artifact
    return assignments, unmatched


# ---------------------------------------------------------------- per-device jobs

# The job state machine is part of the wire contract (JobState.allowed_next), shared with
# the agent's agent/jobs.py.


def job_transition(current: JobState, new: JobState) -> JobState:
    """Return ``new`` if a job may move from ``current`` to it.

    Raises:
        JobTransitionError: naming both states and the states ``current`` may become.
    """
    allowed = current.allowed_next()
    if new not in allowed:
        choices = ", ".join(s.value for s in JobState if s in allowed) or "nothing (terminal)"
        raise JobTransitionError(
            f"job state {current.value} cannot become {new.value}; "
            f"{current.value} can become: {choices}"
        )
    return new


@dataclass(frozen=True)
class JobRun:
    """One job sent to a device (one deploy attempt, or the rollback)."""

    job_id: str
    state: JobState
    started_at: float
    last_update: float
    reason: str | None = None


@dataclass(frozen=True)
class DeviceJob:
    """A device in a rollout: what it gets, what it had, and its current attempt."""

    device_id: str
    artifact_id: str
    previous_artifact_id: str | None
    attempts: int = 0
    deploy: JobRun | None = None
    rollback: JobRun | None = None

    @property
    def state(self) -> JobState | None:
        """State of the current deploy attempt; None before the first start."""
        return self.deploy.state if self.deploy is not None else None

    @property
    def touched(self) -> bool:
        """Whether a deploy job was ever sent to the device."""
        return self.attempts > 0


class Phase(StrEnum):
    """Where a rollout stands."""

    PENDING = "PENDING"
    CANARY = "CANARY"
    ROLLING = "ROLLING"
    PAUSED = "PAUSED"
    SUCCEEDED = "SUCCEEDED"
    ABORTED = "ABORTED"
    CANCELED = "CANCELED"
    ROLLING_BACK = "ROLLING_BACK"
    ROLLED_BACK = "ROLLED_BACK"

    @property
    def final(self) -> bool:
        """Whether the rollout is over (only rollback may follow, except after one)."""
        return self in _FINAL


_FINAL = frozenset({Phase.SUCCEEDED, Phase.ABORTED, Phase.CANCELED, Phase.ROLLED_BACK})
_RUNNING = frozenset({Phase.CANARY, Phase.ROLLING})


@dataclass(frozen=True)
class RolloutState:
    """A rollout: its policy, devices in start order, stage cuts and phase.

    ``stage_ends[k]`` is the index in ``order`` where stage ``k`` ends (stage 0 is the
    canary). Plain data; ``pydantic.TypeAdapter(RolloutState)`` round-trips it as JSON.
    """

    rollout_id: str
    policy: RolloutPolicy
    devices: Mapping[str, DeviceJob]
    order: tuple[str, ...]
    stage_ends: tuple[int, ...]
    created_at: float
    phase: Phase = Phase.PENDING
    reason: str | None = None
    stage: int = 0
    stage_started_at: float | None = None
    stage_passed_at: float | None = None
    paused_from: Phase | None = None
    paused_at: float | None = None
    unmatched: tuple[Unmatched, ...] = ()

    def stage_devices(self, stage: int) -> tuple[str, ...]:
        """Device ids of one stage, in start order."""
        start = self.stage_ends[stage - 1] if stage > 0 else 0
        return self.order[start : self.stage_ends[stage]]

    @property
    def canary_devices(self) -> tuple[str, ...]:
        """Device ids of the canary."""
        return self.stage_devices(0)


@dataclass(frozen=True)
class HealthReport:
    """Recent inference health of a device's new version (from its heartbeats)."""

    samples: int
    p95_latency_ms: float | None = None
    error_rate: float | None = None
    drift: float | None = None
    shadow_disagreement: float | None = None
    artifact_id: str | None = None  # when set and not the device's new artifact: ignored
    drift_samples: int | None = None  # inputs behind ``drift``; None: judged with ``samples``


def health_from_latency(
    summary: LatencySummary,
    *,
    artifact_id: str | None = None,
    drift: float | None = None,
    drift_samples: int | None = None,
    shadow_disagreement: float | None = None,
) -> HealthReport:
    """A HealthReport from a heartbeat's per-model latency summary (errors are not in count)."""
    samples = summary.count + summary.errors
    return HealthReport(
        samples=samples,
        p95_latency_ms=summary.p95_ms,
        error_rate=summary.errors / samples if samples else None,
        drift=drift,
        drift_samples=drift_samples,
        shadow_disagreement=shadow_disagreement,
        artifact_id=artifact_id,
    )


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class StartJob:
    """Send a deploy job (``JobNotify``) to a device."""

    device_id: str
    job_id: str
    artifact_id: str
    attempt: int


@dataclass(frozen=True)
class CancelJob:
    """Withdraw a job that the rollout no longer waits for."""

    device_id: str
    job_id: str
    reason: str


@dataclass(frozen=True)
class RollbackDevice:
    """Send a rollback job that reinstalls the device's previous artifact."""

    device_id: str
    job_id: str
    to_artifact_id: str


@dataclass(frozen=True)
class CannotRollback:
    """A touched device with no previous artifact recorded: nothing to roll back to."""

    device_id: str
    reason: str


@dataclass(frozen=True)
class Abort:
    """The rollout was aborted."""

    reason: str


@dataclass(frozen=True)
class Pause:
    """The rollout was paused (operator or health gate)."""

    reason: str


@dataclass(frozen=True)
class Complete:
    """The rollout reached SUCCEEDED or ROLLED_BACK; counts of devices that did (not)."""

    phase: Phase
    succeeded: int
    failed: int


Action: TypeAlias = (
    StartJob | CancelJob | RollbackDevice | CannotRollback | Abort | Pause | Complete
)

# ---------------------------------------------------------------- planning

_ROLLOUT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")


def plan_rollout(
    rollout_id: str,
    policy: RolloutPolicy,
    *,
    devices: Sequence[DeviceInfo],
    variants: Mapping[str, str],
    now: float,
    seed: int | None = None,
) -> RolloutState:
    """Assign variants, order the devices and cut them into stages (phase PENDING).

    Args:
        rollout_id: 1-40 of ``A-Z a-z 0-9 _ -``; job ids are ``{rollout_id}.{device}.{n}``.
        policy: the validated policy.
        devices: the targeted devices (see :func:`resolve_targets`).
        variants: artifact id per hardware profile.
        now: the current time.
        seed: None orders by device id; an integer shuffles that order reproducibly.

    Returns:
        The PENDING rollout; devices without a variant are in ``unmatched``.

    Raises:
        PlanError: a malformed rollout id, a device listed twice, or no device with a variant.
    """
    if not _ROLLOUT_ID_RE.match(rollout_id):
        raise PlanError(
            f"rollout id {rollout_id!r} is invalid; use 1-40 of A-Z a-z 0-9 '_' '-', "
            "starting with a letter or digit"
        )
    twice = sorted(d for d, n in Counter(d.device_id for d in devices).items() if n > 1)
    if twice:
        raise PlanError(f"devices listed more than once: {', '.join(twice)}")
    assignments, unmatched = select_variants(devices, variants)
    if not assignments:
        profiles = ", ".join(sorted({d.profile for d in devices})) or "none (no devices)"
        built = ", ".join(sorted(variants)) or "none"
        raise PlanError(
            f"no targeted device has an artifact variant; device profiles: {profiles}; "
            f"variants built for: {built}"
        )
    by_id = {d.device_id: d for d in devices}
    order = sorted(assignments)
    if seed is not None:
        random.Random(seed).shuffle(order)
    order.sort(key=lambda device_id: not by_id[device_id].online)  # stable: online first
    total = len(order)
    ends = [policy.canary.of(total)]
    if policy.waves is not None:
        rest = total - ends[0]
        for wave in policy.waves:
            if ends[-1] >= total:
                break
            ends.append(min(total, ends[-1] + wave.of(rest)))
    if ends[-1] < total:
        ends.append(total)
    jobs = {d: DeviceJob(d, assignments[d], by_id[d].current_artifact_id) for d in sorted(order)}
    return RolloutState(
        rollout_id=rollout_id,
        policy=policy,
        devices=jobs,
        order=tuple(order),
        stage_ends=tuple(ends),
        created_at=now,
        unmatched=tuple(unmatched),
    )


# ---------------------------------------------------------------- the machine


def _needed(policy: RolloutPolicy, size: int) -> int:
    return max(1, math.ceil(_fraction(policy.success_threshold) * size)) if size else 0


def _unsuccessful(job: DeviceJob) -> bool:
    return job.deploy is not None and job.deploy.state.terminal and job.state != JobState.SUCCEEDED


def _final_failure(job: DeviceJob, policy: RolloutPolicy) -> bool:
    return _unsuccessful(job) and job.attempts > policy.max_retries


def _retry_due(job: DeviceJob, policy: RolloutPolicy) -> bool:
    return _unsuccessful(job) and job.attempts <= policy.max_retries


def _in_flight(run: JobRun | None) -> bool:
    return run is not None and not run.state.terminal


def _stage_name(stage: int) -> str:
    return "canary" if stage == 0 else f"wave {stage}"


def _listing(items: Sequence[str], limit: int = 5) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _who(devices: Mapping[str, DeviceJob], ids: Sequence[str]) -> str:
    reasons = {d: run.reason for d in ids if (run := devices[d].deploy) is not None}
    return _listing([f"{d} ({reasons.get(d) or 'no reason given'})" for d in ids])


def _start(rollout: RolloutState, job: DeviceJob, *, now: float) -> tuple[DeviceJob, StartJob]:
    attempt = job.attempts + 1
    job_id = f"{rollout.rollout_id}.{job.device_id}.{attempt}"
    run = JobRun(job_id=job_id, state=JobState.QUEUED, started_at=now, last_update=now)
    action = StartJob(job.device_id, job_id, job.artifact_id, attempt)
    return replace(job, attempts=attempt, deploy=run), action


def _end_run(run: JobRun, state: JobState, *, now: float, reason: str) -> JobRun:
    return replace(run, state=job_transition(run.state, state), last_update=now, reason=reason)


def _expire(
    rollout: RolloutState,
    devices: dict[str, DeviceJob],
    *,
    now: float,
    actions: list[Action],
    which: Literal["deploy", "rollback"],
) -> None:
    timeout = rollout.policy.job_timeout_s
    for device_id in rollout.order:
        job = devices[device_id]
        run = job.deploy if which == "deploy" else job.rollback
        if run is None or run.state.terminal or now - run.started_at <= timeout:
            continue
        reason = f"timed out after {timeout:g} s in {run.state.value}"
        ended = _end_run(run, JobState.FAILED, now=now, reason=reason)
        if which == "deploy":
            devices[device_id] = replace(job, deploy=ended)
        else:
            devices[device_id] = replace(job, rollback=ended)
        actions.append(CancelJob(device_id, run.job_id, reason))


def _cancel_in_flight(
    rollout: RolloutState, *, now: float, reason: str
) -> tuple[dict[str, DeviceJob], list[Action]]:
    devices = dict(rollout.devices)
    actions: list[Action] = []
    for device_id in rollout.order:
        job = devices[device_id]
        if job.deploy is not None and _in_flight(job.deploy):
            devices[device_id] = replace(
                job, deploy=_end_run(job.deploy, JobState.CANCELED, now=now, reason=reason)
            )
            actions.append(CancelJob(device_id, job.deploy.job_id, reason))
    return devices, actions


def _failure_verdict(rollout: RolloutState) -> str | None:
    policy, devices = rollout.policy, rollout.devices
    failed = [d for d in rollout.order if _final_failure(devices[d], policy)]
    touched = sum(1 for d in rollout.order if devices[d].touched)
    if policy.abort_failures is not None and len(failed) >= policy.abort_failures:
        return (
            f"{len(failed)} devices failed, abort_failures is {policy.abort_failures}: "
            f"{_who(devices, failed)}"
        )
    ratio = policy.abort_failure_ratio
    if ratio is not None and touched and len(failed) >= _fraction(ratio) * touched:
        return (
            f"{len(failed)} of {touched} started devices failed, abort_failure_ratio is "
            f"{ratio:g}: {_who(devices, failed)}"
        )
    for stage in range(rollout.stage + 1):
        members = rollout.stage_devices(stage)
        lost = [d for d in members if _final_failure(devices[d], policy)]
        needed = _needed(policy, len(members))
        if len(members) - len(lost) < needed:
            return (
                f"{_stage_name(stage)} cannot reach its success threshold: {len(lost)} of "
                f"{len(members)} devices failed and {needed} must succeed: {_who(devices, lost)}"
            )
    return None


_GATES: tuple[tuple[str, str, Callable[[HealthReport], float | None]], ...] = (
    ("max_p95_latency_ms", "p95 latency (ms)", lambda r: r.p95_latency_ms),
    ("max_error_rate", "error rate", lambda r: r.error_rate),
    ("max_drift", "drift", lambda r: r.drift),
    ("max_shadow_disagreement", "shadow disagreement", lambda r: r.shadow_disagreement),
)


def gate_violations(rollout: RolloutState, health: Mapping[str, HealthReport]) -> list[str]:
    """Health gates exceeded by devices that run the new version, one line each.

    Values resting on fewer than ``min_samples`` samples (drift: ``drift_samples`` when
    given), reports for another artifact, and devices whose deploy has not succeeded are
    not judged.
    """
    gates = rollout.policy.health_gates
    found: list[str] = []
    for device_id in rollout.order:
        job = rollout.devices[device_id]
        report = health.get(device_id)
        if report is None or job.state != JobState.SUCCEEDED:
            continue
        if report.artifact_id is not None and report.artifact_id != job.artifact_id:
            continue
        for name, label, read in _GATES:
            limit: float | None = getattr(gates, name)
            value = read(report)
            samples = report.samples
            if name == "max_drift" and report.drift_samples is not None:
                samples = report.drift_samples
            if samples < gates.min_samples:
                continue
            if limit is not None and value is not None and value > limit:
                found.append(
                    f"{device_id}: {label} {value:g} is above {name} {limit:g} ({samples} samples)"
                )
    return found


def next_due(rollout: RolloutState, *, now: float) -> float | None:
    """When (after ``now``) :func:`step` next has something to do without any new input, if
    ever: a job timeout, the end of an observe window, the rate schedule's next minute.

    The executor sleeps until then unless a message or a command wakes it first.
    """
    if rollout.phase.final:
        return None
    policy = rollout.policy
    times: list[float] = []
    for job in rollout.devices.values():
        for run in (job.deploy, job.rollback):
            if _in_flight(run):
                assert run is not None
                times.append(run.started_at + policy.job_timeout_s)
    if rollout.phase in _RUNNING or rollout.phase is Phase.PENDING:
        if rollout.phase is Phase.PENDING:
            times.append(rollout.created_at)
        if rollout.stage_passed_at is not None and policy.observe_s > 0:
            times.append(rollout.stage_passed_at + policy.observe_s)
        members = rollout.stage_devices(rollout.stage) if rollout.stage_ends else ()
        waiting = any(not rollout.devices[d].touched for d in members)
        if policy.rate is not None and rollout.stage > 0 and waiting:
            began = rollout.stage_started_at or rollout.created_at
            times.append(began + 60.0 * (math.floor(max(0.0, now - began) / 60) + 1))
    return min(times, default=None)


def _abort(
    rollout: RolloutState, reason: str, *, now: float, actions: list[Action]
) -> tuple[RolloutState, list[Action]]:
    devices, cancels = _cancel_in_flight(rollout, now=now, reason="rollout aborted")
    aborted = replace(
        rollout,
        devices=devices,
        phase=Phase.ABORTED,
        reason=reason,
        paused_from=None,
        paused_at=None,
    )
    return aborted, [*actions, Abort(reason), *cancels]


def _advance(
    rollout: RolloutState, *, now: float, actions: list[Action]
) -> tuple[RolloutState, list[Action]]:
    policy = rollout.policy
    devices = dict(rollout.devices)
    while True:
        for stage in range(rollout.stage + 1):
            for device_id in rollout.stage_devices(stage):
                if _retry_due(devices[device_id], policy):
                    devices[device_id], start = _start(rollout, devices[device_id], now=now)
                    actions.append(start)
        members = rollout.stage_devices(rollout.stage)
        waiting = [d for d in members if not devices[d].touched]
        if waiting:
            allowed = len(members)
            if policy.rate is not None and rollout.stage > 0:
                elapsed = now - (rollout.stage_started_at or now)
                allowed = rate_allowed(policy.rate, elapsed, limit=len(members))
            for device_id in waiting[: max(0, allowed - (len(members) - len(waiting)))]:
                devices[device_id], start = _start(rollout, devices[device_id], now=now)
                actions.append(start)
        succeeded = sum(1 for d in members if devices[d].state == JobState.SUCCEEDED)
        if any(not devices[d].touched for d in members) or succeeded < _needed(
            policy, len(members)
        ):
            break
        if rollout.stage_passed_at is None:
            rollout = replace(rollout, stage_passed_at=now)
        if now - (rollout.stage_passed_at or now) < policy.observe_s:
            break
        if rollout.stage + 1 < len(rollout.stage_ends):
            rollout = replace(
                rollout,
                phase=Phase.ROLLING,
                stage=rollout.stage + 1,
                stage_started_at=now,
                stage_passed_at=None,
            )
            continue
        settled = [
            devices[d].state == JobState.SUCCEEDED or _final_failure(devices[d], policy)
            for d in rollout.order
        ]
        if all(settled):
            ok = sum(1 for d in rollout.order if devices[d].state == JobState.SUCCEEDED)
            failed = len(rollout.order) - ok
            rollout = replace(
                rollout,
                phase=Phase.SUCCEEDED,
                reason=f"{ok} of {len(rollout.order)} devices succeeded",
            )
            actions.append(Complete(Phase.SUCCEEDED, ok, failed))
        break
    return replace(rollout, devices=devices), actions


def _step_rollback(rollout: RolloutState, now: float) -> tuple[RolloutState, list[Action]]:
    devices = dict(rollout.devices)
    actions: list[Action] = []
    _expire(rollout, devices, now=now, actions=actions, which="rollback")
    runs = {d: devices[d].rollback for d in rollout.order if devices[d].rollback is not None}
    if any(_in_flight(run) for run in runs.values()):
        return replace(rollout, devices=devices), actions
    return _finish_rollback(replace(rollout, devices=devices), actions)


def _finish_rollback(
    rollout: RolloutState, actions: list[Action]
) -> tuple[RolloutState, list[Action]]:
    runs = {d: job.rollback for d, job in rollout.devices.items() if job.rollback is not None}
    # The agent ends a finished rollback job in ROLLED_BACK (agent/daemon.py); SUCCEEDED too.
    done_states = (JobState.SUCCEEDED, JobState.ROLLED_BACK)
    ok = sorted(d for d, run in runs.items() if run.state in done_states)
    bad = sorted(f"{d} ({run.reason})" for d, run in runs.items() if run.state not in done_states)
    reason = f"rolled back {len(ok)} of {len(runs)} touched devices"
    if bad:
        reason += f"; not rolled back: {_listing(bad)}"
    done = replace(rollout, phase=Phase.ROLLED_BACK, reason=reason)
    return done, [*actions, Complete(Phase.ROLLED_BACK, len(ok), len(bad))]


def step(
    rollout: RolloutState, *, now: float, health: Mapping[str, HealthReport] | None = None
) -> tuple[RolloutState, list[Action]]:
    """Advance a rollout to ``now``: timeouts, abort rules, health gates, then new starts.

    Args:
        rollout: the current state.
        now: the current time.
        health: the latest health report per device id (for the new version).

    Returns:
        The new state and the actions to carry out, in order.
    """
    if rollout.phase.final:
        return rollout, []
    if rollout.phase is Phase.ROLLING_BACK:
        return _step_rollback(rollout, now)
    actions: list[Action] = []
    if rollout.phase is Phase.PENDING:
        rollout = replace(rollout, phase=Phase.CANARY, stage=0, stage_started_at=now)
    devices = dict(rollout.devices)
    _expire(rollout, devices, now=now, actions=actions, which="deploy")
    rollout = replace(rollout, devices=devices)
    verdict = _failure_verdict(rollout)
    if verdict is not None:
        return _abort(rollout, verdict, now=now, actions=actions)
    violations = gate_violations(rollout, health or {})
    if violations:
        reason = "health gate: " + _listing(violations)
        if rollout.policy.health_gates.action == "abort":
            return _abort(rollout, reason, now=now, actions=actions)
        if rollout.phase is not Phase.PAUSED:
            paused = replace(
                rollout,
                phase=Phase.PAUSED,
                reason=reason,
                paused_from=rollout.phase,
                paused_at=now,
            )
            return paused, [*actions, Pause(reason)]
    if rollout.phase is Phase.PAUSED:
        return rollout, actions
    return _advance(rollout, now=now, actions=actions)


def apply_update(rollout: RolloutState, update: JobUpdate, *, now: float) -> RolloutState:
    """Record a device's job update; updates of superseded attempts are ignored.

    A repeated state (a QoS 1 redelivery, a re-acknowledged result) only refreshes
    ``last_update``.

    Raises:
        UnknownDeviceError: the device is not part of the rollout.
        JobTransitionError: the update moves the job in a way the machine forbids (for
            example a result after the fleet canceled the job); the adapter logs and drops it.
    """
    job = _updated_job(rollout, rollout.devices, update, now=now)
    if job is None:
        return rollout
    return replace(rollout, devices={**rollout.devices, update.device_id: job})


def apply_updates(
    rollout: RolloutState, updates: Sequence[JobUpdate], *, now: float
) -> tuple[RolloutState, list[tuple[JobUpdate, RolloutError]]]:
    """:func:`apply_update` for a batch (one copy of the device map, not one per update).

    Returns:
        The new state, and each refused update with the error :func:`apply_update` would
        have raised (the others are applied in order).
    """
    devices = dict(rollout.devices)
    refused: list[tuple[JobUpdate, RolloutError]] = []
    changed = False
    for update in updates:
        try:
            job = _updated_job(rollout, devices, update, now=now)
        except RolloutError as err:
            refused.append((update, err))
            continue
        if job is not None:
            devices[update.device_id] = job
            changed = True
    return (replace(rollout, devices=devices) if changed else rollout), refused


def _updated_job(
    rollout: RolloutState, devices: Mapping[str, DeviceJob], update: JobUpdate, *, now: float
) -> DeviceJob | None:
    job = devices.get(update.device_id)
    if job is None:
        raise UnknownDeviceError(
            f"device {update.device_id!r} is not part of rollout {rollout.rollout_id!r} "
            f"({len(devices)} devices)"
        )
    for run, which in ((job.deploy, "deploy"), (job.rollback, "rollback")):
        if run is None or run.job_id != update.job_id:
            continue
        if update.state == run.state:
            new = replace(run, last_update=now)
        else:
            try:
                state = job_transition(run.state, update.state)
            except JobTransitionError as err:
                raise JobTransitionError(
                    f"device {update.device_id!r} job {update.job_id!r}: {err}"
                ) from err
            new = replace(run, state=state, last_update=now, reason=update.reason)
        return replace(job, deploy=new) if which == "deploy" else replace(job, rollback=new)
    return None


# ---------------------------------------------------------------- operator commands


def _require(rollout: RolloutState, command: str, allowed: frozenset[Phase]) -> None:
    if rollout.phase not in allowed:
        choices = ", ".join(p.value for p in Phase if p in allowed)
        raise CommandError(
            f"cannot {command} rollout {rollout.rollout_id!r} in phase {rollout.phase.value}; "
            f"{command} is allowed in: {choices}"
        )


def pause(
    rollout: RolloutState, *, now: float, reason: str = "paused by the operator"
) -> tuple[RolloutState, list[Action]]:
    """Stop starting jobs; jobs already sent keep running and are still judged.

    Raises:
        CommandError: the rollout is not PENDING, CANARY or ROLLING.
    """
    _require(rollout, "pause", frozenset({Phase.PENDING, *_RUNNING}))
    paused = replace(
        rollout, phase=Phase.PAUSED, reason=reason, paused_from=rollout.phase, paused_at=now
    )
    return paused, [Pause(reason)]


def resume(rollout: RolloutState, *, now: float) -> tuple[RolloutState, list[Action]]:
    """Return to the paused phase; the rate schedule skips the pause, observation restarts.

    Raises:
        CommandError: the rollout is not PAUSED.
    """
    _require(rollout, "resume", frozenset({Phase.PAUSED}))
    started = rollout.stage_started_at
    if started is not None and rollout.paused_at is not None:
        started += now - rollout.paused_at
    resumed = replace(
        rollout,
        phase=rollout.paused_from or Phase.PENDING,
        reason=None,
        paused_from=None,
        paused_at=None,
        stage_started_at=started,
        stage_passed_at=None,
    )
    return resumed, []


def cancel(
    rollout: RolloutState, *, now: float, reason: str = "canceled by the operator"
) -> tuple[RolloutState, list[Action]]:
    """Stop the rollout: cancel jobs in flight, start nothing more, keep what succeeded.

    Raises:
        CommandError: the rollout is already over or rolling back.
    """
    _require(rollout, "cancel", frozenset({Phase.PENDING, Phase.PAUSED, *_RUNNING}))
    devices, actions = _cancel_in_flight(rollout, now=now, reason=reason)
    canceled = replace(
        rollout, devices=devices, phase=Phase.CANCELED, reason=reason, paused_from=None
    )
    return canceled, actions


def rollback(rollout: RolloutState, *, now: float) -> tuple[RolloutState, list[Action]]:
    """Cancel jobs in flight and reinstall the previous artifact on every touched device.

    A touched device without a previous artifact gets :class:`CannotRollback` and its
    rollback is recorded as FAILED with that reason.

    Raises:
        CommandError: the rollout is already rolling back or rolled back.
    """
    _require(rollout, "roll back", frozenset(Phase) - {Phase.ROLLING_BACK, Phase.ROLLED_BACK})
    devices, actions = _cancel_in_flight(rollout, now=now, reason="rollout rolled back")
    for device_id in rollout.order:
        job = devices[device_id]
        if not job.touched:
            continue
        job_id = f"{rollout.rollout_id}.{device_id}.rollback"
        if job.previous_artifact_id is None:
            reason = "no previous artifact recorded for the device; nothing to roll back to"
            run = JobRun(job_id, JobState.FAILED, now, now, reason)
            actions.append(CannotRollback(device_id, reason))
        else:
            run = JobRun(job_id, JobState.QUEUED, now, now)
            actions.append(RollbackDevice(device_id, job_id, job.previous_artifact_id))
        devices[device_id] = replace(job, rollback=run)
    rolling = replace(
        rollout,
        devices=devices,
        phase=Phase.ROLLING_BACK,
        reason="rollback requested",
        paused_from=None,
        paused_at=None,
    )
    if any(_in_flight(job.rollback) for job in devices.values()):
        return rolling, actions
    return _finish_rollback(rolling, actions)


def device_counts(rollout: RolloutState) -> dict[str, int]:
    """Devices per deploy state, with ``NOT_STARTED`` for untouched ones (all keys present)."""
    counts = {"NOT_STARTED": 0, **{s.value: 0 for s in JobState}}
    for job in rollout.devices.values():
        counts[job.state.value if job.state is not None else "NOT_STARTED"] += 1
    return counts
