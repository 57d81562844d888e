"""Content-addressed artifact store and device entitlements (local directory backend).

An artifact is stored under its id (the sha256 of its manifest) as the deterministic
transfer tar that devices download in chunks, with its manifest, signature and a small
``meta.json`` beside it::

    <root>/artifacts/<artifact_id>/transfer.tar   pack_bundle() of the verified bundle
    <root>/artifacts/<artifact_id>/manifest.json  the manifest bytes as signed
    <root>/artifacts/<artifact_id>/manifest.sig   the detached ed25519 signature
    <root>/artifacts/<artifact_id>/meta.json      ArtifactMeta (transfer sha256/size, ...)
    <root>/grants/<device_id>.json                artifact ids the device may download
    <root>/grants/artifacts/<artifact_id>.json    devices granted it in batches (a rollout
                                                  wave: one write, not one per device)
    <root>/tmp/                                   staging; a put is renamed into place

Storage sits behind the small :class:`BlobStore` Protocol (:class:`LocalBlobStore` here,
an S3-compatible one later: ``meta.json`` is written last, so "meta exists" is the commit
marker there) and entitlements behind :class:`Entitlements` (:class:`FileEntitlements`
here, the fleet database later).

Errors (``http_status`` for the fleet API, ``exit_code`` for the CLI), under the fleet's root
:class:`fleet.errors.FleetError` (so the API's one handler and the CLI's map them too)::

    StoreError (500, exit 1): a damaged store entry, an I/O failure
    ├── InvalidRequestError (400, exit 2): malformed artifact id, device id or chunk size
    │   └── ChunkRangeError (416, exit 2): chunk index outside the artifact
    ├── ArtifactNotFoundError (404, exit 2): no artifact with that id
    ├── ArtifactConflictError (409, exit 1): an entry with that id exists but is damaged
    └── InvalidArtifactError (422, exit 3): the bundle or tar fails verification
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.protocol import ModelVersion, ProtocolError, TransferInfo, check_device_id, chunk_count
from compiler.bundle import (
    VerifiedArtifact,
    pack_bundle,
    sha256_file,
    unpack_bundle,
    verify_bundle,
)
from compiler.errors import ArtifactError
from compiler.manifest import MANIFEST_FILE, SIGNATURE_FILE, ArtifactManifest, artifact_id_of
from compiler.signing import verify_signature
from fleet.errors import FleetError

log = logging.getLogger(__name__)

TRANSFER_FILE = "transfer.tar"
META_FILE = "meta.json"
MAX_CHUNK_SIZE = 16 * 1024 * 1024
_ARTIFACT_ID_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_BLOCK = 1 << 20


# ---------------------------------------------------------------- errors


class StoreError(FleetError):
    """Root of the store's errors: a damaged entry or an I/O failure."""


class InvalidRequestError(StoreError):
    """A malformed argument: artifact id, device id or chunk size."""

    http_status = 400
    exit_code = 2


class ChunkRangeError(InvalidRequestError):
    """A chunk index outside the artifact's chunks."""

    http_status = 416


class ArtifactNotFoundError(StoreError):
    """No artifact with the given id is stored."""

    http_status = 404
    exit_code = 2


class ArtifactConflictError(StoreError):
    """An entry with the id exists but does not match what the id promises."""

    http_status = 409


class InvalidArtifactError(StoreError):
    """A bundle or transfer tar that fails verification."""

    http_status = 422
    exit_code = 3


def check_artifact_id(artifact_id: str) -> str:
    """Return ``artifact_id`` if it is 64 lowercase hex digits, else raise InvalidRequestError."""
    if not _ARTIFACT_ID_RE.match(artifact_id):
        raise InvalidRequestError(
            f"artifact id {artifact_id!r} is invalid; expected 64 lowercase hex digits "
            "(the sha256 of the manifest)"
        )
    return artifact_id


def _device(device_id: str) -> str:
    try:
        return check_device_id(device_id)
    except ProtocolError as err:
        raise InvalidRequestError(str(err)) from err


# ---------------------------------------------------------------- blob storage


class BlobStore(Protocol):
    """Where the store's bytes live; keys are ``/``-separated relative paths."""

    def staging(self) -> contextlib.AbstractContextManager[Path]:
        """A fresh local scratch directory, removed when the context exits."""
        ...

    def publish(self, prefix: str, staged: Path) -> bool:
        """Make every file of ``staged`` visible under ``prefix`` at once.

        Returns False (and publishes nothing) if ``prefix`` already exists.
        """
        ...

    def exists(self, key: str) -> bool:
        """Whether an object (or a published prefix) exists."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """A whole (small) object; FileNotFoundError if missing."""
        ...

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``; StoreError if the object is shorter."""
        ...

    def children(self, prefix: str) -> list[str]:
        """Names directly below ``prefix``, sorted."""
        ...

    def close(self) -> None:
        """Release open handles."""
        ...


class LocalBlobStore:
    """A :class:`BlobStore` in a local directory; publishing is one ``rename``.

    Reads use ``os.pread`` on file descriptors kept in a bounded LRU cache, so serving a
    chunk does not reopen the file. The cache lock is held across the ``pread`` so that an
    evicted descriptor is never closed (and its number reused) under a concurrent read.
    """

    def __init__(self, root: Path, *, max_open: int = 32, stale_staging_s: float = 3600.0) -> None:
        """Create the directory layout and remove staging left by crashed writers."""
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        self.root = root
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._max_open = max_open
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        cutoff = time.time() - stale_staging_s
        for old in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                if old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise InvalidRequestError(f"blob key {key!r} is not a safe relative path")
        return self.root.joinpath(*parts)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh directory under ``<root>/tmp`` (same filesystem, so rename is atomic)."""
        path = Path(tempfile.mkdtemp(prefix="put-", dir=self._tmp))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish(self, prefix: str, staged: Path) -> bool:
        """fsync the staged files, then rename the directory to ``prefix``."""
        target = self._path(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        for path in staged.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            return False
        try:
            os.rename(staged, target)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return False
            raise
        _fsync_dir(target.parent)
        return True

    def exists(self, key: str) -> bool:
        """Whether the file or directory exists."""
        return self._path(key).exists()

    def read_bytes(self, key: str) -> bytes:
        """The whole file."""
        return self._path(key).read_bytes()

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """``pread`` through the descriptor cache."""
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                fd = os.open(self._path(key), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                self._fds[key] = fd
                while len(self._fds) > self._max_open:
                    _, old = self._fds.popitem(last=False)
                    os.close(old)
            else:
                self._fds.move_to_end(key)
            data = os.pread(fd, length, offset)
        if len(data) != length:
            raise StoreError(
                f"blob {key!r} is truncated: read {len(data)} of {length} bytes at offset {offset}"
            )
        return data

    def children(self, prefix: str) -> list[str]:
        """Entry names of the directory ``prefix`` (empty if it does not exist)."""
        path = self._path(prefix)
        if not path.is_dir():
            return []
        return sorted(p.name for p in path.iterdir())

    def close(self) -> None:
        """Close every cached descriptor."""
        with self._lock:
            while self._fds:
                _, fd = self._fds.popitem()
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- entitlements


class Entitlements(Protocol):
    """Which devices may download which artifacts."""

    def grant(self, device_id: str, artifact_id: str) -> None:
        """Allow ``device_id`` to download ``artifact_id`` (idempotent)."""
        ...

    def revoke(self, device_id: str, artifact_id: str) -> None:
        """Withdraw the grant (idempotent)."""
        ...

    def is_entitled(self, device_id: str, artifact_id: str) -> bool:
        """Whether the grant exists."""
        ...

    def grant_many(self, device_ids: Sequence[str], artifact_id: str) -> set[str]:
        """Allow every device to download ``artifact_id``; returns those not allowed before."""
        ...

    def revoke_many(self, device_ids: Sequence[str], artifact_id: str) -> None:
        """Withdraw the grants of ``artifact_id`` to every device (idempotent)."""
        ...


class _Grants(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    device_id: str
    artifacts: list[str]


class _ArtifactGrants(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    artifact_id: str
    devices: list[str]


class FileEntitlements:
    """:class:`Entitlements` as JSON files replaced atomically: one per device for single
    grants, one per artifact for batches (a device is entitled if either lists the pair).

    Writers serialise on an ``flock`` of ``.lock`` (several CLI processes may grant at
    once); readers need no lock because every file is replaced by rename. Per-artifact
    files are cached by (mtime, size, inode), so the responder's check per request parses
    a file only after it changed.
    """

    def __init__(self, directory: Path) -> None:
        """Use (and create) ``directory``."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.by_artifact = directory / "artifacts"  # created by the first batch
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int, int], frozenset[str]]] = {}
        self._cache_lock = threading.Lock()

    def _artifact_file(self, artifact_id: str) -> Path:
        return self.by_artifact / f"{check_artifact_id(artifact_id)}.json"

    def devices(self, artifact_id: str) -> frozenset[str]:
        """Devices granted ``artifact_id`` in batches (see :meth:`grant_many`).

        Raises:
            InvalidRequestError: the artifact id is malformed.
            StoreError: the grants file is damaged.
        """
        path = self._artifact_file(artifact_id)
        try:
            st = path.stat()
        except FileNotFoundError:
            return frozenset()
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._cache_lock:
            cached = self._cache.get(artifact_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            devices = frozenset(_ArtifactGrants.model_validate_json(path.read_bytes()).devices)
        except FileNotFoundError:
            return frozenset()
        except ValidationError as err:
            raise StoreError(f"grants file {str(path)!r} is damaged: {err}") from err
        with self._cache_lock:
            self._cache[artifact_id] = (key, devices)
        return devices

    def _update_many(self, device_ids: Sequence[str], artifact_id: str, *, add: bool) -> set[str]:
        wanted_ids = {_device(d) for d in device_ids}
        path = self._artifact_file(artifact_id)
        self.by_artifact.mkdir(exist_ok=True)
        with self._locked():
            current = set(self.devices(artifact_id))
            if add:
                changed = {d for d in wanted_ids - current if not self._single(d, artifact_id)}
                wanted = current | wanted_ids
            else:
                changed = current & wanted_ids
                wanted = current - wanted_ids
                for device_id in wanted_ids:
                    self._update_locked(device_id, artifact_id, add=False)
            if wanted != current:
                grants = _ArtifactGrants(artifact_id=artifact_id, devices=sorted(wanted))
                _atomic_write(path, grants.model_dump_json().encode())
        return changed

    def grant_many(self, device_ids: Sequence[str], artifact_id: str) -> set[str]:
        """Grant ``artifact_id`` to every device in one write; returns the newly entitled.

        Raises:
            InvalidRequestError: a malformed device or artifact id (nothing is granted).
        """
        return self._update_many(device_ids, artifact_id, add=True)

    def revoke_many(self, device_ids: Sequence[str], artifact_id: str) -> None:
        """Withdraw every device's grant of ``artifact_id`` (single and batched).

        Raises:
            InvalidRequestError: a malformed device or artifact id.
        """
        self._update_many(device_ids, artifact_id, add=False)

    def _single(self, device_id: str, artifact_id: str) -> bool:
        return artifact_id in self.granted(device_id)

    def _file(self, device_id: str) -> Path:
        return self.directory / f"{_device(device_id)}.json"

    def granted(self, device_id: str) -> list[str]:
        """The artifact ids the device may download, sorted.

        Raises:
            InvalidRequestError: the device id is malformed.
            StoreError: the grants file is damaged.
        """
        path = self._file(device_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            return _Grants.model_validate_json(data).artifacts
        except ValidationError as err:
            raise StoreError(f"grants file {str(path)!r} is damaged: {err}") from err

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock, (self.directory / ".lock").open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _update(self, device_id: str, artifact_id: str, *, add: bool) -> None:
        check_artifact_id(artifact_id)
        with self._locked():
            self._update_locked(device_id, artifact_id, add=add)
            if not add and device_id in self.devices(artifact_id):
                batch = self.devices(artifact_id) - {device_id}
                grants = _ArtifactGrants(artifact_id=artifact_id, devices=sorted(batch))
                _atomic_write(self._artifact_file(artifact_id), grants.model_dump_json().encode())

    def _update_locked(self, device_id: str, artifact_id: str, *, add: bool) -> None:
        current = set(self.granted(device_id))
        wanted = current | {artifact_id} if add else current - {artifact_id}
        if wanted == current:
            return
        grants = _Grants(device_id=device_id, artifacts=sorted(wanted))
        _atomic_write(self._file(device_id), grants.model_dump_json(indent=2).encode())

    def grant(self, device_id: str, artifact_id: str) -> None:
        """Add the grant.

        Raises:
            InvalidRequestError: a malformed device or artifact id.
        """
        self._update(device_id, artifact_id, add=True)

    def revoke(self, device_id: str, artifact_id: str) -> None:
        """Remove the grant.

        Raises:
            InvalidRequestError: a malformed device or artifact id.
        """
        self._update(device_id, artifact_id, add=False)

    def is_entitled(self, device_id: str, artifact_id: str) -> bool:
        """Whether the grant exists (single or batched); False for malformed ids."""
        try:
            return artifact_id in self.granted(device_id) or device_id in self.devices(artifact_id)
        except InvalidRequestError:
            return False


# ---------------------------------------------------------------- artifacts


class ArtifactMeta(BaseModel):
    """``meta.json`` of a stored artifact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    artifact_id: str
    transfer: TransferInfo
    model: ModelVersion
    profile: str
    signing_key_id: str
    stored_at: datetime


@dataclass(frozen=True)
class StoredArtifact:
    """An artifact as stored: its manifest, signature and transfer file description."""

    artifact_id: str
    manifest: ArtifactManifest
    signature: bytes
    meta: ArtifactMeta
    transfer_key: str

    @property
    def transfer(self) -> TransferInfo:
        """sha256 and size of the transfer tar."""
        return self.meta.transfer

    @property
    def model(self) -> ModelVersion:
        """Model name and version."""
        return self.meta.model

    @property
    def profile(self) -> str:
        """The hardware profile it was built for."""
        return self.meta.profile

    @property
    def stored_at(self) -> datetime:
        """When it was stored."""
        return self.meta.stored_at

    @property
    def signature_b64(self) -> str:
        """The manifest signature, base64 (as ``JobNotify.signature``)."""
        return base64.b64encode(self.signature).decode()


def _prefix(artifact_id: str) -> str:
    return f"artifacts/{artifact_id}"


class ArtifactStore:
    """Verified, content-addressed artifacts and the grants that let devices fetch them."""

    def __init__(
        self,
        root: Path,
        public_key: Ed25519PublicKey,
        *,
        blobs: BlobStore | None = None,
        entitlements: Entitlements | None = None,
    ) -> None:
        """Open (and create) a store.

        Args:
            root: directory of the local store (blobs and grants default to it).
            public_key: the fleet's signing key; only bundles it verifies are stored.
            blobs: storage backend (default :class:`LocalBlobStore` on ``root``).
            entitlements: grants backend (default :class:`FileEntitlements` in ``root/grants``).
        """
        self.root = root
        self.public_key = public_key
        self.blobs: BlobStore = blobs or LocalBlobStore(root)
        self.entitlements: Entitlements = entitlements or FileEntitlements(root / "grants")
        self._cache: dict[str, StoredArtifact] = {}
        self._cache_lock = threading.Lock()

    def __enter__(self) -> ArtifactStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release open file descriptors."""
        self.blobs.close()

    # ------------------------------------------------------------ put

    def put_bundle(self, bundle_dir: Path) -> StoredArtifact:
        """Verify a bundle directory and store it; idempotent for the same artifact id.

        Args:
            bundle_dir: a sealed bundle (manifest.json, manifest.sig and its files).

        Returns:
            The stored artifact (the existing one if it was already stored).

        Raises:
            InvalidArtifactError: the signature, a file hash or the file list is wrong, or the
                bundle changed while it was being stored.
            ArtifactConflictError: an entry with the same id exists but is damaged.
        """
        verified = self._verify(bundle_dir, source=str(bundle_dir))
        existing = self._existing(verified.artifact_id)
        if existing is not None:
            return existing
        manifest_bytes = (bundle_dir / MANIFEST_FILE).read_bytes()
        signature = (bundle_dir / SIGNATURE_FILE).read_bytes()
        with self.blobs.staging() as staged:
            tar = staged / TRANSFER_FILE
            pack_bundle(bundle_dir, tar)
            # The directory is the caller's: make sure the tar holds what was verified.
            self._check_packed(tar, verified, manifest_bytes, signature)
            return self._commit(staged, verified, manifest_bytes, signature)

    def put_tar(self, tar_path: Path) -> StoredArtifact:
        """Store an uploaded transfer tar: unpack, verify, and store its canonical pack.

        Raises:
            InvalidArtifactError: the tar is unsafe, damaged or its bundle fails verification.
            ArtifactConflictError: an entry with the same id exists but is damaged.
        """
        with self.blobs.staging() as staged:
            unpacked = staged / "bundle"
            try:
                unpack_bundle(tar_path, unpacked)
            except ArtifactError as err:
                raise InvalidArtifactError(str(err)) from err
            verified = self._verify(unpacked, source=str(tar_path))
            existing = self._existing(verified.artifact_id)
            if existing is not None:
                return existing
            manifest_bytes = (unpacked / MANIFEST_FILE).read_bytes()
            signature = (unpacked / SIGNATURE_FILE).read_bytes()
            entry = staged / "entry"
            entry.mkdir()
            pack_bundle(unpacked, entry / TRANSFER_FILE)
            shutil.rmtree(unpacked)
            return self._commit(entry, verified, manifest_bytes, signature)

    def _verify(self, bundle_dir: Path, *, source: str) -> VerifiedArtifact:
        try:
            return verify_bundle(bundle_dir, self.public_key)
        except ArtifactError as err:
            raise InvalidArtifactError(f"{source!r} was refused: {err}") from err

    def _existing(self, artifact_id: str) -> StoredArtifact | None:
        if not self.blobs.exists(_prefix(artifact_id)):
            return None
        try:
            return self.get(artifact_id)
        except StoreError as err:
            raise ArtifactConflictError(
                f"artifact {artifact_id} is already in the store but its entry is damaged "
                f"({err}); remove {_prefix(artifact_id)!r} from the store and put it again"
            ) from err

    def _check_packed(
        self, tar: Path, verified: VerifiedArtifact, manifest_bytes: bytes, signature: bytes
    ) -> None:
        def changed(what: str) -> InvalidArtifactError:
            return InvalidArtifactError(
                f"bundle {str(verified.root)!r} changed while it was being stored: {what}"
            )

        if artifact_id_of(manifest_bytes) != verified.artifact_id:
            raise changed(MANIFEST_FILE)
        try:
            verify_signature(self.public_key, manifest_bytes, signature)
        except ArtifactError as err:
            raise changed(f"{SIGNATURE_FILE}: {err}") from err
        expected = {entry.path: entry.sha256 for entry in verified.manifest.files}
        expected[MANIFEST_FILE] = hashlib.sha256(manifest_bytes).hexdigest()
        expected[SIGNATURE_FILE] = hashlib.sha256(signature).hexdigest()
        seen: set[str] = set()
        with tarfile.open(tar, "r:") as archive:
            for member in archive:
                source = archive.extractfile(member)
                if source is None or member.name not in expected:
                    raise changed(f"unexpected member {member.name!r}")
                digest = hashlib.sha256()
                with source:
                    while block := source.read(_HASH_BLOCK):
                        digest.update(block)
                if digest.hexdigest() != expected[member.name]:
                    raise changed(f"{member.name!r} does not match its verified sha256")
                seen.add(member.name)
        if missing := sorted(set(expected) - seen):
            raise changed(f"missing {', '.join(missing)}")

    def _commit(
        self, staged: Path, verified: VerifiedArtifact, manifest_bytes: bytes, signature: bytes
    ) -> StoredArtifact:
        tar = staged / TRANSFER_FILE
        manifest = verified.manifest
        meta = ArtifactMeta(
            artifact_id=verified.artifact_id,
            transfer=TransferInfo(sha256=sha256_file(tar), size=tar.stat().st_size),
            model=ModelVersion(name=manifest.model.name, version=manifest.model.version),
            profile=manifest.profile,
            signing_key_id=manifest.signing_key_id,
            stored_at=datetime.now(UTC),
        )
        (staged / MANIFEST_FILE).write_bytes(manifest_bytes)
        (staged / SIGNATURE_FILE).write_bytes(signature)
        (staged / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
        if self.blobs.publish(_prefix(verified.artifact_id), staged):
            log.info("stored artifact %s (%d bytes)", verified.artifact_id, meta.transfer.size)
        else:
            log.info("artifact %s was stored concurrently; keeping that", verified.artifact_id)
        return self.get(verified.artifact_id)

    # ------------------------------------------------------------ read

    def get(self, artifact_id: str) -> StoredArtifact:
        """The stored artifact ``artifact_id``.

        Raises:
            InvalidRequestError: the id is not 64 hex digits.
            ArtifactNotFoundError: no such artifact.
            StoreError: its entry is damaged.
        """
        check_artifact_id(artifact_id)
        with self._cache_lock:
            cached = self._cache.get(artifact_id)
        if cached is not None:
            return cached
        prefix = _prefix(artifact_id)
        try:
            meta_bytes = self.blobs.read_bytes(f"{prefix}/{META_FILE}")
        except FileNotFoundError:
            raise ArtifactNotFoundError(
                f"no artifact {artifact_id} in the store at {str(self.root)!r}; "
                "list them with 'edgeloop fleet store list'"
            ) from None
        try:
            meta = ArtifactMeta.model_validate_json(meta_bytes)
            manifest_bytes = self.blobs.read_bytes(f"{prefix}/{MANIFEST_FILE}")
            signature = self.blobs.read_bytes(f"{prefix}/{SIGNATURE_FILE}")
            manifest = ArtifactManifest.model_validate_json(manifest_bytes)
        except (OSError, ValidationError) as err:
            raise StoreError(f"store entry {prefix!r} is damaged: {err}") from err
        if artifact_id_of(manifest_bytes) != artifact_id or meta.artifact_id != artifact_id:
            raise StoreError(f"store entry {prefix!r} does not hold artifact {artifact_id}")
        stored = StoredArtifact(
            artifact_id=artifact_id,
            manifest=manifest,
            signature=signature,
            meta=meta,
            transfer_key=f"{prefix}/{TRANSFER_FILE}",
        )
        with self._cache_lock:
            self._cache[artifact_id] = stored
        return stored

    def list(self) -> list[StoredArtifact]:
        """Every stored artifact, oldest first; damaged entries are logged and skipped."""
        found = []
        for name in self.blobs.children("artifacts"):
            if not _ARTIFACT_ID_RE.match(name):
                continue
            try:
                found.append(self.get(name))
            except StoreError as err:
                log.warning("skipping %s: %s", name, err)
        return sorted(found, key=lambda a: (a.stored_at, a.artifact_id))

    def transfer_info(self, artifact_id: str) -> TransferInfo:
        """sha256 and size of the artifact's transfer tar.

        Raises:
            ArtifactNotFoundError: no such artifact.
        """
        return self.get(artifact_id).transfer

    def read_chunk(self, artifact_id: str, index: int, chunk_size: int) -> bytes:
        """Chunk ``index`` of the transfer tar cut into ``chunk_size`` pieces (last may be short).

        Raises:
            InvalidRequestError: ``chunk_size`` outside 1..MAX_CHUNK_SIZE.
            ChunkRangeError: ``index`` outside 0..count-1.
            ArtifactNotFoundError: no such artifact.
        """
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidRequestError(
                f"chunk size {chunk_size} is outside the allowed 1..{MAX_CHUNK_SIZE} bytes"
            )
        stored = self.get(artifact_id)
        size = stored.transfer.size
        count = chunk_count(size, chunk_size)
        if not 0 <= index < count:
            raise ChunkRangeError(
                f"chunk index {index} is outside 0..{count - 1} of artifact {artifact_id} "
                f"({size} bytes in chunks of {chunk_size})"
            )
        offset = index * chunk_size
        return self.blobs.read_range(stored.transfer_key, offset, min(chunk_size, size - offset))

    # ------------------------------------------------------------ entitlements

    def grant(self, device_id: str, artifact_id: str) -> None:
        """Let ``device_id`` download ``artifact_id``.

        Raises:
            InvalidRequestError: a malformed device id.
            ArtifactNotFoundError: the artifact is not stored.
        """
        _device(device_id)
        self.get(artifact_id)
        self.entitlements.grant(device_id, artifact_id)

    def revoke(self, device_id: str, artifact_id: str) -> None:
        """Withdraw the grant (idempotent).

        Raises:
            InvalidRequestError: a malformed device or artifact id.
        """
        _device(device_id)
        check_artifact_id(artifact_id)
        self.entitlements.revoke(device_id, artifact_id)

    def is_entitled(self, device_id: str, artifact_id: str) -> bool:
        """Whether ``device_id`` may download ``artifact_id``."""
        return self.entitlements.is_entitled(device_id, artifact_id)

    def grant_many(self, device_ids: Sequence[str], artifact_id: str) -> set[str]:
        """Let every device download ``artifact_id``, in one write; returns the devices that
        were not entitled before (what a failed publish should withdraw).

        Raises:
            InvalidRequestError: a malformed device id (nothing is granted).
            ArtifactNotFoundError: the artifact is not stored.
        """
        self.get(artifact_id)
        return self.entitlements.grant_many(device_ids, artifact_id)

    def revoke_many(self, device_ids: Sequence[str], artifact_id: str) -> None:
        """Withdraw the grants (idempotent).

        Raises:
            InvalidRequestError: a malformed device or artifact id.
        """
        check_artifact_id(artifact_id)
        self.entitlements.revoke_many(device_ids, artifact_id)


def describe(stored: StoredArtifact) -> dict[str, object]:
    """A JSON-ready summary of a stored artifact (CLI ``--json``, future API)."""
    return {
        "artifact_id": stored.artifact_id,
        "model": {"name": stored.model.name, "version": stored.model.version},
        "profile": stored.profile,
        "runtime": stored.manifest.runtime,
        "transfer": {"sha256": stored.transfer.sha256, "size": stored.transfer.size},
        "stored_at": stored.stored_at.isoformat(),
    }
