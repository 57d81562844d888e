"""Keep Mosquitto's password file in line with the fleet's registered devices.

The fleet API talks to a small :class:`BrokerAuth` Protocol; :class:`MosquittoPasswordFile`
is the production adapter: it hashes a device's password with ``mosquitto_passwd`` (the
plaintext goes through a private 0600 file, never a command line), rewrites the password
file atomically (keeping its mode and owner, under a lock shared with other processes), then
asks the broker to reload it: a callback, :func:`signal_reload` (SIGHUP to the pid in the
broker's pid file) in production, ``MosquittoProcess.reload`` in tests.

After a reload Mosquitto checks new connections against the new file, and (2.0, tested with
2.0.11) also disconnects open sessions whose login is gone, so revocation cuts a device off.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Protocol

from agent.protocol import ProtocolError, check_device_id
from fleet.broker import FLEET_USER, RESPONDER_USER
from fleet.errors import BrokerSyncError, InvalidRequestError


class BrokerAuth(Protocol):
    """Adds and removes device logins on the MQTT broker."""

    def add_device(self, username: str, password: str) -> None:
        """Let ``username`` log in with ``password`` (replacing an older password)."""
        ...

    def remove_device(self, username: str) -> None:
        """Stop ``username`` from logging in (idempotent)."""
        ...


def signal_reload(pid_file: Path) -> Callable[[], None]:
    """A reload callback that sends SIGHUP to the pid written in ``pid_file``."""

    def reload() -> None:
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as err:
            raise BrokerSyncError(
                f"could not reload the broker via pid file {str(pid_file)!r}: {err}; "
                "is Mosquitto running with that pid_file?"
            ) from err

    return reload


class MosquittoPasswordFile:
    """:class:`BrokerAuth` over a Mosquitto ``password_file`` and a reload callback."""

    def __init__(
        self,
        password_file: Path,
        *,
        reload: Callable[[], None],
        reserved: Collection[str] = (FLEET_USER, RESPONDER_USER),
        passwd_binary: str | None = None,
    ) -> None:
        """Use ``password_file`` (created empty, mode 0600, if missing).

        Args:
            password_file: the file named by ``password_file`` in mosquitto.conf.
            reload: makes the broker re-read the file (called after every change).
            reserved: service users devices may never replace or remove.
            passwd_binary: path of ``mosquitto_passwd`` (default: found on PATH).
        """
        self.password_file = password_file
        self._reload = reload
        self._reserved = frozenset(reserved)
        self._binary = passwd_binary
        self._lock = threading.Lock()
        if not password_file.exists():
            password_file.parent.mkdir(parents=True, exist_ok=True)
            password_file.touch(mode=0o600)

    def users(self) -> list[str]:
        """Usernames in the password file, in file order."""
        return [user for user, _ in self._entries()]

    def add_device(self, username: str, password: str) -> None:
        """Hash ``password`` and (re)place ``username``'s line, then reload the broker.

        Raises:
            InvalidRequestError: the username is not a device id or is reserved.
            BrokerSyncError: mosquitto_passwd is missing or failed, or the reload failed.
        """
        self._check(username)
        line = self._hash(username, password)
        with self._locked():
            entries = [(u, rest) for u, rest in self._entries() if u != username]
            entries.append((username, line))
            self._write(entries)
        self._reload()

    def remove_device(self, username: str) -> None:
        """Remove ``username``'s line (if any), then reload the broker.

        Raises:
            InvalidRequestError: the username is not a device id or is reserved.
            BrokerSyncError: the reload failed.
        """
        self._check(username)
        with self._locked():
            entries = self._entries()
            kept = [(u, rest) for u, rest in entries if u != username]
            if len(kept) != len(entries):
                self._write(kept)
        self._reload()

    # ------------------------------------------------------------ internals

    def _check(self, username: str) -> None:
        try:
            check_device_id(username)
        except ProtocolError as err:
            raise InvalidRequestError(str(err)) from err
        if username in self._reserved:
            raise InvalidRequestError(
                f"broker user {username!r} is reserved for the fleet's services; "
                f"reserved: {', '.join(sorted(self._reserved))}"
            )

    def _hash(self, username: str, password: str) -> str:
        binary = self._binary or shutil.which("mosquitto_passwd")
        if binary is None:
            raise BrokerSyncError(
                "mosquitto_passwd not found; install the Debian package mosquitto"
            )
        with tempfile.TemporaryDirectory(prefix="edgeloop-passwd-") as scratch:
            plain = Path(scratch) / "passwd"
            fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{username}:{password}\n")
            try:
                subprocess.run(
                    [binary, "-U", str(plain)], check=True, capture_output=True, timeout=30
                )
            except (OSError, subprocess.SubprocessError) as err:
                raise BrokerSyncError(
                    f"mosquitto_passwd could not hash the password of {username!r}: {err}"
                ) from err
            user, _, hashed = plain.read_text().strip().partition(":")
        if user != username or not hashed.startswith("$"):
            raise BrokerSyncError(f"mosquitto_passwd wrote no hash for {username!r}")
        return hashed

    def _entries(self) -> list[tuple[str, str]]:
        try:
            text = self.password_file.read_text()
        except FileNotFoundError:
            return []
        entries = []
        for raw in text.splitlines():
            user, sep, rest = raw.partition(":")
            if sep and user:
                entries.append((user, rest))
        return entries

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.password_file.with_name(f".{self.password_file.name}.lock")
        with self._lock, lock_path.open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _write(self, entries: list[tuple[str, str]]) -> None:
        target = self.password_file
        try:
            before = target.stat()
        except FileNotFoundError:
            before = None
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write("".join(f"{user}:{rest}\n" for user, rest in entries))
                fh.flush()
                os.fsync(fh.fileno())
            if before is not None:
                os.chmod(tmp, before.st_mode & 0o777)
                if (before.st_uid, before.st_gid) != (os.getuid(), os.getgid()):
                    with contextlib.suppress(PermissionError):
                        os.chown(tmp, before.st_uid, before.st_gid)
            os.replace(tmp, target)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise BrokerSyncError(
                f"could not rewrite the broker password file {str(target)!r}: {err}"
            ) from err
