"""Database helpers of the cloud service: keyword-only, never committing.

The caller (a route, the worker) owns the transaction: these helpers add, update and flush,
and leave commit or rollback to it. The job queue lives here too, as conditional updates
that work alike on SQLite and PostgreSQL:

* :func:`claim_job`: the oldest QUEUED job becomes RUNNING under a lease held by one worker
  (PostgreSQL: the candidate is read ``FOR UPDATE SKIP LOCKED``; SQLite, which has one
  writer, relies on ``UPDATE ... WHERE state = 'QUEUED'`` touching one row or none).
* :func:`renew_lease`, :func:`finish_job`, :func:`release_job`: only while the row still
  names this worker and is RUNNING, so a worker that lost its lease cannot overwrite the job.
* :func:`reap_expired`: a RUNNING job whose lease expired is re-queued while attempts remain,
  else FAILED with the reason ``worker <id> lost (lease expired at <time>)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import func, update
from sqlmodel import Session, SQLModel, col, select
from sqlmodel.sql.expression import SelectOfScalar

from cloud.errors import ConflictError
from cloud.models import (
    CompileRecord,
    Dataset,
    Job,
    JobEvent,
    JobKind,
    JobState,
    ModelVersion,
    ModelVersionPublic,
    RegisteredModel,
    RegisteredModelPublic,
    Stage,
)
from fleet.models import utcnow

T = TypeVar("T", bound=SQLModel)


def _page(
    session: Session, query: SelectOfScalar[T], *, order: Any, offset: int, limit: int
) -> tuple[list[T], int]:
    count = session.exec(select(func.count()).select_from(query.subquery())).one()
    orders = order if isinstance(order, tuple) else (order,)
    rows = session.exec(query.order_by(*orders).offset(offset).limit(limit)).all()
    return list(rows), int(count)


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# ---------------------------------------------------------------- datasets


def register_dataset(
    session: Session,
    *,
    name: str,
    kind: str,
    source: str,
    digest: str,
    stored_path: str,
    input_shape: Sequence[int],
    classes: Sequence[str],
    n_samples: int,
) -> tuple[Dataset, bool]:
    """A new version of dataset ``name``, or its newest version if the content is the same.

    Returns:
        The row and whether it was created.
    """
    latest = find_dataset(session, name=name)
    if latest is not None and latest.digest == digest:
        return latest, False
    dataset = Dataset(
        name=name,
        version=1 if latest is None else latest.version + 1,
        kind=kind,
        source=source,
        digest=digest,
        stored_path=stored_path,
        input_shape=list(input_shape),
        classes=list(classes),
        n_samples=n_samples,
    )
    session.add(dataset)
    session.flush()
    return dataset, True


def get_dataset(session: Session, *, dataset_id: int) -> Dataset | None:
    """The dataset row ``dataset_id``, or None."""
    return session.get(Dataset, dataset_id)


def find_dataset(session: Session, *, name: str, version: int | None = None) -> Dataset | None:
    """Version ``version`` (default: the newest) of dataset ``name``, or None."""
    query = select(Dataset).where(Dataset.name == name)
    if version is not None:
        return session.exec(query.where(Dataset.version == version)).first()
    return session.exec(query.order_by(col(Dataset.version).desc())).first()


def list_datasets(
    session: Session, *, name: str | None = None, offset: int = 0, limit: int = 100
) -> tuple[list[Dataset], int]:
    """Dataset versions (of ``name`` if given), by name then version."""
    query = select(Dataset)
    if name is not None:
        query = query.where(Dataset.name == name)
    return _page(
        session,
        query,
        order=(col(Dataset.name), col(Dataset.version)),
        offset=offset,
        limit=limit,
    )


# ---------------------------------------------------------------- jobs


def enqueue_job(
    session: Session,
    *,
    kind: JobKind,
    spec: dict[str, Any],
    max_attempts: int,
    parent_id: int | None = None,
) -> Job:
    """A new QUEUED job."""
    job = Job(kind=kind, spec=spec, max_attempts=max_attempts, parent_id=parent_id)
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, *, job_id: int) -> Job | None:
    """The job ``job_id`` as stored now (not a cached copy), or None."""
    job = session.get(Job, job_id)
    if job is not None:
        session.refresh(job)
    return job


def list_jobs(
    session: Session,
    *,
    state: JobState | None = None,
    kind: JobKind | None = None,
    parent_id: int | None = None,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[Job], int]:
    """Jobs, newest first, filtered by state, kind and parent."""
    query = select(Job)
    if state is not None:
        query = query.where(Job.state == state)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if parent_id is not None:
        query = query.where(Job.parent_id == parent_id)
    return _page(session, query, order=col(Job.id).desc(), offset=offset, limit=limit)


def children(session: Session, *, job_id: int) -> list[Job]:
    """The jobs whose parent is ``job_id``."""
    rows = session.exec(select(Job).where(Job.parent_id == job_id).order_by(col(Job.id)))
    return list(rows)


def add_event(
    session: Session,
    *,
    job_id: int,
    kind: str,
    message: str,
    metrics: dict[str, float] | None = None,
) -> JobEvent:
    """Append a log line or metric to the job's events (``seq`` 1, 2, ...)."""
    last = session.exec(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id)).one()
    event = JobEvent(
        job_id=job_id, seq=int(last or 0) + 1, kind=kind, message=message, metrics=metrics
    )
    session.add(event)
    session.flush()
    return event


def list_events(
    session: Session, *, job_id: int, after: int = 0, limit: int = 1000
) -> tuple[list[JobEvent], int]:
    """The job's events with ``seq > after``, oldest first."""
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after)
    return _page(session, query, order=col(JobEvent.seq), offset=0, limit=limit)


def _end(job: Job, state: JobState, *, error: str | None = None) -> None:
    now = utcnow()
    job.state = state
    job.error = error
    job.finished_at = now
    job.updated_at = now
    job.worker_id = None
    job.lease_expires_at = None


def request_cancel(session: Session, *, job: Job) -> Job:
    """Cancel ``job`` and its children: a queued one at once, a running one at its next check.

    Raises:
        ConflictError: the job is already over.
    """
    if JobState(job.state).terminal:
        raise ConflictError(
            f"job {job.id} is already {job.state}; only QUEUED or RUNNING jobs cancel"
        )
    for child in children(session, job_id=job.id or 0):
        if not JobState(child.state).terminal:
            request_cancel(session, job=child)
    if job.state == JobState.QUEUED:
        _end(job, JobState.CANCELED, error="canceled before it started")
    else:
        job.cancel_requested = True
        job.updated_at = utcnow()
    session.add(job)
    session.flush()
    add_event(session, job_id=job.id or 0, kind="log", message="cancel requested")
    return job


def claim_job(
    session: Session,
    *,
    worker_id: str,
    lease_s: float,
    kinds: Sequence[JobKind] | None = None,
) -> Job | None:
    """Make the oldest QUEUED job RUNNING for ``worker_id`` under a lease (None: queue empty)."""
    query = select(Job.id).where(Job.state == JobState.QUEUED)
    if kinds:
        query = query.where(col(Job.kind).in_(list(kinds)))
    query = query.order_by(col(Job.id)).limit(5)
    if _is_postgres(session):
        query = query.with_for_update(skip_locked=True)
    for job_id in session.exec(query).all():
        assert job_id is not None
        now = utcnow()
        claimed = session.execute(
            update(Job)
            .where(col(Job.id) == job_id, col(Job.state) == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                worker_id=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_s),
                attempts=col(Job.attempts) + 1,
                started_at=func.coalesce(col(Job.started_at), now),
                updated_at=now,
            )
        )
        if claimed.rowcount == 1:  # type: ignore[attr-defined]
            return get_job(session, job_id=job_id)
    return None


def _owned(job_id: int, worker_id: str) -> Any:
    return (
        (col(Job.id) == job_id)
        & (col(Job.worker_id) == worker_id)
        & (col(Job.state) == JobState.RUNNING)
    )


def renew_lease(session: Session, *, job_id: int, worker_id: str, lease_s: float) -> bool | None:
    """Extend the lease; None if the job is no longer this worker's, else its cancel flag."""
    now = utcnow()
    renewed = session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now)
    )
    if renewed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    flag = session.exec(select(Job.cancel_requested).where(Job.id == job_id)).one()
    return bool(flag)


def set_progress(session: Session, *, job_id: int, worker_id: str, progress: float) -> bool:
    """Record progress (0..1) while the job is this worker's; whether it still is."""
    done = session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(progress=min(max(progress, 0.0), 1.0), updated_at=utcnow())
    )
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def finish_job(
    session: Session,
    *,
    job_id: int,
    worker_id: str,
    state: JobState,
    error: str | None = None,
    result: dict[str, Any] | None = None,
) -> bool:
    """End the job as ``state`` if it is still this worker's; whether it was."""
    now = utcnow()
    values: dict[str, Any] = {
        "state": state,
        "error": error,
        "finished_at": now,
        "updated_at": now,
        "worker_id": None,
        "lease_expires_at": None,
    }
    if result is not None:
        values["result"] = result
    if state == JobState.SUCCEEDED:
        values["progress"] = 1.0
    done = session.execute(update(Job).where(_owned(job_id, worker_id)).values(**values))
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def release_job(
    session: Session, *, job_id: int, worker_id: str, requeue: bool, result: dict[str, Any] | None
) -> bool:
    """Give the job up: back to QUEUED (``requeue``, the try not counted) or RUNNING unowned.

    An unowned RUNNING job waits on its children (an HPO study) and is finished by
    :func:`cloud.worker.Worker.maintain` when they are.
    """
    values: dict[str, Any] = {"worker_id": None, "lease_expires_at": None, "updated_at": utcnow()}
    if requeue:
        values.update(state=JobState.QUEUED, attempts=col(Job.attempts) - 1)
    if result is not None:
        values["result"] = result
    done = session.execute(update(Job).where(_owned(job_id, worker_id)).values(**values))
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def take_waiting(session: Session, *, job_id: int, worker_id: str, lease_s: float) -> bool:
    """Lease an unowned RUNNING job (a parent whose children are done) to finish it."""
    now = utcnow()
    done = session.execute(
        update(Job)
        .where(
            col(Job.id) == job_id,
            col(Job.state) == JobState.RUNNING,
            col(Job.worker_id).is_(None),
        )
        .values(
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_s),
            updated_at=now,
        )
    )
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def waiting_jobs(session: Session) -> list[Job]:
    """RUNNING jobs no worker holds: parents waiting on their children."""
    query = select(Job).where(Job.state == JobState.RUNNING, col(Job.worker_id).is_(None))
    return list(session.exec(query.order_by(col(Job.id))))


def reap_expired(session: Session, *, now: datetime | None = None) -> list[tuple[int, str]]:
    """Re-queue or fail RUNNING jobs whose lease expired.

    Returns:
        ``(job id, what happened)`` per job reaped.
    """
    now = now or utcnow()
    query = select(Job).where(
        Job.state == JobState.RUNNING,
        col(Job.lease_expires_at).is_not(None),
        col(Job.lease_expires_at) < now,
    )
    reaped: list[tuple[int, str]] = []
    for job in session.exec(query).all():
        assert job.id is not None and job.lease_expires_at is not None
        lost = (
            f"worker {job.worker_id} lost (lease expired at "
            f"{job.lease_expires_at.isoformat(timespec='seconds')})"
        )
        values: dict[str, Any] = {"worker_id": None, "lease_expires_at": None, "updated_at": now}
        if job.attempts < job.max_attempts and not job.cancel_requested:
            values["state"] = JobState.QUEUED
            what = f"{lost}; re-queued (attempt {job.attempts} of {job.max_attempts} used)"
        elif job.cancel_requested:
            values.update(state=JobState.CANCELED, error=f"canceled; {lost}", finished_at=now)
            what = f"canceled; {lost}"
        else:
            values.update(state=JobState.FAILED, error=lost, finished_at=now)
            what = f"{lost}; failed after {job.attempts} of {job.max_attempts} attempts"
        done = session.execute(
            update(Job)
            .where(
                col(Job.id) == job.id,
                col(Job.state) == JobState.RUNNING,
                col(Job.lease_expires_at) == job.lease_expires_at,
            )
            .values(**values)
        )
        if done.rowcount == 1:  # type: ignore[attr-defined]
            add_event(session, job_id=job.id, kind="log", message=what)
            reaped.append((job.id, what))
    return reaped


# ---------------------------------------------------------------- registry


def get_model(session: Session, *, name: str) -> RegisteredModel | None:
    """The registered model ``name``, or None."""
    return session.exec(select(RegisteredModel).where(RegisteredModel.name == name)).first()


def _model_public(session: Session, model: RegisteredModel) -> RegisteredModelPublic:
    versions = session.exec(
        select(ModelVersion.version, ModelVersion.stage).where(ModelVersion.model_id == model.id)
    ).all()
    numbers = [v for v, _ in versions]
    production = [v for v, s in versions if s == Stage.PRODUCTION]
    return RegisteredModelPublic(
        name=model.name,
        created_at=model.created_at,
        versions=len(numbers),
        latest_version=max(numbers) if numbers else None,
        production_version=max(production) if production else None,
    )


def list_models(
    session: Session, *, offset: int = 0, limit: int = 100
) -> tuple[list[RegisteredModelPublic], int]:
    """Registered models by name, with their version counts and stages."""
    rows, count = _page(
        session,
        select(RegisteredModel),
        order=col(RegisteredModel.name),
        offset=offset,
        limit=limit,
    )
    return [_model_public(session, m) for m in rows], count


def model_public(session: Session, *, model: RegisteredModel) -> RegisteredModelPublic:
    """The API view of ``model``."""
    return _model_public(session, model)


def register_version(
    session: Session,
    *,
    model_name: str,
    metrics: dict[str, float],
    spec: dict[str, Any],
    dataset_id: int,
    training_job_id: int | None,
    code_version: str,
    parent_version_id: int | None,
    weights_path: str,
    onnx_path: str,
    baseline_path: str,
    input_shape: Sequence[int],
    classes: Sequence[str],
) -> ModelVersion:
    """A new version (newest + 1) of ``model_name``, creating the model if needed."""
    model = get_model(session, name=model_name)
    if model is None:
        model = RegisteredModel(name=model_name)
        session.add(model)
        session.flush()
    last = session.exec(
        select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id)
    ).one()
    version = ModelVersion(
        model_id=model.id or 0,
        version=int(last or 0) + 1,
        metrics=metrics,
        spec=spec,
        dataset_id=dataset_id,
        training_job_id=training_job_id,
        code_version=code_version,
        parent_version_id=parent_version_id,
        weights_path=weights_path,
        onnx_path=onnx_path,
        baseline_path=baseline_path,
        input_shape=list(input_shape),
        classes=list(classes),
    )
    session.add(version)
    session.flush()
    return version


def get_version(session: Session, *, model_name: str, version: int) -> ModelVersion | None:
    """Version ``version`` of ``model_name``, or None."""
    query = (
        select(ModelVersion)
        .join(RegisteredModel, col(RegisteredModel.id) == col(ModelVersion.model_id))
        .where(RegisteredModel.name == model_name, ModelVersion.version == version)
    )
    return session.exec(query).first()


def get_version_by_id(session: Session, *, version_id: int) -> ModelVersion | None:
    """The model version row ``version_id``, or None."""
    return session.get(ModelVersion, version_id)


def list_versions(
    session: Session, *, model_name: str, offset: int = 0, limit: int = 100
) -> tuple[list[ModelVersion], int]:
    """The versions of ``model_name``, newest first."""
    query = (
        select(ModelVersion)
        .join(RegisteredModel, col(RegisteredModel.id) == col(ModelVersion.model_id))
        .where(RegisteredModel.name == model_name)
    )
    return _page(session, query, order=col(ModelVersion.version).desc(), offset=offset, limit=limit)


def version_public(session: Session, *, version: ModelVersion) -> ModelVersionPublic:
    """The API view of ``version`` (with its model's name)."""
    model = session.get(RegisteredModel, version.model_id)
    data = {
        name: getattr(version, name) for name in ModelVersionPublic.model_fields if name != "model"
    }
    data["model"] = model.name if model is not None else "?"
    return ModelVersionPublic.model_validate(data)


def promote(session: Session, *, version: ModelVersion, stage: Stage) -> ModelVersion:
    """Move ``version`` to ``stage``; a new production version moves the old one to staging."""
    if stage == Stage.PRODUCTION:
        session.execute(
            update(ModelVersion)
            .where(
                col(ModelVersion.model_id) == version.model_id,
                col(ModelVersion.stage) == Stage.PRODUCTION,
                col(ModelVersion.id) != version.id,
            )
            .values(stage=Stage.STAGING)
        )
    version.stage = stage
    session.add(version)
    session.flush()
    return version


def add_compile_record(session: Session, **fields: Any) -> CompileRecord:
    """Record one profile's compile (fields of :class:`CompileRecord`)."""
    record = CompileRecord(**fields)
    session.add(record)
    session.flush()
    return record


def list_compile_records(
    session: Session,
    *,
    model_version_id: int | None = None,
    job_id: int | None = None,
    artifact_id: str | None = None,
) -> list[CompileRecord]:
    """Compile records, oldest first, filtered."""
    query = select(CompileRecord)
    if model_version_id is not None:
        query = query.where(CompileRecord.model_version_id == model_version_id)
    if job_id is not None:
        query = query.where(CompileRecord.job_id == job_id)
    if artifact_id is not None:
        query = query.where(CompileRecord.artifact_id == artifact_id)
    return list(session.exec(query.order_by(col(CompileRecord.id))))


# ---------------------------------------------------------------- lineage


class RegistryLineageSource:
    """:class:`cloud.lineage.LineageSource` over the cloud's tables (ids are the rows' ids)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @staticmethod
    def _id(value: str) -> int | None:
        try:
            return int(value)
        except ValueError:
            return None

    def compile_record(self, artifact_id: str) -> Any:
        """The first compile that produced ``artifact_id`` (uploaded ones first)."""
        from cloud.lineage import CompileNode

        records = list_compile_records(self.session, artifact_id=artifact_id)
        if not records:
            return None
        record = sorted(records, key=lambda r: (not r.fleet_uploaded, r.id or 0))[0]
        return CompileNode(
            artifact_id=artifact_id,
            model_version_id=str(record.model_version_id),
            profile=record.profile,
            job_id=str(record.job_id),
            tuning_db_digest=record.tuning_db_digest,
            fleet_uploaded=record.fleet_uploaded,
            created_at=record.created_at,
        )

    def model_version(self, version_id: str) -> Any:
        """A model version by id."""
        from cloud.lineage import ModelVersionNode

        row_id = self._id(version_id)
        row = get_version_by_id(self.session, version_id=row_id) if row_id is not None else None
        if row is None:
            return None
        public = version_public(self.session, version=row)
        return ModelVersionNode(
            id=str(row.id),
            model=public.model,
            version=row.version,
            stage=str(row.stage),
            metrics=row.metrics,
            hparams=_hparams(row.spec),
            code_version=row.code_version,
            dataset_id=str(row.dataset_id),
            training_job_id=None if row.training_job_id is None else str(row.training_job_id),
            parent_version_id=None if row.parent_version_id is None else str(row.parent_version_id),
            created_at=row.created_at,
        )

    def training_run(self, job_id: str) -> Any:
        """A train or HPO job by id."""
        from cloud.lineage import TrainingRunNode

        row_id = self._id(job_id)
        job = self.session.get(Job, row_id) if row_id is not None else None
        if job is None:
            return None
        spec = job.spec or {}
        training = spec.get("training") or (spec.get("hpo") or {}).get("base") or {}
        result = job.result or {}
        metrics = result.get("metrics") or (
            {"test_accuracy": result["best_value"]} if "best_value" in result else {}
        )
        hparams = dict(training.get("hparams") or {})
        hparams.update(result.get("best_params") or {})
        return TrainingRunNode(
            id=str(job.id),
            kind=str(job.kind),
            state=str(job.state),
            architecture=training.get("architecture"),
            hparams=hparams,
            metrics={k: float(v) for k, v in metrics.items()},
            dataset_id=None if spec.get("dataset_id") is None else str(spec["dataset_id"]),
            parent_job_id=None if job.parent_id is None else str(job.parent_id),
            started_at=job.started_at,
            finished_at=job.finished_at,
        )

    def dataset(self, dataset_id: str) -> Any:
        """A dataset version by id."""
        from cloud.lineage import DatasetNode

        row_id = self._id(dataset_id)
        row = get_dataset(self.session, dataset_id=row_id) if row_id is not None else None
        if row is None:
            return None
        return DatasetNode(
            id=str(row.id),
            name=row.name,
            version=row.version,
            kind=row.kind,
            digest=row.digest,
            n_samples=row.n_samples,
            classes=row.classes,
            input_shape=row.input_shape,
            created_at=row.created_at,
        )


def _hparams(spec: dict[str, Any]) -> dict[str, Any]:
    keys = ("learning_rate", "weight_decay", "batch_size", "optimizer", "epochs")
    return {**{k: spec[k] for k in keys if k in spec}, **(spec.get("hparams") or {})}
