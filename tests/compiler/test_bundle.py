"""Manifest, signing and bundle verification: tampering of any kind is caught."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from compiler import bundle
from compiler.errors import ArtifactError, InvalidInputError, UsageError
from compiler.manifest import ArtifactManifest, artifact_id_of, canonical_json
from compiler.signing import generate_keys, key_id, load_private_key, load_public_key
from edgeloop.cli import cli


def _fields() -> dict[str, Any]:
    return {
        "model": {"name": "m", "version": "3"},
        "profile": "generic/x86_64",
        "isa": "x86_64",
        "target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"},
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


@pytest.fixture()
def keys(tmp_path: Path) -> Any:
    return generate_keys(tmp_path / "keys")


@pytest.fixture()
def sealed(tmp_path: Path, keys: Any) -> Path:
    out = tmp_path / "artifact"
    with bundle.staging_dir(out) as staging:
        (staging / "model.so").write_bytes(os.urandom(4096))
        (staging / "report.json").write_text('{"ok": true}')
        bundle.seal_bundle(
            staging, out, manifest_fields=_fields(), private_key=load_private_key(keys.private)
        )
    return out


def test_sealed_bundle_verifies_and_id_is_manifest_hash(sealed: Path, keys: Any) -> None:
    verified = bundle.verify_bundle(sealed, load_public_key(keys.public))
    data = (sealed / "manifest.json").read_bytes()
    assert verified.artifact_id == artifact_id_of(data) == verified.manifest.artifact_id
    assert data == canonical_json(json.loads(data))
    assert {f.path for f in verified.manifest.files} == {"model.so", "report.json"}
    assert verified.report() == {"ok": True}
    assert not [p for p in sealed.parent.iterdir() if ".staging-" in p.name]


def _flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: _flip(b / "model.so"), "file 'model.so' was modified"),
        (lambda b: _flip(b / "manifest.json", 40), "manifest"),
        (lambda b: _flip(b / "manifest.sig", 5), "signature does not verify"),
        (lambda b: (b / "report.json").unlink(), "'report.json' listed in the manifest is missing"),
        (lambda b: (b / "manifest.sig").unlink(), "unsigned"),
        (lambda b: (b / "manifest.json").unlink(), "no manifest.json"),
        (
            lambda b: (b / "extra.so").write_bytes(b"\x7fELF"),
            "not listed in its manifest: extra.so",
        ),
        (lambda b: (b / "model.so").write_bytes(b"short"), "has 5 bytes"),
    ],
)
def test_tampering_is_detected(sealed: Path, keys: Any, mutate: Any, message: str) -> None:
    mutate(sealed)
    with pytest.raises(ArtifactError, match=message):
        bundle.verify_bundle(sealed, load_public_key(keys.public))


def test_re_signed_manifest_with_other_key_is_rejected(
    sealed: Path, keys: Any, tmp_path: Path
) -> None:
    other = generate_keys(tmp_path / "other")
    with pytest.raises(ArtifactError, match="signed with key"):
        bundle.verify_bundle(sealed, load_public_key(other.public))
    # An attacker who rewrites the key id and re-signs still fails against the real key.
    manifest = json.loads((sealed / "manifest.json").read_bytes())
    attacker = load_private_key(other.private)
    manifest["signing_key_id"] = key_id(load_public_key(keys.public))
    data = canonical_json(manifest)
    (sealed / "manifest.json").write_bytes(data)
    (sealed / "manifest.sig").write_bytes(attacker.sign(data))
    with pytest.raises(ArtifactError, match="signature does not verify"):
        bundle.verify_bundle(sealed, load_public_key(keys.public))


def test_staging_failure_leaves_nothing_and_keeps_existing(sealed: Path, keys: Any) -> None:
    before = {p.name: p.read_bytes() for p in sealed.iterdir()}
    with pytest.raises(UsageError, match="already exists"):
        with bundle.staging_dir(sealed):
            pass
    with pytest.raises(RuntimeError):
        with bundle.staging_dir(sealed, overwrite=True) as staging:
            (staging / "model.so").write_bytes(b"new")
            raise RuntimeError("compile failed")
    assert {p.name: p.read_bytes() for p in sealed.iterdir()} == before
    assert sorted(p.name for p in sealed.parent.iterdir()) == sorted(["artifact", "keys"])


def test_manifest_rejects_unknown_fields_and_versions() -> None:
    ArtifactManifest(**_fields(), files=[], signing_key_id="0" * 16)
    with pytest.raises(ValueError):
        ArtifactManifest(**_fields(), files=[], signing_key_id="0" * 16, surprise=1)
    with pytest.raises(ValueError):
        ArtifactManifest(**{**_fields(), "schema_version": 2}, files=[], signing_key_id="0" * 16)


def test_key_generation_refuses_overwrite_and_bad_keys(tmp_path: Path) -> None:
    paths = generate_keys(tmp_path / "k")
    assert oct(paths.private.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(UsageError, match="already exists"):
        generate_keys(tmp_path / "k")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(InvalidInputError, match="not a PEM private key"):
        load_private_key(garbage)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_private_key(tmp_path / "none.pem")
    assert (
        load_public_key(paths.private).public_bytes_raw()
        == load_public_key(paths.public).public_bytes_raw()
    )


def test_cli_keys_and_artifact_verify(sealed: Path, keys: Any, tmp_path: Path) -> None:
    runner = CliRunner()
    generated = runner.invoke(cli, ["keys", "generate"])
    assert generated.exit_code == 0, generated.output
    assert (tmp_path / "config" / "keys" / "signing-key.pem").exists()
    again = runner.invoke(cli, ["keys", "generate"])
    assert again.exit_code == 2 and "--force" in again.stderr
    ok = runner.invoke(cli, ["artifact", "verify", str(sealed), "--public-key", str(keys.public)])
    assert ok.exit_code == 0, ok.stderr
    assert "verified" in ok.output
    wrong = runner.invoke(cli, ["artifact", "verify", str(sealed)])  # default key differs
    assert wrong.exit_code == 3 and "signed with key" in wrong.stderr
    inspected = runner.invoke(cli, ["artifact", "inspect", str(sealed), "--json"])
    assert inspected.exit_code == 0
    assert json.loads(inspected.stdout)["manifest"]["model"] == {"name": "m", "version": "3"}
    _flip(sealed / "model.so")
    tampered = runner.invoke(
        cli, ["artifact", "verify", str(sealed), "--public-key", str(keys.public)]
    )
    assert tampered.exit_code == 3 and "was modified" in tampered.stderr
    missing = runner.invoke(
        cli, ["artifact", "verify", str(tmp_path / "nope"), "--public-key", str(keys.public)]
    )
    assert missing.exit_code == 3 and "not an artifact bundle" in missing.stderr


def test_pack_is_deterministic_and_unpack_round_trips(
    sealed: Path, keys: Any, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    digest = bundle.pack_bundle(sealed, a)
    os.utime(sealed / "model.so", (1, 1))
    assert bundle.pack_bundle(sealed, b) == digest
    assert a.read_bytes() == b.read_bytes()
    out = bundle.unpack_bundle(a, tmp_path / "unpacked")
    assert bundle.verify_bundle(out, load_public_key(keys.public)).manifest.model.version == "3"


@pytest.mark.parametrize("kind", ["symlink", "parent", "absolute"])
def test_unpack_refuses_unsafe_members(kind: str, tmp_path: Path) -> None:
    import io
    import tarfile

    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        if kind == "symlink":
            info = tarfile.TarInfo("model.so")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            name = "../escape.so" if kind == "parent" else "/tmp/abs.so"
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(ArtifactError, match="not a plain file with a safe path"):
        bundle.unpack_bundle(path, tmp_path / "dest")
    assert not (tmp_path / "escape.so").exists()


def test_unpack_truncated_tar_never_verifies(sealed: Path, keys: Any, tmp_path: Path) -> None:
    tar = tmp_path / "t.tar"
    bundle.pack_bundle(sealed, tar)
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(ArtifactError):
        bundle.verify_bundle(
            bundle.unpack_bundle(tar, tmp_path / "dest"), load_public_key(keys.public)
        )
