"""Deployments in the database: the shell around the pure planner (:mod:`fleet.rollout`).

The API creates a deployment (targets resolved and variants selected by the planner) and
applies operator commands; :mod:`fleet.executor` steps it and carries out its actions. Both
save through :func:`save`, which is conditional on the row's ``version`` (optimistic locking):
a save that lost a race raises :class:`StaleDeploymentError` and the caller retries or answers
409. Operator commands do not publish anything themselves: their actions go to the row's
``outbox``, which the executor drains.

Helpers are keyword-only and never commit (the route or the executor owns the transaction).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import bindparam, func, insert, update
from sqlmodel import Session, col, select

from fleet import rollout
from fleet.errors import ConflictError, InvalidRequestError
from fleet.models import (
    Artifact,
    Deployment,
    DeploymentCreate,
    DeploymentDevice,
    DeploymentPublic,
    DeploymentTarget,
    Device,
    DeviceReport,
    Group,
    ModelStateDiff,
    UnmatchedDevice,
    utcnow,
)
from fleet.rollout import (
    Abort,
    Action,
    CancelJob,
    CannotRollback,
    Complete,
    DeviceInfo,
    DeviceJob,
    Pause,
    Phase,
    RollbackDevice,
    RolloutState,
    StartJob,
)

_STATE: TypeAdapter[RolloutState] = TypeAdapter(RolloutState)
_JOB: TypeAdapter[DeviceJob] = TypeAdapter(DeviceJob)
_ACTIONS: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (StartJob, CancelJob, RollbackDevice, CannotRollback, Abort, Pause, Complete)
}
ACTIVE_PHASES = tuple(p.value for p in Phase if not p.final)


class StaleDeploymentError(ConflictError):
    """The deployment changed since it was read (another writer saved first)."""


# ---------------------------------------------------------------- (de)serialization


def dump_state(state: RolloutState) -> dict[str, Any]:
    """The planner's state as JSON-ready data."""
    data: dict[str, Any] = _STATE.dump_python(state, mode="json")
    return data


class StateDumper:
    """:func:`dump_state` for successive states of one rollout, re-dumping only the devices
    whose job changed.

    The planner's steps copy only the :class:`~fleet.rollout.DeviceJob`s they change (frozen
    dataclasses), so an unchanged job is the same object as in the last dumped state and its
    JSON data is reused: a pass that moves a few jobs of a 100,000-device rollout dumps a few
    jobs, not 100,000. The result equals :func:`dump_state` (tested).
    """

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[DeviceJob, dict[str, Any]]] = {}
        self._head: dict[str, Any] | None = None
        self.unchanged = False
        """Whether the last :meth:`dump` equals the one before it (never for the first)."""

    def dump(self, state: RolloutState) -> dict[str, Any]:
        """The state as JSON-ready data (the same as :func:`dump_state`)."""
        cache: dict[str, tuple[DeviceJob, dict[str, Any]]] = {}
        devices: dict[str, Any] = {}
        redumped = 0
        for device_id, job in state.devices.items():
            hit = self._jobs.get(device_id)
            if hit is not None and hit[0] is job:
                data = hit[1]
            else:
                data = _JOB.dump_python(job, mode="json")
                redumped += 1
            devices[device_id] = data
            cache[device_id] = (job, data)
        same_devices = redumped == 0 and len(cache) == len(self._jobs)
        self._jobs = cache
        bare = dataclasses.replace(state, devices={})
        head: dict[str, Any] = _STATE.dump_python(bare, mode="json")
        self.unchanged = same_devices and self._head is not None and head == self._head
        self._head = head
        return {**head, "devices": devices}


def load_state(data: dict[str, Any]) -> RolloutState:
    """The planner's state from :func:`dump_state` data."""
    return _STATE.validate_python(data)


def dump_action(action: Action) -> dict[str, Any]:
    """An action as ``{"type": <class name>, **fields}``."""
    return {"type": type(action).__name__, **dataclasses.asdict(action)}


def load_action(data: dict[str, Any]) -> Action:
    """An action from :func:`dump_action` data."""
    fields = {k: v for k, v in data.items() if k != "type"}
    if data["type"] == "Complete":
        fields["phase"] = Phase(fields["phase"])
    action: Action = _ACTIONS[data["type"]](**fields)
    return action


# ---------------------------------------------------------------- devices as the planner sees them


def get_report(session: Session, *, device_id: str) -> DeviceReport | None:
    """A device's report row, if it ever reported or was given a desired state."""
    return session.get(DeviceReport, device_id)


def ensure_report(session: Session, *, org_id: uuid.UUID, device_id: str) -> DeviceReport:
    """A device's report row, created (empty) if missing."""
    report = session.get(DeviceReport, device_id)
    if report is None:
        report = DeviceReport(device_id=device_id, org_id=org_id)
        session.add(report)
    return report


def _report_row(device_id: str, org_id: uuid.UUID, **columns: Any) -> dict[str, Any]:
    """A new ``device_reports`` row (every column, for a multi-row INSERT) with ``columns``."""
    row: dict[str, Any] = {
        "device_id": device_id,
        "org_id": org_id,
        "online": False,
        "last_seen": None,
        "heartbeat": None,
        "reported_models": [],
        "desired_models": {},
    }
    row.update(columns)
    return row


def record_reports(session: Session, *, reports: Mapping[str, Mapping[str, Any]]) -> None:
    """Write what many devices reported, in few statements: per device the report columns to
    set (e.g. ``online``, ``last_seen``, ``heartbeat``), one batched UPDATE per set of columns
    for devices with a report row, one multi-row INSERT for those without; ids of devices that
    are not registered are left out.

    Core statements, not ORM objects: a broker restart brings every device's status at once,
    and building a SQLModel object per device cost ~0.4 ms each (its default factories run
    ``inspect.signature``).
    """
    if not reports:
        return
    ids = sorted(reports)
    orgs = dict(
        session.exec(
            select(Device.device_id, Device.org_id).where(col(Device.device_id).in_(ids))
        ).all()
    )
    existing = set(
        session.exec(
            select(DeviceReport.device_id).where(col(DeviceReport.device_id).in_(list(orgs)))
        ).all()
    )
    table = DeviceReport.__table__  # type: ignore[attr-defined]
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    new_rows = []
    for device_id in orgs:
        columns = reports[device_id]
        if device_id in existing:
            by_columns.setdefault(tuple(sorted(columns)), []).append(
                {"key": device_id, **{f"v_{k}": v for k, v in columns.items()}}
            )
        else:
            new_rows.append(_report_row(device_id, orgs[device_id], **columns))
    for names, rows in by_columns.items():
        session.execute(
            update(table)
            .where(table.c.device_id == bindparam("key"))
            .values({name: bindparam(f"v_{name}") for name in names}),
            rows,
        )
    if new_rows:
        session.execute(insert(table), new_rows)


def set_desired(
    session: Session, *, model_name: str, desired: Mapping[str, str | None]
) -> dict[str, str | None]:
    """Set (or, for None, clear) the desired artifact of ``model_name`` on many devices, in
    few statements: one read of the current values, one batched UPDATE, one batched INSERT
    for devices without a report row. Unregistered devices are skipped.

    Returns:
        The previous desired artifact per device that was changed (to undo it).
    """
    if not desired:
        return {}
    ids = sorted(desired)
    orgs = dict(
        session.exec(
            select(Device.device_id, Device.org_id).where(col(Device.device_id).in_(ids))
        ).all()
    )
    current = dict(
        session.exec(
            select(DeviceReport.device_id, DeviceReport.desired_models).where(
                col(DeviceReport.device_id).in_(list(orgs))
            )
        ).all()
    )
    previous: dict[str, str | None] = {}
    changes = []
    new_rows = []
    for device_id in orgs:
        models = dict(current.get(device_id) or {})
        previous[device_id] = models.get(model_name)
        if desired[device_id] is None:
            models.pop(model_name, None)
        else:
            models[model_name] = desired[device_id]
        if device_id in current:
            changes.append({"key": device_id, "models": models})
        else:
            new_rows.append(_report_row(device_id, orgs[device_id], desired_models=models))
    table = DeviceReport.__table__  # type: ignore[attr-defined]
    if changes:
        session.execute(
            update(table)
            .where(table.c.device_id == bindparam("key"))
            .values(desired_models=bindparam("models")),
            changes,
        )
    if new_rows:  # one executemany (multi-row INSERT), not one ORM object per device
        session.execute(insert(table), new_rows)
    return previous


def reported_artifact(report: DeviceReport | None, model_name: str) -> dict[str, Any] | None:
    """The primary artifact of ``model_name`` the device last reported serving."""
    if report is None:
        return None
    return _primary(report.reported_models, model_name)


def _primary(reported: Sequence[Any] | None, model_name: str) -> dict[str, Any] | None:
    for model in reported or []:
        if model.get("name") == model_name and model.get("role", "primary") == "primary":
            found: dict[str, Any] = model
            return found
    return None


def device_infos(session: Session, *, org_id: uuid.UUID, model_name: str) -> list[DeviceInfo]:
    """Every unrevoked device of the organization, with its groups (names and ids), tags,
    presence and the artifact of ``model_name`` it runs (reported, else desired).

    Reads only the columns it needs (no ORM objects, not the stored heartbeats): this runs
    in ``POST /deployments`` over the whole organization."""
    groups = dict(session.exec(select(Group.id, Group.name).where(Group.org_id == org_id)).all())
    reports = {
        device_id: (online, reported, desired)
        for device_id, online, reported, desired in session.exec(
            select(
                DeviceReport.device_id,
                DeviceReport.online,
                DeviceReport.reported_models,
                DeviceReport.desired_models,
            ).where(DeviceReport.org_id == org_id)
        )
    }
    infos = []
    query = select(Device.device_id, Device.profile, Device.group_id, Device.tags).where(
        Device.org_id == org_id, col(Device.revoked).is_(False)
    )
    for device_id, profile, group_id, tags in session.exec(query):
        report = reports.get(device_id)
        current = None
        if report is not None:
            model = _primary(report[1], model_name)
            current = model["artifact_id"] if model is not None else None
            if current is None:
                current = (report[2] or {}).get(model_name)
        member = frozenset({groups[group_id], str(group_id)}) if group_id in groups else frozenset()
        infos.append(
            DeviceInfo(
                device_id=device_id,
                profile=profile,
                online=report[0] if report is not None else False,
                current_artifact_id=current,
                groups=member,
                tags=dict(tags or {}),
            )
        )
    return infos


# ---------------------------------------------------------------- create, read, save


def _check_variants(
    session: Session, *, org_id: uuid.UUID, model_name: str, variants: dict[str, str]
) -> None:
    problems = []
    for profile, artifact_id in sorted(variants.items()):
        artifact = session.exec(
            select(Artifact).where(Artifact.org_id == org_id, Artifact.artifact_id == artifact_id)
        ).first()
        if artifact is None:
            problems.append(f"variant {profile!r}: no artifact {artifact_id!r} in the org")
        elif artifact.profile != profile:
            problems.append(
                f"variant {profile!r}: artifact {artifact_id!r} is built for {artifact.profile!r}"
            )
        elif artifact.model_name != model_name:
            problems.append(
                f"variant {profile!r}: artifact {artifact_id!r} is model "
                f"{artifact.model_name!r}, not {model_name!r}"
            )
    if problems:
        raise InvalidRequestError("invalid variants: " + "; ".join(problems))


def create_deployment(
    session: Session, *, org_id: uuid.UUID, deployment_in: DeploymentCreate, now: float
) -> Deployment:
    """Validate, resolve targets, select variants and plan a PENDING rollout (added, not
    committed).

    Raises:
        PolicyError: the policy does not validate (422, naming each field).
        InvalidRequestError: an empty target, unknown device ids, bad variants.
        PlanError: no targeted device has a variant.
    """
    policy = rollout.parse_policy(deployment_in.policy)
    try:
        target = rollout.Target.model_validate(deployment_in.target.model_dump())
    except ValidationError as err:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise InvalidRequestError(f"invalid target: {problems}") from err
    _check_variants(
        session,
        org_id=org_id,
        model_name=deployment_in.model_name,
        variants=deployment_in.variants,
    )
    devices = device_infos(session, org_id=org_id, model_name=deployment_in.model_name)
    chosen, missing = rollout.resolve_targets(devices, target)
    if missing:
        raise InvalidRequestError(
            f"target names devices not in the organization: {', '.join(missing)}"
        )
    if not chosen:
        raise InvalidRequestError(
            f"target {target.model_dump()} selects no device of the organization"
        )
    deployment_id = uuid.uuid4()
    state = rollout.plan_rollout(
        deployment_id.hex,
        policy,
        devices=chosen,
        variants=deployment_in.variants,
        now=now,
        seed=deployment_in.seed,
    )
    deployment = Deployment(
        id=deployment_id,
        org_id=org_id,
        name=deployment_in.name,
        model_name=deployment_in.model_name,
        variants=dict(deployment_in.variants),
        target=deployment_in.target.model_dump(),
        policy=policy.model_dump(mode="json", exclude_defaults=True),
        state=dump_state(state),
        phase=state.phase.value,
    )
    session.add(deployment)
    session.flush()
    return deployment


def get_deployment(
    session: Session, *, org_id: uuid.UUID, deployment_id: uuid.UUID
) -> Deployment | None:
    """The deployment of the organization, or None (also for another org's id)."""
    deployment = session.get(Deployment, deployment_id)
    return deployment if deployment is not None and deployment.org_id == org_id else None


def list_deployments(
    session: Session, *, org_id: uuid.UUID, phase: str | None, offset: int, limit: int
) -> tuple[Sequence[Deployment], int]:
    """The organization's deployments, newest first, and their count."""
    query = select(Deployment).where(Deployment.org_id == org_id)
    counted = select(func.count()).select_from(Deployment).where(Deployment.org_id == org_id)
    if phase is not None:
        query = query.where(Deployment.phase == phase)
        counted = counted.where(Deployment.phase == phase)
    rows = session.exec(
        query.order_by(col(Deployment.created_at).desc()).offset(offset).limit(limit)
    ).all()
    return rows, session.exec(counted).one()


def active_deployments(session: Session) -> Sequence[Deployment]:
    """Deployments the executor must look at: not over, or with actions still to carry out."""
    query = select(Deployment).where(col(Deployment.phase).in_(ACTIVE_PHASES))
    active = list(session.exec(query).all())
    seen = {d.id for d in active}
    pending = select(Deployment).where(col(Deployment.phase).not_in(ACTIVE_PHASES))
    active += [d for d in session.exec(pending).all() if d.outbox and d.id not in seen]
    return active


def save(
    session: Session,
    *,
    deployment: Deployment,
    state: RolloutState,
    outbox: list[dict[str, Any]],
    dumped: dict[str, Any] | None = None,
) -> int:
    """Store a new state (``dumped``: its :func:`dump_state` data, if already made) and outbox
    if nobody saved since ``deployment`` was read; returns the row's new version.

    Raises:
        StaleDeploymentError: the row's version moved on (re-read and retry).
    """
    version = deployment.version + 1
    result = session.execute(
        update(Deployment)
        .where(col(Deployment.id) == deployment.id, col(Deployment.version) == deployment.version)
        .values(
            state=dumped if dumped is not None else dump_state(state),
            outbox=outbox,
            phase=state.phase.value,
            version=version,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise StaleDeploymentError(
            f"deployment {str(deployment.id)!r} changed meanwhile; read it again and retry"
        )
    session.expire(deployment)
    return version


# ---------------------------------------------------------------- responses


def to_public(deployment: Deployment) -> DeploymentPublic:
    """The API view: phase, stages, per-device job states and counts, unmatched devices."""
    state = load_state(deployment.state)
    devices = []
    for device_id in sorted(state.devices):
        job = state.devices[device_id]
        devices.append(
            DeploymentDevice(
                device_id=device_id,
                artifact_id=job.artifact_id,
                previous_artifact_id=job.previous_artifact_id,
                attempts=job.attempts,
                state=job.state.value if job.state is not None else "NOT_STARTED",
                job_id=job.deploy.job_id if job.deploy is not None else None,
                reason=job.deploy.reason if job.deploy is not None else None,
                rollback_state=job.rollback.state.value if job.rollback is not None else None,
                rollback_reason=job.rollback.reason if job.rollback is not None else None,
            )
        )
    return DeploymentPublic(
        id=deployment.id,
        name=deployment.name,
        model_name=deployment.model_name,
        variants=deployment.variants,
        target=DeploymentTarget.model_validate(deployment.target),
        policy=deployment.policy,
        phase=state.phase.value,
        reason=state.reason,
        stage=state.stage,
        stages=[list(state.stage_devices(k)) for k in range(len(state.stage_ends))],
        devices=devices,
        counts=rollout.device_counts(state),
        unmatched=[UnmatchedDevice(device_id=u[0], profile=u[1]) for u in state.unmatched],
        created_at=deployment.created_at,
        updated_at=deployment.updated_at,
    )


def state_diff(report: DeviceReport | None) -> list[ModelStateDiff]:
    """Desired vs reported artifact per model name (every model either side names)."""
    desired = report.desired_models if report is not None else {}
    reported = {
        m["name"]: m
        for m in (report.reported_models if report is not None else [])
        if m.get("role", "primary") == "primary"
    }
    diff = []
    for name in sorted(set(desired) | set(reported)):
        have = reported.get(name)
        want = desired.get(name)
        diff.append(
            ModelStateDiff(
                model_name=name,
                desired_artifact_id=want,
                reported_artifact_id=have["artifact_id"] if have else None,
                reported_version=have["version"] if have else None,
                in_sync=want is None or (have is not None and have["artifact_id"] == want),
            )
        )
    return diff
