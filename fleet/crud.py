"""Database helpers of the fleet: keyword-only, scoped to an organization, never committing.

Every lookup of an organization's object takes ``org_id`` and returns None for another
organization's id, exactly as for a missing one, so callers answer 404 either way. The
caller (a route, :mod:`fleet.api.bootstrap`) owns the transaction: these helpers add and
flush, and leave commit or rollback to it.
"""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from sqlalchemy import RowMapping, func
from sqlmodel import Session, SQLModel, col, select
from sqlmodel.sql.expression import SelectOfScalar

from fleet import credentials
from fleet.errors import ConflictError, InvalidRequestError
from fleet.models import (
    ApiKey,
    ApiKeyCreate,
    ApiKeyUpdate,
    Artifact,
    ArtifactCreate,
    AuditLog,
    AuditLogCreate,
    Device,
    DeviceCreate,
    DevicePublic,
    DeviceReport,
    DeviceUpdate,
    Group,
    GroupCreate,
    GroupUpdate,
    ModelPublic,
    ModelVersionPublic,
    Organization,
    OrganizationCreate,
    OrganizationUpdate,
    utcnow,
)
from fleet.scopes import Scope

T = TypeVar("T", bound=SQLModel)


def _page(
    session: Session, query: SelectOfScalar[T], *, order: Any, offset: int, limit: int
) -> tuple[list[T], int]:
    count = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(order).offset(offset).limit(limit)).all()
    return list(rows), int(count)


# ---------------------------------------------------------------- organizations


def create_organization(session: Session, *, org_in: OrganizationCreate) -> Organization:
    """Add an organization.

    Raises:
        ConflictError: the name is taken.
    """
    if get_organization_by_name(session, name=org_in.name) is not None:
        raise ConflictError(f"organization name {org_in.name!r} is taken; choose another name")
    org = Organization.model_validate(org_in)
    session.add(org)
    session.flush()
    return org


def get_organization(session: Session, *, org_id: uuid.UUID) -> Organization | None:
    """The organization ``org_id``, or None."""
    return session.get(Organization, org_id)


def get_organization_by_name(session: Session, *, name: str) -> Organization | None:
    """The organization called ``name``, or None."""
    return session.exec(select(Organization).where(Organization.name == name)).first()


def update_organization(
    session: Session, *, org: Organization, org_in: OrganizationUpdate
) -> Organization:
    """Apply the fields set in ``org_in``.

    Raises:
        ConflictError: the new name is taken.
    """
    changes = org_in.model_dump(exclude_unset=True, exclude_none=True)
    name = changes.get("name")
    if name is not None and name != org.name:
        if get_organization_by_name(session, name=name) is not None:
            raise ConflictError(f"organization name {name!r} is taken; choose another name")
    org.sqlmodel_update(changes)
    session.add(org)
    session.flush()
    return org


# ---------------------------------------------------------------- API keys


def create_api_key(
    session: Session, *, org_id: uuid.UUID, key_in: ApiKeyCreate, created_by: str | None
) -> tuple[ApiKey, str]:
    """Add an API key; returns the row and the token (the only time it exists in clear)."""
    key_id = credentials.new_key_id()
    while find_api_key(session, key_id=key_id) is not None:
        key_id = credentials.new_key_id()
    secret = credentials.new_secret()
    key = ApiKey(
        key_id=key_id,
        org_id=org_id,
        name=key_in.name,
        scopes=list(key_in.scopes),
        secret_hash=credentials.hash_secret(secret),
        created_by=created_by,
    )
    session.add(key)
    session.flush()
    return key, credentials.format_token(key_id, secret)


def find_api_key(session: Session, *, key_id: str) -> ApiKey | None:
    """The key with public id ``key_id`` in any organization (authentication only)."""
    return session.exec(select(ApiKey).where(ApiKey.key_id == key_id)).first()


def get_api_key(session: Session, *, org_id: uuid.UUID, key_id: str) -> ApiKey | None:
    """The organization's key ``key_id``, or None."""
    return session.exec(
        select(ApiKey).where(ApiKey.key_id == key_id, ApiKey.org_id == org_id)
    ).first()


def list_api_keys(
    session: Session,
    *,
    org_id: uuid.UUID,
    include_revoked: bool = True,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[ApiKey], int]:
    """The organization's keys, oldest first, and their total count."""
    query = select(ApiKey).where(ApiKey.org_id == org_id)
    if not include_revoked:
        query = query.where(col(ApiKey.revoked_at).is_(None))
    return _page(session, query, order=col(ApiKey.created_at), offset=offset, limit=limit)


def update_api_key(session: Session, *, key: ApiKey, key_in: ApiKeyUpdate) -> ApiKey:
    """Apply the fields set in ``key_in``."""
    key.sqlmodel_update(key_in.model_dump(exclude_unset=True, exclude_none=True))
    session.add(key)
    session.flush()
    return key


def active_admin_keys(session: Session, *, org_id: uuid.UUID) -> list[ApiKey]:
    """The organization's unrevoked keys with the admin scope."""
    keys, _ = list_api_keys(session, org_id=org_id, include_revoked=False, limit=10_000)
    return [k for k in keys if Scope.ADMIN in k.scopes]


def revoke_api_key(session: Session, *, key: ApiKey) -> ApiKey:
    """Mark ``key`` revoked (idempotent).

    Raises:
        ConflictError: it is the organization's last active admin key.
    """
    if key.revoked_at is not None:
        return key
    admins = active_admin_keys(session, org_id=key.org_id)
    if [k.key_id for k in admins] == [key.key_id]:
        raise ConflictError(
            f"API key {key.key_id!r} is the organization's last active admin key; "
            "create another admin key before revoking it"
        )
    key.revoked_at = utcnow()
    session.add(key)
    session.flush()
    return key


# ---------------------------------------------------------------- groups


def create_group(session: Session, *, org_id: uuid.UUID, group_in: GroupCreate) -> Group:
    """Add a group.

    Raises:
        ConflictError: the organization has a group of that name.
    """
    _check_group_name_free(session, org_id=org_id, name=group_in.name)
    group = Group.model_validate(group_in, update={"org_id": org_id})
    session.add(group)
    session.flush()
    return group


def _check_group_name_free(session: Session, *, org_id: uuid.UUID, name: str) -> None:
    taken = session.exec(select(Group).where(Group.org_id == org_id, Group.name == name)).first()
    if taken is not None:
        raise ConflictError(f"group name {name!r} is taken in this organization; choose another")


def get_group(session: Session, *, org_id: uuid.UUID, group_id: uuid.UUID) -> Group | None:
    """The organization's group ``group_id``, or None."""
    group = session.get(Group, group_id)
    return group if group is not None and group.org_id == org_id else None


def list_groups(
    session: Session, *, org_id: uuid.UUID, offset: int = 0, limit: int = 100
) -> tuple[list[Group], int]:
    """The organization's groups by name, and their total count."""
    query = select(Group).where(Group.org_id == org_id)
    return _page(session, query, order=col(Group.name), offset=offset, limit=limit)


def update_group(session: Session, *, group: Group, group_in: GroupUpdate) -> Group:
    """Apply the fields set in ``group_in``.

    Raises:
        ConflictError: the new name is taken in the organization.
    """
    changes = group_in.model_dump(exclude_unset=True, exclude_none=True)
    name = changes.get("name")
    if name is not None and name != group.name:
        _check_group_name_free(session, org_id=group.org_id, name=name)
    group.sqlmodel_update(changes)
    session.add(group)
    session.flush()
    return group


def count_group_devices(session: Session, *, group: Group) -> int:
    """How many devices are in ``group``."""
    query = select(func.count()).select_from(Device).where(Device.group_id == group.id)
    return int(session.exec(query).one())


def delete_group(session: Session, *, group: Group) -> None:
    """Delete an empty group.

    Raises:
        ConflictError: devices are still in it.
    """
    members = count_group_devices(session, group=group)
    if members:
        raise ConflictError(
            f"group {group.name!r} still has {members} device(s); move them to another group "
            "(PATCH /devices/{device_id} with group_id) before deleting it"
        )
    session.delete(group)
    session.flush()


# ---------------------------------------------------------------- devices


def _check_group(session: Session, *, org_id: uuid.UUID, group_id: uuid.UUID | None) -> None:
    if group_id is not None and get_group(session, org_id=org_id, group_id=group_id) is None:
        raise InvalidRequestError(
            f"group_id {str(group_id)!r} is not a group of this organization; "
            "list the groups with GET /groups"
        )


def find_device(session: Session, *, device_id: str) -> Device | None:
    """The device ``device_id`` in any organization (device ids are fleet-wide)."""
    return session.exec(select(Device).where(Device.device_id == device_id)).first()


def create_device(session: Session, *, org_id: uuid.UUID, device_in: DeviceCreate) -> Device:
    """Add a device.

    Raises:
        ConflictError: the device id is registered (in any organization: it is the MQTT
            username, unique on the broker).
        InvalidRequestError: ``group_id`` is not one of the organization's groups.
    """
    if find_device(session, device_id=device_in.device_id) is not None:
        raise ConflictError(
            f"device id {device_in.device_id!r} is already registered in the fleet; "
            "device ids are unique across organizations, choose another"
        )
    _check_group(session, org_id=org_id, group_id=device_in.group_id)
    device = Device.model_validate(device_in, update={"org_id": org_id})
    session.add(device)
    session.flush()
    return device


def create_devices(
    session: Session, *, org_id: uuid.UUID, devices_in: list[DeviceCreate]
) -> list[Device]:
    """Add several devices in one flush (one multi-row INSERT); none if any is refused.

    Raises:
        ConflictError: device ids already registered (in any organization), all named.
        InvalidRequestError: a ``group_id`` is not one of the organization's groups.
    """
    ids = [d.device_id for d in devices_in]
    taken: list[str] = []
    for start in range(0, len(ids), 500):  # keep the IN list under every driver's limit
        chunk = ids[start : start + 500]
        query = select(Device.device_id).where(col(Device.device_id).in_(chunk))
        taken += session.exec(query).all()
    if taken:
        shown = ", ".join(repr(t) for t in sorted(taken)[:20])
        more = f" and {len(taken) - 20} more" if len(taken) > 20 else ""
        raise ConflictError(
            f"{len(taken)} device id(s) already registered in the fleet: {shown}{more}; "
            "device ids are unique across organizations, nothing was registered"
        )
    group_ids = {d.group_id for d in devices_in if d.group_id is not None}
    if group_ids:
        known = set(
            session.exec(
                select(Group.id).where(col(Group.id).in_(group_ids), Group.org_id == org_id)
            ).all()
        )
        if missing := sorted(str(g) for g in group_ids - known):
            raise InvalidRequestError(
                f"group_id {missing[0]!r} is not a group of this organization; "
                "list the groups with GET /groups"
            )
    devices = [Device.model_validate(d, update={"org_id": org_id}) for d in devices_in]
    session.add_all(devices)
    session.flush()
    return devices


def get_device(session: Session, *, org_id: uuid.UUID, device_id: str) -> Device | None:
    """The organization's device ``device_id``, or None."""
    return session.exec(
        select(Device).where(Device.device_id == device_id, Device.org_id == org_id)
    ).first()


def list_devices(
    session: Session,
    *,
    org_id: uuid.UUID,
    group_id: uuid.UUID | None = None,
    revoked: bool | None = None,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[RowMapping], int]:
    """The organization's devices by id, optionally one group's or by revocation.

    Each device is a mapping of only the columns :class:`DevicePublic` shows (no ORM
    objects: listing 1000 devices as entities costs about as much as the rest of the request).
    """
    conditions = [col(Device.org_id) == org_id]
    if group_id is not None:
        conditions.append(col(Device.group_id) == group_id)
    if revoked is not None:
        conditions.append(col(Device.revoked) == revoked)
    count = session.exec(select(func.count()).select_from(Device).where(*conditions)).one()
    columns = [getattr(Device, name) for name in DevicePublic.model_fields]
    query = (
        select(*columns)
        .where(*conditions)
        .order_by(col(Device.device_id))
        .offset(offset)
        .limit(limit)
    )
    return list(session.exec(query).mappings().all()), int(count)


def update_device(session: Session, *, device: Device, device_in: DeviceUpdate) -> Device:
    """Apply the fields set in ``device_in`` (``group_id: null`` leaves the group).

    Raises:
        InvalidRequestError: ``group_id`` is not one of the organization's groups.
    """
    changes = device_in.model_dump(exclude_unset=True)
    for field in ("profile", "tags"):
        if changes.get(field, ...) is None:
            del changes[field]
    if "group_id" in changes:
        _check_group(session, org_id=device.org_id, group_id=changes["group_id"])
    device.sqlmodel_update(changes)
    session.add(device)
    session.flush()
    return device


def revoke_device(session: Session, *, device: Device) -> Device:
    """Mark ``device`` revoked (idempotent)."""
    if not device.revoked:
        device.revoked = True
        device.revoked_at = utcnow()
        session.add(device)
        session.flush()
    return device


def delete_device(session: Session, *, device: Device) -> None:
    """Delete the device's row and its report (a re-registration starts afresh)."""
    report = session.get(DeviceReport, device.device_id)
    if report is not None:
        session.delete(report)
    session.delete(device)
    session.flush()


# ---------------------------------------------------------------- artifacts


def create_artifact(
    session: Session, *, org_id: uuid.UUID, artifact_in: ArtifactCreate, uploaded_by: str | None
) -> Artifact:
    """Record a stored artifact for the organization (or return its existing record)."""
    existing = get_artifact(session, org_id=org_id, artifact_id=artifact_in.artifact_id)
    if existing is not None:
        return existing
    artifact = Artifact.model_validate(
        artifact_in, update={"org_id": org_id, "uploaded_by": uploaded_by}
    )
    session.add(artifact)
    session.flush()
    return artifact


def get_artifact(session: Session, *, org_id: uuid.UUID, artifact_id: str) -> Artifact | None:
    """The organization's record of ``artifact_id``, or None."""
    return session.exec(
        select(Artifact).where(Artifact.artifact_id == artifact_id, Artifact.org_id == org_id)
    ).first()


def list_artifacts(
    session: Session,
    *,
    org_id: uuid.UUID,
    model_name: str | None = None,
    profile: str | None = None,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[Artifact], int]:
    """The organization's artifacts, newest first, optionally of one model or profile."""
    query = select(Artifact).where(Artifact.org_id == org_id)
    if model_name is not None:
        query = query.where(Artifact.model_name == model_name)
    if profile is not None:
        query = query.where(Artifact.profile == profile)
    order = col(Artifact.uploaded_at).desc()
    return _page(session, query, order=order, offset=offset, limit=limit)


# ---------------------------------------------------------------- audit log


def add_audit(session: Session, *, org_id: uuid.UUID, entry: AuditLogCreate) -> AuditLog:
    """Append an audit entry."""
    row = AuditLog.model_validate(entry, update={"org_id": org_id})
    session.add(row)
    session.flush()
    return row


def add_audits(session: Session, *, org_id: uuid.UUID, entries: list[AuditLogCreate]) -> None:
    """Append audit entries in one flush."""
    session.add_all([AuditLog.model_validate(e, update={"org_id": org_id}) for e in entries])
    session.flush()


def list_audit(
    session: Session,
    *,
    org_id: uuid.UUID,
    actor: str | None = None,
    action: str | None = None,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[AuditLog], int]:
    """The organization's audit entries, newest first, optionally one actor's or action's."""
    query = select(AuditLog).where(AuditLog.org_id == org_id)
    if actor is not None:
        query = query.where(AuditLog.actor == actor)
    if action is not None:
        query = query.where(AuditLog.action == action)
    return _page(session, query, order=col(AuditLog.id).desc(), offset=offset, limit=limit)


# Largest list offset the API accepts: databases store offsets as 64-bit integers, and
# no fleet has 2**31 objects of one kind; anything larger is a 422, not a 500.
MAX_OFFSET = 2**31 - 1


# ---------------------------------------------------------------- models (a view of artifacts)


def model_views(
    session: Session, *, org_id: uuid.UUID, name: str | None = None
) -> list[ModelPublic]:
    """The organization's models: name -> versions (newest first) -> artifact per profile."""
    query = select(Artifact).where(Artifact.org_id == org_id)
    if name is not None:
        query = query.where(Artifact.model_name == name)
    grouped: dict[str, dict[str, ModelVersionPublic]] = {}
    for row in session.exec(query.order_by(col(Artifact.uploaded_at))).all():
        versions = grouped.setdefault(row.model_name, {})
        entry = versions.get(row.model_version)
        if entry is None:
            entry = versions[row.model_version] = ModelVersionPublic(
                version=row.model_version, artifacts={}, uploaded_at=row.uploaded_at
            )
        entry.artifacts[row.profile] = row.artifact_id
        entry.uploaded_at = max(entry.uploaded_at, row.uploaded_at)
    return [
        ModelPublic(
            name=model,
            versions=sorted(versions.values(), key=lambda v: v.uploaded_at, reverse=True),
        )
        for model, versions in sorted(grouped.items())
    ]
