"""Artifact uploads: raw and multipart, idempotent, and every refusal leaves nothing behind."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from fleet.models import Artifact
from fleet.store import ArtifactStore

from .conftest import KeyFactory, Org, TarFactory, auth

TAR = {"Content-Type": "application/x-tar"}


def _upload(client: TestClient, org: Org, tar: Path, **kwargs: object) -> dict[str, object]:
    response = client.post("/artifacts", headers={**org.headers, **TAR}, content=tar.read_bytes())
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def _snapshot(app: FastAPI, store: ArtifactStore, state_dir: Path) -> dict[str, list[str]]:
    """Files under the store's artifacts/ and tmp/, upload scratch, and artifact rows."""

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []

    with Session(app.state.engine) as session:
        rows = sorted(a.artifact_id for a in session.exec(select(Artifact)).all())
    return {
        "artifacts": files(store.root / "artifacts"),
        "tmp": files(store.root / "tmp"),
        "uploads": files(state_dir / "uploads"),
        "rows": rows,
    }


def test_upload_raw_body_then_again_is_idempotent(
    client: TestClient, org_a: Org, make_tar: TarFactory, artifact_store: ArtifactStore
) -> None:
    tar = make_tar()
    body = _upload(client, org_a, tar)
    artifact_id = body["artifact_id"]
    assert isinstance(artifact_id, str)
    stored = artifact_store.get(artifact_id)
    assert body["size"] == stored.transfer.size
    assert body["transfer_sha256"] == stored.transfer.sha256
    assert (body["model_name"], body["model_version"]) == ("m", "1")
    assert body["profile"] == "generic/x86_64" and body["runtime"] == "tvm"
    assert body["uploaded_by"] == org_a.key_id
    again = client.post("/artifacts", headers={**org_a.headers, **TAR}, content=tar.read_bytes())
    assert again.status_code == 200 and again.json() == body
    assert client.get(f"/artifacts/{artifact_id}", headers=org_a.headers).json() == body
    listed = client.get("/artifacts", headers=org_a.headers).json()
    assert listed["count"] == 1 and listed["data"] == [body]
    by_model = client.get("/artifacts?model_name=other", headers=org_a.headers).json()
    assert by_model["count"] == 0


def test_upload_multipart_and_streamed_body(
    client: TestClient, org_a: Org, make_tar: TarFactory
) -> None:
    first = make_tar("one", version="1")
    response = client.post(
        "/artifacts",
        headers=org_a.headers,
        files={"file": ("one.tar", first.read_bytes(), "application/x-tar")},
    )
    assert response.status_code == 201, response.text
    second = make_tar("two", version="2")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        data = second.read_bytes()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    response = client.post(
        "/artifacts",
        headers={**org_a.headers, "Content-Type": "application/octet-stream"},
        content=chunks(),
    )
    assert response.status_code == 201, response.text
    versions = [
        a["model_version"] for a in client.get("/artifacts", headers=org_a.headers).json()["data"]
    ]
    assert sorted(versions) == ["1", "2"]


def test_same_artifact_in_two_organizations(
    client: TestClient, org_a: Org, org_b: Org, make_tar: TarFactory
) -> None:
    tar = make_tar()
    a = _upload(client, org_a, tar)
    b = _upload(client, org_b, tar)  # the store has it; org B gets its own record
    assert a["artifact_id"] == b["artifact_id"] and b["uploaded_by"] == org_b.key_id
    assert client.get("/artifacts", headers=org_b.headers).json()["count"] == 1


def _tampered(tar: Path, out: Path) -> Path:
    """The tar with one byte of model.so flipped (its manifest hash no longer matches)."""
    with tarfile.open(tar) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            data = src.extractfile(member)
            assert data is not None
            content = data.read()
            if member.name == "model.so":
                content = bytes([content[0] ^ 0xFF]) + content[1:]
            dst.addfile(member, io.BytesIO(content))
    return out


def _unsigned(tar: Path, out: Path) -> Path:
    with tarfile.open(tar) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            if member.name != "manifest.sig":
                dst.addfile(member, src.extractfile(member))
    return out


BAD_UPLOADS = {
    "other signing key": (
        lambda t, m, tmp: m("evil", key=Ed25519PrivateKey.generate()),
        422,
        "artifact upload refused: artifact was signed with key",
    ),
    "file hash wrong": (
        lambda t, m, tmp: _tampered(t, tmp / "bad.tar"),
        422,
        "was modified: sha256",
    ),
    "unsigned": (lambda t, m, tmp: _unsigned(t, tmp / "bad.tar"), 422, "the bundle is unsigned"),
    "not a tar": (lambda t, m, tmp: _write(tmp / "bad.tar", b"hello " * 200), 422, "is damaged"),
    "empty": (lambda t, m, tmp: _write(tmp / "bad.tar", b""), 422, "the upload is empty"),
    "oversize": (
        lambda t, m, tmp: _write(tmp / "big.tar", b"\0" * ((1 << 20) + 1)),
        413,
        "upload of 1048577 bytes exceeds the limit of 1048576 bytes",
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_refused_and_leave_nothing(
    app: FastAPI,
    client: TestClient,
    org_a: Org,
    make_tar: TarFactory,
    make_bundle: object,
    artifact_store: ArtifactStore,
    tmp_path: Path,
    case: str,
) -> None:
    good = make_tar()
    _upload(client, org_a, good)  # something already stored, to see it is left alone
    before = _snapshot(app, artifact_store, tmp_path / "state")
    build, status, needle = BAD_UPLOADS[case]

    def make_bad_bundle(name: str, **kwargs: object) -> Path:
        return make_tar(name, **kwargs)

    bad = build(good, make_bad_bundle, tmp_path)
    response = client.post("/artifacts", headers={**org_a.headers, **TAR}, content=bad.read_bytes())
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"]
    assert _snapshot(app, artifact_store, tmp_path / "state") == before


def test_streamed_oversize_without_content_length_is_413(
    app: FastAPI, client: TestClient, org_a: Org, artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    before = _snapshot(app, artifact_store, tmp_path / "state")

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"\0" * 65536

    response = client.post("/artifacts", headers={**org_a.headers, **TAR}, content=chunks())
    assert response.status_code == 413
    assert "exceeds the limit of 1048576 bytes" in response.json()["detail"]
    multipart = client.post(
        "/artifacts",
        headers=org_a.headers,
        files={"file": ("big.tar", b"\0" * (1 << 20), "application/x-tar")},
    )
    assert multipart.status_code == 413
    assert _snapshot(app, artifact_store, tmp_path / "state") == before


@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        (
            {"content": b"x", "headers": {"Content-Type": "application/json"}},
            415,
            "content type 'application/json' is not accepted for an artifact upload; use one of: "
            "application/x-tar, application/octet-stream, multipart/form-data (field 'file')",
        ),
        (
            {"files": {"other": ("a.tar", b"x", "application/x-tar")}},
            422,
            "multipart upload has no file field 'file' (fields: other)",
        ),
        ({"files": {"file": (None, b"not a file")}}, 422, "no file field 'file' (fields: file)"),
        ({"data": {"file": "x"}}, 415, "'application/x-www-form-urlencoded' is not accepted"),
    ],
)
def test_upload_content_types(
    client: TestClient, org_a: Org, kwargs: dict[str, object], status: int, needle: str
) -> None:
    kwargs = dict(kwargs)  # the table is shared by both databases' runs
    headers = {**org_a.headers, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    response = client.post("/artifacts", headers=headers, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"]


def test_upload_needs_the_deploy_scope(
    client: TestClient, org_a: Org, make_key: KeyFactory, make_tar: TarFactory
) -> None:
    tar = make_tar()
    for scopes, status in ((["fleet:read", "fleet:write"], 403), (["deploy"], 201)):
        token = make_key(org_a, scopes)
        response = client.post(
            "/artifacts", headers={**auth(token), **TAR}, content=tar.read_bytes()
        )
        assert response.status_code == status, response.text
    assert (
        "lacks scope 'deploy'"
        in client.post(
            "/artifacts", headers={**auth(make_key(org_a, ["fleet:read"])), **TAR}, content=b"x"
        ).json()["detail"]
    )
