"""Tables and API schemas of the data loop's cloud side (ingestion, drift, alerts, capture).

Same conventions as :mod:`cloud.models`: one SQLModel family per entity, ``cloud_*`` tables,
timezone-aware UTC timestamps, validation on the request models.

* :class:`Sample` (``cloud_samples``): one captured inference, unique on the device's
  ``sample_id`` (ingestion inserts and ignores duplicates); tensors live in the blob
  directory, content-addressed, the row keeps their dtype, shape and sha256.
* :class:`Sketch` (``cloud_sketches``): one drift sketch window, unique on ``sketch_id``;
  ``status`` is ``pending`` until the monitor scores it (``scored``) or cannot (``skipped``,
  with the reason: no compile record for the artifact, no baseline, spec mismatch).
* :class:`DriftScore` (``cloud_drift_scores``): the score of one sketch under the model's
  policy, one per sketch.
* :class:`DriftPolicy` (``cloud_drift_policies``): per registered model, the metric,
  threshold, minimum window size and optional webhook.
* :class:`DriftAlert` (``cloud_drift_alerts``): one per score over threshold, until
  acknowledged.
* :class:`DeviceCapture` (``cloud_device_capture``): the desired state last published to a
  device's ``desired`` topic and its revision (revisions only increase).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator
from sqlalchemy import JSON, Column, String, Text
from sqlmodel import Field, SQLModel

from agent.protocol import SelectionRules
from cloud.drift import DEFAULT_THRESHOLDS, METRICS
from fleet.models import UTCDateTime, utcnow

SKETCH_STATES = ("pending", "scored", "skipped")

# ---------------------------------------------------------------- samples


class TensorRef(BaseModel):
    """A stored tensor: its sha256 (of the raw little-endian bytes), dtype and shape, and
    where its bytes are: ``size`` bytes at ``offset`` of the blob ``pack`` (a write's tensors
    packed into one blob), or, without ``pack`` (the first layout), the blob ``sha256``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    dtype: str
    shape: list[int]
    sha256: str
    size: int
    pack: str | None = None
    offset: int = 0


class TensorData(TensorRef):
    """A tensor with its bytes (base64), as ``GET /samples/{id}`` returns it."""

    data: str


class Sample(SQLModel, table=True):
    __tablename__ = "cloud_samples"

    id: int | None = Field(default=None, primary_key=True)
    sample_id: str = Field(max_length=32, unique=True)
    device_id: str = Field(max_length=64, index=True)
    model: str = Field(max_length=128, index=True)
    version: str = Field(max_length=64)
    artifact_id: str | None = Field(default=None, max_length=64, index=True)
    role: str = Field(max_length=16)
    reason: str = Field(max_length=32)
    ts: datetime = Field(sa_type=UTCDateTime, index=True)
    top1: int | None = None
    confidence: float | None = None
    entropy: float | None = None
    inputs: list[dict[str, Any]] = Field(sa_type=JSON)
    outputs: list[dict[str, Any]] = Field(sa_type=JSON)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class SamplePublic(SQLModel):
    id: int
    sample_id: str
    device_id: str
    model: str
    version: str
    artifact_id: str | None
    role: str
    reason: str
    ts: datetime
    top1: int | None
    confidence: float | None
    entropy: float | None
    inputs: list[TensorRef]
    outputs: list[TensorRef]
    received_at: datetime


class SampleDetailPublic(SamplePublic):
    inputs: list[TensorData]  # type: ignore[assignment]
    outputs: list[TensorData]  # type: ignore[assignment]


class SamplesPublic(SQLModel):
    data: list[SamplePublic]
    count: int


# ---------------------------------------------------------------- sketches and scores


class Sketch(SQLModel, table=True):
    __tablename__ = "cloud_sketches"

    id: int | None = Field(default=None, primary_key=True)
    sketch_id: str = Field(max_length=32, unique=True)
    device_id: str = Field(max_length=64, index=True)
    model: str = Field(max_length=128, index=True)
    version: str = Field(max_length=64)
    artifact_id: str | None = Field(default=None, max_length=64)
    spec_key: str = Field(max_length=128)
    spec_sha256: str = Field(max_length=64)
    window_start: datetime = Field(sa_type=UTCDateTime)
    window_end: datetime = Field(sa_type=UTCDateTime, index=True)
    n_samples: int
    counts: dict[str, Any] = Field(sa_type=JSON)
    dropped: dict[str, int] = Field(sa_type=JSON)
    status: str = Field(default="pending", sa_type=String(16), index=True)
    status_reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    model_version_id: int | None = Field(default=None, foreign_key="cloud_model_versions.id")
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DriftScore(SQLModel, table=True):
    __tablename__ = "cloud_drift_scores"

    id: int | None = Field(default=None, primary_key=True)
    sketch_id: int = Field(foreign_key="cloud_sketches.id", unique=True)
    device_id: str = Field(max_length=64, index=True)
    model: str = Field(max_length=128, index=True)
    model_version_id: int = Field(foreign_key="cloud_model_versions.id", index=True)
    artifact_id: str | None = Field(default=None, max_length=64)
    window_start: datetime = Field(sa_type=UTCDateTime)
    window_end: datetime = Field(sa_type=UTCDateTime, index=True)
    n_samples: int
    metric: str = Field(max_length=32)
    score: float
    threshold: float
    drifted: bool
    metrics: dict[str, float] = Field(sa_type=JSON)
    drifted_features: list[int] = Field(sa_type=JSON)
    fleet_status: str | None = Field(
        default=None, sa_column=Column(Text, nullable=True), description="pushed, or why not"
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DriftScorePublic(SQLModel):
    id: int
    device_id: str
    model: str
    model_version: int
    artifact_id: str | None
    window_start: datetime
    window_end: datetime
    n_samples: int
    metric: str
    score: float
    threshold: float
    drifted: bool
    metrics: dict[str, float]
    drifted_features: list[int]
    fleet_status: str | None
    created_at: datetime


class DriftScoresPublic(SQLModel):
    data: list[DriftScorePublic]
    count: int


class DriftAggregatePublic(SQLModel):
    """Windows merged (devices of a group, or the whole fleet) and scored as one."""

    model: str
    model_version: int
    devices: list[str]
    windows: int
    window_start: datetime
    window_end: datetime
    n_samples: int
    metric: str
    score: float
    threshold: float
    drifted: bool
    metrics: dict[str, float]
    drifted_features: list[int]


# ---------------------------------------------------------------- policies and alerts


class DriftPolicyBase(SQLModel):
    metric: str = Field(default="psi", max_length=32, description=f"One of: {', '.join(METRICS)}.")
    threshold: float | None = Field(
        default=None, ge=0, description="Alert at or above (default: the metric's default)."
    )
    min_samples: int = Field(
        default=30, ge=1, description="Windows with fewer samples are stored, not scored."
    )
    webhook_url: str | None = Field(
        default=None, max_length=1024, description="POSTed each new alert (JSON), optional."
    )


class DriftPolicyUpdate(DriftPolicyBase):
    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in METRICS:
            raise ValueError(f"unknown drift metric {value!r}; choose from: {', '.join(METRICS)}")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"webhook_url {value!r} must start with http:// or https://")
        return value


class DriftPolicy(SQLModel, table=True):
    __tablename__ = "cloud_drift_policies"

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="cloud_models.id", unique=True)
    metric: str = Field(max_length=32)
    threshold: float
    min_samples: int
    webhook_url: str | None = Field(default=None, max_length=1024)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DriftPolicyPublic(SQLModel):
    model: str
    metric: str
    threshold: float
    min_samples: int
    webhook_url: str | None
    default: bool = Field(description="True when the model has no stored policy.")


def default_policy(model: str) -> DriftPolicyPublic:
    """The policy of a model that has none stored: PSI at its default threshold."""
    return DriftPolicyPublic(
        model=model,
        metric="psi",
        threshold=DEFAULT_THRESHOLDS["psi"],
        min_samples=30,
        webhook_url=None,
        default=True,
    )


class DriftAlert(SQLModel, table=True):
    __tablename__ = "cloud_drift_alerts"

    id: int | None = Field(default=None, primary_key=True)
    score_id: int = Field(foreign_key="cloud_drift_scores.id", unique=True)
    device_id: str = Field(max_length=64, index=True)
    model: str = Field(max_length=128, index=True)
    model_version_id: int = Field(foreign_key="cloud_model_versions.id")
    metric: str = Field(max_length=32)
    score: float
    threshold: float
    drifted_features: list[int] = Field(sa_type=JSON)
    window_start: datetime = Field(sa_type=UTCDateTime)
    window_end: datetime = Field(sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    acknowledged_at: datetime | None = Field(default=None, sa_type=UTCDateTime, index=True)
    ack_note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    webhook_status: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class DriftAlertPublic(SQLModel):
    id: int
    score_id: int
    device_id: str
    model: str
    model_version: int
    metric: str
    score: float
    threshold: float
    drifted_features: list[int]
    window_start: datetime
    window_end: datetime
    created_at: datetime
    acknowledged_at: datetime | None
    ack_note: str | None
    webhook_status: str | None


class DriftAlertsPublic(SQLModel):
    data: list[DriftAlertPublic]
    count: int


class AlertAck(SQLModel):
    note: str | None = Field(default=None, max_length=1000)


# ---------------------------------------------------------------- capture policies


class DeviceCapture(SQLModel, table=True):
    __tablename__ = "cloud_device_capture"

    device_id: str = Field(max_length=64, primary_key=True)
    revision: int
    desired: dict[str, Any] = Field(sa_type=JSON, description="The DesiredState published.")
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class CapturePolicyRequest(SQLModel):
    """A model's capture policy for some devices (the device-wide settings apply to all of
    the device's models: the newest request's values win)."""

    devices: list[str] = Field(min_length=1, max_length=10_000)
    version: int | None = Field(
        default=None,
        ge=1,
        description="Whose baseline to sketch on (default: production, else the newest version).",
    )
    enabled: bool = True
    sample_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    rules: SelectionRules = Field(default_factory=SelectionRules)
    bytes_per_hour: int = Field(default=50 * 1024 * 1024, ge=0)
    max_sample_bytes: int = Field(default=64 * 1024, ge=256, le=192 * 1024)
    sketch_interval_s: float = Field(default=60.0, ge=0.1, le=86400.0)
    batch_size: int = Field(default=32, ge=1, le=1000)

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: list[str]) -> list[str]:
        from agent.protocol import ProtocolError, check_device_id

        for device in value:
            try:
                check_device_id(device)
            except ProtocolError as err:
                raise ValueError(str(err)) from err
        return list(dict.fromkeys(value))


class CaptureDeliveryPublic(SQLModel):
    device_id: str
    revision: int
    published: bool
    error: str | None


class CaptureDeliveriesPublic(SQLModel):
    model: str
    model_version: int
    data: list[CaptureDeliveryPublic]
    count: int


class DeviceCapturePublic(SQLModel):
    device_id: str
    revision: int
    desired: dict[str, Any]
    updated_at: datetime
