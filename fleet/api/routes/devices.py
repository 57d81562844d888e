"""Devices of the caller's organization: register (MQTT credentials shown once), list, read,
change, revoke, delete; and the drift scores the data loop posts for them (:mod:`fleet.drift`).

A device's id is its MQTT username, so it is unique in the whole fleet. Registration adds
the device to the broker's password file and revocation or deletion removes it, both before
the database commits: a broker failure answers 503 and leaves the database unchanged; a
database failure after the broker changed undoes the broker change on registration, and on
revocation leaves the device cut off (retrying finishes the job). ``POST /devices/bulk``
registers up to ``MAX_BULK_DEVICES`` devices the same way, all or none, in one transaction and
one broker rewrite and reload.
"""

from __future__ import annotations

import contextlib
import types
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Query, Response, status
from pydantic import TypeAdapter, create_model

from fleet import credentials, crud, deployments, drift
from fleet.api.deps import (
    AuditDep,
    BrokerAuthDep,
    DeviceDep,
    OrgDep,
    ProfilesDep,
    SessionDep,
    require_scope,
)
from fleet.api.routing import AuditedRoute
from fleet.crud import MAX_OFFSET
from fleet.errors import InvalidRequestError
from fleet.models import (
    DeviceCreate,
    DevicePublic,
    DeviceRegistered,
    DevicesBulkCreate,
    DevicesPublic,
    DevicesRegistered,
    DeviceStatePublic,
    DeviceUpdate,
    DriftScoreCreate,
    DriftScorePublic,
    MqttCredentials,
)
from fleet.scopes import Scope

router = APIRouter(prefix="/devices", tags=["devices"], route_class=AuditedRoute)


def _check_profile(profile: str, known: list[str]) -> None:
    if known and profile not in known:
        raise InvalidRequestError(
            f"unknown hardware profile {profile!r}; choose from: {', '.join(known)}"
        )


@router.post(
    "", status_code=status.HTTP_201_CREATED, dependencies=[Depends(require_scope(Scope.WRITE))]
)
def register_device(
    session: SessionDep,
    org: OrgDep,
    audit: AuditDep,
    broker: BrokerAuthDep,
    profiles: ProfilesDep,
    device_in: DeviceCreate,
) -> DeviceRegistered:
    """Register a device and return its MQTT username and password (shown only now)."""
    audit.target = f"device:{device_in.device_id}"
    _check_profile(device_in.profile, profiles)
    device = crud.create_device(session, org_id=org.id, device_in=device_in)
    password = credentials.new_device_password()
    try:
        broker.add_device(device.device_id, password)
        session.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            broker.remove_device(device.device_id)
        raise
    mqtt = MqttCredentials(username=device.device_id, password=password)
    return DeviceRegistered.model_validate(device, update={"mqtt": mqtt})


@router.post(
    "/bulk",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_scope(Scope.WRITE))],
)
def register_devices(
    session: SessionDep,
    org: OrgDep,
    audit: AuditDep,
    broker: BrokerAuthDep,
    profiles: ProfilesDep,
    bulk_in: DevicesBulkCreate,
) -> DevicesRegistered:
    """Register up to 1000 (``MAX_BULK_DEVICES``) devices at once, all or none, and return
    each one's MQTT username and password (shown only now).

    Every id and profile is checked and every id must be free before anything is stored; the
    devices are inserted in one transaction and added to the broker in one password-file
    rewrite and one reload. The audit log gets one entry per device.
    """
    audit.target = f"devices:bulk:{len(bulk_in.devices)}"
    for index, device_in in enumerate(bulk_in.devices):
        try:
            _check_profile(device_in.profile, profiles)
        except InvalidRequestError as err:
            raise InvalidRequestError(f"devices[{index}] ({device_in.device_id!r}): {err}") from err
    devices = crud.create_devices(session, org_id=org.id, devices_in=bulk_in.devices)
    passwords = {d.device_id: credentials.new_device_password() for d in devices}
    try:
        broker.add_devices(passwords)
        session.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            broker.remove_devices(list(passwords))
        raise
    audit.targets = [f"device:{d.device_id}" for d in devices]
    registered = []
    for device in devices:
        mqtt = MqttCredentials(username=device.device_id, password=passwords[device.device_id])
        registered.append(DeviceRegistered.model_validate(device, update={"mqtt": mqtt}))
    return DevicesRegistered(data=registered, count=len(registered))


# GET /devices answers up to 1000 devices, so it is built in pydantic-core alone: the column
# mappings crud.list_devices reads are validated once into plain pydantic copies of
# DevicePublic / DevicesPublic (same fields, same FieldInfo, so the same checks and the same
# JSON; SQLModel classes validate through their Python __init__, several µs a row) and
# serialised straight to bytes. The route still declares response_model=DevicesPublic, so its
# OpenAPI schema is unchanged; test_devices checks the bytes equal DevicesPublic's own JSON.
_DEVICE_FIELDS: dict[str, Any] = {
    name: (field.annotation, field) for name, field in DevicePublic.model_fields.items()
}
_DevicePublicRow = create_model("DevicePublicRow", **_DEVICE_FIELDS)
_DEVICES_PAGE: TypeAdapter[Any] = TypeAdapter(
    create_model(
        "DevicesPublicPage",
        data=(types.GenericAlias(list, (_DevicePublicRow,)), ...),
        count=(int, ...),
    )
)


@router.get("", response_model=DevicesPublic, dependencies=[Depends(require_scope(Scope.READ))])
def list_devices(
    session: SessionDep,
    org: OrgDep,
    group_id: uuid.UUID | None = None,
    revoked: bool | None = None,
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    limit: int = Query(100, ge=1, le=1000),
) -> Response:
    """The organization's devices by id, optionally one group's, or only (un)revoked ones."""
    devices, count = crud.list_devices(
        session, org_id=org.id, group_id=group_id, revoked=revoked, offset=offset, limit=limit
    )
    page = _DEVICES_PAGE.validate_python({"data": devices, "count": count})
    return Response(_DEVICES_PAGE.dump_json(page), media_type="application/json")


@router.get("/{device_id}", dependencies=[Depends(require_scope(Scope.READ))])
def read_device(device: DeviceDep) -> DevicePublic:
    """One device."""
    return DevicePublic.model_validate(device)


@router.get("/{device_id}/state", dependencies=[Depends(require_scope(Scope.READ))])
def read_device_state(session: SessionDep, device: DeviceDep) -> DeviceStatePublic:
    """What the fleet wants on the device vs what it last reported, per model."""
    report = deployments.get_report(session, device_id=device.device_id)
    diff = deployments.state_diff(report)
    return DeviceStatePublic(
        device_id=device.device_id,
        online=report.online if report is not None else False,
        last_seen=report.last_seen if report is not None else None,
        reported_models=report.reported_models if report is not None else [],
        desired_models=report.desired_models if report is not None else {},
        diff=diff,
        in_sync=all(d.in_sync for d in diff),
        drift=[
            DriftScorePublic.model_validate(d)
            for d in drift.device_scores(session, device_id=device.device_id)
        ],
    )


@router.post(
    "/{device_id}/drift",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_scope(Scope.WRITE))],
)
def post_drift_score(
    session: SessionDep, device: DeviceDep, audit: AuditDep, score_in: DriftScoreCreate
) -> DriftScorePublic:
    """Record a drift score of the device's inputs to one of the organization's artifacts
    (from the data loop); deployments whose policy sets ``max_drift`` gate on the latest."""
    audit.target = f"device:{device.device_id}"
    score = drift.record_score(session, device=device, score_in=score_in)
    session.commit()
    return DriftScorePublic.model_validate(score)


@router.patch("/{device_id}", dependencies=[Depends(require_scope(Scope.WRITE))])
def update_device(
    session: SessionDep, device: DeviceDep, profiles: ProfilesDep, device_in: DeviceUpdate
) -> DevicePublic:
    """Change a device's profile, tags (replaced whole) or group (``null`` leaves it)."""
    if device_in.profile is not None:
        _check_profile(device_in.profile, profiles)
    device = crud.update_device(session, device=device, device_in=device_in)
    session.commit()
    return DevicePublic.model_validate(device)


@router.post("/{device_id}/revoke", dependencies=[Depends(require_scope(Scope.WRITE))])
def revoke_device(session: SessionDep, device: DeviceDep, broker: BrokerAuthDep) -> DevicePublic:
    """Cut a device off the broker and mark it revoked (idempotent); it stays listed."""
    device = crud.revoke_device(session, device=device)
    broker.remove_device(device.device_id)
    session.commit()
    return DevicePublic.model_validate(device)


@router.delete(
    "/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require_scope(Scope.WRITE))],
)
def delete_device(session: SessionDep, device: DeviceDep, broker: BrokerAuthDep) -> None:
    """Cut a device off the broker and delete it; its id can then be registered again."""
    device_id = device.device_id
    drift.delete_device_scores(session, device_id=device_id)
    crud.delete_device(session, device=device)
    broker.remove_device(device_id)
    session.commit()
