"""The retrain trigger: a policy per model fires a retrain, run as linked steps.

**Policy** (:class:`~cloud.dataloop.labeling_models.RetrainPolicy`, pure evaluation in
:func:`evaluate_policy`): fire when at least ``min_new_labels`` labels exist that no retrain
run used yet, or when one device's drift score stays above ``drift_threshold`` for
``drift_minutes`` (every score of the device from the first one above the threshold up to
now is above it, the first is at least ``drift_minutes`` old and the newest at most
``drift_minutes`` old). A model with a run still in progress does not fire again.

**Run** (:class:`~cloud.dataloop.labeling_models.RetrainRun`), a state machine advanced by
:func:`advance_run`::

    AWAITING_APPROVAL --approve--> TRAINING --train job SUCCEEDED--> COMPILING
           |                           |                                 |
           +--reject--> REJECTED       +--job failed--> FAILED           +--> DEPLOYING -> DEPLOYED
                                                                         +--> DONE (nothing to do)

* start (:func:`start_run`): the parent is the version the labeled samples came from (the
  one the devices run), else the model's production version, else its newest. Its dataset
  plus the new labels (:func:`cloud.datasets.concat_datasets`) is written as an ``.npz`` and
  registered as dataset ``<name>-relabeled`` (a new version each time), then a ``train`` job
  is queued with ``parent_version_id`` = the parent, so the lineage of the new version reads
  dataset → training run → version → parent version. The labels used are marked with the run.
* compile: when the train job succeeded, a ``compile`` job for every profile in use by a
  device running one of the parent's artifacts (asked through :class:`RetrainTarget`, the
  fleet); without a fleet, every profile the parent was compiled for.
* deploy: when the compile job succeeded, a canary deployment of the new artifacts to those
  devices through ``fleet.sdk.FleetClient.create_deployment`` with the policy's rollout
  (default: 1 canary device, then the rest; abort on a failure or on drift above the
  trigger threshold). Without a fleet or devices the run ends DONE with a note.

:func:`tick` evaluates every enabled policy and advances every active run; the data loop's
monitor loop, :func:`run_loop` (every ``every_s`` seconds) or ``POST /retrain/tick`` calls
it. Labeling calls :func:`maybe_trigger` after each label so a label-count policy fires at
once.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cloud.errors import CloudError, ConflictError, InvalidRequestError, NotFoundError

if TYPE_CHECKING:
    from sqlmodel import Session

    from cloud.dataloop.labeling_models import (
        RetrainPolicy,
        RetrainPolicyPublic,
        RetrainPolicyPut,
        RetrainRun,
        RetrainRunPublic,
        RetrainRunState,
    )
    from cloud.models import ModelVersion, RegisteredModel
    from cloud.settings import CloudSettings
    from fleet.sdk import FleetClient

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the pure policy


@dataclass(frozen=True)
class PolicyRule:
    """The trigger part of a retrain policy."""

    min_new_labels: int | None = None
    drift_threshold: float | None = None
    drift_minutes: float = 30.0
    require_approval: bool = False
    enabled: bool = True


@dataclass(frozen=True)
class DriftPoint:
    """One drift score of one series (a device) at the end of its window."""

    series: str
    time: datetime
    score: float


@dataclass(frozen=True)
class PolicyInputs:
    """What the policy is judged on."""

    now: datetime
    new_labels: int = 0
    drift: Sequence[DriftPoint] = ()
    active_run: str | None = None


@dataclass(frozen=True)
class Decision:
    """Whether to retrain, why, and whether a person must approve first."""

    fire: bool
    reason: str
    needs_approval: bool = False
    reasons: tuple[str, ...] = field(default_factory=tuple)


def sustained_drift(
    points: Sequence[DriftPoint], *, threshold: float, minutes: float, now: datetime
) -> tuple[str, datetime] | None:
    """The first series whose score stayed above ``threshold`` for ``minutes`` up to ``now``,
    with the time its streak began, or None."""
    span = timedelta(minutes=minutes)
    by_series: dict[str, list[DriftPoint]] = {}
    for point in points:
        by_series.setdefault(point.series, []).append(point)
    found: list[tuple[datetime, str]] = []
    for series, series_points in by_series.items():
        ordered = sorted(series_points, key=lambda p: p.time)
        if now - ordered[-1].time > span:
            continue  # stale: no recent window
        start: datetime | None = None
        for point in reversed(ordered):
            if point.score > threshold:
                start = point.time
            else:
                break
        if start is not None and now - start >= span:
            found.append((start, series))
    if not found:
        return None
    start, series = min(found)
    return series, start


def evaluate_policy(rule: PolicyRule, inputs: PolicyInputs) -> Decision:
    """Whether ``rule`` fires on ``inputs`` (see the module docstring)."""
    if not rule.enabled:
        return Decision(False, "the policy is disabled")
    if inputs.active_run is not None:
        return Decision(False, f"{inputs.active_run} is still in progress")
    reasons: list[str] = []
    if rule.min_new_labels is not None and inputs.new_labels >= rule.min_new_labels:
        reasons.append(f"{inputs.new_labels} new label(s) >= {rule.min_new_labels}")
    if rule.drift_threshold is not None:
        hit = sustained_drift(
            inputs.drift,
            threshold=rule.drift_threshold,
            minutes=rule.drift_minutes,
            now=inputs.now,
        )
        if hit is not None:
            series, start = hit
            minutes = (inputs.now - start).total_seconds() / 60
            reasons.append(
                f"drift of {series} above {rule.drift_threshold:g} for {minutes:.0f} min "
                f"(>= {rule.drift_minutes:g}) since {start.isoformat(timespec='seconds')}"
            )
    if not reasons:
        wanted = []
        if rule.min_new_labels is not None:
            wanted.append(f"{inputs.new_labels} of {rule.min_new_labels} new labels")
        if rule.drift_threshold is not None:
            wanted.append(
                f"no device above drift {rule.drift_threshold:g} for {rule.drift_minutes:g} min"
            )
        return Decision(False, "; ".join(wanted) or "no trigger set")
    return Decision(True, "; ".join(reasons), rule.require_approval, tuple(reasons))


# ---------------------------------------------------------------- the fleet side


class RetrainTarget(Protocol):
    """Where a retrained model goes: the fleet's devices and deployments."""

    def devices_running(self, model_name: str, artifacts: Mapping[str, str]) -> dict[str, str]:
        """Device id → profile of the devices that run one of ``artifacts`` (profile → id)."""
        ...

    def create_deployment(
        self,
        name: str,
        *,
        model_name: str,
        variants: dict[str, str],
        device_ids: list[str],
        policy: dict[str, Any],
    ) -> str:
        """Start a rollout; the deployment's id."""
        ...


class FleetRetrainTarget:
    """:class:`RetrainTarget` over the fleet API (``fleet:read`` and ``fleet:write``)."""

    def __init__(self, client: FleetClient) -> None:
        self.client = client

    def devices_running(self, model_name: str, artifacts: Mapping[str, str]) -> dict[str, str]:
        """See :class:`RetrainTarget`."""
        from cloud.lineage import FleetDeviceSource

        source = FleetDeviceSource(self.client)
        found: dict[str, str] = {}
        for profile, artifact_id in artifacts.items():
            for device in source.devices_for(artifact_id, model_name=model_name, profile=profile):
                if device.status == "running":
                    found[device.device_id] = device.profile
        return found

    def create_deployment(
        self,
        name: str,
        *,
        model_name: str,
        variants: dict[str, str],
        device_ids: list[str],
        policy: dict[str, Any],
    ) -> str:
        """See :class:`RetrainTarget`."""
        from fleet.sdk import FleetAPIError

        try:
            deployment = self.client.create_deployment(
                name, model_name=model_name, variants=variants, device_ids=device_ids, policy=policy
            )
        except FleetAPIError as err:
            raise CloudError(f"the fleet API at {self.client.base_url} failed: {err}") from err
        return str(deployment.id)

    def close(self) -> None:
        """Close the client."""
        self.client.close()


def fleet_target(settings: CloudSettings) -> FleetRetrainTarget | None:
    """The fleet of ``EDGELOOP_CLOUD_FLEET_URL`` / ``_FLEET_API_KEY``, or None."""
    if not settings.fleet_url or settings.fleet_api_key is None:
        return None
    from fleet.sdk import FleetClient

    return FleetRetrainTarget(
        FleetClient(settings.fleet_url, settings.fleet_api_key.get_secret_value())
    )


def default_rollout(threshold: float | None) -> dict[str, Any]:
    """1 canary device, then the rest; abort on a failure or drift above ``threshold``."""
    gates: dict[str, Any] = {"action": "abort"}
    if threshold is not None:
        gates["max_drift"] = threshold
    return {
        "canary": {"count": 1},
        "waves": [{"percent": 100}],
        "abort_failures": 1,
        "health_gates": gates,
    }


# ---------------------------------------------------------------- policies in the database


def policy_public(model: RegisteredModel, policy: RetrainPolicy) -> RetrainPolicyPublic:
    """The API view of ``policy``."""
    from cloud.dataloop.labeling_models import RetrainPolicyPublic

    data = policy.model_dump(warnings=False)
    data["model"] = model.name
    return RetrainPolicyPublic.model_validate(data)


def get_policy(session: Session, *, model: RegisteredModel) -> RetrainPolicy | None:
    """The model's retrain policy, or None."""
    from sqlmodel import select

    from cloud.dataloop.labeling_models import RetrainPolicy

    return session.exec(select(RetrainPolicy).where(RetrainPolicy.model_id == model.id)).first()


def put_policy(
    session: Session, *, model: RegisteredModel, policy_in: RetrainPolicyPut
) -> RetrainPolicy:
    """Create or replace the model's retrain policy.

    Raises:
        InvalidRequestError: a training spec or rollout policy that does not validate.
    """
    from cloud.dataloop.labeling_models import RetrainPolicy
    from fleet.models import utcnow

    if policy_in.training is not None:
        _training_spec(policy_in.training, where="training")
    if policy_in.rollout is not None:
        from fleet.errors import FleetError
        from fleet.rollout import parse_policy

        try:
            parse_policy(policy_in.rollout)
        except FleetError as err:
            raise InvalidRequestError(f"rollout: {err}") from err
    row = get_policy(session, model=model)
    values = policy_in.model_dump()
    if row is None:
        row = RetrainPolicy(model_id=model.id or 0, **values)
    else:
        for key, value in values.items():
            setattr(row, key, value)
        row.updated_at = utcnow()
    session.add(row)
    session.flush()
    return row


def _training_spec(data: Mapping[str, Any], *, where: str) -> Any:
    from pydantic import ValidationError

    from cloud.training.spec import TrainingSpec, check_training_spec

    try:
        spec = TrainingSpec.model_validate(dict(data))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise InvalidRequestError(f"{where}: {problems}") from err
    check_training_spec(spec)
    return spec


# ---------------------------------------------------------------- runs


def run_public(session: Session, *, run: RetrainRun) -> RetrainRunPublic:
    """The API view of ``run`` (with the model name and version numbers)."""
    from cloud import crud
    from cloud.dataloop.labeling_models import RetrainRunPublic
    from cloud.models import RegisteredModel

    model = session.get(RegisteredModel, run.model_id)
    parent = crud.get_version_by_id(session, version_id=run.parent_version_id)
    new = (
        crud.get_version_by_id(session, version_id=run.model_version_id)
        if run.model_version_id is not None
        else None
    )
    data = run.model_dump(warnings=False)
    data.update(
        model=model.name if model is not None else "?",
        parent_version=parent.version if parent is not None else None,
        version=new.version if new is not None else None,
    )
    return RetrainRunPublic.model_validate(data)


def get_run(session: Session, *, run_id: int) -> RetrainRun:
    """The retrain run ``run_id``.

    Raises:
        NotFoundError: there is none.
    """
    from cloud.dataloop.labeling_models import RetrainRun

    run = session.get(RetrainRun, run_id)
    if run is None:
        raise NotFoundError(f"no retrain run {run_id}; list them with GET /retrain/runs")
    return run


def list_runs(
    session: Session,
    *,
    model: RegisteredModel | None = None,
    state: str | None = None,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[RetrainRun], int]:
    """Retrain runs, newest first."""
    from sqlalchemy import func
    from sqlmodel import col, select

    from cloud.dataloop.labeling_models import RetrainRun

    query = select(RetrainRun)
    if model is not None:
        query = query.where(RetrainRun.model_id == model.id)
    if state is not None:
        query = query.where(RetrainRun.state == state)
    count = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(col(RetrainRun.id).desc()).offset(offset).limit(limit))
    return list(rows), int(count)


def _active_run(session: Session, model_id: int) -> RetrainRun | None:
    from sqlmodel import col, select

    from cloud.dataloop.labeling_models import ACTIVE_RUN_STATES, RetrainRun

    query = select(RetrainRun).where(
        RetrainRun.model_id == model_id, col(RetrainRun.state).in_(list(ACTIVE_RUN_STATES))
    )
    return session.exec(query.order_by(col(RetrainRun.id))).first()


def _unused_labels(session: Session, model: RegisteredModel) -> list[Any]:
    from sqlmodel import col, select

    from cloud.dataloop.labeling_models import LabelTask, LabelTaskState

    query = select(LabelTask).where(
        LabelTask.model == model.name,
        LabelTask.state == LabelTaskState.LABELED,
        col(LabelTask.retrain_run_id).is_(None),
    )
    return list(session.exec(query.order_by(col(LabelTask.id))))


def _drift_points(session: Session, model: RegisteredModel, since: datetime) -> list[DriftPoint]:
    from sqlmodel import col, select

    from cloud.dataloop.models import DriftScore

    query = select(DriftScore.device_id, DriftScore.window_end, DriftScore.score).where(
        DriftScore.model == model.name, col(DriftScore.window_end) >= since
    )
    return [DriftPoint(d, t, float(s)) for d, t, s in session.exec(query)]


def rule_of(policy: RetrainPolicy) -> PolicyRule:
    """The trigger part of a stored policy."""
    return PolicyRule(
        min_new_labels=policy.min_new_labels,
        drift_threshold=policy.drift_threshold,
        drift_minutes=policy.drift_minutes,
        require_approval=policy.require_approval,
        enabled=policy.enabled,
    )


def evaluate(
    session: Session, *, model: RegisteredModel, policy: RetrainPolicy, now: datetime
) -> Decision:
    """Judge ``policy`` on the model's unused labels, drift scores and runs now."""
    active = _active_run(session, model.id or 0)
    rule = rule_of(policy)
    drift: list[DriftPoint] = []
    if rule.drift_threshold is not None:
        drift = _drift_points(session, model, now - timedelta(minutes=3 * rule.drift_minutes))
    inputs = PolicyInputs(
        now=now,
        new_labels=len(_unused_labels(session, model)),
        drift=drift,
        active_run=None if active is None else f"retrain run {active.id} ({active.state})",
    )
    return evaluate_policy(rule, inputs)


def _parent_version(session: Session, model: RegisteredModel, tasks: Sequence[Any]) -> ModelVersion:
    from sqlmodel import col, select

    from cloud.models import ModelVersion, Stage

    if tasks:
        version_id, _ = Counter(t.model_version_id for t in tasks).most_common(1)[0]
        row = session.get(ModelVersion, version_id)
        if row is not None:
            return row
    query = select(ModelVersion).where(ModelVersion.model_id == model.id)
    production = session.exec(
        query.where(ModelVersion.stage == Stage.PRODUCTION).order_by(
            col(ModelVersion.version).desc()
        )
    ).first()
    newest = session.exec(query.order_by(col(ModelVersion.version).desc())).first()
    row = production or newest
    if row is None:
        raise InvalidRequestError(f"model {model.name!r} has no version to retrain")
    return row


def trigger(
    session: Session,
    *,
    settings: CloudSettings,
    model: RegisteredModel,
    decision: Decision,
) -> RetrainRun:
    """Record a retrain run for ``decision`` and start it unless it needs approval.

    Raises:
        ConflictError: a run of the model is still in progress.
    """
    from cloud.dataloop.labeling_models import RetrainRun, RetrainRunState

    active = _active_run(session, model.id or 0)
    if active is not None:
        raise ConflictError(
            f"retrain run {active.id} of model {model.name!r} is still {active.state}"
        )
    tasks = _unused_labels(session, model)
    parent = _parent_version(session, model, tasks)
    run = RetrainRun(
        model_id=model.id or 0,
        state=RetrainRunState.AWAITING_APPROVAL,
        active_model_id=model.id,
        reason=decision.reason,
        parent_version_id=parent.id or 0,
    )
    session.add(run)
    session.flush()
    log.info("model %s: retrain run %s (%s)", model.name, run.id, decision.reason)
    if not decision.needs_approval:
        start_run(session, settings=settings, run=run)
    return run


def maybe_trigger(
    session: Session, *, settings: CloudSettings, model_name: str, now: datetime | None = None
) -> RetrainRun | None:
    """Evaluate the model's policy and trigger a run when it fires (None otherwise)."""
    from cloud import crud
    from fleet.models import utcnow

    model = crud.get_model(session, name=model_name)
    policy = get_policy(session, model=model) if model is not None else None
    if model is None or policy is None:
        return None
    decision = evaluate(session, model=model, policy=policy, now=now or utcnow())
    if not decision.fire:
        return None
    return trigger(session, settings=settings, model=model, decision=decision)


def approve_run(
    session: Session, *, settings: CloudSettings, run: RetrainRun, approve: bool, by: str
) -> RetrainRun:
    """Start (``approve``) or reject a run that awaits approval.

    Raises:
        ConflictError: the run does not await approval.
    """
    from cloud.dataloop.labeling_models import RetrainRunState
    from fleet.models import utcnow

    if run.state != RetrainRunState.AWAITING_APPROVAL:
        raise ConflictError(
            f"retrain run {run.id} is {run.state}; only runs in "
            f"{RetrainRunState.AWAITING_APPROVAL.value} can be approved or rejected"
        )
    now = utcnow()
    run.approved_by = by
    run.approved_at = now
    run.updated_at = now
    if approve:
        start_run(session, settings=settings, run=run)
    else:
        set_state(run, RetrainRunState.REJECTED)
        run.note = f"rejected by {by}"
    session.add(run)
    session.flush()
    return run


def _write_npz(path: Path, data: Any) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial.npz")
    np.savez_compressed(partial, x=data.x, y=data.y, classes=np.asarray(data.classes))
    partial.replace(path)


def start_run(session: Session, *, settings: CloudSettings, run: RetrainRun) -> RetrainRun:
    """Build the dataset (parent's + new labels), register it, and queue the train job.

    Raises:
        DatasetError: the parent's dataset cannot be read or the labels do not fit it.
        NotFoundError: the parent version or its dataset is gone.
    """
    from cloud import crud
    from cloud.dataloop.labeling import labeled_dataset, tensor_dir
    from cloud.dataloop.labeling_models import RetrainRunState
    from cloud.datasets import concat_datasets, dataset_digest, load_dataset
    from cloud.models import JobKind, RegisteredModel, TrainJobSpec
    from fleet.models import utcnow

    model = session.get(RegisteredModel, run.model_id)
    parent = crud.get_version_by_id(session, version_id=run.parent_version_id)
    if model is None or parent is None:
        raise NotFoundError(f"the model or parent version of retrain run {run.id} is gone")
    original = crud.get_dataset(session, dataset_id=parent.dataset_id)
    if original is None:
        raise NotFoundError(
            f"dataset id {parent.dataset_id} of {model.name} v{parent.version} is gone"
        )
    tasks = [t for t in _unused_labels(session, model) if t.label in parent.classes]
    dataset_id = original.id or 0
    if tasks:
        base = load_dataset(original.stored_path, original.kind)  # type: ignore[arg-type]
        labels = labeled_dataset(
            session,
            blob_dir=tensor_dir(settings),
            tasks=tasks,
            classes=base.classes,
            input_shape=base.input_shape,
        )
        combined = concat_datasets(base, labels)
        name = f"{original.name[:54]}-relabeled"
        path = settings.resolved_blob_dir() / "datasets" / f"retrain-{run.id}" / f"{name}.npz"
        _write_npz(path, combined)
        dataset, _ = crud.register_dataset(
            session,
            name=name,
            kind="npz",
            source=str(path),
            digest=dataset_digest(str(path)),
            stored_path=str(path),
            input_shape=list(combined.input_shape),
            classes=list(combined.classes),
            n_samples=len(combined),
        )
        dataset_id = dataset.id or 0
        for task in tasks:
            task.retrain_run_id = run.id
            session.add(task)
    policy = get_policy(session, model=model)
    training_data = policy.training if policy is not None and policy.training else parent.spec
    training = _training_spec(training_data, where="the retrain's training spec")
    spec = TrainJobSpec(
        model=model.name, dataset_id=dataset_id, training=training, parent_version_id=parent.id
    )
    job = crud.enqueue_job(
        session,
        kind=JobKind.TRAIN,
        spec=spec.model_dump(mode="json"),
        max_attempts=settings.max_attempts,
    )
    run.n_labels = len(tasks)
    run.dataset_id = dataset_id
    run.train_job_id = job.id
    set_state(run, RetrainRunState.TRAINING)
    run.updated_at = utcnow()
    session.add(run)
    session.flush()
    return run


def set_state(run: RetrainRun, state: RetrainRunState) -> None:
    """Move ``run`` to ``state``; ``active_model_id`` (unique) is set only while it is active,
    so two concurrent triggers of one model cannot both record a run."""
    run.state = state
    run.active_model_id = None if state.terminal else run.model_id


def _fail(run: RetrainRun, error: str) -> None:
    from cloud.dataloop.labeling_models import RetrainRunState

    set_state(run, RetrainRunState.FAILED)
    run.error = error


def advance_run(
    session: Session,
    *,
    settings: CloudSettings,
    run: RetrainRun,
    target: RetrainTarget | None,
) -> RetrainRun:
    """Take the run's next step if its current one is over (see the module docstring)."""
    from cloud import crud
    from cloud.dataloop.labeling_models import RetrainRunState
    from cloud.models import CompileJobSpec, JobKind, JobState, RegisteredModel
    from fleet.models import utcnow

    model = session.get(RegisteredModel, run.model_id)
    model_name = model.name if model is not None else "?"
    before = run.state
    if run.state == RetrainRunState.TRAINING and run.train_job_id is not None:
        job = crud.get_job(session, job_id=run.train_job_id)
        if job is None or job.state in (JobState.FAILED, JobState.CANCELED):
            why = job.error if job is not None else "the job is gone"
            _fail(run, f"train job {run.train_job_id} {job.state if job else 'lost'}: {why}")
        elif job.state == JobState.SUCCEEDED:
            run.model_version_id = int((job.result or {}).get("model_version_id") or 0) or None
            parent_artifacts = {
                r.profile: r.artifact_id
                for r in crud.list_compile_records(session, model_version_id=run.parent_version_id)
                if r.artifact_id and r.error is None
            }
            if target is not None and parent_artifacts:
                devices = target.devices_running(model_name, parent_artifacts)
                run.device_ids = sorted(devices)
                profiles = sorted(set(devices.values()))
            else:
                profiles = sorted(parent_artifacts)
            run.profiles = profiles
            if run.model_version_id is None:
                _fail(run, f"train job {job.id} succeeded without a model version")
            elif not profiles:
                set_state(run, RetrainRunState.DONE)
                run.note = (
                    "trained; nothing to compile: no device runs the parent version"
                    if parent_artifacts
                    else "trained; nothing to compile: the parent version was never compiled"
                )
            else:
                compile_spec = CompileJobSpec(
                    model_version_id=run.model_version_id, profiles=profiles
                )
                compile_job = crud.enqueue_job(
                    session,
                    kind=JobKind.COMPILE,
                    spec=compile_spec.model_dump(mode="json"),
                    max_attempts=settings.max_attempts,
                )
                run.compile_job_id = compile_job.id
                set_state(run, RetrainRunState.COMPILING)
    elif run.state == RetrainRunState.COMPILING and run.compile_job_id is not None:
        job = crud.get_job(session, job_id=run.compile_job_id)
        if job is None or job.state in (JobState.FAILED, JobState.CANCELED):
            why = job.error if job is not None else "the job is gone"
            _fail(run, f"compile job {run.compile_job_id} {job.state if job else 'lost'}: {why}")
        elif job.state == JobState.SUCCEEDED:
            variants = {
                r.profile: r.artifact_id
                for r in crud.list_compile_records(session, job_id=run.compile_job_id)
                if r.artifact_id and r.error is None and r.fleet_uploaded
            }
            if target is None:
                set_state(run, RetrainRunState.DONE)
                run.note = "compiled; no fleet configured (EDGELOOP_CLOUD_FLEET_URL), not deployed"
            elif not variants or not run.device_ids:
                set_state(run, RetrainRunState.DONE)
                run.note = "compiled; no uploaded artifact or no device to deploy to"
            else:
                set_state(run, RetrainRunState.DEPLOYING)
                policy = get_policy(session, model=model) if model is not None else None
                rollout = (policy.rollout if policy is not None else None) or default_rollout(
                    policy.drift_threshold if policy is not None else None
                )
                new = crud.get_version_by_id(session, version_id=run.model_version_id or 0)
                try:
                    run.deployment_id = target.create_deployment(
                        f"retrain-{run.id}-v{new.version if new else 0}",
                        model_name=model_name,
                        variants=variants,
                        device_ids=run.device_ids,
                        policy=rollout,
                    )
                    set_state(run, RetrainRunState.DEPLOYED)
                except CloudError as err:
                    _fail(run, f"the canary deployment failed: {err}")
    if run.state != before:
        run.updated_at = utcnow()
        session.add(run)
        session.flush()
        log.info("retrain run %s: %s -> %s", run.id, before, run.state)
    return run


@dataclass
class TickReport:
    """What one :func:`tick` did."""

    triggered: list[int] = field(default_factory=list)
    advanced: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def tick(
    new_session: Callable[[], Session],
    *,
    settings: CloudSettings,
    target: RetrainTarget | None,
    now: datetime | None = None,
) -> TickReport:
    """Evaluate every enabled policy and advance every active run (each in its own
    transaction; one model's failure does not stop the others)."""
    from sqlalchemy.exc import IntegrityError
    from sqlmodel import col, select

    from cloud.dataloop.labeling_models import RetrainPolicy, RetrainRun, RetrainRunState
    from cloud.models import RegisteredModel
    from fleet.models import utcnow

    report = TickReport()
    now = now or utcnow()
    with new_session() as session:
        policies = list(session.exec(select(RetrainPolicy).where(col(RetrainPolicy.enabled))))
    for policy in policies:
        with new_session() as session:
            try:
                model = session.get(RegisteredModel, policy.model_id)
                row = session.get(RetrainPolicy, policy.id)
                if model is None or row is None:
                    continue
                decision = evaluate(session, model=model, policy=row, now=now)
                if decision.fire:
                    run = trigger(session, settings=settings, model=model, decision=decision)
                    session.commit()
                    report.triggered.append(run.id or 0)
            except IntegrityError:  # another process recorded a run of the model first
                session.rollback()
            except CloudError as err:
                session.rollback()
                report.errors.append(f"model id {policy.model_id}: {err}")
    with new_session() as session:
        active = [
            r.id
            for r in session.exec(
                select(RetrainRun).where(
                    col(RetrainRun.state).in_([RetrainRunState.TRAINING, RetrainRunState.COMPILING])
                )
            )
        ]
    for run_id in active:
        with new_session() as session:
            try:
                run = get_run(session, run_id=run_id or 0)
                before = run.state
                advance_run(session, settings=settings, run=run, target=target)
                session.commit()
                if run.state != before:
                    report.advanced.append(run.id or 0)
            except CloudError as err:
                session.rollback()
                report.errors.append(f"retrain run {run_id}: {err}")
    return report


def run_loop(
    settings: CloudSettings,
    *,
    every_s: float = 60.0,
    stop: threading.Event | None = None,
    iterations: int | None = None,
    target: RetrainTarget | None = None,
) -> int:
    """:func:`tick` every ``every_s`` seconds until ``stop`` is set (or ``iterations`` ran);
    the fleet is :func:`fleet_target` unless ``target`` is given. Returns the ticks run."""
    from cloud import db

    stop = stop or threading.Event()
    engine = db.make_engine(settings.resolved_database_url())
    own_target = fleet_target(settings) if target is None else None
    ran = 0
    try:
        while not stop.is_set() and (iterations is None or ran < iterations):
            report = tick(
                db.session_factory(engine), settings=settings, target=target or own_target
            )
            ran += 1
            for error in report.errors:
                log.warning("retrain: %s", error)
            if iterations is None or ran < iterations:
                stop.wait(every_s)
    finally:
        if own_target is not None:
            own_target.close()
        engine.dispose()
    return ran
