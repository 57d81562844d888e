"""Keep Mosquitto's password file in line with the fleet's registered devices.

The fleet API talks to a small :class:`BrokerAuth` Protocol; :class:`MosquittoPasswordFile`
is the production adapter: it hashes a device's password in-process in Mosquitto 2.0's
``$7$`` format (PBKDF2-SHA512, 101 iterations, 12-byte salt, as ``mosquitto_passwd`` writes
it; the binary can still be named, then the plaintext goes through a private 0600 file,
never a command line), rewrites the password file atomically (keeping its mode and owner,
under a lock shared with other processes), then asks the broker to reload it: a callback,
:func:`signal_reload` (SIGHUP to the pid in the broker's pid file) in production,
``MosquittoProcess.reload`` in tests.

Changes are **group-committed**: a change waits until it is in the file and the broker has
reloaded (so credentials work once ``add_device`` returns), but changes made meanwhile by
other threads (concurrent registrations) go into the same rewrite and the same reload; with
``linger_s`` the writer waits that long first to gather more. The ACL needs no per-device
update: its ``pattern`` rules on ``%u`` cover every device (:func:`fleet.broker.render_acl`).

After a reload Mosquitto checks new connections against the new file, and (2.0, tested with
2.0.11) also disconnects open sessions whose login is gone, so revocation cuts a device off.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
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

    def add_devices(self, logins: Mapping[str, str]) -> None:
        """Let every username of ``logins`` log in with its password: all or none, with
        one broker reload."""
        ...

    def remove_devices(self, usernames: Collection[str]) -> None:
        """Stop every one of ``usernames`` from logging in (idempotent), one reload."""
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


PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for $7$


def mosquitto_hash(password: str, *, salt: bytes | None = None) -> str:
    """A Mosquitto 2.0 ``$7$`` password hash: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte
    salt, salt and 64-byte digest in base64 (what ``mosquitto_passwd`` writes)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    encoded = (base64.b64encode(part).decode() for part in (salt, digest))
    return f"$7${PBKDF2_ITERATIONS}${'$'.join(encoded)}"


class MosquittoPasswordFile:
    """:class:`BrokerAuth` over a Mosquitto ``password_file`` and a reload callback."""

    def __init__(
        self,
        password_file: Path,
        *,
        reload: Callable[[], None],
        reserved: Collection[str] = (FLEET_USER, RESPONDER_USER),
        passwd_binary: str | None = None,
        linger_s: float = 0.0,
    ) -> None:
        """Use ``password_file`` (created empty, mode 0600, if missing).

        Args:
            password_file: the file named by ``password_file`` in mosquitto.conf.
            reload: makes the broker re-read the file (called once per batch of changes).
            reserved: service users devices may never replace or remove.
            passwd_binary: hash with this ``mosquitto_passwd`` instead of in-process.
            linger_s: how long a batch's writer waits for more changes before writing.
        """
        self.password_file = password_file
        self._reload = reload
        self._reserved = frozenset(reserved)
        self._binary = passwd_binary
        self._linger_s = linger_s
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: list[tuple[int, str, str | None]] = []
        self._next_ticket = 1
        self._done_ticket = 0
        self._flushing = False
        self._results: dict[int, BrokerSyncError | None] = {}
        self.writes = 0
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
        self._commit(username, self._hash(username, password))

    def remove_device(self, username: str) -> None:
        """Remove ``username``'s line (if any), then reload the broker.

        Raises:
            InvalidRequestError: the username is not a device id or is reserved.
            BrokerSyncError: the reload failed.
        """
        self._check(username)
        self._commit(username, None)

    def add_devices(self, logins: Mapping[str, str]) -> None:
        """:meth:`add_device` for many users: every name is checked before anything is
        written, then all lines go into one rewrite and one reload.

        Raises:
            InvalidRequestError: a username is not a device id or is reserved (nothing written).
            BrokerSyncError: hashing, the rewrite or the reload failed.
        """
        for username in logins:
            self._check(username)
        self._commit_many([(user, self._hash(user, password)) for user, password in logins.items()])

    def remove_devices(self, usernames: Collection[str]) -> None:
        """:meth:`remove_device` for many users, in one rewrite and one reload.

        Raises:
            InvalidRequestError: a username is not a device id or is reserved (nothing written).
            BrokerSyncError: the rewrite or the reload failed.
        """
        for username in usernames:
            self._check(username)
        self._commit_many([(user, None) for user in usernames])

    # ------------------------------------------------------------ internals

    def _commit(self, username: str, line: str | None) -> None:
        self._commit_many([(username, line)])

    def _commit_many(self, changes: list[tuple[str, str | None]]) -> None:
        """Queue changes (a hashed line, or None to remove) under one ticket and return once
        they are written and the broker reloaded; whoever finds no write running writes every
        queued change. One ticket's changes always land in the same rewrite."""
        if not changes:
            return
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._pending.extend((ticket, username, line) for username, line in changes)
            while self._done_ticket < ticket:
                if self._flushing:
                    self._cond.wait()
                    continue
                self._flushing = True
                self._cond.release()
                try:
                    if self._linger_s > 0:
                        time.sleep(self._linger_s)
                    with self._cond:
                        batch, self._pending = self._pending, []
                    error = self._flush(batch)
                finally:
                    self._cond.acquire()
                    self._flushing = False
                for done, _, _ in batch:
                    self._results[done] = error
                self._done_ticket = max(self._done_ticket, batch[-1][0]) if batch else ticket
                self._cond.notify_all()
            error = self._results.pop(ticket, None)
        if error is not None:
            raise error

    def _flush(self, batch: list[tuple[int, str, str | None]]) -> BrokerSyncError | None:
        if not batch:
            return None
        try:
            with self._locked():
                before = self._entries()
                # A dict keeps file order; a changed user moves to the end, as before (one
                # pass over the batch instead of one scan of the file per change).
                merged = dict(before)
                for _, username, line in batch:
                    merged.pop(username, None)
                    if line is not None:
                        merged[username] = line
                entries = list(merged.items())
                if entries != before:
                    self._write(entries)
                    self.writes += 1
            self._reload()
        except BrokerSyncError as err:
            return err
        except Exception as err:  # every waiter of the batch must learn it failed
            return BrokerSyncError(f"could not update the broker's password file: {err}")
        return None

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
        if self._binary is None:
            return mosquitto_hash(password)
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
