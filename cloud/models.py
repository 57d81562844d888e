"""Database tables and API schemas of the cloud service, one SQLModel family per entity.

Per entity: ``XBase`` (shared fields), ``XCreate`` (request body), ``X(table=True)`` (the
row), ``XPublic`` (response) and ``XsPublic`` (``data`` + ``count``). Table models do not
validate (SQLModel skips it); validation lives on the request models. Every table is
``cloud_*`` so the fleet may share the database. Timestamps are timezone-aware UTC
(:class:`fleet.models.UTCDateTime`).

Jobs are a state machine: QUEUED → RUNNING → SUCCEEDED | FAILED | CANCELED, with RUNNING →
QUEUED when a worker is lost and attempts remain (:mod:`cloud.crud`). A job's ``spec`` is
the JSON of its kind's spec model (:class:`TrainJobSpec`, :class:`HpoJobSpec`,
:class:`HpoWorkerJobSpec`, :class:`CompileJobSpec`).
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator
from sqlalchemy import JSON, Column, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from cloud.training.spec import HpoSpec, TrainingSpec
from fleet.models import UTCDateTime, utcnow

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_RULE = "1-64 of A-Z a-z 0-9 '_' '.' '-', starting with a letter or digit"
DATASET_KINDS = ("builtin", "images", "csv", "npz")


def check_name(value: str, what: str) -> str:
    """``value`` if it is a valid name, else ValueError naming it and the rule."""
    if not re.match(NAME_PATTERN, value):
        raise ValueError(f"{what} {value!r} is invalid; use {NAME_RULE}")
    return value


class JobKind(StrEnum):
    """What a job does; each kind has a runner in :mod:`cloud.jobs`."""

    TRAIN = "train"
    HPO = "hpo"
    HPO_WORKER = "hpo_worker"
    COMPILE = "compile"


class JobState(StrEnum):
    """A job's state; SUCCEEDED, FAILED and CANCELED are terminal."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"

    @property
    def terminal(self) -> bool:
        """Whether the job is over."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)


TERMINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)


class Stage(StrEnum):
    """A model version's stage in the registry."""

    NONE = "none"
    STAGING = "staging"
    PRODUCTION = "production"


# ---------------------------------------------------------------- datasets


class DatasetBase(SQLModel):
    name: str = Field(max_length=64, description=f"Dataset name: {NAME_RULE}.")


class DatasetCreate(DatasetBase):
    source: str = Field(
        max_length=1024,
        description="'builtin:digits', a directory of class subdirectories of images, "
        "a .csv (label column last) or an .npz (x, y); a path the API can read.",
    )
    kind: str | None = Field(default=None, description="builtin, images, csv or npz (detected).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "dataset name")

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str | None) -> str | None:
        if value is not None and value not in DATASET_KINDS:
            raise ValueError(
                f"dataset kind {value!r} is unknown; choose from: {', '.join(DATASET_KINDS)}"
            )
        return value


class Dataset(DatasetBase, table=True):
    __tablename__ = "cloud_datasets"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_cloud_datasets_name_version"),)

    id: int | None = Field(default=None, primary_key=True)
    version: int
    kind: str = Field(max_length=16)
    source: str = Field(max_length=1024)
    digest: str = Field(max_length=64, index=True)
    stored_path: str = Field(max_length=1024, description="The service's copy (or builtin:).")
    input_shape: list[int] = Field(sa_type=JSON)
    classes: list[str] = Field(sa_type=JSON)
    n_samples: int
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DatasetPublic(DatasetBase):
    id: int
    version: int
    kind: str
    source: str
    digest: str
    input_shape: list[int]
    classes: list[str]
    n_samples: int
    created_at: datetime


class DatasetsPublic(SQLModel):
    data: list[DatasetPublic]
    count: int


# ---------------------------------------------------------------- job specs (the JSON in Job.spec)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainJobSpec(_Spec):
    """A train job: train ``training`` on dataset row ``dataset_id``, register under ``model``."""

    model: str
    dataset_id: int
    training: TrainingSpec
    parent_version_id: int | None = None


class HpoJobSpec(_Spec):
    """An HPO job: the study's parent; registers the best trial under ``model``."""

    model: str
    dataset_id: int
    hpo: HpoSpec


class HpoWorkerJobSpec(HpoJobSpec):
    """One worker's share of an HPO study (a child of the ``hpo`` job)."""

    study_name: str


class CompileJobSpec(_Spec):
    """A compile job: compile model version ``model_version_id`` for each profile."""

    model_version_id: int
    profiles: list[str]
    tuning_trials: int = 0


# ---------------------------------------------------------------- job requests


class _JobRequest(SQLModel):
    max_attempts: int | None = Field(
        default=None, ge=1, le=100, description="Tries if a worker is lost (default: setting)."
    )


class _OnDataset(_JobRequest):
    model: str = Field(max_length=64, description=f"Registered model name: {NAME_RULE}.")
    dataset: str = Field(max_length=64, description="Registered dataset name.")
    dataset_version: int | None = Field(default=None, ge=1, description="Default: the newest.")

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return check_name(value, "model name")


class TrainJobCreate(_OnDataset):
    training: TrainingSpec
    parent_version: int | None = Field(
        default=None, ge=1, description="The version of the same model this one retrains."
    )


class HpoJobCreate(_OnDataset):
    hpo: HpoSpec


class CompileJobCreate(_JobRequest):
    model: str = Field(max_length=64)
    version: int = Field(ge=1)
    profiles: list[str] = Field(min_length=1, max_length=32)
    tuning_trials: int = Field(default=0, ge=0, le=100_000)


# ---------------------------------------------------------------- jobs


class JobBase(SQLModel):
    kind: JobKind
    spec: dict[str, Any]


class Job(JobBase, table=True):
    __tablename__ = "cloud_jobs"

    id: int | None = Field(default=None, primary_key=True)
    kind: JobKind = Field(sa_type=String(16))
    spec: dict[str, Any] = Field(sa_type=JSON)
    state: JobState = Field(default=JobState.QUEUED, sa_type=String(16), index=True)
    attempts: int = 0
    max_attempts: int = 1
    worker_id: str | None = Field(default=None, max_length=128)
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cancel_requested: bool = False
    progress: float = 0.0
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    result: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    parent_id: int | None = Field(default=None, foreign_key="cloud_jobs.id", index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class JobPublic(JobBase):
    id: int
    state: JobState
    attempts: int
    max_attempts: int
    worker_id: str | None
    lease_expires_at: datetime | None
    cancel_requested: bool
    progress: float
    error: str | None
    result: dict[str, Any] | None
    parent_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobsPublic(SQLModel):
    data: list[JobPublic]
    count: int


class JobEventBase(SQLModel):
    kind: str = Field(max_length=8, description="log or metric.")
    message: str = Field(sa_column=Column(Text, nullable=False))
    metrics: dict[str, float] | None = Field(default=None, sa_type=JSON)


class JobEvent(JobEventBase, table=True):
    __tablename__ = "cloud_job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_cloud_job_events_job_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="cloud_jobs.id", index=True)
    seq: int
    time: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class JobEventPublic(SQLModel):
    job_id: int
    seq: int
    time: datetime
    kind: str
    message: str
    metrics: dict[str, float] | None


class JobEventsPublic(SQLModel):
    data: list[JobEventPublic]
    count: int


# ---------------------------------------------------------------- registry


class RegisteredModel(SQLModel, table=True):
    __tablename__ = "cloud_models"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class RegisteredModelPublic(SQLModel):
    name: str
    created_at: datetime
    versions: int
    latest_version: int | None
    production_version: int | None


class RegisteredModelsPublic(SQLModel):
    data: list[RegisteredModelPublic]
    count: int


class ModelVersion(SQLModel, table=True):
    __tablename__ = "cloud_model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version", name="uq_cloud_model_versions_model_version"),
    )

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="cloud_models.id", index=True)
    version: int
    stage: Stage = Field(default=Stage.NONE, sa_type=String(16))
    metrics: dict[str, float] = Field(sa_type=JSON)
    spec: dict[str, Any] = Field(sa_type=JSON, description="The TrainingSpec that made it.")
    dataset_id: int = Field(foreign_key="cloud_datasets.id", index=True)
    training_job_id: int | None = Field(default=None, foreign_key="cloud_jobs.id")
    code_version: str = Field(max_length=128)
    parent_version_id: int | None = Field(default=None, foreign_key="cloud_model_versions.id")
    weights_path: str = Field(max_length=1024)
    onnx_path: str = Field(max_length=1024)
    baseline_path: str = Field(max_length=1024)
    input_shape: list[int] = Field(sa_type=JSON)
    classes: list[str] = Field(sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ModelVersionPublic(SQLModel):
    id: int
    model: str
    version: int
    stage: Stage
    metrics: dict[str, float]
    spec: dict[str, Any]
    dataset_id: int
    training_job_id: int | None
    code_version: str
    parent_version_id: int | None
    weights_path: str
    onnx_path: str
    baseline_path: str
    input_shape: list[int]
    classes: list[str]
    created_at: datetime


class ModelVersionsPublic(SQLModel):
    data: list[ModelVersionPublic]
    count: int


class PromoteRequest(SQLModel):
    stage: Stage = Field(description="none, staging or production.")


class CompileRecord(SQLModel, table=True):
    __tablename__ = "cloud_compile_records"

    id: int | None = Field(default=None, primary_key=True)
    model_version_id: int = Field(foreign_key="cloud_model_versions.id", index=True)
    job_id: int = Field(foreign_key="cloud_jobs.id", index=True)
    profile: str = Field(max_length=128)
    tuning_db_digest: str | None = Field(default=None, max_length=64)
    artifact_id: str | None = Field(default=None, max_length=64, index=True)
    bundle_path: str | None = Field(default=None, max_length=1024)
    fleet_uploaded: bool = False
    report: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class CompileRecordPublic(SQLModel):
    id: int
    model_version_id: int
    job_id: int
    profile: str
    tuning_db_digest: str | None
    artifact_id: str | None
    bundle_path: str | None
    fleet_uploaded: bool
    report: dict[str, Any] | None
    error: str | None
    created_at: datetime


class CompileRecordsPublic(SQLModel):
    data: list[CompileRecordPublic]
    count: int
