"""Artifact bundles on disk: atomic writing, reading and verification.

A bundle is a directory (layout in docs/artifact-format.md)::

    manifest.json   canonical JSON of compiler.manifest.ArtifactManifest
    manifest.sig    detached ed25519 signature over manifest.json (64 raw bytes)
    report.json     accuracy, latency and tuning report
    model.so | model.onnx   the entry file the runtime loads

Verification order matters: the signature is checked before any other file is hashed or
read, and nothing outside the manifest's file list may be present (a native library is code).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from compiler.errors import ArtifactError, UsageError
from compiler.manifest import (
    MANIFEST_FILE,
    REPORT_FILE,
    SIGNATURE_FILE,
    ArtifactManifest,
    FileEntry,
    artifact_id_of,
)
from compiler.signing import key_id, sign, verify_signature

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def staging_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh directory beside ``out``; on error it is removed, nothing else changes.

    The caller fills it and then calls :func:`seal_bundle`, which moves it into place.

    Raises:
        UsageError: ``out`` exists and ``overwrite`` is false.
    """
    if out.exists() and not overwrite:
        raise UsageError(f"output {str(out)!r} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def file_entries(root: Path) -> list[FileEntry]:
    """Hash every regular file below ``root`` except the manifest and its signature."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in (MANIFEST_FILE, SIGNATURE_FILE):
            continue
        entries.append(FileEntry(path=rel, sha256=sha256_file(path), size=path.stat().st_size))
    return entries


def seal_bundle(
    staging: Path,
    out: Path,
    *,
    manifest_fields: dict[str, Any],
    private_key: Ed25519PrivateKey,
) -> ArtifactManifest:
    """Hash the staged files, write and sign the manifest, and move the bundle to ``out``.

    ``manifest_fields`` holds every manifest field except ``files`` and ``signing_key_id``.
    The move is a rename in the same directory; an existing ``out`` is replaced only after
    the new bundle is complete.
    """
    manifest = ArtifactManifest(
        **manifest_fields,
        files=file_entries(staging),
        signing_key_id=key_id(private_key.public_key()),
    )
    data = manifest.canonical_bytes()
    (staging / MANIFEST_FILE).write_bytes(data)
    (staging / SIGNATURE_FILE).write_bytes(sign(private_key, data))
    for path in staging.iterdir():
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)
    return manifest


@dataclass(frozen=True)
class VerifiedArtifact:
    """A bundle whose signature and every file hash were checked."""

    root: Path
    manifest: ArtifactManifest
    artifact_id: str

    def report(self) -> dict[str, Any]:
        """The parsed report.json (hash already verified)."""
        data: dict[str, Any] = json.loads((self.root / REPORT_FILE).read_text(encoding="utf-8"))
        return data


def read_manifest(root: Path) -> tuple[ArtifactManifest, bytes]:
    """Parse ``manifest.json`` of a bundle without verifying anything else.

    Raises:
        ArtifactError: not a bundle directory, or the manifest does not parse.
    """
    if not root.is_dir():
        raise ArtifactError(f"{str(root)!r} is not an artifact bundle directory")
    try:
        data = (root / MANIFEST_FILE).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(
            f"{str(root)!r} has no {MANIFEST_FILE}; not an artifact bundle"
        ) from None
    try:
        return ArtifactManifest.model_validate_json(data), data
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ArtifactError(
            f"{root / MANIFEST_FILE}: invalid manifest ({err.error_count()} error(s)); "
            f"first: {where}: {first['msg']}"
        ) from err


def verify_bundle(root: Path, public_key: Ed25519PublicKey) -> VerifiedArtifact:
    """Verify signature, then every listed file's size and sha256, then that nothing is extra.

    Raises:
        ArtifactError: naming the first problem found (bad signature, missing, modified or
            unlisted file).
    """
    manifest, data = read_manifest(root)
    try:
        signature = (root / SIGNATURE_FILE).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(
            f"{str(root)!r} has no {SIGNATURE_FILE}; the bundle is unsigned"
        ) from None
    if manifest.signing_key_id != key_id(public_key):
        raise ArtifactError(
            f"artifact was signed with key {manifest.signing_key_id}, "
            f"but the verifying public key is {key_id(public_key)}"
        )
    verify_signature(public_key, data, signature)
    listed = set()
    for entry in manifest.files:
        path = root / entry.path
        listed.add(entry.path)
        if not path.is_file():
            raise ArtifactError(f"file {entry.path!r} listed in the manifest is missing")
        size = path.stat().st_size
        if size != entry.size:
            raise ArtifactError(
                f"file {entry.path!r} has {size} bytes; the manifest says {entry.size}"
            )
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise ArtifactError(
                f"file {entry.path!r} was modified: sha256 {actual} != manifest {entry.sha256}"
            )
    extra = [
        p.relative_to(root).as_posix()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and p.relative_to(root).as_posix() not in listed | {MANIFEST_FILE, SIGNATURE_FILE}
    ]
    if extra:
        raise ArtifactError(f"bundle holds files not listed in its manifest: {', '.join(extra)}")
    return VerifiedArtifact(root=root, manifest=manifest, artifact_id=artifact_id_of(data))


def pack_bundle(root: Path, out: Path) -> str:
    """Write the bundle as a deterministic uncompressed tar (the transfer file); return its sha256.

    Deterministic: members sorted, mtime 0, uid/gid 0, mode 0644, so the same bundle always
    packs to the same bytes and the store can address the tar by content.
    """
    members = sorted(p for p in root.rglob("*") if p.is_file())
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in members:
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size = path.stat().st_size
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    os.replace(tmp, out)
    return sha256_file(out)


def unpack_bundle(tar_path: Path, dest: Path, *, max_bytes: int = 4 << 30) -> Path:
    """Extract a transfer tar into the new directory ``dest``, refusing anything but plain
    files with safe relative paths (no links, devices, absolute paths or '..').

    Raises:
        ArtifactError: a member is unsafe, the tar is damaged, or it unpacks too large.
    """
    dest.mkdir(parents=True)
    total = 0
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                name = member.name
                parts = Path(name).parts
                if not member.isfile() or name.startswith("/") or ".." in parts or not parts:
                    raise ArtifactError(
                        f"transfer file member {name!r} is not a plain file with a safe path"
                    )
                total += member.size
                if total > max_bytes:
                    raise ArtifactError(f"transfer file unpacks to more than {max_bytes} bytes")
                target = dest.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    raise ArtifactError(f"transfer file member {name!r} has no data")
                with source, target.open("wb") as fh:
                    shutil.copyfileobj(source, fh, _CHUNK)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ArtifactError(f"transfer file {tar_path.name} is damaged: {err}") from err
    return dest
