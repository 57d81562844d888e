"""Model store: atomic activation, last-known-good, rollback, anti-rollback ordering."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.slots import ModelStore, SlotError, is_downgrade
from compiler.bundle import read_manifest
from compiler.manifest import artifact_id_of
from tests.agent.bundles import make_bundle


@pytest.mark.parametrize(
    ("installed", "candidate", "older"),
    [
        ("1", "2", False),
        ("2", "1", True),
        ("1.10", "1.9", True),
        ("1.0", "1.0.0", False),
        ("2.0rc1", "2.0", False),
        ("2.0", "2.0rc1", True),
        ("abc", "abc", False),
        ("abc", "abd", True),
        ("1", "abc", True),
    ],
)
def test_is_downgrade(installed: str, candidate: str, older: bool) -> None:
    assert is_downgrade(installed, candidate) is older


def _install(store: ModelStore, tmp: Path, key: Path, version: str) -> str:
    src = make_bundle(tmp / f"b{version}", key, version=version)
    manifest, data = read_manifest(src)
    staged = store.new_staging_dir("t")
    shutil.rmtree(staged)
    shutil.copytree(src, staged)
    aid = artifact_id_of(data)
    store.install(staged, manifest, aid)
    return aid


def test_activate_rollback_prune(tmp_path: Path, signing_key: Path) -> None:
    store = ModelStore(tmp_path / "state")
    v1 = _install(store, tmp_path, signing_key, "1")
    assert store.active("m") is None and store.models() == []
    assert store.activate("m", v1) is None
    v2 = _install(store, tmp_path, signing_key, "2")
    previous = store.activate("m", v2)
    assert previous is not None and previous.artifact_id == v1
    active, lkg = store.active("m"), store.last_known_good("m")
    assert active is not None and active.manifest.model.version == "2"
    assert lkg is not None and lkg.artifact_id == v1
    assert store.rollback("m").artifact_id == v1
    assert store.active("m").artifact_id == v1  # type: ignore[union-attr]
    assert store.last_known_good("m").artifact_id == v2  # type: ignore[union-attr]
    v3 = _install(store, tmp_path, signing_key, "3")
    v4 = _install(store, tmp_path, signing_key, "4")
    store.activate("m", v4)
    removed = store.prune("m", keep=3)
    remaining = {p.name for p in (store.root / "m" / "versions").iterdir()}
    assert {v4, v1} <= remaining and len(remaining) == 3 and len(removed) == 1
    assert v3 in remaining or v2 in remaining
    store.restore("m", store.version("m", v1))
    assert store.active("m").artifact_id == v1  # type: ignore[union-attr]


def test_errors(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    with pytest.raises(SlotError, match="no installed version"):
        store.activate("m", "0" * 64)
    with pytest.raises(SlotError, match="invalid"):
        store.active("../etc")
    (store.root / "m").mkdir()
    with pytest.raises(SlotError, match="no last-known-good"):
        store.rollback("m")


def test_recover_removes_leftovers(tmp_path: Path, signing_key: Path) -> None:
    store = ModelStore(tmp_path / "state")
    v1 = _install(store, tmp_path, signing_key, "1")
    store.activate("m", v1)
    half = store.new_staging_dir("half")
    (half / "model.so").write_bytes(b"partial")
    (store.root / "m" / ".active.tmp123").symlink_to("versions/nowhere")
    # Killed between os.symlink and os.replace: the link points at a real version.
    (store.root / "m" / ".active.tmp456").symlink_to(f"versions/{v1}")
    removed = store.recover()
    assert len(removed) == 3
    assert store.active("m").artifact_id == v1  # type: ignore[union-attr]
    assert (store.root / "m" / "versions" / v1 / "manifest.json").is_file()
    assert not list((store.root / "m").glob(".*.tmp*"))
