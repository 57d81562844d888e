"""Shared fixtures: a clean environment per test, signing keys, and small real models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

_KEEP = {"EDGELOOP_CACHE_DIR"}  # the qemu sysroot cache is shared on purpose (built once)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No EDGELOOP_* setting leaks in; config (keys) lives in the test's tmp dir."""
    for name in list(os.environ):
        if name.startswith("EDGELOOP_") and name not in _KEEP:
            monkeypatch.delenv(name)
    monkeypatch.setenv("EDGELOOP_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("EDGELOOP_TUNING_DB", str(tmp_path / "tuning"))
    yield


@pytest.fixture()
def signing_key(tmp_path: Path) -> Path:
    """A fresh default key pair (in $EDGELOOP_CONFIG_DIR/keys); returns the private key."""
    from compiler.signing import generate_keys

    return generate_keys(tmp_path / "config" / "keys").private
