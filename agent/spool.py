"""The store-and-forward spool: captured samples and sketches on disk until the broker has them.

One SQLite database in WAL mode with ``synchronous=FULL``: a ``put`` that returned is on disk
and survives an agent crash or a power loss; a half-written transaction is rolled back by
SQLite on the next open. Bounded by bytes (the sum of stored payload sizes); when a new item
does not fit, the policy decides:

* ``drop_oldest``: the oldest items are deleted until it fits (counted as ``spool_full_oldest``);
* ``reject_new``: the new item is refused (counted as ``spool_full_rejected``).

An item larger than the whole bound is refused as ``too_large``. Every drop of the data loop
(spool, budget, queue, hook) is counted by reason in the ``counters`` table, so the totals
survive restarts and travel with every batch (``SampleBatch.dropped``).

Draining (:func:`drain_once`) reads the oldest items, publishes them at QoS 1 and deletes them
only after the broker's PUBACK. A crash between PUBACK and delete re-sends the same items
with the same ids: delivery is at least once, and the cloud deduplicates on the id.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from agent import protocol
from agent.capture import CaptureError

Kind = Literal["sample", "sketch"]
WhenFull = Literal["drop_oldest", "reject_new"]
WHEN_FULL: tuple[WhenFull, ...] = ("drop_oldest", "reject_new")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('sample', 'sketch')),
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class SpoolError(CaptureError):
    """The spool cannot be opened, or a limit or policy is invalid."""


@dataclass(frozen=True)
class Item:
    """One spooled item."""

    seq: int
    item_id: str
    kind: Kind
    payload: bytes


class Spool:
    """A byte-bounded, crash-safe FIFO of encoded samples and sketches (thread-safe)."""

    def __init__(self, path: Path, *, max_bytes: int, when_full: WhenFull = "drop_oldest") -> None:
        self.path = path
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self.set_limits(max_bytes=max_bytes, when_full=when_full)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM items").fetchone()
        except (OSError, sqlite3.Error) as err:
            raise SpoolError(f"cannot open the capture spool {str(path)!r}: {err}") from err
        self._bytes = int(row[0])
        self._count = int(row[1])

    def set_limits(self, *, max_bytes: int, when_full: str) -> None:
        """Change the bound and the full policy (items already stored stay until drained).

        Raises:
            SpoolError: a bound below 1 byte or an unknown policy.
        """
        if when_full not in WHEN_FULL:
            raise SpoolError(
                f"spool full policy {when_full!r} is not valid; choose from: {', '.join(WHEN_FULL)}"
            )
        if max_bytes < 1:
            raise SpoolError(f"spool bound {max_bytes} bytes must be at least 1")
        self.max_bytes = max_bytes
        self.when_full: WhenFull = when_full

    def close(self) -> None:
        """Write pending counters and close the database."""
        with self._lock:
            self._flush_locked()
            self._db.close()

    # ------------------------------------------------------------ counters

    def count(self, reason: str, n: int = 1) -> None:
        """Count ``n`` items dropped for ``reason`` (written with the next put or flush)."""
        if n:
            with self._lock:
                self._pending[reason] = self._pending.get(reason, 0) + n

    def flush(self) -> None:
        """Write pending counters to disk."""
        with self._lock:
            if not self._pending:
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._flush_locked()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        self._db.executemany(
            "INSERT INTO counters(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            list(self._pending.items()),
        )
        self._pending.clear()

    def counters(self) -> dict[str, int]:
        """Drop totals by reason since the spool was created (including pending ones)."""
        with self._lock:
            stored = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            for name, n in self._pending.items():
                stored[name] = stored.get(name, 0) + n
        return {str(k): int(v) for k, v in sorted(stored.items())}

    # ------------------------------------------------------------ items

    @property
    def used_bytes(self) -> int:
        """Bytes of payload stored."""
        return self._bytes

    def __len__(self) -> int:
        return self._count

    def put(self, kind: Kind, item_id: str, payload: bytes) -> bool:
        """Store an item durably; False when refused (the reason is counted).

        With ``drop_oldest`` the oldest items make room; with ``reject_new`` a full spool
        refuses the item. A duplicate ``item_id`` is ignored (True: it is already stored).
        """
        size = len(payload)
        with self._lock:
            if size > self.max_bytes:
                self._pending["too_large"] = self._pending.get("too_large", 0) + 1
                return False
            if self._bytes + size > self.max_bytes and self.when_full == "reject_new":
                self._pending["spool_full_rejected"] = (
                    self._pending.get("spool_full_rejected", 0) + 1
                )
                return False
            self._db.execute("BEGIN IMMEDIATE")
            try:
                dropped = 0
                freed = 0
                if self._bytes + size > self.max_bytes:
                    need = self._bytes + size - self.max_bytes
                    for seq, item_size in self._db.execute(
                        "SELECT seq, size FROM items ORDER BY seq"
                    ).fetchall():
                        if freed >= need:
                            break
                        self._db.execute("DELETE FROM items WHERE seq = ?", (seq,))
                        freed += int(item_size)
                        dropped += 1
                    if dropped:
                        self._pending["spool_full_oldest"] = (
                            self._pending.get("spool_full_oldest", 0) + dropped
                        )
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO items(item_id, kind, size, created, payload) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (item_id, kind, size, time.time(), payload),
                )
                self._flush_locked()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            added = cur.rowcount == 1
            self._bytes += (size if added else 0) - freed
            self._count += (1 if added else 0) - dropped
            return True

    def peek(self, kind: Kind, *, limit: int, max_bytes: int | None = None) -> list[Item]:
        """The oldest items of ``kind``: at most ``limit``, whose payloads sum to ≤ ``max_bytes``
        (the first item is always returned)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, item_id, kind, payload FROM items WHERE kind = ? ORDER BY seq LIMIT ?",
                (kind, limit),
            ).fetchall()
        items: list[Item] = []
        total = 0
        for seq, item_id, k, payload in rows:
            data = bytes(payload)
            if items and max_bytes is not None and total + len(data) > max_bytes:
                break
            total += len(data)
            items.append(Item(int(seq), str(item_id), k, data))
        return items

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete delivered items (by ``seq``); returns how many were still there."""
        wanted = list(seqs)
        if not wanted:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                removed = 0
                freed = 0
                for seq in wanted:
                    row = self._db.execute(
                        "SELECT size FROM items WHERE seq = ?", (seq,)
                    ).fetchone()
                    if row is None:
                        continue  # dropped to make room while it was in flight
                    self._db.execute("DELETE FROM items WHERE seq = ?", (seq,))
                    removed += 1
                    freed += int(row[0])
                self._flush_locked()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._bytes -= freed
            self._count -= removed
            return removed

    def ids(self) -> list[str]:
        """Every stored item id, oldest first."""
        with self._lock:
            return [str(r[0]) for r in self._db.execute("SELECT item_id FROM items ORDER BY seq")]


# ------------------------------------------------------------------ draining


class ConfirmedPublisher(Protocol):
    """Publishes at QoS 1 and reports whether the broker acknowledged (PUBACK) in time."""

    @property
    def connected(self) -> bool:
        """Whether publishing can succeed now."""
        ...

    def publish_confirmed(self, topic: str, payload: bytes, *, timeout: float) -> bool:
        """Publish at QoS 1; True once the PUBACK arrived, False on timeout or error."""
        ...


def sample_batch(device_id: str, payloads: list[bytes], dropped: dict[str, int]) -> bytes:
    """A ``protocol.SampleBatch`` around already-encoded ``CapturedSample`` payloads.

    Built by concatenation (each stored sample is valid JSON of the model), so a batch costs
    no re-encoding of the tensors.
    """
    head = {
        "schema_version": protocol.SCHEMA_VERSION,
        "device_id": device_id,
        "sent_at": datetime.now(UTC).isoformat(),
        "dropped": dropped,
    }
    prefix = json.dumps(head, separators=(",", ":"))[:-1].encode()
    return prefix + b',"samples":[' + b",".join(payloads) + b"]}"


#: Room a SampleBatch needs beyond its samples: the envelope and its counters.
BATCH_ENVELOPE_BYTES = 4096


def drain_once(
    spool: Spool,
    publisher: ConfirmedPublisher,
    *,
    device_id: str,
    batch_size: int,
    max_batch_bytes: int = protocol.MAX_SAMPLE_BATCH_PAYLOAD,
    timeout: float = 10.0,
) -> tuple[int, int]:
    """Publish one sample batch and the waiting sketches; delete what the broker acknowledged.

    Returns:
        ``(samples sent, sketches sent)``; ``(0, 0)`` when offline, empty, or unacknowledged.
    """
    if not publisher.connected:
        return 0, 0
    sketches = 0
    for item in spool.peek("sketch", limit=16):
        if not publisher.publish_confirmed(
            protocol.capture_sketch(device_id), item.payload, timeout=timeout
        ):
            return 0, sketches
        spool.ack([item.seq])
        sketches += 1
    items = spool.peek(
        "sample", limit=batch_size, max_bytes=max(1, max_batch_bytes - BATCH_ENVELOPE_BYTES)
    )
    if not items:
        return 0, sketches
    spool.flush()
    payload = sample_batch(device_id, [i.payload for i in items], spool.counters())
    if not publisher.publish_confirmed(
        protocol.capture_samples(device_id), payload, timeout=timeout
    ):
        return 0, sketches
    spool.ack(i.seq for i in items)
    return len(items), sketches
