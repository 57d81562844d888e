"""``POST /devices/{id}/drift``: drift scores from the data loop, stored, shown in the device
state and in /metrics; bad scores are refused naming the value and store nothing. (Tenant
isolation and scopes: test_isolation's table; the rollout gate: test_executor.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ..conftest import Keys
from .conftest import Org
from .deploying import AVX512, GENERIC, Fleet, make_fleet


@pytest.fixture()
def lab(client: TestClient, org_a: Org, keys: Keys, tmp_path: Path) -> Fleet:
    return make_fleet(client, org_a, keys, tmp_path)


def _score(lab: Fleet, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model_name": "m",
        "artifact_id": lab.v1[GENERIC],
        "metric": "psi",
        "score": 0.25,
        "samples": 400,
        "window_start": "2026-11-26T00:00:00Z",
        "window_end": "2026-11-26T01:00:00Z",
    }
    return {**body, **changes}


def _state(client: TestClient, lab: Fleet, device_id: str = "gen-1") -> dict[str, Any]:
    response = client.get(f"/devices/{device_id}/state", headers=lab.org.headers)
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    return data


def test_scores_are_stored_the_latest_shown_and_exported(client: TestClient, lab: Fleet) -> None:
    assert _state(client, lab)["drift"] == []
    first = client.post("/devices/gen-1/drift", headers=lab.org.headers, json=_score(lab))
    assert first.status_code == 201, first.text
    assert first.json()["device_id"] == "gen-1" and first.json()["score"] == 0.25
    later = _score(
        lab, score=0.4, window_start="2026-11-26T01:00:00Z", window_end="2026-11-26T02:00:00Z"
    )
    assert (
        client.post("/devices/gen-1/drift", headers=lab.org.headers, json=later).status_code == 201
    )
    other = _score(lab, metric="ks", score=0.05)
    assert (
        client.post("/devices/gen-1/drift", headers=lab.org.headers, json=other).status_code == 201
    )
    avx = _score(lab, artifact_id=lab.v1[AVX512], score=0.7)
    assert client.post("/devices/avx-1/drift", headers=lab.org.headers, json=avx).status_code == 201
    shown = [(d["metric"], d["score"]) for d in _state(client, lab)["drift"]]
    assert shown == [("ks", 0.05), ("psi", 0.4)]  # the latest window per metric
    assert [d["score"] for d in _state(client, lab, "gen-2")["drift"]] == []
    metrics = client.get("/metrics").text
    assert 'edgeloop_fleet_drift_score_max{metric="psi",model="m"} 0.7' in metrics
    assert 'edgeloop_fleet_drift_score_max{metric="ks",model="m"} 0.05' in metrics
    audit = client.get("/audit?limit=100", headers=lab.org.headers).json()["data"]
    assert any(e["target"] == "device:gen-1" and "drift" in e["action"] for e in audit)
    # Deleting the device deletes its scores: a re-registration starts afresh.
    assert client.delete("/devices/gen-1", headers=lab.org.headers).status_code == 204
    again = {"device_id": "gen-1", "profile": GENERIC}
    assert client.post("/devices", headers=lab.org.headers, json=again).status_code == 201
    assert _state(client, lab)["drift"] == []


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"artifact_id": "ab" * 32}, f"no artifact {'ab' * 32!r} in the organization"),
        ({"artifact_id": "XYZ"}, "artifact id 'XYZ' is not 64 lowercase hex digits"),
        ({"model_name": "other"}, "is model 'm', not 'other'"),
        ({"metric": "PSI!"}, "metric 'PSI!' is invalid; use 1-32 of a-z 0-9 '_'"),
        ({"score": -0.1}, "greater than or equal to 0"),
        ({"samples": 0}, "greater than or equal to 1"),
        ({"window_end": "2025-01-01T00:00:00Z"}, "is before window_start"),
    ],
)
def test_bad_scores_are_refused_naming_the_value(
    client: TestClient, lab: Fleet, changes: dict[str, Any], needle: str
) -> None:
    response = client.post(
        "/devices/gen-1/drift", headers=lab.org.headers, json=_score(lab, **changes)
    )
    assert response.status_code == 422, response.text
    assert needle in str(response.json()["detail"])
    assert _state(client, lab)["drift"] == []


def test_unknown_device_is_404(client: TestClient, lab: Fleet) -> None:
    response = client.post("/devices/ghost/drift", headers=lab.org.headers, json=_score(lab))
    assert response.status_code == 404
    assert "ghost" in response.json()["detail"]
