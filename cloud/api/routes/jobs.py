"""``/jobs``: submit train, HPO and compile jobs (only enqueued here), follow and cancel them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from cloud import crud
from cloud.api.deps import JobDep, ProfilesDep, SessionDep, SettingsDep
from cloud.errors import InvalidRequestError, NotFoundError
from cloud.models import (
    CompileJobCreate,
    CompileJobSpec,
    Dataset,
    HpoJobCreate,
    HpoJobSpec,
    JobEventPublic,
    JobEventsPublic,
    JobKind,
    JobPublic,
    JobsPublic,
    JobState,
    TrainJobCreate,
    TrainJobSpec,
)

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _dataset(session: SessionDep, name: str, version: int | None) -> Dataset:
    row = crud.find_dataset(session, name=name, version=version)
    if row is None:
        which = f"version {version} of dataset {name!r}" if version else f"dataset {name!r}"
        raise NotFoundError(f"no {which}; register it first (POST /datasets)")
    return row


def _public(job: object) -> JobPublic:
    return JobPublic.model_validate(job)


@router.post("/train", status_code=status.HTTP_201_CREATED)
def submit_train(session: SessionDep, settings: SettingsDep, job_in: TrainJobCreate) -> JobPublic:
    """Queue a training run; a worker registers the model version when it succeeds."""
    from cloud.training.spec import check_training_spec

    check_training_spec(job_in.training)
    dataset = _dataset(session, job_in.dataset, job_in.dataset_version)
    parent_id = None
    if job_in.parent_version is not None:
        parent = crud.get_version(session, model_name=job_in.model, version=job_in.parent_version)
        if parent is None:
            raise NotFoundError(
                f"model {job_in.model!r} has no version {job_in.parent_version} to retrain"
            )
        parent_id = parent.id
    spec = TrainJobSpec(
        model=job_in.model,
        dataset_id=dataset.id or 0,
        training=job_in.training,
        parent_version_id=parent_id,
    )
    job = crud.enqueue_job(
        session,
        kind=JobKind.TRAIN,
        spec=spec.model_dump(mode="json"),
        max_attempts=job_in.max_attempts or settings.max_attempts,
    )
    session.commit()
    return _public(job)


@router.post("/hpo", status_code=status.HTTP_201_CREATED)
def submit_hpo(session: SessionDep, settings: SettingsDep, job_in: HpoJobCreate) -> JobPublic:
    """Queue a hyperparameter search; it runs as ``workers`` child jobs sharing one study."""
    from cloud.training.spec import check_hpo_spec

    check_hpo_spec(job_in.hpo)
    dataset = _dataset(session, job_in.dataset, job_in.dataset_version)
    spec = HpoJobSpec(model=job_in.model, dataset_id=dataset.id or 0, hpo=job_in.hpo)
    job = crud.enqueue_job(
        session,
        kind=JobKind.HPO,
        spec=spec.model_dump(mode="json"),
        max_attempts=job_in.max_attempts or settings.max_attempts,
    )
    session.commit()
    return _public(job)


@router.post("/compile", status_code=status.HTTP_201_CREATED)
def submit_compile(
    session: SessionDep, settings: SettingsDep, profiles: ProfilesDep, job_in: CompileJobCreate
) -> JobPublic:
    """Queue compiles of a model version for hardware profiles; artifacts go to the fleet."""
    unknown = [p for p in job_in.profiles if p not in profiles]
    if unknown:
        raise InvalidRequestError(
            f"unknown hardware profile(s) {', '.join(repr(p) for p in unknown)}; choose from: "
            + ", ".join(profiles)
        )
    repeated = sorted({p for p in job_in.profiles if job_in.profiles.count(p) > 1})
    if repeated:
        raise InvalidRequestError(f"profile(s) listed more than once: {', '.join(repeated)}")
    version = crud.get_version(session, model_name=job_in.model, version=job_in.version)
    if version is None:
        raise NotFoundError(
            f"model {job_in.model!r} has no version {job_in.version}; list them with "
            f"GET /models/{job_in.model}/versions"
        )
    spec = CompileJobSpec(
        model_version_id=version.id or 0,
        profiles=job_in.profiles,
        tuning_trials=job_in.tuning_trials,
    )
    job = crud.enqueue_job(
        session,
        kind=JobKind.COMPILE,
        spec=spec.model_dump(mode="json"),
        max_attempts=job_in.max_attempts or settings.max_attempts,
    )
    session.commit()
    return _public(job)


@router.get("")
def list_jobs(
    session: SessionDep,
    state: JobState | None = None,
    kind: JobKind | None = None,
    parent_id: Annotated[int | None, Query(ge=1)] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobsPublic:
    """Jobs, newest first."""
    rows, count = crud.list_jobs(
        session, state=state, kind=kind, parent_id=parent_id, offset=offset, limit=limit
    )
    return JobsPublic(data=[_public(r) for r in rows], count=count)


@router.get("/{job_id}")
def get_job(job: JobDep) -> JobPublic:
    """One job: state, progress, error, result."""
    return _public(job)


@router.get("/{job_id}/events")
def list_events(
    session: SessionDep,
    job: JobDep,
    after: Annotated[int, Query(ge=0, description="Only events with seq > after.")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> JobEventsPublic:
    """The job's log lines and metrics, oldest first (poll with ``after``)."""
    rows, count = crud.list_events(session, job_id=job.id or 0, after=after, limit=limit)
    return JobEventsPublic(data=[JobEventPublic.model_validate(r) for r in rows], count=count)


@router.post("/{job_id}/cancel")
def cancel_job(session: SessionDep, job: JobDep) -> JobPublic:
    """Cancel a job (and its children): queued ones at once, running ones at their next check."""
    crud.request_cancel(session, job=job)
    session.commit()
    return _public(crud.get_job(session, job_id=job.id or 0))
