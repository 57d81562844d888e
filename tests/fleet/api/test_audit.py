"""The audit log: one entry per mutating call (ok, denied or failed), never a secret."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from fleet.models import AuditLog

from .conftest import PROFILE, KeyFactory, Org, TarFactory, auth


def _entries(client: TestClient, org: Org, **query: str) -> list[dict[str, Any]]:
    response = client.get("/audit", headers=org.headers, params={"limit": "1000", **query})
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return list(reversed(data))  # oldest first


def test_every_mutating_call_is_audited(
    client: TestClient, org_a: Org, make_key: KeyFactory, make_tar: TarFactory
) -> None:
    reader = make_key(org_a, ["fleet:read"])
    reader_id = reader.split("_")[1]
    client.post("/groups", headers=org_a.headers, json={"name": "lab"})
    registered = client.post(
        "/devices", headers=org_a.headers, json={"device_id": "dev-1", "profile": PROFILE}
    ).json()
    client.patch("/devices/dev-1", headers=org_a.headers, json={"tags": {"a": "b"}})
    client.post("/devices/dev-1/revoke", headers=org_a.headers)
    client.delete("/devices/dev-1", headers=auth(reader))  # denied
    client.delete("/devices/nope", headers=org_a.headers)  # failed: 404
    client.post("/devices", headers=org_a.headers, json={"device_id": "x"})  # failed: 422
    tar = make_tar()
    artifact = client.post(
        "/artifacts",
        headers={**org_a.headers, "Content-Type": "application/x-tar"},
        content=tar.read_bytes(),
    ).json()
    client.get("/devices", headers=org_a.headers)  # reads are not audited
    client.get("/devices/dev-1", headers=org_a.headers)

    got = [
        (e["actor"], e["action"], e["target"], e["result"], e["status_code"])
        for e in _entries(client, org_a)
    ]
    assert got == [
        (org_a.key_id, "api-keys.create_api_key", f"api-key:{reader_id}", "ok", 201),
        (org_a.key_id, "groups.create_group", got[1][2], "ok", 201),
        (org_a.key_id, "devices.register_device", "device:dev-1", "ok", 201),
        (org_a.key_id, "devices.update_device", "/devices/dev-1", "ok", 200),
        (org_a.key_id, "devices.revoke_device", "/devices/dev-1/revoke", "ok", 200),
        (reader_id, "devices.delete_device", "/devices/dev-1", "denied", 403),
        (org_a.key_id, "devices.delete_device", "/devices/nope", "failed", 404),
        (org_a.key_id, "devices.register_device", "/devices", "failed", 422),
        (
            org_a.key_id,
            "artifacts.upload_artifact",
            f"artifact:{artifact['artifact_id']}",
            "ok",
            201,
        ),
    ]
    assert got[1][2].startswith("group:")
    entries = _entries(client, org_a)
    assert "lacks scope 'fleet:write'" in entries[5]["detail"]
    assert "no device 'nope'" in entries[6]["detail"]
    assert entries[7]["detail"].startswith("invalid request: body.profile: Field required")
    assert all(e["detail"] is None for e in entries if e["result"] == "ok")
    assert registered["mqtt"]["password"] not in str(entries)
    # Filters.
    assert len(_entries(client, org_a, actor=reader_id)) == 1
    assert len(_entries(client, org_a, action="devices.register_device")) == 2


def test_no_secret_reaches_the_audit_log(app: FastAPI, client: TestClient, org_a: Org) -> None:
    created = client.post(
        "/api-keys", headers=org_a.headers, json={"name": "ci", "scopes": ["deploy"]}
    ).json()
    device = client.post(
        "/devices", headers=org_a.headers, json={"device_id": "dev-1", "profile": PROFILE}
    ).json()
    with Session(app.state.engine) as session:
        rows = session.exec(select(AuditLog)).all()
    text = repr([row.model_dump() for row in rows])
    for secret in (created["token"], org_a.token, device["mqtt"]["password"]):
        assert secret not in text
        if secret.startswith("elk_"):  # elk_<key id>_<secret>; the secret may contain '_'
            assert secret.split("_", 2)[2] not in text


def test_unauthenticated_calls_are_not_audited(
    app: FastAPI, client: TestClient, org_a: Org
) -> None:
    assert client.post("/groups", json={"name": "x"}).status_code == 401
    assert _entries(client, org_a) == []


def test_audit_log_is_append_only(app: FastAPI, client: TestClient, org_a: Org) -> None:
    client.post("/groups", headers=org_a.headers, json={"name": "lab"})
    with Session(app.state.engine) as session:
        row = session.exec(select(AuditLog)).one()
        row.result = "forged"
        session.add(row)
        with pytest.raises(RuntimeError, match="append-only"):
            session.commit()
        session.rollback()
        with pytest.raises(RuntimeError, match="append-only"):
            session.delete(row)
            session.commit()
    assert _entries(client, org_a)[0]["result"] == "ok"


def test_audit_needs_admin(client: TestClient, org_a: Org, make_key: KeyFactory) -> None:
    writer = make_key(org_a, ["fleet:read", "fleet:write", "deploy"])
    response = client.get("/audit", headers=auth(writer))
    assert response.status_code == 403
    assert "lacks scope 'admin'" in response.json()["detail"]
