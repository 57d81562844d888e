"""Ingestion: captured samples and drift sketches from every device, over MQTT, into the DB.

* :func:`parse_message` (pure): a ``capture/samples`` or ``capture/sketch`` message into its
  payload. The device id comes from the topic (the broker's ACL ties it to the username) and
  must match the payload's; anything else is a :class:`~agent.protocol.ProtocolError`.
* :class:`BlobStore`: tensors as files named by the sha256 of their raw bytes
  (``<dir>/<sha[:2]>/<sha>``), written once (temp file + rename), so a re-sent sample costs
  nothing and two consumers never corrupt one another's files.
* :class:`IngestStore`: one database transaction per batch of messages. Rows are inserted
  "insert or ignore" on the devices' unique ids, so a message delivered twice (QoS 1, a
  device re-sending after a lost PUBACK, two consumers) is stored once and counted as a
  duplicate. SQLite: ``INSERT OR IGNORE`` with executemany. PostgreSQL: psycopg ``COPY``
  into a temporary table, then ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``.
* :class:`Ingestor`: the MQTT consumer. It subscribes with a *shared* subscription
  (``$share/<group>/edgeloop/v1/devices/+/capture/...``) so more consumers of a group split
  the load; the paho network thread only enqueues; one worker thread batches, writes, scores
  new sketches (:class:`cloud.dataloop.monitor.Monitor`) and only then acknowledges the
  messages (manual PUBACK), so a consumer that dies mid-batch loses nothing the broker still
  holds for its (persistent) session. Malformed payloads are counted, logged and
  acknowledged; they never stop the consumer. Connection-level failures (database or blob
  directory unavailable) keep the batch for a retry; a batch refused for its content is
  written message by message, and the refused message counted as malformed.

Tensors are written before their rows: a crash in between leaves an unreferenced blob, which
the re-delivered message then reuses.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import queue
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from agent import protocol
from agent.protocol import CapturedSample, DriftSketch, ProtocolError, SampleBatch
from cloud.dataloop.models import Sample, Sketch, TensorRef
from fleet.models import utcnow

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt
    from sqlalchemy import CursorResult, Engine, Table
    from sqlmodel import Session

    from cloud.dataloop.monitor import Monitor
    from fleet.responder import BrokerConfig

log = logging.getLogger(__name__)

SAMPLES_LEAF = "capture/samples"
SKETCH_LEAF = "capture/sketch"
COUNTERS = (
    "messages",
    "samples_inserted",
    "samples_duplicate",
    "sketches_inserted",
    "sketches_duplicate",
    "malformed",
    "dropped",
    "write_failures",
    "scored",
    "alerts",
)


def subscriptions(group: str) -> tuple[str, str]:
    """The shared subscriptions of an ingest consumer in ``group``."""
    return (
        f"$share/{group}/{protocol.all_devices(SAMPLES_LEAF)}",
        f"$share/{group}/{protocol.all_devices(SKETCH_LEAF)}",
    )


# ---------------------------------------------------------------- pure parsing


#: Longest stored values (the columns' sizes); longer ones make the message malformed.
FIELD_LIMITS = {"model": 128, "version": 64, "artifact_id": 64, "spec_key": 128}


def _check_fields(message: CapturedSample | DriftSketch, topic: str) -> None:
    for name, limit in FIELD_LIMITS.items():
        value = getattr(message, name, None)
        if value is not None and len(value) > limit:
            raise ProtocolError(
                f"{type(message).__name__} on {topic!r}: {name} of {len(value)} characters "
                f"exceeds {limit}"
            )


def parse_message(topic: str, payload: bytes) -> SampleBatch | DriftSketch:
    """The payload of a capture message.

    Raises:
        ProtocolError: not a capture topic, an invalid payload, or a payload naming another
            device than its topic.
    """
    device_id, leaf = protocol.parse_device_topic(topic)
    message: SampleBatch | DriftSketch
    if leaf == SAMPLES_LEAF:
        message = protocol.decode(SampleBatch, payload, max_bytes=protocol.MAX_SAMPLE_BATCH_PAYLOAD)
        others = {s.device_id for s in message.samples} | {message.device_id}
        if others != {device_id}:
            raise ProtocolError(
                f"SampleBatch on {topic!r} names device(s) {sorted(others)}, not {device_id!r}"
            )
        for sample in message.samples:
            _check_fields(sample, topic)
        return message
    if leaf == SKETCH_LEAF:
        message = protocol.decode(DriftSketch, payload, max_bytes=protocol.MAX_SKETCH_PAYLOAD)
        if message.device_id != device_id:
            raise ProtocolError(
                f"DriftSketch on {topic!r} names device {message.device_id!r}, not {device_id!r}"
            )
        _check_fields(message, topic)
        return message
    raise ProtocolError(f"topic {topic!r} is not a capture topic ({SAMPLES_LEAF}, {SKETCH_LEAF})")


def tensor_bytes(tensor: protocol.Tensor) -> bytes:
    """The raw bytes of a wire tensor, checked against its dtype and shape.

    Raises:
        ProtocolError: not base64, or a byte count that does not fit dtype and shape.
    """
    import numpy as np

    try:
        raw = base64.b64decode(tensor.data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ProtocolError(f"tensor {tensor.name!r} is not valid base64: {err}") from err
    if any(d < 0 for d in tensor.shape):
        raise ProtocolError(f"tensor {tensor.name!r} has a negative dimension {tensor.shape}")
    expected = int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize
    if len(raw) != expected:
        raise ProtocolError(
            f"tensor {tensor.name!r} has {len(raw)} bytes; {tensor.dtype} {tensor.shape} "
            f"needs {expected}"
        )
    return raw


# ---------------------------------------------------------------- blobs


class BlobStore:
    """Content-addressed files: ``<root>/<sha[:2]>/<sha>``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        """Where the blob ``sha256`` lives."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"blob name {sha256!r} is not 64 lowercase hex digits")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store ``data`` (once) and return its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if path.exists():
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".blob.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def get(self, sha256: str) -> bytes:
        """The blob's bytes.

        Raises:
            FileNotFoundError: no such blob.
        """
        return self.path(sha256).read_bytes()


# ---------------------------------------------------------------- database


@dataclass
class IngestResult:
    """What one batch of messages did."""

    samples_inserted: int = 0
    samples_duplicate: int = 0
    sketches_inserted: int = 0
    sketches_duplicate: int = 0
    malformed: int = 0
    sketch_ids: list[str] = field(default_factory=list)

    def merge(self, other: IngestResult) -> None:
        """Add ``other``'s counts and sketch ids to these."""
        for name in (
            "samples_inserted",
            "samples_duplicate",
            "sketches_inserted",
            "sketches_duplicate",
            "malformed",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.sketch_ids.extend(other.sketch_ids)

    def add_to(self, counters: dict[str, int]) -> None:
        """Add these counts to ``counters``."""
        for name in (
            "samples_inserted",
            "samples_duplicate",
            "sketches_inserted",
            "sketches_duplicate",
            "malformed",
        ):
            counters[name] = counters.get(name, 0) + getattr(self, name)


def _utc(value: datetime) -> datetime:
    """Aware UTC (a device's naive timestamp is taken as UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def insert_ignore(session: Session, table: Table, rows: Sequence[dict[str, Any]], key: str) -> int:
    """Insert ``rows`` into ``table``, skipping those whose unique ``key`` exists; returns how
    many were inserted. Does not commit.

    PostgreSQL: ``COPY`` into a temporary table, then ``INSERT ... SELECT ... ON CONFLICT
    (key) DO NOTHING``; SQLite (and others): ``INSERT OR IGNORE`` with executemany.
    """
    if not rows:
        return 0
    columns = list(rows[0])
    if session.get_bind().dialect.name != "postgresql":
        from sqlalchemy import insert

        result = session.execute(insert(table).prefix_with("OR IGNORE"), list(rows))
        return int(cast("CursorResult[Any]", result).rowcount)
    from sqlalchemy import JSON

    json_columns = {c for c in columns if isinstance(table.c[c].type, JSON)}
    cols = ", ".join(f'"{c}"' for c in columns)
    tmp = f"_ingest_{table.name}"
    raw = session.connection().connection.driver_connection
    assert raw is not None
    with raw.cursor() as cur:
        cur.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{tmp}" AS SELECT {cols} FROM "{table.name}" '
            "WITH NO DATA"
        )
        cur.execute(f'TRUNCATE "{tmp}"')
        with cur.copy(f'COPY "{tmp}" ({cols}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row(
                    [
                        json.dumps(row[c], default=_json_default) if c in json_columns else row[c]
                        for c in columns
                    ]
                )
        cur.execute(
            f'INSERT INTO "{table.name}" ({cols}) SELECT {cols} FROM "{tmp}" '
            f'ON CONFLICT ("{key}") DO NOTHING'
        )
        inserted = cur.rowcount
        cur.execute(f'TRUNCATE "{tmp}"')
    return int(inserted)


def _table(model: type[Any]) -> Table:
    table: Table = model.__table__
    return table


class IngestStore:
    """Writes batches of capture messages: tensors to blobs, rows to the database."""

    def __init__(self, engine: Engine, blob_dir: Path) -> None:
        self.engine = engine
        self.blobs = BlobStore(blob_dir)

    def _sample_row(self, sample: CapturedSample, received: Any) -> dict[str, Any]:
        def refs(tensors: list[protocol.Tensor]) -> list[dict[str, Any]]:
            out = []
            for t in tensors:
                raw = tensor_bytes(t)
                digest = self.blobs.put(raw)
                ref = TensorRef(
                    name=t.name, dtype=t.dtype, shape=t.shape, sha256=digest, size=len(raw)
                )
                out.append(ref.model_dump())
            return out

        return {
            "sample_id": sample.sample_id,
            "device_id": sample.device_id,
            "model": sample.model,
            "version": sample.version,
            "artifact_id": sample.artifact_id,
            "role": sample.role,
            "reason": sample.reason,
            "ts": _utc(sample.ts),
            "top1": sample.top1,
            "confidence": sample.confidence,
            "entropy": sample.entropy,
            "inputs": refs(sample.inputs),
            "outputs": refs(sample.outputs),
            "received_at": received,
        }

    @staticmethod
    def _sketch_row(sketch: DriftSketch, received: Any) -> dict[str, Any]:
        return {
            "sketch_id": sketch.sketch_id,
            "device_id": sketch.device_id,
            "model": sketch.model,
            "version": sketch.version,
            "artifact_id": sketch.artifact_id,
            "spec_key": sketch.spec_key,
            "spec_sha256": sketch.spec_sha256,
            "window_start": _utc(sketch.window_start),
            "window_end": _utc(sketch.window_end),
            "n_samples": sketch.counts.n_samples,
            "counts": sketch.counts.model_dump(),
            "dropped": dict(sketch.dropped),
            "status": "pending",
            "status_reason": None,
            "model_version_id": None,
            "received_at": received,
        }

    def write(self, messages: Sequence[tuple[str, bytes]]) -> IngestResult:
        """Parse and store ``messages`` (topic, payload) in one transaction.

        Malformed messages (and samples whose tensors do not decode) are counted and logged;
        the others are stored.
        """
        from sqlmodel import Session

        result = IngestResult()
        received = utcnow()
        samples: dict[str, dict[str, Any]] = {}
        sketches: dict[str, dict[str, Any]] = {}
        duplicates_in_batch = [0, 0]
        for topic, payload in messages:
            try:
                message = parse_message(topic, payload)
            except ProtocolError as err:
                result.malformed += 1
                log.warning("dropping a malformed message on %s: %s", topic, err)
                continue
            if isinstance(message, DriftSketch):
                if message.sketch_id in sketches:
                    duplicates_in_batch[1] += 1
                    continue
                sketches[message.sketch_id] = self._sketch_row(message, received)
                continue
            for sample in message.samples:
                if sample.sample_id in samples:
                    duplicates_in_batch[0] += 1
                    continue
                try:
                    samples[sample.sample_id] = self._sample_row(sample, received)
                except ProtocolError as err:
                    result.malformed += 1
                    log.warning("dropping sample %s on %s: %s", sample.sample_id, topic, err)
        with Session(self.engine) as session:
            inserted_samples = insert_ignore(
                session, _table(Sample), list(samples.values()), "sample_id"
            )
            inserted_sketches = insert_ignore(
                session, _table(Sketch), list(sketches.values()), "sketch_id"
            )
            session.commit()
        result.samples_inserted = inserted_samples
        result.samples_duplicate = len(samples) - inserted_samples + duplicates_in_batch[0]
        result.sketches_inserted = inserted_sketches
        result.sketches_duplicate = len(sketches) - inserted_sketches + duplicates_in_batch[1]
        result.sketch_ids = list(sketches)
        return result


# ---------------------------------------------------------------- the consumer


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: bytes
    mid: int
    qos: int


class Ingestor:
    """The MQTT consumer: shared subscription, batched writes, acknowledgement after commit."""

    def __init__(
        self,
        store: IngestStore,
        *,
        broker: BrokerConfig,
        group: str = "edgeloop-ingest",
        monitor: Monitor | None = None,
        batch_size: int = 200,
        batch_wait_s: float = 0.5,
        queue_size: int = 10_000,
        session_expiry_s: int = 3600,
        retry_s: float = 1.0,
    ) -> None:
        """Configure (not connect) a consumer.

        Args:
            store: where messages go.
            broker: broker address and credentials (a user that may read ``capture/#``).
            group: the shared-subscription group.
            monitor: scores new sketches after each batch (None: scoring is left to
                ``edgeloop dataloop monitor``).
            batch_size: most messages per transaction.
            batch_wait_s: how long a partial batch waits for more messages.
            queue_size: received messages waiting for the worker; more are dropped unacked.
            session_expiry_s: with a fixed ``broker.client_id``, how long the broker keeps
                the session (and unacknowledged messages) while the consumer is away.
            retry_s: pause before retrying a batch the database refused.

        Raises:
            ValueError: a limit below 1.
        """
        from fleet.responder import MqttSession

        if batch_size < 1 or queue_size < 1:
            raise ValueError(
                f"batch_size and queue_size must be >= 1, got {batch_size}, {queue_size}"
            )
        self.store = store
        self.monitor = monitor
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.retry_s = retry_s
        self._queue: queue.Queue[_Message] = queue.Queue(maxsize=queue_size)
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self.session = MqttSession(
            broker,
            role="ingest",
            subscriptions=subscriptions(group),
            on_message=self._enqueue,
            session_expiry_s=session_expiry_s if broker.client_id is not None else None,
        )
        self.session.client.manual_ack_set(True)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: messages, samples/sketches inserted and duplicate, malformed, dropped
        (queue full), write_failures (batches the database refused, retried), scored, alerts."""
        with self._lock:
            return dict(self._counters)

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, n in amounts.items():
                self._counters[name] = self._counters.get(name, 0) + n

    def _enqueue(self, message: mqtt.MQTTMessage) -> None:
        try:
            self._queue.put_nowait(
                _Message(message.topic, bytes(message.payload), message.mid, message.qos)
            )
        except queue.Full:
            self._count(dropped=1)

    # lifecycle ---------------------------------------------------------

    def start(self, *, timeout: float | None = 10.0) -> None:
        """Start the worker and connect; with a ``timeout``, wait until subscribed.

        Raises:
            BrokerError: refused or not subscribed within ``timeout`` (stopped again).
        """
        from fleet.responder import BrokerError

        if self._worker is not None:
            raise RuntimeError("ingestor already started")
        self._stopping.clear()
        self._worker = threading.Thread(target=self._work, name="ingest-worker", daemon=True)
        self._worker.start()
        try:
            self.session.start(timeout=timeout)
        except BrokerError:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, then disconnect."""
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None
        self.session.stop()

    def serve_forever(
        self, *, connect_timeout: float = 30.0, on_ready: Callable[[], None] | None = None
    ) -> None:
        """Start, consume until SIGTERM/SIGINT (or :meth:`stop`), then stop.

        Raises:
            BrokerError: the broker refused us or was unreachable for ``connect_timeout``.
        """
        done = threading.Event()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():

            def on_signal(signum: int, frame: FrameType | None) -> None:
                done.set()

            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            self.start(timeout=connect_timeout)
            if on_ready is not None:
                on_ready()
            while not done.wait(1.0) and not self._stopping.is_set():
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # worker ------------------------------------------------------------

    def _next_batch(self) -> list[_Message]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _work(self) -> None:
        while not self._stopping.is_set():
            batch = self._next_batch()
            if batch:
                self._handle(batch)

    def _write(self, batch: list[_Message]) -> IngestResult | None:
        """Write ``batch``, retrying while the database is unreachable (None: stopping).

        A batch the database refuses for its content (a value it cannot store) is written
        message by message, and a message it still refuses is counted as malformed, so one
        bad message can neither block the consumer nor take its batch down with it.
        """
        from sqlalchemy.exc import InterfaceError, OperationalError

        while True:
            try:
                return self.store.write([(m.topic, m.payload) for m in batch])
            except (OperationalError, InterfaceError, OSError):
                log.exception("writing a batch of %d messages failed; retrying", len(batch))
                self._count(write_failures=1)
                if self._stopping.wait(self.retry_s):
                    return None  # unacknowledged: a persistent session gets them again
            except Exception as err:  # refused for its content
                if len(batch) == 1:
                    log.warning("dropping a message on %s: %s", batch[0].topic, err)
                    return IngestResult(malformed=1)
                total = IngestResult()
                for message in batch:
                    part = self._write([message])
                    if part is None:
                        return None
                    total.merge(part)
                return total

    def _handle(self, batch: list[_Message]) -> None:
        result = self._write(batch)
        if result is None:
            return
        with self._lock:
            result.add_to(self._counters)
            self._counters["messages"] += len(batch)
        if self.monitor is not None and result.sketch_ids:
            try:
                scored = self.monitor.score_pending(self.store.engine, sketch_ids=result.sketch_ids)
                self._count(scored=scored.scored, alerts=scored.alerts)
            except Exception:  # scoring failures must not lose the stored messages
                log.exception("scoring %d sketch(es) failed", len(result.sketch_ids))
        for message in batch:
            if message.qos > 0:
                try:
                    self.session.client.ack(message.mid, message.qos)
                except Exception as err:  # disconnected: the broker redelivers
                    log.warning("cannot acknowledge message %d: %s", message.mid, err)
