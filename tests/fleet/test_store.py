"""Artifact store: verified puts, idempotency, atomicity, chunk reads, entitlements, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agent.protocol import chunk_count
from compiler import bundle
from compiler.signing import generate_keys, load_private_key
from fleet import store as store_mod
from fleet.cli import register
from fleet.store import (
    ArtifactConflictError,
    ArtifactNotFoundError,
    ArtifactStore,
    ChunkRangeError,
    InvalidArtifactError,
    InvalidRequestError,
    LocalBlobStore,
    StoreError,
)

from .conftest import BundleFactory, Keys


@pytest.fixture()
def store(tmp_path: Path, keys: Keys) -> Iterator[ArtifactStore]:
    with ArtifactStore(tmp_path / "store", keys.public) as opened:
        yield opened


def _left_behind(root: Path) -> list[str]:
    """Everything in the store's artifacts/ and tmp/ directories."""
    return sorted(
        str(p.relative_to(root))
        for d in ("artifacts", "tmp")
        if (root / d).exists()
        for p in (root / d).rglob("*")
    )


def test_put_stores_transfer_manifest_and_meta(store: ArtifactStore, signed_bundle: Path) -> None:
    stored = store.put_bundle(signed_bundle)
    entry = store.root / "artifacts" / stored.artifact_id
    assert sorted(p.name for p in entry.iterdir()) == [
        "manifest.json",
        "manifest.sig",
        "meta.json",
        "transfer.tar",
    ]
    tar = entry / "transfer.tar"
    assert stored.transfer.sha256 == hashlib.sha256(tar.read_bytes()).hexdigest()
    assert stored.transfer.size == tar.stat().st_size
    assert (entry / "manifest.json").read_bytes() == (signed_bundle / "manifest.json").read_bytes()
    assert stored.signature == (signed_bundle / "manifest.sig").read_bytes()
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["model"] == {"schema_version": 1, "name": "m", "version": "1"}
    assert meta["profile"] == "generic/x86_64"
    assert meta["transfer"]["sha256"] == stored.transfer.sha256
    # The stored tar is exactly pack_bundle() of the bundle, and unpacks to a valid bundle.
    assert bundle.pack_bundle(signed_bundle, store.root / "again.tar") == stored.transfer.sha256
    unpacked = bundle.unpack_bundle(tar, store.root / "unpacked")
    assert bundle.verify_bundle(unpacked, store.public_key).artifact_id == stored.artifact_id
    assert store.get(stored.artifact_id) == stored
    assert store.transfer_info(stored.artifact_id) == stored.transfer
    assert _left_behind(store.root) == sorted(
        f"artifacts/{stored.artifact_id}" + s
        for s in ("", "/manifest.json", "/manifest.sig", "/meta.json", "/transfer.tar")
    )


def test_put_is_idempotent_and_list_sorts_by_age(
    store: ArtifactStore, make_bundle: BundleFactory, keys: Keys
) -> None:
    one = make_bundle("one", version="1")
    first = store.put_bundle(one)
    assert store.put_bundle(one) == first
    # A fresh store instance (no cache) sees the same entry, stored_at unchanged.
    with ArtifactStore(store.root, keys.public) as reopened:
        assert reopened.put_bundle(one).stored_at == first.stored_at
    second = store.put_bundle(make_bundle("two", version="2"))
    assert [a.artifact_id for a in store.list()] == [first.artifact_id, second.artifact_id]
    assert len(list((store.root / "artifacts").iterdir())) == 2


def test_concurrent_puts_of_one_bundle_agree(
    tmp_path: Path, keys: Keys, signed_bundle: Path
) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def put() -> None:
        try:
            with ArtifactStore(tmp_path / "store", keys.public) as s:
                results.append(s.put_bundle(signed_bundle).transfer.sha256)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=put) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(set(results)) == 1 and len(results) == 3
    assert len(list((tmp_path / "store" / "artifacts").iterdir())) == 1
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_put_tar_stores_the_canonical_pack(
    store: ArtifactStore, signed_bundle: Path, tmp_path: Path
) -> None:
    # An uploaded tar packed differently (other order, mtimes, modes) stores the same bytes.
    upload = tmp_path / "upload.tar"
    with tarfile.open(upload, "w", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(signed_bundle.iterdir(), reverse=True):
            tar.add(path, arcname=f"./{path.name}" if path.name == "report.json" else path.name)
    stored = store.put_tar(upload)
    assert stored.transfer.sha256 == bundle.pack_bundle(signed_bundle, tmp_path / "canon.tar")
    assert store.put_bundle(signed_bundle) == stored
    assert len(_left_behind(store.root)) == 5


def _flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: _flip(b / "manifest.sig", 5), "signature does not verify"),
        (lambda b: _flip(b / "model.so"), "'model.so' was modified"),
        (lambda b: (b / "extra.so").write_bytes(b"\x7fELF"), "not listed in its manifest"),
        (lambda b: (b / "report.json").unlink(), "'report.json' listed in the manifest is missing"),
        (lambda b: (b / "manifest.json").unlink(), "no manifest.json"),
    ],
)
def test_bad_bundles_are_refused_and_leave_nothing(
    store: ArtifactStore, signed_bundle: Path, mutate: object, message: str
) -> None:
    mutate(signed_bundle)  # type: ignore[operator]
    with pytest.raises(InvalidArtifactError, match=message) as info:
        store.put_bundle(signed_bundle)
    assert info.value.http_status == 422 and info.value.exit_code == 3
    assert str(signed_bundle) in str(info.value)
    assert _left_behind(store.root) == [] and store.list() == []


def test_bundle_signed_with_another_key_is_refused(
    store: ArtifactStore, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    other = load_private_key(generate_keys(tmp_path / "other").private)
    with pytest.raises(InvalidArtifactError, match="signed with key"):
        store.put_bundle(make_bundle(key=other))
    assert _left_behind(store.root) == []


def test_bad_tars_are_refused_and_leave_nothing(
    store: ArtifactStore, signed_bundle: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.tar"
    bundle.pack_bundle(signed_bundle, truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(InvalidArtifactError):
        store.put_tar(truncated)
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escape.so")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(InvalidArtifactError, match="not a plain file with a safe path"):
        store.put_tar(evil)
    tampered = tmp_path / "tampered.tar"
    _flip(signed_bundle / "model.so")
    bundle.pack_bundle(signed_bundle, tampered)
    with pytest.raises(InvalidArtifactError, match="was modified"):
        store.put_tar(tampered)
    assert _left_behind(store.root) == []
    assert not (tmp_path / "escape.so").exists()


def test_failure_while_committing_leaves_nothing(
    store: ArtifactStore, signed_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: Path) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod, "sha256_file", broken)
    with pytest.raises(OSError, match="No space left"):
        store.put_bundle(signed_bundle)
    assert _left_behind(store.root) == []
    monkeypatch.undo()
    assert store.put_bundle(signed_bundle).artifact_id


def test_bundle_changed_after_verification_is_refused(
    store: ArtifactStore, signed_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pack = store_mod.pack_bundle

    def pack_after_tampering(root: Path, out: Path) -> str:
        _flip(root / "model.so")  # the caller's directory changes between verify and pack
        return real_pack(root, out)

    monkeypatch.setattr(store_mod, "pack_bundle", pack_after_tampering)
    with pytest.raises(InvalidArtifactError, match="changed while it was being stored"):
        store.put_bundle(signed_bundle)
    assert _left_behind(store.root) == []


def test_damaged_entry_is_a_conflict_and_skipped_by_list(
    store: ArtifactStore, signed_bundle: Path, keys: Keys
) -> None:
    stored = store.put_bundle(signed_bundle)
    (store.root / "artifacts" / stored.artifact_id / "meta.json").write_text("{")
    with ArtifactStore(store.root, keys.public) as fresh:
        with pytest.raises(StoreError, match="is damaged"):
            fresh.get(stored.artifact_id)
        assert fresh.list() == []
        with pytest.raises(ArtifactConflictError, match="already in the store") as info:
            fresh.put_bundle(signed_bundle)
        assert info.value.http_status == 409


@pytest.mark.parametrize(
    ("artifact_id", "error", "status"),
    [
        ("ab" * 32, ArtifactNotFoundError, 404),
        ("../../etc", InvalidRequestError, 400),
        ("AB" * 32, InvalidRequestError, 400),
        ("", InvalidRequestError, 400),
    ],
)
def test_get_unknown_or_malformed_id(
    store: ArtifactStore, artifact_id: str, error: type[StoreError], status: int
) -> None:
    with pytest.raises(error, match=f"artifact (id )?'?{artifact_id[:8]}") as info:
        store.get(artifact_id)
    assert type(info.value) is error and info.value.http_status == status


def test_read_chunk_covers_the_file_and_checks_bounds(
    store: ArtifactStore, signed_bundle: Path
) -> None:
    stored = store.put_bundle(signed_bundle)
    data = (store.root / stored.transfer_key).read_bytes()
    size = 64 * 1024
    count = chunk_count(stored.transfer.size, size)
    assert count > 40
    chunks = [store.read_chunk(stored.artifact_id, i, size) for i in range(count)]
    assert b"".join(chunks) == data
    assert len(chunks[-1]) == stored.transfer.size - (count - 1) * size < size
    for bad in (-1, count, 10**9):
        with pytest.raises(
            ChunkRangeError, match=rf"chunk index {bad} is outside 0\.\.{count - 1}"
        ):
            store.read_chunk(stored.artifact_id, bad, size)
    with pytest.raises(ChunkRangeError) as info:
        store.read_chunk(stored.artifact_id, count, size)
    assert info.value.http_status == 416
    for bad_size in (0, -5, 17 * 1024 * 1024):
        with pytest.raises(InvalidRequestError, match=f"chunk size {bad_size} is outside"):
            store.read_chunk(stored.artifact_id, 0, bad_size)
    with pytest.raises(ArtifactNotFoundError):
        store.read_chunk("cd" * 32, 0, size)


def test_descriptor_cache_is_bounded(
    tmp_path: Path, keys: Keys, make_bundle: BundleFactory
) -> None:
    blobs = LocalBlobStore(tmp_path / "store", max_open=1)
    with ArtifactStore(tmp_path / "store", keys.public, blobs=blobs) as store:
        a = store.put_bundle(make_bundle("a", version="1", size=5000))
        b = store.put_bundle(make_bundle("b", version="2", size=5000))
        for _ in range(3):
            for art in (a, b):
                expected = (store.root / art.transfer_key).read_bytes()[1024:2048]
                assert store.read_chunk(art.artifact_id, 1, 1024) == expected
                assert len(blobs._fds) == 1
    assert blobs._fds == {}


def test_entitlements_persist_across_instances(
    store: ArtifactStore, signed_bundle: Path, keys: Keys
) -> None:
    stored = store.put_bundle(signed_bundle)
    aid = stored.artifact_id
    assert not store.is_entitled("dev-a", aid)
    store.grant("dev-a", aid)
    store.grant("dev-a", aid)  # idempotent
    with ArtifactStore(store.root, keys.public) as reopened:
        assert reopened.is_entitled("dev-a", aid)
        assert not reopened.is_entitled("dev-b", aid)
        assert not reopened.is_entitled("not/a/device", aid)
        reopened.revoke("dev-a", aid)
        reopened.revoke("dev-a", aid)
    assert not store.is_entitled("dev-a", aid)
    grants = json.loads((store.root / "grants" / "dev-a.json").read_text())
    assert grants == {"schema_version": 1, "device_id": "dev-a", "artifacts": []}
    with pytest.raises(ArtifactNotFoundError, match="ef" * 32):
        store.grant("dev-a", "ef" * 32)
    with pytest.raises(InvalidRequestError, match="device id 'bad/id' is invalid") as info:
        store.grant("bad/id", aid)
    assert info.value.http_status == 400
    assert sorted(p.name for p in (store.root / "grants").iterdir()) == [".lock", "dev-a.json"]


@pytest.mark.parametrize(
    ("error", "status", "exit_code"),
    [
        (store_mod.StoreError, 500, 1),
        (store_mod.InvalidRequestError, 400, 2),
        (store_mod.ChunkRangeError, 416, 2),
        (store_mod.ArtifactNotFoundError, 404, 2),
        (store_mod.ArtifactConflictError, 409, 1),
        (store_mod.InvalidArtifactError, 422, 3),
    ],
)
def test_store_errors_are_fleet_errors_with_their_mapping(
    error: type[Exception], status: int, exit_code: int
) -> None:
    from fleet.errors import FleetError

    assert issubclass(error, FleetError)
    assert (error.http_status, error.exit_code) == (status, exit_code)  # type: ignore[attr-defined]


def test_batched_grants_one_write_per_artifact(
    store: ArtifactStore, signed_bundle: Path, keys: Keys
) -> None:
    aid = store.put_bundle(signed_bundle).artifact_id
    store.grant("dev-a", aid)  # a single grant first: not "new" for the batch
    new = store.grant_many(["dev-a", "dev-b", "dev-c"], aid)
    assert new == {"dev-b", "dev-c"}
    batch = store.root / "grants" / "artifacts" / f"{aid}.json"
    assert json.loads(batch.read_text())["devices"] == ["dev-a", "dev-b", "dev-c"]
    assert not (store.root / "grants" / "dev-b.json").exists()  # no per-device file written
    with ArtifactStore(store.root, keys.public) as reopened:  # another process, e.g. a responder
        assert all(reopened.is_entitled(d, aid) for d in ("dev-a", "dev-b", "dev-c"))
        assert not reopened.is_entitled("dev-d", aid)
        store.revoke("dev-b", aid)  # a single revoke also withdraws the batched grant
        assert not reopened.is_entitled("dev-b", aid)  # the cache follows the file
    store.revoke_many(["dev-a", "dev-c"], aid)
    assert not any(store.is_entitled(d, aid) for d in ("dev-a", "dev-b", "dev-c"))
    with pytest.raises(InvalidRequestError, match="device id 'bad/id' is invalid"):
        store.grant_many(["dev-e", "bad/id"], aid)
    assert not store.is_entitled("dev-e", aid)  # nothing granted from a bad batch
    with pytest.raises(ArtifactNotFoundError):
        store.grant_many(["dev-e"], "ef" * 32)


# ---------------------------------------------------------------- CLI


def _cli() -> click.Group:
    @click.group()
    def root() -> None:
        pass

    register(root)
    return root


def test_cli_store_put_and_list(tmp_path: Path, keys: Keys, make_bundle: BundleFactory) -> None:
    runner = CliRunner()
    base = ["--store", str(tmp_path / "cli-store"), "--public-key", str(keys.public_path)]
    good = make_bundle("good")
    put = runner.invoke(_cli(), ["fleet", "store", "put", str(good), *base, "--json"])
    assert put.exit_code == 0, put.output
    aid = json.loads(put.stdout)["artifact_id"]
    tar = tmp_path / "good.tar"
    bundle.pack_bundle(good, tar)
    put_tar = runner.invoke(_cli(), ["fleet", "store", "put", str(tar), *base])
    assert put_tar.exit_code == 0 and aid in put_tar.stdout
    listed = runner.invoke(_cli(), ["fleet", "store", "list", *base, "--json"])
    assert listed.exit_code == 0
    assert [a["artifact_id"] for a in json.loads(listed.stdout)] == [aid]
    table = runner.invoke(_cli(), ["fleet", "store", "list", *base])
    assert table.exit_code == 0 and aid[:16] in table.stdout
    bad = make_bundle("bad")
    _flip(bad / "model.so")
    refused = runner.invoke(_cli(), ["fleet", "store", "put", str(bad), *base])
    assert refused.exit_code == 3 and "was modified" in refused.stderr


def test_cli_settings_from_environment(
    tmp_path: Path, keys: Keys, signed_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGELOOP_FLEET_STORE", str(tmp_path / "env-store"))
    monkeypatch.setenv("EDGELOOP_FLEET_PUBLIC_KEY", str(keys.public_path))
    result = CliRunner().invoke(_cli(), ["fleet", "store", "put", str(signed_bundle)])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "env-store" / "artifacts").iterdir())) == 1
    missing_key = CliRunner().invoke(
        _cli(), ["fleet", "store", "list", "--public-key", str(tmp_path / "none.pub")]
    )
    assert missing_key.exit_code == 3 and "does not exist" in missing_key.stderr
