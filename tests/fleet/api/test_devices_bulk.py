"""Bulk device registration (``POST /devices/bulk``): all or none, one broker rewrite and
reload, one audit entry per device, bad input named with nothing stored."""

from __future__ import annotations

import uuid

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from fleet.broker_auth import MosquittoPasswordFile
from fleet.errors import BrokerSyncError
from fleet.models import MAX_BULK_DEVICES, Device

from .conftest import PROFILE, BrokeredApi, KeyFactory, Org, Reloads, auth
from .test_devices import connect_reason
from .test_sdk import AppTransport


def _devices(n: int, prefix: str = "bulk") -> list[dict[str, object]]:
    return [{"device_id": f"{prefix}-{i}", "profile": PROFILE} for i in range(n)]


def _rows(app: FastAPI) -> list[str]:
    with Session(app.state.engine) as session:
        return sorted(d.device_id for d in session.exec(select(Device)).all())


def test_bulk_registers_all_with_one_reload_and_an_audit_entry_each(
    app: FastAPI,
    client: TestClient,
    org_a: Org,
    broker_auth: MosquittoPasswordFile,
    reloads: Reloads,
) -> None:
    group = client.post("/groups", headers=org_a.headers, json={"name": "lab"}).json()
    devices = _devices(50)
    devices[0] = {**devices[0], "tags": {"site": "lab"}, "group_id": group["id"]}
    response = client.post("/devices/bulk", headers=org_a.headers, json={"devices": devices})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["count"] == 50
    assert [d["device_id"] for d in body["data"]] == [f"bulk-{i}" for i in range(50)]
    passwords = {d["mqtt"]["username"]: d["mqtt"]["password"] for d in body["data"]}
    assert len(set(passwords.values())) == 50 and all(len(p) >= 24 for p in passwords.values())
    assert body["data"][0]["tags"] == {"site": "lab"} and body["data"][0]["group_id"] == group["id"]
    assert reloads.count == 1  # one rewrite, one reload for the whole batch
    text = broker_auth.password_file.read_text()
    assert broker_auth.users() == [f"bulk-{i}" for i in range(50)]
    assert not any(p in text for p in passwords.values())
    assert _rows(app) == sorted(passwords)
    audit = client.get(
        "/audit", headers=org_a.headers, params={"action": "devices.register_devices"}
    ).json()
    assert audit["count"] == 50
    assert sorted(e["target"] for e in audit["data"]) == sorted(f"device:{d}" for d in passwords)
    assert all(e["result"] == "ok" for e in audit["data"])
    assert not any(p in str(audit) for p in passwords.values())
    # The passwords are shown once: reading the devices never returns them.
    listed = client.get("/devices", headers=org_a.headers).json()
    assert listed["count"] == 50 and "mqtt" not in listed["data"][0]


def _refused(
    client: TestClient, org: Org, devices: object, status: int, *needles: str
) -> dict[str, object]:
    response = client.post("/devices/bulk", headers=org.headers, json={"devices": devices})
    assert response.status_code == status, response.text
    for needle in needles:
        assert needle in response.text, response.text
    body: dict[str, object] = response.json()
    return body


@pytest.mark.parametrize(
    ("devices", "needles"),
    [
        (
            [*_devices(3), {"device_id": "bulk-1", "profile": PROFILE}],
            ("device id 'bulk-1' is given twice (devices 1 and 3)",),
        ),
        (_devices(MAX_BULK_DEVICES + 1), ("at most 1000 items", "not 1001")),
        ([], ("at least 1 item",)),
        (
            [*_devices(2), {"device_id": "-bad", "profile": PROFILE}],
            ('"devices",2,"device_id"', "device id '-bad' is invalid; use 1-64 of"),
        ),
        (
            [*_devices(2), {"device_id": "fleet", "profile": PROFILE}],
            ("device id 'fleet' is reserved",),
        ),
        (
            [*_devices(2), {"device_id": "x-1", "profile": "rpi4"}],
            ("devices[2] ('x-1'): unknown hardware profile 'rpi4'; choose from:",),
        ),
        (
            [{"device_id": "g-1", "profile": PROFILE, "group_id": str(uuid.uuid4())}],
            ("is not a group of this organization",),
        ),
    ],
)
def test_bulk_bad_input_names_the_value_and_stores_nothing(
    app: FastAPI,
    client: TestClient,
    org_a: Org,
    broker_auth: MosquittoPasswordFile,
    reloads: Reloads,
    devices: list[dict[str, object]],
    needles: tuple[str, ...],
) -> None:
    _refused(client, org_a, devices, 422, *needles)
    assert _rows(app) == []
    assert broker_auth.users() == [] and reloads.count == 0
    audit = client.get("/audit", headers=org_a.headers).json()
    refused = [e for e in audit["data"] if e["action"] == "devices.register_devices"]
    assert len(refused) == 1 and refused[0]["result"] == "failed"


def test_bulk_with_a_taken_id_registers_none_and_names_every_taken_id(
    app: FastAPI,
    client: TestClient,
    org_a: Org,
    org_b: Org,
    broker_auth: MosquittoPasswordFile,
) -> None:
    first = client.post("/devices/bulk", headers=org_b.headers, json={"devices": _devices(2)})
    assert first.status_code == 201
    before = broker_auth.password_file.read_text()
    # Taken in another organization: still a conflict (ids are broker usernames).
    _refused(
        client,
        org_a,
        [*_devices(3, "new"), *_devices(2)],
        409,
        "2 device id(s) already registered in the fleet: 'bulk-0', 'bulk-1'",
        "nothing was registered",
    )
    assert _rows(app) == ["bulk-0", "bulk-1"]
    assert broker_auth.password_file.read_text() == before


def test_bulk_broker_failure_leaves_database_and_password_file_unchanged(
    app: FastAPI,
    client: TestClient,
    org_a: Org,
    broker_auth: MosquittoPasswordFile,
    reloads: Reloads,
) -> None:
    reloads.fail_with = BrokerSyncError("broker pid file '/run/x.pid' is gone")
    _refused(client, org_a, _devices(5), 503, "pid file")
    assert _rows(app) == []
    assert broker_auth.users() == []


def test_bulk_needs_the_write_scope(
    app: FastAPI, client: TestClient, org_a: Org, make_key: KeyFactory
) -> None:
    reader = make_key(org_a, ["fleet:read"])
    response = client.post("/devices/bulk", headers=auth(reader), json={"devices": _devices(2)})
    assert response.status_code == 403
    assert _rows(app) == []


def test_sdk_register_devices(app: FastAPI, client: TestClient, org_a: Org) -> None:
    from fleet.sdk import FleetClient, FleetConflictError, FleetValidationError

    fleet = FleetClient("http://testserver", org_a.token, transport=AppTransport(client))
    registered = fleet.register_devices(_devices(3))
    assert [d.device_id for d in registered.data] == ["bulk-0", "bulk-1", "bulk-2"]
    assert all(d.mqtt.password for d in registered.data)
    with pytest.raises(FleetConflictError, match="'bulk-2'"):
        fleet.register_devices(_devices(4))
    with pytest.raises(FleetValidationError, match="given twice"):
        fleet.register_devices([*_devices(1, "x"), *_devices(1, "x")])
    assert _rows(app) == ["bulk-0", "bulk-1", "bulk-2"]


@pytest.mark.mqtt
def test_bulk_registered_devices_log_in_to_mosquitto(brokered_api: BrokeredApi) -> None:
    broker, client, headers = brokered_api.broker, brokered_api.client, brokered_api.headers
    response = client.post("/devices/bulk", headers=headers, json={"devices": _devices(5)})
    assert response.status_code == 201, response.text
    for device in response.json()["data"]:
        login = device["mqtt"]
        assert connect_reason(broker.port, login["username"], login["password"]) == "Success"
    assert connect_reason(broker.port, "bulk-0", "wrong") != "Success"
    assert connect_reason(broker.port, "fleet", "fleet-pw") == "Success"  # untouched


def test_bulk_cannot_place_devices_in_another_organizations_group(
    app: FastAPI, client: TestClient, org_a: Org, org_b: Org, broker_auth: MosquittoPasswordFile
) -> None:
    group = client.post("/groups", headers=org_a.headers, json={"name": "lab"}).json()
    devices = [{**d, "group_id": group["id"]} for d in _devices(2)]
    _refused(client, org_b, devices, 422, f"group_id {group['id']!r} is not a group of this")
    assert _rows(app) == [] and broker_auth.users() == []
