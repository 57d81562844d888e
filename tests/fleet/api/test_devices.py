"""Devices: registration with MQTT credentials, broker sync, revocation, groups, validation."""

from __future__ import annotations

import threading
import uuid

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import TypeAdapter
from sqlmodel import Session, select

from fleet.api.main import create_app
from fleet.api.settings import ApiSettings
from fleet.broker_auth import MosquittoPasswordFile
from fleet.errors import BrokerSyncError
from fleet.models import Device, DevicePublic, DevicesPublic
from fleet.store import ArtifactStore

from .conftest import PROFILE, BrokeredApi, KeyFactory, Org, Reloads, auth

DEVICE = {"device_id": "dev-1", "profile": PROFILE, "tags": {"site": "lab"}}


def _register(client: TestClient, org: Org, **fields: object) -> dict[str, object]:
    response = client.post("/devices", headers=org.headers, json={**DEVICE, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def _device_rows(app: FastAPI) -> list[str]:
    with Session(app.state.engine) as session:
        return sorted(d.device_id for d in session.exec(select(Device)).all())


def test_register_returns_credentials_once_and_adds_a_hashed_broker_user(
    client: TestClient, org_a: Org, broker_auth: MosquittoPasswordFile, reloads: Reloads
) -> None:
    body = _register(client, org_a)
    mqtt = body["mqtt"]
    assert isinstance(mqtt, dict)
    assert mqtt["username"] == "dev-1" and len(mqtt["password"]) >= 24
    assert body["tags"] == {"site": "lab"} and body["revoked"] is False
    line = broker_auth.password_file.read_text()
    assert line.startswith("dev-1:$") and mqtt["password"] not in line
    assert reloads.count == 1
    read = client.get("/devices/dev-1", headers=org_a.headers).json()
    assert "mqtt" not in read and mqtt["password"] not in str(read)
    listed = client.get("/devices", headers=org_a.headers).json()
    assert listed["count"] == 1 and listed["data"][0]["device_id"] == "dev-1"


def test_revoke_and_delete_remove_the_broker_user(
    client: TestClient, org_a: Org, broker_auth: MosquittoPasswordFile, reloads: Reloads
) -> None:
    _register(client, org_a)
    _register(client, org_a, device_id="dev-2")
    assert broker_auth.users() == ["dev-1", "dev-2"]
    revoked = client.post("/devices/dev-1/revoke", headers=org_a.headers)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert broker_auth.users() == ["dev-2"]
    again = client.post("/devices/dev-1/revoke", headers=org_a.headers)  # idempotent
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    only_revoked = client.get("/devices?revoked=true", headers=org_a.headers).json()
    assert [d["device_id"] for d in only_revoked["data"]] == ["dev-1"]
    deleted = client.delete("/devices/dev-2", headers=org_a.headers)
    assert deleted.status_code == 204
    assert broker_auth.users() == []
    assert client.get("/devices/dev-2", headers=org_a.headers).status_code == 404
    assert reloads.count == 5
    # A deleted device's id can be registered again (with a new password).
    assert _register(client, org_a, device_id="dev-2")["device_id"] == "dev-2"


def test_device_ids_are_unique_across_the_fleet(
    client: TestClient, org_a: Org, org_b: Org, broker_auth: MosquittoPasswordFile
) -> None:
    _register(client, org_a)
    before = broker_auth.password_file.read_text()
    for org in (org_a, org_b):
        response = client.post("/devices", headers=org.headers, json=DEVICE)
        assert response.status_code == 409
        assert "'dev-1' is already registered" in response.json()["detail"]
    assert broker_auth.password_file.read_text() == before


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"device_id": "fleet"}, "'fleet' is reserved for the fleet's own broker users; reserved"),
        ({"device_id": "responder"}, "reserved: fleet, responder"),
        ({"device_id": "-bad"}, "device id '-bad' is invalid; use 1-64 of"),
        ({"device_id": "a:b"}, "device id 'a:b' is invalid"),
        (
            {"profile": "rpi4"},
            "unknown hardware profile 'rpi4'; choose from: "
            "amd/epyc-zen2, amd/epyc-zen4, amd/epyc-zen5, generic",
        ),
        ({"tags": {"": "x"}}, "tag key '' must have 1-64 characters"),
        ({"tags": {str(i): "x" for i in range(33)}}, "33 tags given; at most 32"),
        ({"group_id": str(uuid.uuid4())}, "is not a group of this organization"),
    ],
)
def test_register_names_bad_values(
    app: FastAPI,
    client: TestClient,
    org_a: Org,
    broker_auth: MosquittoPasswordFile,
    fields: dict[str, object],
    needle: str,
) -> None:
    response = client.post("/devices", headers=org_a.headers, json={**DEVICE, **fields})
    assert response.status_code == 422
    assert needle in response.text
    assert _device_rows(app) == []
    assert broker_auth.users() == []


def test_broker_failure_leaves_database_and_password_file_unchanged(
    app: FastAPI,
    client: TestClient,
    org_a: Org,
    broker_auth: MosquittoPasswordFile,
    reloads: Reloads,
) -> None:
    reloads.fail_with = BrokerSyncError("broker pid file '/run/x.pid' is gone")
    response = client.post("/devices", headers=org_a.headers, json=DEVICE)
    assert response.status_code == 503
    assert "pid file" in response.json()["detail"]
    assert _device_rows(app) == []
    assert broker_auth.users() == []
    reloads.fail_with = None
    _register(client, org_a)
    reloads.fail_with = BrokerSyncError("reload failed")
    assert client.post("/devices/dev-1/revoke", headers=org_a.headers).status_code == 503
    assert client.get("/devices/dev-1", headers=org_a.headers).json()["revoked"] is False


def test_no_broker_configured_is_503_naming_the_settings(
    settings: ApiSettings, artifact_store: ArtifactStore
) -> None:
    app = create_app(settings, store=artifact_store)
    with TestClient(app) as client:
        from fleet.api.bootstrap import create_admin_key

        with Session(app.state.engine) as session:
            token = create_admin_key(session, "solo").token
        response = client.post("/devices", headers=auth(token), json=DEVICE)
    assert response.status_code == 503
    assert "EDGELOOP_FLEET_BROKER_PASSWORD_FILE" in response.json()["detail"]


def test_groups_and_device_membership(
    client: TestClient, org_a: Org, org_b: Org, make_key: KeyFactory
) -> None:
    group = client.post("/groups", headers=org_a.headers, json={"name": "lab"}).json()
    other = client.post("/groups", headers=org_b.headers, json={"name": "lab"}).json()
    dup = client.post("/groups", headers=org_a.headers, json={"name": "lab"})
    assert dup.status_code == 409 and "'lab' is taken" in dup.json()["detail"]
    bad = client.post("/groups", headers=org_a.headers, json={"name": "no spaces"})
    assert bad.status_code == 422 and "'no spaces'" in bad.text
    _register(client, org_a, group_id=group["id"])
    _register(client, org_a, device_id="dev-2")
    in_group = client.get(f"/devices?group_id={group['id']}", headers=org_a.headers).json()
    assert [d["device_id"] for d in in_group["data"]] == ["dev-1"]
    # Another organization's group cannot be assigned.
    moved = client.patch("/devices/dev-2", headers=org_a.headers, json={"group_id": other["id"]})
    assert moved.status_code == 422 and other["id"] in moved.json()["detail"]
    # A group with devices cannot be deleted; moving them out (null) frees it.
    busy = client.delete(f"/groups/{group['id']}", headers=org_a.headers)
    assert busy.status_code == 409 and "still has 1 device(s)" in busy.json()["detail"]
    left = client.patch("/devices/dev-1", headers=org_a.headers, json={"group_id": None})
    assert left.status_code == 200 and left.json()["group_id"] is None
    assert client.delete(f"/groups/{group['id']}", headers=org_a.headers).status_code == 204
    renamed = client.patch(f"/groups/{other['id']}", headers=org_b.headers, json={"name": "x"})
    assert renamed.json()["name"] == "x"


def test_update_device_profile_and_tags(client: TestClient, org_a: Org) -> None:
    _register(client, org_a)
    changed = client.patch(
        "/devices/dev-1",
        headers=org_a.headers,
        json={"profile": "raspberry-pi/4b-aarch64", "tags": {"new": "1"}},
    )
    assert changed.status_code == 200
    assert changed.json()["profile"] == "raspberry-pi/4b-aarch64"
    assert changed.json()["tags"] == {"new": "1"}
    unchanged = client.patch("/devices/dev-1", headers=org_a.headers, json={}).json()
    assert unchanged["tags"] == {"new": "1"}
    bad = client.patch("/devices/dev-1", headers=org_a.headers, json={"profile": "rpi"})
    assert bad.status_code == 422 and "choose from:" in bad.json()["detail"]


def test_listing_is_exactly_each_devices_public_json(
    app: FastAPI, client: TestClient, org_a: Org, org_b: Org
) -> None:
    group = client.post("/groups", headers=org_a.headers, json={"name": "lab"}).json()
    odd_tags = {"é": "ü€😀", "quote": 'a"b\\c', "ctl": "x\ty\n\u001f\u007f\u2028", "<": "</x>"}
    for index, tags in enumerate([{}, {"site": "lab"}, odd_tags, {"a": ""}, {}]):
        fields: dict[str, object] = {"device_id": f"dev-{4 - index}", "tags": tags}
        if index % 2 == 0:
            fields["group_id"] = group["id"]
        _register(client, org_a, **fields)
    _register(client, org_b, device_id="other-org")
    for device_id in ("dev-0", "dev-3"):
        assert client.post(f"/devices/{device_id}/revoke", headers=org_a.headers).status_code == 200
    with Session(app.state.engine) as session:
        rows = session.exec(select(Device).where(Device.device_id != "other-org")).all()
        devices = sorted((DevicePublic.model_validate(d) for d in rows), key=lambda d: d.device_id)
    assert any(d.revoked_at is not None for d in devices) and any(d.group_id for d in devices)
    public = TypeAdapter(DevicesPublic)
    for query, expected in [
        ("", devices),
        ("?limit=2&offset=1", devices[1:3]),
        (f"?group_id={group['id']}", [d for d in devices if d.group_id is not None]),
        ("?revoked=true", [d for d in devices if d.revoked]),
        ("?revoked=false&limit=1000", [d for d in devices if not d.revoked]),
    ]:
        response = client.get(f"/devices{query}", headers=org_a.headers)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        count = len(devices) if "limit=2" in query else len(expected)
        assert response.content == public.dump_json(DevicesPublic(data=expected, count=count))
    # The route still documents its answer as DevicesPublic.
    get = app.openapi()["paths"]["/devices"]["get"]
    schema = get["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/DevicesPublic"}


# ---------------------------------------------------------------- a real broker


class MqttSession:
    """A paho client that records its CONNACK reason and whether the broker dropped it."""

    def __init__(self, port: int, username: str, password: str) -> None:
        mqtt = pytest.importorskip("paho.mqtt.client")
        from paho.mqtt.enums import CallbackAPIVersion

        self.connected = threading.Event()
        self.dropped = threading.Event()
        self.reason = ""
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{username}-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(60, 120)  # no reconnect within a test
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_args: self.dropped.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(5.0), "no CONNACK within 5 s"

    def _on_connect(self, _c: object, _u: object, _f: object, code: object, _p: object) -> None:
        self.reason = str(code)
        self.connected.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect_reason(port: int, username: str, password: str) -> str:
    """Connect and disconnect; the CONNACK reason as text ('Success' or why not)."""
    session = MqttSession(port, username, password)
    session.close()
    return session.reason


@pytest.mark.mqtt
def test_registered_device_connects_to_mosquitto_and_revocation_cuts_it_off(
    brokered_api: BrokeredApi,
) -> None:
    # The adapter edits the broker's own password file and reloads it with SIGHUP.
    broker, client, headers = brokered_api.broker, brokered_api.client, brokered_api.headers
    registered = client.post("/devices", headers=headers, json=DEVICE)
    assert registered.status_code == 201
    password = registered.json()["mqtt"]["password"]
    assert connect_reason(broker.port, "dev-1", password) == "Success"
    assert connect_reason(broker.port, "dev-1", "wrong") != "Success"
    assert connect_reason(broker.port, "fleet", "fleet-pw") == "Success"  # untouched

    online = MqttSession(broker.port, "dev-1", password)
    try:
        assert online.reason == "Success" and not online.dropped.is_set()
        assert client.post("/devices/dev-1/revoke", headers=headers).status_code == 200
        # The reload re-checks open sessions: the connected device is dropped too.
        assert online.dropped.wait(5.0), "revoked device still connected after reload"
    finally:
        online.close()
    assert connect_reason(broker.port, "dev-1", password) != "Success"
    assert connect_reason(broker.port, "fleet", "fleet-pw") == "Success"
