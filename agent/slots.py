"""The agent's models on disk: verified versions, the active one, the last known good.

Layout under ``<state>/models/<name>/``::

    versions/<artifact_id>/   a verified bundle, moved here whole by rename
    active -> versions/<id>   symlink, replaced atomically (os.replace) to swap
    last-known-good -> ...    the previous active version, for rollback

A version directory only ever appears by ``rename`` of a completely written, verified
staging directory, and ``active`` only ever changes by ``os.replace`` of a symlink, so a
crash at any point leaves ``active`` pointing at the old or the new version, never at a
partial one. Leftover staging directories are removed at start-up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from compiler.bundle import read_manifest
from compiler.manifest import ArtifactManifest

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ACTIVE = "active"
LAST_KNOWN_GOOD = "last-known-good"


class SlotError(Exception):
    """A model-store operation that cannot be done (the message says why)."""


def version_key(version: str) -> tuple[int, Version | str]:
    """Sort key of a model version: PEP 440 when it parses, else the plain string."""
    try:
        return (1, Version(version))
    except InvalidVersion:
        return (0, version)


def is_downgrade(installed: str, candidate: str) -> bool:
    """Whether ``candidate`` may not replace ``installed`` without a rollback job (pure).

    Versions are compared as PEP 440; if either does not parse, only an identical version
    passes: anti-rollback refuses what it cannot prove newer.
    """
    a, b = version_key(installed), version_key(candidate)
    if a[0] == 1 and b[0] == 1:
        return b[1] < a[1]  # type: ignore[operator]
    return installed != candidate


@dataclass(frozen=True)
class InstalledVersion:
    """A verified version on disk."""

    name: str
    artifact_id: str
    path: Path
    manifest: ArtifactManifest


class ModelStore:
    """Versions of every model the agent has, with atomic activation and rollback."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "models"
        self.staging_root = state_dir / "staging"
        self.root.mkdir(parents=True, exist_ok=True)
        self.staging_root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ housekeeping

    def recover(self) -> list[str]:
        """Remove leftovers of an interrupted install or swap; return what was removed."""
        removed = []
        leftovers = list(self.staging_root.iterdir())
        for model_dir in self.root.iterdir():
            leftovers.extend(model_dir.glob(".*.tmp*"))
        for path in leftovers:
            # A swap killed between its symlink and its os.replace leaves ``.active.tmpPID``,
            # a link to a version directory: unlink the link, never follow it.
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path))
        return removed

    def new_staging_dir(self, label: str) -> Path:
        """A fresh directory on the same file system as the versions (for rename)."""
        path = self.staging_root / f"{label}-{os.urandom(4).hex()}"
        path.mkdir(parents=True)
        return path

    # ------------------------------------------------------------ queries

    def models(self) -> list[str]:
        """Names of models with an active version."""
        return sorted(p.name for p in self.root.iterdir() if (p / ACTIVE).is_symlink())

    def _model_dir(self, name: str) -> Path:
        if not _NAME_RE.match(name):
            raise SlotError(f"model name {name!r} is invalid (letters, digits, '_', '.', '-')")
        return self.root / name

    def _resolve(self, name: str, link: str) -> InstalledVersion | None:
        path = self._model_dir(name) / link
        if not path.is_symlink():
            return None
        target = path.parent / os.readlink(path)
        if not target.is_dir():
            return None
        manifest, _ = read_manifest(target)
        return InstalledVersion(name, target.name, target, manifest)

    def active(self, name: str) -> InstalledVersion | None:
        """The active version of ``name``, if any."""
        return self._resolve(name, ACTIVE)

    def last_known_good(self, name: str) -> InstalledVersion | None:
        """The version to roll back to, if any."""
        return self._resolve(name, LAST_KNOWN_GOOD)

    def version(self, name: str, artifact_id: str) -> InstalledVersion | None:
        """An installed version by artifact id."""
        path = self._model_dir(name) / "versions" / artifact_id
        if not path.is_dir():
            return None
        manifest, _ = read_manifest(path)
        return InstalledVersion(name, artifact_id, path, manifest)

    # ------------------------------------------------------------ changes

    def install(
        self, verified_dir: Path, manifest: ArtifactManifest, artifact_id: str
    ) -> InstalledVersion:
        """Move a verified bundle directory into ``versions/`` (rename; idempotent)."""
        model_dir = self._model_dir(manifest.model.name)
        versions = model_dir / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        target = versions / artifact_id
        if target.is_dir():
            shutil.rmtree(verified_dir, ignore_errors=True)
        else:
            _fsync_tree(verified_dir)
            os.rename(verified_dir, target)
            _fsync_dir(versions)
        return InstalledVersion(manifest.model.name, artifact_id, target, manifest)

    def _point(self, name: str, link: str, artifact_id: str) -> None:
        model_dir = self._model_dir(name)
        tmp = model_dir / f".{link}.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(f"versions/{artifact_id}", tmp)
        os.replace(tmp, model_dir / link)
        _fsync_dir(model_dir)

    def activate(self, name: str, artifact_id: str) -> InstalledVersion | None:
        """Make ``artifact_id`` active; the previous active becomes last-known-good.

        Returns the previous active version (None if there was none).
        """
        if self.version(name, artifact_id) is None:
            raise SlotError(f"model {name!r} has no installed version {artifact_id}")
        previous = self.active(name)
        if previous is not None and previous.artifact_id != artifact_id:
            self._point(name, LAST_KNOWN_GOOD, previous.artifact_id)
        self._point(name, ACTIVE, artifact_id)
        return previous

    def restore(self, name: str, previous: InstalledVersion | None) -> None:
        """Undo an activation (after a failed health check)."""
        if previous is None:
            (self._model_dir(name) / ACTIVE).unlink(missing_ok=True)
            return
        self._point(name, ACTIVE, previous.artifact_id)

    def rollback(self, name: str) -> InstalledVersion:
        """Swap active and last-known-good (works offline).

        Raises:
            SlotError: there is nothing to roll back to.
        """
        target = self.last_known_good(name)
        current = self.active(name)
        if target is None or (current is not None and target.artifact_id == current.artifact_id):
            raise SlotError(f"model {name!r} has no last-known-good version to roll back to")
        self._point(name, ACTIVE, target.artifact_id)
        if current is not None:
            self._point(name, LAST_KNOWN_GOOD, current.artifact_id)
        return target

    # ------------------------------------------------------------ candidate and shadow

    def _roles_file(self, name: str) -> Path:
        return self._model_dir(name) / "roles.json"

    def roles(self, name: str) -> dict[str, dict[str, Any]]:
        """The candidate/shadow versions of ``name``: role -> {artifact_id, fraction}."""
        try:
            data = json.loads(self._roles_file(name).read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {k: v for k, v in data.items() if k in ("candidate", "shadow")}

    def set_role(
        self, name: str, role: str, artifact_id: str | None, fraction: float = 0.0
    ) -> None:
        """Record (or with ``artifact_id=None`` clear) the candidate or shadow of ``name``."""
        if role not in ("candidate", "shadow"):
            raise SlotError(f"role {role!r} is not valid; choose from: candidate, shadow")
        roles = self.roles(name)
        if artifact_id is None:
            roles.pop(role, None)
        else:
            if self.version(name, artifact_id) is None:
                raise SlotError(f"model {name!r} has no installed version {artifact_id}")
            roles[role] = {"artifact_id": artifact_id, "fraction": fraction}
        path = self._roles_file(name)
        tmp = path.with_name(f".roles.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(roles))
        os.replace(tmp, path)

    def prune(self, name: str, keep: int) -> list[str]:
        """Delete old versions beyond ``keep``, never the active or last-known-good one."""
        versions = self._model_dir(name) / "versions"
        if not versions.is_dir():
            return []
        pinned = {v.artifact_id for v in (self.active(name), self.last_known_good(name)) if v}
        pinned |= {str(r["artifact_id"]) for r in self.roles(name).values()}
        others = sorted(
            (p for p in versions.iterdir() if p.name not in pinned),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        removed = []
        for path in others[max(0, keep - len(pinned)) :]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)
