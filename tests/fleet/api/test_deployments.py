"""Deployments over the API, on SQLite and PostgreSQL: planning, unmatched devices, policy
errors and operator commands (tenant isolation is test_isolation's)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ..conftest import Keys
from .conftest import KeyFactory, Org, auth
from .deploying import AVX512, GENERIC, PI, Fleet, make_fleet


@pytest.fixture()
def lab(client: TestClient, org_a: Org, keys: Keys, tmp_path: Path) -> Fleet:
    return make_fleet(client, org_a, keys, tmp_path)


def _create(client: TestClient, lab: Fleet, **changes: object) -> dict[str, object]:
    response = client.post("/deployments", headers=lab.org.headers, json=lab.body(**changes))
    assert response.status_code == 201, response.text
    data: dict[str, object] = response.json()
    return data


def test_create_assigns_variants_and_lists_unmatched_devices(
    client: TestClient, lab: Fleet
) -> None:
    created = _create(client, lab)
    assert created["phase"] == "PENDING"
    devices = {d["device_id"]: d for d in created["devices"]}  # type: ignore[attr-defined]
    assert devices["gen-1"]["artifact_id"] == lab.v1[GENERIC]
    assert devices["gen-2"]["artifact_id"] == lab.v1[GENERIC]
    assert devices["avx-1"]["artifact_id"] == lab.v1[AVX512]
    assert all(d["state"] == "NOT_STARTED" for d in devices.values())
    assert created["unmatched"] == [{"device_id": "pi-1", "profile": PI}]
    assert created["stages"] == [["avx-1"], ["gen-1", "gen-2"]]
    assert created["counts"]["NOT_STARTED"] == 3  # type: ignore[index]
    read = client.get(f"/deployments/{created['id']}", headers=lab.org.headers).json()
    assert read == created
    listed = client.get("/deployments", headers=lab.org.headers).json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == created["id"]
    assert client.get("/deployments?phase=ROLLING", headers=lab.org.headers).json()["count"] == 0


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ({"device_ids": ["gen-1"]}, None),
        ({"tags": {"site": "x"}}, "selects no device"),
        ({"device_ids": ["nope"]}, "not in the organization: nope"),
        ({}, "at least one of"),
    ],
)
def test_targets(
    client: TestClient, lab: Fleet, target: dict[str, object], needle: str | None
) -> None:
    response = client.post("/deployments", headers=lab.org.headers, json=lab.body(target=target))
    if needle is None:
        assert response.status_code == 201, response.text
        assert [d["device_id"] for d in response.json()["devices"]] == ["gen-1"]
        assert response.json()["unmatched"] == []
    else:
        assert response.status_code == 422, response.text
        assert needle in response.json()["detail"]


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"canary": 1, "waves": ["100%"], "succes_threshold": 1}, "'succes_threshold'"),
        ({"canary": 1, "waves": ["100%"], "success_threshold": 2}, "success_threshold"),
        ({"canary": 1}, "waves"),
        ({"canary": "lots", "waves": [1]}, "canary"),
    ],
)
def test_bad_policy_is_422_naming_the_field(
    client: TestClient, lab: Fleet, policy: dict[str, object], field: str
) -> None:
    response = client.post("/deployments", headers=lab.org.headers, json=lab.body(policy=policy))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("invalid rollout policy") and field in detail
    assert client.get("/deployments", headers=lab.org.headers).json()["count"] == 0


def test_bad_variants_are_422(client: TestClient, lab: Fleet) -> None:
    swapped = {GENERIC: lab.v1[AVX512]}
    response = client.post("/deployments", headers=lab.org.headers, json=lab.body(variants=swapped))
    assert response.status_code == 422
    assert f"built for '{AVX512}'" in response.json()["detail"]
    missing = {GENERIC: "0" * 64}
    response = client.post("/deployments", headers=lab.org.headers, json=lab.body(variants=missing))
    assert response.status_code == 422 and "no artifact" in response.json()["detail"]
    wrong_model = lab.body(model_name="other")
    response = client.post("/deployments", headers=lab.org.headers, json=wrong_model)
    assert response.status_code == 422 and "not 'other'" in response.json()["detail"]
    only_pi = lab.body(target={"device_ids": ["pi-1"]})
    response = client.post("/deployments", headers=lab.org.headers, json=only_pi)
    assert response.status_code == 422 and "no targeted device" in response.json()["detail"]


def test_pause_resume_cancel(client: TestClient, lab: Fleet) -> None:
    created = _create(client, lab)
    base = f"/deployments/{created['id']}"
    paused = client.post(f"{base}/pause", headers=lab.org.headers)
    assert paused.status_code == 200 and paused.json()["phase"] == "PAUSED"
    again = client.post(f"{base}/pause", headers=lab.org.headers)
    assert again.status_code == 409 and "pause is allowed in" in again.json()["detail"]
    resumed = client.post(f"{base}/resume", headers=lab.org.headers)
    assert resumed.status_code == 200 and resumed.json()["phase"] == "PENDING"
    canceled = client.post(f"{base}/cancel", headers=lab.org.headers)
    assert canceled.status_code == 200 and canceled.json()["phase"] == "CANCELED"
    assert client.post(f"{base}/resume", headers=lab.org.headers).status_code == 409
    assert client.get("/deployments?phase=CANCELED", headers=lab.org.headers).json()["count"] == 1


def test_rollback_of_untouched_deployment_is_immediate(client: TestClient, lab: Fleet) -> None:
    created = _create(client, lab)
    base = f"/deployments/{created['id']}"
    rolled = client.post(f"{base}/rollback", headers=lab.org.headers)
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["phase"] == "ROLLED_BACK"
    assert rolled.json()["reason"].startswith("rolled back 0 of 0")
    again = client.post(f"{base}/rollback", headers=lab.org.headers)
    assert again.status_code == 409


def test_scopes(client: TestClient, lab: Fleet, make_key: KeyFactory) -> None:
    writer = auth(make_key(lab.org, ["fleet:write", "fleet:read"]))
    response = client.post("/deployments", headers=writer, json=lab.body())
    assert response.status_code == 403 and "lacks scope 'deploy'" in response.json()["detail"]
    deployer = auth(make_key(lab.org, ["deploy"]))
    created = client.post("/deployments", headers=deployer, json=lab.body())
    assert created.status_code == 201
    assert client.get("/deployments", headers=deployer).status_code == 403
    assert client.get("/deployments", headers=writer).json()["count"] == 1


def test_device_state_without_reports(client: TestClient, lab: Fleet) -> None:
    state = client.get("/devices/gen-1/state", headers=lab.org.headers)
    assert state.status_code == 200, state.text
    assert state.json() == {
        "device_id": "gen-1",
        "online": False,
        "last_seen": None,
        "reported_models": [],
        "desired_models": {},
        "diff": [],
        "in_sync": True,
        "drift": [],
    }


def test_metrics_count_deployments_by_phase(client: TestClient, lab: Fleet) -> None:
    created = _create(client, lab)
    client.post(f"/deployments/{created['id']}/cancel", headers=lab.org.headers)
    _create(client, lab)
    metrics = client.get("/metrics").text
    assert 'edgeloop_fleet_deployments{phase="CANCELED"} 1.0' in metrics
    assert 'edgeloop_fleet_deployments{phase="PENDING"} 1.0' in metrics
    assert 'edgeloop_fleet_deployments{phase="ROLLING"} 0.0' in metrics
    assert "edgeloop_fleet_devices_online 0.0" in metrics
