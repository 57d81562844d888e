"""Fleet fixtures: a real Mosquitto broker with users and ACL, and signed bundles without TVM."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compiler import bundle
from compiler.signing import generate_keys, load_private_key, load_public_key
from fleet import credentials
from fleet.broker import MosquittoProcess

PASSWORDS = {"fleet": "fleet-pw", "responder": "responder-pw", "dev-a": "a-pw", "dev-b": "b-pw"}
MODEL_BYTES = 3 * 1024 * 1024 + 12345  # many chunks, the last one short


@dataclass(frozen=True)
class Broker:
    """A running broker and the passwords of its users."""

    process: MosquittoProcess
    port: int
    passwords: dict[str, str]


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    """Mosquitto on a free port with users fleet, responder, dev-a and dev-b."""
    pytest.importorskip("paho.mqtt.client")
    process = MosquittoProcess(tmp_path / "broker", users=dict(PASSWORDS))
    process.start()
    try:
        yield Broker(process=process, port=process.port, passwords=dict(PASSWORDS))
    finally:
        process.stop()


@dataclass(frozen=True)
class Keys:
    """The fleet's signing key pair."""

    private: Ed25519PrivateKey
    public: Ed25519PublicKey
    public_path: Path


@pytest.fixture()
def keys(tmp_path: Path) -> Keys:
    """A fresh ed25519 key pair."""
    paths = generate_keys(tmp_path / "keys")
    return Keys(load_private_key(paths.private), load_public_key(paths.public), paths.public)


def manifest_fields(version: str = "1") -> dict[str, Any]:
    """Every manifest field except files and signing_key_id (see tests/compiler/test_bundle.py)."""
    return {
        "model": {"name": "m", "version": version},
        "profile": "generic/x86_64",
        "isa": "x86_64",
        "target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
        "runtime": "tvm",
        "runtime_reason": "test",
        "entry": "model.so",
        "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}],
        "toolchain": {"edgeloop": "0.1.0", "tvm": "0.27.0"},
        "tuning": {},
        "source_model": {"format": "onnx", "filename": "m.onnx", "sha256": "0" * 64},
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
    }


BundleFactory = Callable[..., Path]


@pytest.fixture()
def make_bundle(tmp_path: Path, keys: Keys) -> BundleFactory:
    """Seal a bundle with a fake model.so (random bytes); no TVM involved."""

    def make(
        name: str = "bundle", *, version: str = "1", size: int = MODEL_BYTES, key: Any = None
    ) -> Path:
        out = tmp_path / "bundles" / name
        with bundle.staging_dir(out) as staging:
            (staging / "model.so").write_bytes(os.urandom(size))
            (staging / "report.json").write_text('{"ok": true}')
            bundle.seal_bundle(
                staging,
                out,
                manifest_fields=manifest_fields(version),
                private_key=key or keys.private,
            )
        return out

    return make


@pytest.fixture()
def signed_bundle(make_bundle: BundleFactory) -> Path:
    """One sealed 3 MB bundle signed with ``keys``."""
    return make_bundle()


@pytest.fixture()
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Counts scrypt checks (``credentials.verify_secret``) since the last look; they still run."""
    calls = 0
    real = credentials.verify_secret

    def counting(secret: str, stored: str) -> bool:
        nonlocal calls
        calls += 1
        return real(secret, stored)

    monkeypatch.setattr(credentials, "verify_secret", counting)

    def taken() -> int:
        nonlocal calls
        count, calls = calls, 0
        return count

    return taken
