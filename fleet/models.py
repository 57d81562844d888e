"""Database tables and API schemas of the fleet, one SQLModel family per entity.

Per entity: ``XBase`` (shared fields), ``XCreate`` (request body), ``XUpdate`` (partial
update, every field optional), ``X(table=True)`` (the row), ``XPublic`` (response) and
``XsPublic`` (``data`` + ``count``). Table models do not validate (SQLModel skips it);
validation lives on the request models, so CRUD helpers take validated ``XCreate``/``XUpdate``.

Every row but ``Organization`` belongs to one organization (``org_id``) and every lookup is
scoped to it (``fleet.crud``). Timestamps are timezone-aware UTC on every database.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import field_validator
from sqlalchemy import JSON, BigInteger, DateTime, UniqueConstraint, event
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from agent.protocol import ProtocolError, check_device_id
from fleet.broker import FLEET_USER, RESPONDER_USER
from fleet.scopes import Scope

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_RULE = "1-64 of A-Z a-z 0-9 '_' '.' '-', starting with a letter or digit"
RESERVED_DEVICE_IDS = (FLEET_USER, RESPONDER_USER)
MAX_TAGS = 32


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamp {value.isoformat()} has no time zone; use UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def _check_name(value: str, what: str) -> str:
    if not re.match(NAME_PATTERN, value):
        raise ValueError(f"{what} {value!r} is invalid; use {NAME_RULE}")
    return value


# ---------------------------------------------------------------- organizations


class OrganizationBase(SQLModel):
    name: str = Field(max_length=64, description=f"Unique name: {NAME_RULE}.")


class OrganizationCreate(OrganizationBase):
    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "organization name")


class OrganizationUpdate(SQLModel):
    name: str | None = Field(default=None, max_length=64)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _check_name(value, "organization name")


class Organization(OrganizationBase, table=True):
    __tablename__ = "organizations"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class OrganizationPublic(OrganizationBase):
    id: uuid.UUID
    created_at: datetime


class OrganizationsPublic(SQLModel):
    data: list[OrganizationPublic]
    count: int


# ---------------------------------------------------------------- API keys


class ApiKeyBase(SQLModel):
    name: str = Field(max_length=128, description="What the key is for (free text).")
    scopes: list[Scope] = Field(description="fleet:read, fleet:write, deploy and/or admin.")


class ApiKeyCreate(ApiKeyBase):
    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[Scope]) -> list[Scope]:
        if not value:
            raise ValueError(
                "an API key needs at least one scope; choose from: "
                + ", ".join(s.value for s in Scope)
            )
        return sorted(set(value), key=list(Scope).index)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("API key name is empty; say what the key is for")
        return value


class ApiKeyUpdate(SQLModel):
    name: str | None = Field(default=None, max_length=128)


class ApiKey(ApiKeyBase, table=True):
    __tablename__ = "api_keys"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    key_id: str = Field(max_length=12, unique=True, description="Public id (token prefix).")
    org_id: uuid.UUID = Field(foreign_key="organizations.id", index=True)
    scopes: list[Scope] = Field(sa_type=JSON)
    secret_hash: str = Field(max_length=256)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    created_by: str | None = Field(default=None, max_length=12)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ApiKeyPublic(ApiKeyBase):
    key_id: str
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    """The one response that carries the token; it is not stored and cannot be shown again."""

    token: str = Field(description="Send as 'Authorization: Bearer <token>'. Shown once.")


class ApiKeysPublic(SQLModel):
    data: list[ApiKeyPublic]
    count: int


# ---------------------------------------------------------------- groups


class GroupBase(SQLModel):
    name: str = Field(max_length=64, description=f"Unique in the organization: {NAME_RULE}.")
    description: str = Field(default="", max_length=1024)


class GroupCreate(GroupBase):
    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "group name")


class GroupUpdate(SQLModel):
    name: str | None = Field(default=None, max_length=64)
    description: str | None = Field(default=None, max_length=1024)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _check_name(value, "group name")


class Group(GroupBase, table=True):
    __tablename__ = "groups"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_groups_org_name"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    org_id: uuid.UUID = Field(foreign_key="organizations.id", index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class GroupPublic(GroupBase):
    id: uuid.UUID
    created_at: datetime


class GroupsPublic(SQLModel):
    data: list[GroupPublic]
    count: int


# ---------------------------------------------------------------- devices


def _check_tags(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > MAX_TAGS:
        raise ValueError(f"{len(value)} tags given; at most {MAX_TAGS} are allowed")
    for key, item in value.items():
        if not 1 <= len(key) <= 64:
            raise ValueError(f"tag key {key!r} must have 1-64 characters")
        if len(item) > 256:
            raise ValueError(f"tag {key!r} has a {len(item)}-character value; at most 256")
    return value


class DeviceBase(SQLModel):
    profile: str = Field(
        max_length=128, description="Hardware profile name, e.g. raspberry-pi/4b-aarch64."
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Free key/value labels.")
    group_id: uuid.UUID | None = Field(default=None, description="The device's group, if any.")


class DeviceCreate(DeviceBase):
    device_id: str = Field(
        max_length=64, description="Unique in the fleet; the device's MQTT username."
    )

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        try:
            check_device_id(value)
        except ProtocolError as err:
            raise ValueError(str(err)) from err
        if value in RESERVED_DEVICE_IDS:
            raise ValueError(
                f"device id {value!r} is reserved for the fleet's own broker users; "
                f"reserved: {', '.join(RESERVED_DEVICE_IDS)}"
            )
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_tags(value) or {}


class DeviceUpdate(SQLModel):
    profile: str | None = Field(default=None, max_length=128)
    tags: dict[str, str] | None = None
    group_id: uuid.UUID | None = None

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _check_tags(value)


class Device(DeviceBase, table=True):
    __tablename__ = "devices"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    device_id: str = Field(max_length=64, unique=True)
    org_id: uuid.UUID = Field(foreign_key="organizations.id", index=True)
    tags: dict[str, str] = Field(default_factory=dict, sa_type=JSON)
    group_id: uuid.UUID | None = Field(default=None, foreign_key="groups.id", index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    revoked: bool = False
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class DevicePublic(DeviceBase):
    device_id: str
    created_at: datetime
    revoked: bool
    revoked_at: datetime | None


class MqttCredentials(SQLModel):
    """A device's broker login; the password is shown once, at registration."""

    username: str
    password: str


class DeviceRegistered(DevicePublic):
    mqtt: MqttCredentials


class DevicesPublic(SQLModel):
    data: list[DevicePublic]
    count: int


MAX_BULK_DEVICES = 1000
"""The most devices one ``POST /devices/bulk`` registers (one transaction, one broker reload)."""


class DevicesBulkCreate(SQLModel):
    """Devices to register together: all of them or none."""

    devices: list[DeviceCreate] = Field(
        min_length=1,
        max_length=MAX_BULK_DEVICES,
        description=f"1 to {MAX_BULK_DEVICES} devices, each id at most once.",
    )

    @field_validator("devices")
    @classmethod
    def _unique(cls, value: list[DeviceCreate]) -> list[DeviceCreate]:
        seen: dict[str, int] = {}
        for index, device in enumerate(value):
            if (first := seen.setdefault(device.device_id, index)) != index:
                raise ValueError(
                    f"device id {device.device_id!r} is given twice (devices {first} and "
                    f"{index}); each device id may appear once"
                )
        return value


class DevicesRegistered(SQLModel):
    """Registered devices with their MQTT credentials (shown only in this answer)."""

    data: list[DeviceRegistered]
    count: int


# ---------------------------------------------------------------- artifacts


class ArtifactBase(SQLModel):
    artifact_id: str = Field(max_length=64, description="sha256 of the signed manifest.")
    model_name: str = Field(max_length=128)
    model_version: str = Field(max_length=64)
    profile: str = Field(max_length=128)
    runtime: str = Field(max_length=32)
    size: int = Field(description="Bytes of the transfer tar.")
    transfer_sha256: str = Field(max_length=64)


class ArtifactCreate(ArtifactBase):
    """What the store reports after a verified put (not a request body: uploads are tars)."""


class Artifact(ArtifactBase, table=True):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("org_id", "artifact_id", name="uq_artifacts_org_artifact"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    org_id: uuid.UUID = Field(foreign_key="organizations.id", index=True)
    artifact_id: str = Field(max_length=64, index=True)
    size: int = Field(sa_type=BigInteger)
    uploaded_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    uploaded_by: str | None = Field(default=None, max_length=12)


class ArtifactPublic(ArtifactBase):
    uploaded_at: datetime
    uploaded_by: str | None


class ArtifactsPublic(SQLModel):
    data: list[ArtifactPublic]
    count: int


# ---------------------------------------------------------------- audit log


class AuditLogBase(SQLModel):
    actor: str = Field(max_length=12, description="Key id of the API key that made the call.")
    action: str = Field(max_length=128, description="<resource>.<operation>")
    target: str = Field(max_length=512, description="What the call was about (path or id).")
    result: str = Field(max_length=16, description="ok, denied or failed.")
    status_code: int
    detail: str | None = Field(default=None, max_length=1024)


class AuditLogCreate(AuditLogBase):
    pass


class AuditLog(AuditLogBase, table=True):
    """Append-only: nothing updates or deletes rows (enforced by ORM events in fleet.crud)."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    org_id: uuid.UUID = Field(foreign_key="organizations.id", index=True)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)


class AuditLogPublic(AuditLogBase):
    id: int
    at: datetime


class AuditLogsPublic(SQLModel):
    data: list[AuditLogPublic]
    count: int


@event.listens_for(AuditLog, "before_update")
@event.listens_for(AuditLog, "before_delete")
def _audit_is_append_only(_mapper: Any, _connection: Any, target: AuditLog) -> None:
    raise RuntimeError(
        f"audit log entry {target.id} cannot be changed or deleted; it is append-only"
    )


# ---------------------------------------------------------------- deployments


class DeploymentTarget(SQLModel):
    """Which devices a deployment is for: the union of ids, group names and tag matches."""

    device_ids: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list, description="Group names of the org.")
    tags: dict[str, str] = Field(default_factory=dict, description="Devices with every pair.")


class DeploymentBase(SQLModel):
    name: str = Field(max_length=64, description=f"Free label: {NAME_RULE}.")
    model_name: str = Field(max_length=128, description="The model every variant must be of.")
    variants: dict[str, str] = Field(description="Artifact id per hardware profile.")
    target: DeploymentTarget
    policy: dict[str, Any] = Field(
        default_factory=dict, description="A rollout policy (fleet.rollout.RolloutPolicy)."
    )


class DeploymentCreate(DeploymentBase):
    seed: int | None = Field(default=None, description="Shuffle the start order reproducibly.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "deployment name")

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("a deployment needs at least one variant (profile: artifact id)")
        return value


class Deployment(SQLModel, table=True):
    """A rollout: its request, the planner's serialized state and operator commands' actions.

    ``version`` grows on every save; saves are conditional on it (optimistic locking between
    the API and the executor). ``outbox`` holds actions of operator commands that the
    executor has yet to carry out.
    """

    __tablename__ = "deployments"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    org_id: uuid.UUID = Field(foreign_key="organizations.id", index=True)
    name: str = Field(max_length=64)
    model_name: str = Field(max_length=128)
    variants: dict[str, str] = Field(sa_type=JSON)
    target: dict[str, Any] = Field(sa_type=JSON)
    policy: dict[str, Any] = Field(sa_type=JSON)
    state: dict[str, Any] = Field(sa_type=JSON)
    outbox: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    phase: str = Field(max_length=16, index=True)
    version: int = 0
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DeploymentDevice(SQLModel):
    """One device of a deployment: what it gets, had, and its job states."""

    device_id: str
    artifact_id: str
    previous_artifact_id: str | None
    attempts: int
    state: str = Field(description="Deploy job state, or NOT_STARTED.")
    job_id: str | None
    reason: str | None
    rollback_state: str | None
    rollback_reason: str | None


class UnmatchedDevice(SQLModel):
    """A targeted device whose profile has no variant (listed, never silently skipped)."""

    device_id: str
    profile: str


class DeploymentPublic(SQLModel):
    id: uuid.UUID
    name: str
    model_name: str
    variants: dict[str, str]
    target: DeploymentTarget
    policy: dict[str, Any]
    phase: str
    reason: str | None
    stage: int
    stages: list[list[str]]
    devices: list[DeploymentDevice]
    counts: dict[str, int]
    unmatched: list[UnmatchedDevice]
    created_at: datetime
    updated_at: datetime


class DeploymentsPublic(SQLModel):
    data: list[DeploymentPublic]
    count: int


# ---------------------------------------------------------------- device reports


class DeviceReport(SQLModel, table=True):
    """What a device last reported (heartbeat, status) and what the fleet wants on it."""

    __tablename__ = "device_reports"

    device_id: str = Field(max_length=64, primary_key=True)
    org_id: uuid.UUID = Field(foreign_key="organizations.id", index=True)
    online: bool = False
    last_seen: datetime | None = Field(default=None, sa_type=UTCDateTime)
    heartbeat: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    reported_models: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    desired_models: dict[str, str] = Field(
        default_factory=dict, sa_type=JSON, description="Artifact id per model name."
    )


# ---------------------------------------------------------------- drift scores (from the data loop)

_METRIC_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_ARTIFACT_ID_RE = re.compile(r"^[0-9a-f]{64}$")


class DriftScoreBase(SQLModel):
    model_name: str = Field(min_length=1, max_length=128)
    artifact_id: str = Field(max_length=64, description="The artifact whose inputs were scored.")
    metric: str = Field(
        min_length=1, max_length=32, description="How drift was measured, e.g. psi, ks, mmd."
    )
    score: float = Field(ge=0, description="Higher is more drift; gated by max_drift.")
    samples: int = Field(ge=1, description="Inputs in the window the score rests on.")
    window_start: datetime = Field(sa_type=UTCDateTime)
    window_end: datetime = Field(sa_type=UTCDateTime)


class DriftScoreCreate(DriftScoreBase):
    @field_validator("artifact_id")
    @classmethod
    def _artifact_id(cls, value: str) -> str:
        if not _ARTIFACT_ID_RE.match(value):
            raise ValueError(f"artifact id {value!r} is not 64 lowercase hex digits")
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if not _METRIC_RE.match(value):
            raise ValueError(
                f"metric {value!r} is invalid; use 1-32 of a-z 0-9 '_', starting with a letter"
            )
        return value

    @field_validator("window_end")
    @classmethod
    def _window(cls, value: datetime, info: Any) -> datetime:
        start = info.data.get("window_start")
        if start is not None and _aware(value) < _aware(start):
            raise ValueError(f"window_end {value.isoformat()} is before window_start")
        return value


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class DriftScore(DriftScoreBase, table=True):
    """A drift score of a device's inputs to one artifact, as posted by the data loop."""

    __tablename__ = "drift_scores"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    org_id: uuid.UUID = Field(foreign_key="organizations.id", index=True)
    device_id: str = Field(max_length=64, index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DriftScorePublic(DriftScoreBase):
    device_id: str
    created_at: datetime


class ModelStateDiff(SQLModel):
    """One model on a device: the artifact the fleet wants and the one the device serves."""

    model_name: str
    desired_artifact_id: str | None
    reported_artifact_id: str | None
    reported_version: str | None
    in_sync: bool


class DeviceStatePublic(SQLModel):
    device_id: str
    online: bool
    last_seen: datetime | None
    reported_models: list[dict[str, Any]]
    desired_models: dict[str, str]
    diff: list[ModelStateDiff]
    in_sync: bool
    drift: list[DriftScorePublic] = Field(
        default_factory=list,
        description="The latest drift score per model, artifact and metric.",
    )


# ---------------------------------------------------------------- models (a view of artifacts)


class ModelVersionPublic(SQLModel):
    """One version of a model and its artifact per hardware profile."""

    version: str
    artifacts: dict[str, str] = Field(description="profile -> artifact id")
    uploaded_at: datetime


class ModelPublic(SQLModel):
    """A model: its versions, newest first."""

    name: str
    versions: list[ModelVersionPublic]


class ModelsPublic(SQLModel):
    data: list[ModelPublic]
    count: int
