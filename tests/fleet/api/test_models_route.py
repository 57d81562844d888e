"""``/models``: a model's versions, newest first, each with its artifact per profile."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from compiler import bundle
from tests.fleet.conftest import BundleFactory

from .conftest import OrgFactory


def _upload(client: TestClient, headers: dict[str, str], bundle_dir: Path, tmp: Path) -> str:
    tar = tmp / f"{bundle_dir.name}.tar"
    bundle.pack_bundle(bundle_dir, tar)
    response = client.post(
        "/artifacts",
        headers={**headers, "Content-Type": "application/x-tar"},
        content=tar.read_bytes(),
    )
    assert response.status_code == 201, response.text
    artifact_id: str = response.json()["artifact_id"]
    return artifact_id


def test_models_group_artifacts_by_version_and_profile(
    client: TestClient, make_org: OrgFactory, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    org = make_org("acme")
    v1 = _upload(client, org.headers, make_bundle("v1", version="1", size=2048), tmp_path)
    v2 = _upload(client, org.headers, make_bundle("v2", version="2", size=2048), tmp_path)
    listed = client.get("/models", headers=org.headers).json()
    assert listed["count"] == 1
    model = listed["data"][0]
    assert model["name"] == "m"
    assert [v["version"] for v in model["versions"]] == ["2", "1"]
    assert model["versions"][0]["artifacts"] == {"generic/x86_64": v2}
    assert model["versions"][1]["artifacts"] == {"generic/x86_64": v1}
    assert client.get("/models/m", headers=org.headers).json() == model
    missing = client.get("/models/nothing", headers=org.headers)
    assert missing.status_code == 404 and "'nothing'" in missing.json()["detail"]
    other = make_org("other")
    assert client.get("/models", headers=other.headers).json() == {"data": [], "count": 0}
