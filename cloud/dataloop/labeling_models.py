"""Tables and API schemas of relabeling and retraining: label tasks, retrain policies and runs.

Same conventions as :mod:`cloud.models`: one SQLModel family per entity, ``cloud_*`` tables,
timezone-aware UTC timestamps, validation on the request models only.

* :class:`LabelTask`: one captured sample a person (or a labeling tool) should label. Its state
  is ``open`` → ``labeled`` | ``skipped``; a labeled task may be relabeled until a retrain run
  has used it (``retrain_run_id`` set), a skipped one may be labeled later.
* :class:`RetrainPolicy`: per registered model, when a retrain fires (>= N new labels, or drift
  above a threshold for T minutes) and whether a person must approve it.
* :class:`RetrainRun`: one retrain, linking every step (labels used, concatenated dataset,
  train job, new model version, compile job, fleet deployment). Its state machine is in
  :mod:`cloud.dataloop.retrain`.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import field_validator, model_validator
from sqlalchemy import JSON, Column, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from fleet.models import UTCDateTime, utcnow

#: Why a sample was flagged for labeling.
TASK_REASONS = (
    "low_confidence",
    "high_entropy",
    "shadow_disagreement",
    "drifted_window",
    "every_nth",
    "random",
    "selected",
)


class LabelTaskState(StrEnum):
    """A label task's state."""

    OPEN = "open"
    LABELED = "labeled"
    SKIPPED = "skipped"


class RetrainRunState(StrEnum):
    """A retrain run's state; DEPLOYED, DONE, FAILED and REJECTED are terminal.

    AWAITING_APPROVAL → (approve) TRAINING | (reject) REJECTED; TRAINING → COMPILING →
    DEPLOYING → DEPLOYED, or DONE when there is nothing to deploy to (no fleet configured,
    no device runs the parent); any step → FAILED with the reason.
    """

    AWAITING_APPROVAL = "awaiting_approval"
    TRAINING = "training"
    COMPILING = "compiling"
    DEPLOYING = "deploying"
    DEPLOYED = "deployed"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        """Whether the run is over."""
        return self in (
            RetrainRunState.DEPLOYED,
            RetrainRunState.DONE,
            RetrainRunState.FAILED,
            RetrainRunState.REJECTED,
        )


ACTIVE_RUN_STATES = tuple(s for s in RetrainRunState if not s.terminal)


# ---------------------------------------------------------------- label tasks


class LabelTask(SQLModel, table=True):
    __tablename__ = "cloud_label_tasks"
    __table_args__ = (UniqueConstraint("sample_id", name="uq_cloud_label_tasks_sample"),)

    id: int | None = Field(default=None, primary_key=True)
    sample_id: str = Field(max_length=32, description="The captured sample (uuid4 hex).")
    device_id: str = Field(max_length=128, index=True)
    model: str = Field(max_length=64, index=True)
    model_version_id: int = Field(foreign_key="cloud_model_versions.id", index=True)
    reason: str = Field(max_length=32)
    prediction: str | None = Field(default=None, max_length=128)
    confidence: float | None = None
    state: LabelTaskState = Field(default=LabelTaskState.OPEN, sa_type=String(16), index=True)
    label: str | None = Field(default=None, max_length=128)
    labeled_by: str | None = Field(default=None, max_length=128)
    labeled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    source: str | None = Field(
        default=None, max_length=64, description="What created it: 'alert 12', 'selection'."
    )
    retrain_run_id: int | None = Field(
        default=None, foreign_key="cloud_retrain_runs.id", index=True
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class LabelTaskPublic(SQLModel):
    id: int
    sample_id: str
    device_id: str
    model: str
    model_version_id: int
    version: int | None = Field(default=None, description="The model version's number.")
    classes: list[str] = Field(default_factory=list, description="The labels allowed.")
    reason: str
    prediction: str | None
    confidence: float | None
    state: LabelTaskState
    label: str | None
    labeled_by: str | None
    labeled_at: datetime | None
    source: str | None
    retrain_run_id: int | None
    created_at: datetime
    updated_at: datetime


class LabelTasksPublic(SQLModel):
    data: list[LabelTaskPublic]
    count: int


class LabelTasksCreate(SQLModel):
    """Bulk creation: the samples of a drift alert, or a selection of sample ids."""

    alert_id: int | None = Field(default=None, ge=1, description="Every sample of this alert.")
    sample_ids: list[str] | None = Field(
        default=None, min_length=1, max_length=10_000, description="These samples."
    )
    reason: str | None = Field(
        default=None, description="Override the samples' capture reason (e.g. drifted_window)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> LabelTasksCreate:
        if (self.alert_id is None) == (self.sample_ids is None):
            got = "neither" if self.alert_id is None else "both"
            raise ValueError(f"give exactly one of 'alert_id' or 'sample_ids' (got {got})")
        return self

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str | None) -> str | None:
        if value is not None and value not in TASK_REASONS:
            raise ValueError(f"reason {value!r} is unknown; choose from: {', '.join(TASK_REASONS)}")
        return value


class LabelTasksCreated(SQLModel):
    created: list[LabelTaskPublic]
    existing: int = Field(description="Samples that already had a task (left as they were).")


class LabelRequest(SQLModel):
    label: str = Field(min_length=1, max_length=128, description="One of the model's classes.")
    labeled_by: str = Field(default="api", min_length=1, max_length=128)


class SkipRequest(SQLModel):
    labeled_by: str = Field(default="api", min_length=1, max_length=128)


class LabelStudioImportResult(SQLModel):
    labeled: int = Field(description="Tasks given a new or changed label.")
    unchanged: int = Field(description="Tasks that already had this label (a re-import).")
    skipped: int = Field(description="Tasks whose only annotations were cancelled.")
    unannotated: int = Field(description="Exported tasks nobody annotated yet.")
    models: list[str] = Field(default_factory=list, description="Models whose tasks changed.")


# ---------------------------------------------------------------- retrain policies


class RetrainPolicyBase(SQLModel):
    min_new_labels: int | None = Field(
        default=None, ge=1, description="Fire when this many labels no run used yet exist."
    )
    drift_threshold: float | None = Field(
        default=None, ge=0, description="Fire when a device's drift score stays above this ..."
    )
    drift_minutes: float = Field(default=30.0, gt=0, le=7 * 24 * 60, description="... this long.")
    require_approval: bool = Field(default=False, description="A person approves each run.")
    enabled: bool = True
    training: dict[str, Any] | None = Field(
        default=None,
        sa_type=JSON,
        description="TrainingSpec of the retrain (default: the parent version's spec).",
    )
    rollout: dict[str, Any] | None = Field(
        default=None,
        sa_type=JSON,
        description="fleet rollout policy of the canary deployment (default: 1 canary device, "
        "then the rest, aborting on a failure or drift above the trigger threshold).",
    )


class RetrainPolicyPut(RetrainPolicyBase):
    @model_validator(mode="after")
    def _some_trigger(self) -> RetrainPolicyPut:
        if self.min_new_labels is None and self.drift_threshold is None:
            raise ValueError("set 'min_new_labels', 'drift_threshold' or both")
        return self


class RetrainPolicy(RetrainPolicyBase, table=True):
    __tablename__ = "cloud_retrain_policies"

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="cloud_models.id", unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class RetrainPolicyPublic(RetrainPolicyBase):
    model: str
    created_at: datetime
    updated_at: datetime


# ---------------------------------------------------------------- retrain runs


class RetrainRun(SQLModel, table=True):
    __tablename__ = "cloud_retrain_runs"

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="cloud_models.id", index=True)
    state: RetrainRunState = Field(sa_type=String(24), index=True)
    active_model_id: int | None = Field(
        default=None, unique=True, description="model_id while the run is active, else None."
    )
    reason: str = Field(sa_column=Column(Text, nullable=False))
    parent_version_id: int = Field(foreign_key="cloud_model_versions.id")
    n_labels: int = 0
    dataset_id: int | None = Field(default=None, foreign_key="cloud_datasets.id")
    train_job_id: int | None = Field(default=None, foreign_key="cloud_jobs.id")
    model_version_id: int | None = Field(default=None, foreign_key="cloud_model_versions.id")
    compile_job_id: int | None = Field(default=None, foreign_key="cloud_jobs.id")
    profiles: list[str] = Field(default_factory=list, sa_type=JSON)
    device_ids: list[str] = Field(default_factory=list, sa_type=JSON)
    deployment_id: str | None = Field(default=None, max_length=64)
    note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    approved_by: str | None = Field(default=None, max_length=128)
    approved_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class RetrainRunPublic(SQLModel):
    id: int
    model: str
    state: RetrainRunState
    reason: str
    parent_version_id: int
    parent_version: int | None
    n_labels: int
    dataset_id: int | None
    train_job_id: int | None
    model_version_id: int | None
    version: int | None = Field(description="The new version's number, once trained.")
    compile_job_id: int | None
    profiles: list[str]
    device_ids: list[str]
    deployment_id: str | None
    note: str | None
    error: str | None
    approved_by: str | None
    approved_at: datetime | None
    created_at: datetime
    updated_at: datetime


class RetrainRunsPublic(SQLModel):
    data: list[RetrainRunPublic]
    count: int


class ApprovalRequest(SQLModel):
    approve: bool = Field(description="true starts the run, false rejects it.")
    by: str = Field(min_length=1, max_length=128, description="Who decided.")
