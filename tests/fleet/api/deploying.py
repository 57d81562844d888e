"""Helpers of the deployment tests: a small fleet with two profiles and signed variants."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from compiler import bundle

from ..conftest import Keys, manifest_fields
from .conftest import Org

GENERIC = "generic/x86_64"
AVX512 = "intel/x86_64-avx512"
PI = "raspberry-pi/4b-aarch64"
TAR = {"Content-Type": "application/x-tar"}


def upload_variant(
    client: TestClient, org: Org, keys: Keys, root: Path, *, profile: str, version: str
) -> str:
    """Seal, pack and upload a bundle of model ``m`` for ``profile``; its artifact id."""
    name = f"{profile.replace('/', '_')}-{version}"
    sealed = root / "bundles" / name
    fields = {**manifest_fields(version), "profile": profile}
    with bundle.staging_dir(sealed) as staging:
        (staging / "model.so").write_bytes(os.urandom(2048))
        bundle.seal_bundle(staging, sealed, manifest_fields=fields, private_key=keys.private)
    tar = root / "tars" / f"{name}.tar"
    tar.parent.mkdir(parents=True, exist_ok=True)
    bundle.pack_bundle(sealed, tar)
    response = client.post("/artifacts", headers={**org.headers, **TAR}, content=tar.read_bytes())
    assert response.status_code in (200, 201), response.text
    artifact_id: str = response.json()["artifact_id"]
    return artifact_id


@dataclass
class Fleet:
    """Org A's lab: gen-1, gen-2 (generic), avx-1 (AVX-512), pi-1 (no variant), and v1/v2."""

    org: Org
    group_id: str
    v1: dict[str, str]  # profile -> artifact id
    v2: dict[str, str]

    def body(self, version: str = "v1", **changes: Any) -> dict[str, Any]:
        """A deployment request for the lab group (canary 1, then the rest)."""
        body: dict[str, Any] = {
            "name": f"rollout-{version}",
            "model_name": "m",
            "variants": self.v1 if version == "v1" else self.v2,
            "target": {"groups": ["lab"]},
            "policy": {"canary": 1, "waves": ["100%"]},
        }
        return {**body, **changes}


def make_fleet(client: TestClient, org: Org, keys: Keys, root: Path) -> Fleet:
    """Register the lab's devices and upload both versions for both x86 profiles."""
    group = client.post("/groups", headers=org.headers, json={"name": "lab"}).json()
    for device_id, profile in (
        ("gen-1", GENERIC),
        ("gen-2", GENERIC),
        ("avx-1", AVX512),
        ("pi-1", PI),
    ):
        response = client.post(
            "/devices",
            headers=org.headers,
            json={"device_id": device_id, "profile": profile, "group_id": group["id"]},
        )
        assert response.status_code == 201, response.text
    v1 = {
        p: upload_variant(client, org, keys, root, profile=p, version="1")
        for p in (GENERIC, AVX512)
    }
    v2 = {
        p: upload_variant(client, org, keys, root, profile=p, version="2")
        for p in (GENERIC, AVX512)
    }
    return Fleet(org=org, group_id=group["id"], v1=v1, v2=v2)
