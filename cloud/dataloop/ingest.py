"""Ingestion: captured samples and drift sketches from every device, over MQTT, into the DB.

* :func:`parse_message` (pure): a ``capture/samples`` or ``capture/sketch`` message into its
  payload. The device id comes from the topic (the broker's ACL ties it to the username) and
  must match the payload's; anything else is a :class:`~agent.protocol.ProtocolError`.
* :class:`BlobStore`: content-addressed files named by the sha256 of their bytes
  (``<dir>/<sha[:2]>/<sha>``), written once (temp file, fsync, rename), so a re-sent blob
  costs nothing and two consumers never corrupt one another's files. Since the pack layout
  (see docs/dataloop.md, "Tensor storage"), one blob holds the tensors of a whole write (a
  *pack*): each tensor reference names its pack, offset and size, and keeps its own sha256,
  checked on every read. References without a pack (the first layout: one file per tensor)
  are still read from ``<dir>/<sha[:2]>/<sha>``; nothing needs migrating.
* :class:`IngestStore`: one database transaction per batch of messages, in two steps so the
  consumer can overlap them: :meth:`IngestStore.prepare` (pure CPU: parse and validate, with
  the msgspec mirror of the wire models first (:func:`decode_message`), decode the tensors,
  build the rows and the pack) and :meth:`IngestStore.commit` (insert the rows of the samples
  the database does not hold yet, write their pack with one fsync, commit). Rows are inserted
  "insert or ignore" on the devices' unique ids, so a message delivered twice (QoS 1, a device
  re-sending after a lost PUBACK, two consumers) is stored once and counted as a duplicate.
  SQLite: ``INSERT OR IGNORE`` with executemany. PostgreSQL: one psycopg ``COPY`` straight
  into the table inside a savepoint (:func:`copy_new`); only when that meets an existing id:
  drop the ids that exist (and re-pack), then ``COPY`` into a temporary table and ``INSERT ...
  SELECT ... ON CONFLICT DO NOTHING`` (:func:`insert_ignore`).
* :func:`pipelined`: runs ``prepare`` one batch ahead in a helper thread, so the parsing of
  batch k+1 overlaps the database write of batch k (``Ingestor(overlap=True)``; off by
  default, see its docstring).
* :class:`Ingestor`: the MQTT consumer. It subscribes with a *shared* subscription
  (``$share/<group>/edgeloop/v1/devices/+/capture/...``) so more consumers of a group split
  the load; the paho network thread only enqueues; one worker thread prepares and writes
  the batches (with ``overlap``, a helper thread prepares them), scores new sketches
  (:class:`cloud.dataloop.monitor.Monitor`) and only then acknowledges the messages (manual
  PUBACK), so a consumer that dies mid-batch loses nothing the broker still holds for its
  (persistent) session. Malformed payloads are counted, logged and acknowledged; they never
  stop the consumer. Connection-level failures (database or blob directory unavailable) keep
  the batch for a retry; a batch refused for its content is written message by message, and
  the refused message counted as malformed.

Packs are written (and fsynced) after their rows are inserted and before the transaction
commits: a crash in between leaves an unreferenced pack, which the re-delivered messages then
reuse (same samples, same bytes, same name) or leave behind (garbage, never a dangling
reference).
"""

from __future__ import annotations

import binascii
import gc
import hashlib
import json
import logging
import math
import os
import queue
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, cast

import msgspec

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


def _check_fields(message: CapturedSample | WireSample | DriftSketch, topic: str) -> None:
    for name, limit in FIELD_LIMITS.items():
        value = getattr(message, name, None)
        if value is not None and len(value) > limit:
            raise ProtocolError(
                f"{type(message).__name__} on {topic!r}: {name} of {len(value)} characters "
                f"exceeds {limit}"
            )


def _check_sample_fields(sample: CapturedSample | WireSample, topic: str) -> None:
    # The hot path of _check_fields for samples (no spec_key, plain attribute reads):
    # getattr with a default on a pydantic model cost a fifth of parse_message's time.
    model, version, artifact_id = sample.model, sample.version, sample.artifact_id
    if (
        len(model) > FIELD_LIMITS["model"]
        or len(version) > FIELD_LIMITS["version"]
        or (artifact_id is not None and len(artifact_id) > FIELD_LIMITS["artifact_id"])
    ):
        _check_fields(sample, topic)


def _check_batch(message: SampleBatch | WireBatch, device_id: str, topic: str) -> None:
    if message.device_id != device_id or any(s.device_id != device_id for s in message.samples):
        others = {s.device_id for s in message.samples} | {message.device_id}
        raise ProtocolError(
            f"SampleBatch on {topic!r} names device(s) {sorted(others)}, not {device_id!r}"
        )
    for sample in message.samples:
        _check_sample_fields(sample, topic)


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
        _check_batch(message, device_id, topic)
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


# ---------------------------------------------------------------- fast decoding of samples
#
# Validating a SampleBatch with pydantic was half of ingestion's CPU time, more than the whole
# raw COPY of the same rows (docs/dataloop.md, "Tensor storage"). msgspec validates the same
# JSON several times faster, so ingestion decodes sample batches with the msgspec mirror of
# the wire models below and falls back to the canonical path (parse_message: pydantic, the
# wire contract in agent/protocol.py) whenever msgspec refuses a payload. The mirror is
# never more lenient than the contract (strict types, the same patterns, lengths and
# literals, unknown fields refused), so the fallback decides every doubtful payload: a
# payload is accepted or refused exactly as parse_message would, only faster when valid.
# tests/cloud/test_ingest.py checks that the mirror's fields and constraints match.

_DTYPE_PATTERN = r"^(bool|u?int(8|16|32|64)|float(16|32|64))$"
_UUID_HEX = r"^[0-9a-f]{32}$"


class WireTensor(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Mirror of :class:`agent.protocol.Tensor`."""

    dtype: Annotated[str, msgspec.Meta(pattern=_DTYPE_PATTERN)]
    shape: list[int]
    data: str
    schema_version: Literal[1] = 1
    name: Annotated[str, msgspec.Meta(max_length=128)] = ""


class WireSample(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Mirror of :class:`agent.protocol.CapturedSample`."""

    sample_id: Annotated[str, msgspec.Meta(pattern=_UUID_HEX)]
    device_id: str
    model: str
    version: str
    ts: datetime
    reason: Literal["low_confidence", "high_entropy", "shadow_disagreement", "every_nth", "random"]
    inputs: list[WireTensor]
    outputs: list[WireTensor]
    schema_version: Literal[1] = 1
    artifact_id: str | None = None
    role: Literal["primary", "candidate", "shadow"] = "primary"
    top1: int | None = None
    confidence: float | None = None
    entropy: float | None = None


class WireBatch(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Mirror of :class:`agent.protocol.SampleBatch`."""

    device_id: str
    samples: Annotated[list[WireSample], msgspec.Meta(min_length=1)]
    schema_version: Literal[1] = 1
    sent_at: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC))
    dropped: dict[str, int] = msgspec.field(default_factory=dict)


_WIRE_BATCH = msgspec.json.Decoder(WireBatch)


def decode_message(topic: str, payload: bytes) -> SampleBatch | WireBatch | DriftSketch:
    """:func:`parse_message`, faster for valid sample batches (decoded into the msgspec
    mirror); anything the mirror refuses goes through :func:`parse_message` itself.

    Raises:
        ProtocolError: as :func:`parse_message`.
    """
    device_id, leaf = protocol.parse_device_topic(topic)
    if leaf == SAMPLES_LEAF and len(payload) <= protocol.MAX_SAMPLE_BATCH_PAYLOAD:
        try:
            batch = _WIRE_BATCH.decode(payload)
            _check_batch(batch, device_id, topic)
        except (msgspec.ValidationError, msgspec.DecodeError, ProtocolError):
            pass  # the canonical path decides, and names the reason in its own words
        else:
            return batch
    return parse_message(topic, payload)


#: Bytes per element of the wire dtypes (``protocol.Tensor.dtype``'s pattern allows no others).
#: A table, not ``np.dtype(...).itemsize`` + ``np.prod``: those cost more than the base64
#: decode itself for the small tensors devices send.
ITEMSIZE = {
    "bool": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "float16": 2,
    "int32": 4,
    "uint32": 4,
    "float32": 4,
    "int64": 8,
    "uint64": 8,
    "float64": 8,
}


def tensor_bytes(tensor: protocol.Tensor | WireTensor) -> bytes:
    """The raw bytes of a wire tensor, checked against its dtype and shape.

    Raises:
        ProtocolError: not base64, or a byte count that does not fit dtype and shape.
    """
    try:
        raw = binascii.a2b_base64(tensor.data, strict_mode=True)
    except (binascii.Error, ValueError) as err:
        raise ProtocolError(f"tensor {tensor.name!r} is not valid base64: {err}") from err
    if min(tensor.shape, default=0) < 0:
        raise ProtocolError(f"tensor {tensor.name!r} has a negative dimension {tensor.shape}")
    itemsize = ITEMSIZE.get(tensor.dtype)
    if itemsize is None:
        raise ProtocolError(
            f"tensor {tensor.name!r} has dtype {tensor.dtype!r}; choose from: {', '.join(ITEMSIZE)}"
        )
    expected = math.prod(tensor.shape) * itemsize
    if len(raw) != expected:
        raise ProtocolError(
            f"tensor {tensor.name!r} has {len(raw)} bytes; {tensor.dtype} {tensor.shape} "
            f"needs {expected}"
        )
    return raw


# ---------------------------------------------------------------- blobs


class BlobStore:
    """Content-addressed files: ``<root>/<sha[:2]>/<sha>``; a tensor is a range of one."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        """Where the blob ``sha256`` lives."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"blob name {sha256!r} is not 64 lowercase hex digits")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes, *, digest: str | None = None, fsync: bool = False) -> str:
        """Store ``data`` (once) and return its sha256.

        Args:
            data: the bytes.
            digest: their sha256 when the caller has it already (not checked again).
            fsync: make the file and its directory entry durable before returning.
        """
        digest = digest or hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if path.exists():
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".blob.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if fsync:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return digest

    def get(self, sha256: str) -> bytes:
        """The blob's bytes.

        Raises:
            FileNotFoundError: no such blob.
        """
        return self.path(sha256).read_bytes()

    def tensor(self, ref: TensorRef | Mapping[str, Any]) -> bytes:
        """The bytes of a stored tensor (a :class:`~cloud.dataloop.models.TensorRef` or its
        dict): ``size`` bytes at ``offset`` of blob ``pack``, or (first layout, no ``pack``)
        the whole blob ``sha256``; checked against ``sha256`` either way.

        Raises:
            FileNotFoundError: the blob is missing.
            ValueError: the bytes are truncated or do not match the tensor's sha256.
        """
        if isinstance(ref, TensorRef):
            ref = ref.model_dump()
        sha256, pack = str(ref["sha256"]), ref.get("pack")
        if pack is None:
            data = self.get(sha256)
        else:
            offset, size = int(ref.get("offset") or 0), int(ref["size"])
            with self.path(str(pack)).open("rb") as f:
                f.seek(offset)
                data = f.read(size)
            if len(data) != size:
                raise ValueError(
                    f"blob {pack} holds {len(data)} of the {size} bytes of tensor "
                    f"{ref.get('name')!r} at offset {offset}"
                )
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"tensor {ref.get('name')!r} does not match its sha256 {sha256}")
        return data


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


def _copy_rows(cur: Any, table: str, columns: list[str], json_columns: set[str], rows: Any) -> None:
    cols = ", ".join(f'"{c}"' for c in columns)
    with cur.copy(f'COPY "{table}" ({cols}) FROM STDIN') as copy:
        for row in rows:
            copy.write_row(
                [
                    json.dumps(row[c], default=_json_default) if c in json_columns else row[c]
                    for c in columns
                ]
            )


def existing_keys(session: Session, table: Table, key: str, values: Sequence[str]) -> set[str]:
    """Which of ``values`` the unique column ``key`` of ``table`` holds already."""
    if not values:
        return set()
    if session.get_bind().dialect.name == "postgresql":
        raw = session.connection().connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur:
            cur.execute(
                f'SELECT "{key}" FROM "{table.name}" WHERE "{key}" = ANY(%s)', (list(values),)
            )
            return {str(r[0]) for r in cur.fetchall()}
    from sqlalchemy import select

    found: set[str] = set()
    column = table.c[key]
    for i in range(0, len(values), 500):  # SQLite's bound-parameter limit
        chunk = values[i : i + 500]
        found.update(
            str(v) for v in session.execute(select(column).where(column.in_(chunk))).scalars()
        )
    return found


def copy_new(session: Session, table: Table, rows: Sequence[dict[str, Any]]) -> bool:
    """PostgreSQL: ``COPY`` ``rows`` straight into ``table`` inside a savepoint; False (and
    nothing inserted, the transaction usable) when one of them violates a unique constraint.
    Does not commit.
    """
    import psycopg.errors
    from sqlalchemy import JSON

    if not rows:
        return True
    columns = list(rows[0])
    json_columns = {c for c in columns if isinstance(table.c[c].type, JSON)}
    raw = session.connection().connection.driver_connection
    assert raw is not None
    with raw.cursor() as cur:
        cur.execute("SAVEPOINT edgeloop_ingest_copy")
        try:
            _copy_rows(cur, table.name, columns, json_columns, rows)
        except psycopg.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT edgeloop_ingest_copy")
            return False
        cur.execute("RELEASE SAVEPOINT edgeloop_ingest_copy")
    return True


def insert_ignore(session: Session, table: Table, rows: Sequence[dict[str, Any]], key: str) -> int:
    """Insert ``rows`` into ``table``, skipping those whose unique ``key`` exists; returns how
    many were inserted. Does not commit.

    PostgreSQL: :func:`copy_new` (one ``COPY`` straight into ``table``); if that meets a
    duplicate, ``COPY`` into a temporary table and ``INSERT ... SELECT ... ON CONFLICT (key)
    DO NOTHING``. SQLite (and others): ``INSERT OR IGNORE`` with executemany.
    """
    if not rows:
        return 0
    columns = list(rows[0])
    if session.get_bind().dialect.name != "postgresql":
        from sqlalchemy import insert

        result = session.execute(insert(table).prefix_with("OR IGNORE"), list(rows))
        return int(cast("CursorResult[Any]", result).rowcount)
    from sqlalchemy import JSON

    if copy_new(session, table, rows):
        return len(rows)
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
        _copy_rows(cur, tmp, columns, json_columns, rows)
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


@dataclass
class PreparedSample:
    """A parsed sample: its row (tensor references without a pack yet) and raw tensors."""

    row: dict[str, Any]
    tensors: list[bytes]


@dataclass
class PreparedBatch:
    """Messages parsed by :meth:`IngestStore.prepare`, ready for :meth:`IngestStore.commit`.

    ``pack`` holds the tensors of every sample in order and the rows' references point into
    it (``pack_sha256``); :meth:`repack` rebuilds both for a subset.
    """

    samples: dict[str, PreparedSample] = field(default_factory=dict)
    sketches: dict[str, dict[str, Any]] = field(default_factory=dict)
    malformed: int = 0
    samples_duplicate: int = 0
    sketches_duplicate: int = 0
    pack: bytes = b""
    pack_sha256: str = ""
    #: distinct samples prepared (``samples`` shrinks when commit drops those stored already)
    sample_count: int = 0

    def repack(self, sample_ids: Sequence[str] | None = None) -> None:
        """Keep only ``sample_ids`` (None: all), rebuild the pack, point the rows into it."""
        if sample_ids is not None:
            self.samples = {i: self.samples[i] for i in sample_ids}
        parts: list[bytes] = []
        refs: list[dict[str, Any]] = []
        for prepared in self.samples.values():
            parts += prepared.tensors  # in the order of the row's inputs, then outputs
            refs += prepared.row["inputs"]
            refs += prepared.row["outputs"]
        self.pack = b"".join(parts)
        self.pack_sha256 = pack = hashlib.sha256(self.pack).hexdigest()
        offset = 0
        for ref in refs:
            ref["pack"] = pack
            ref["offset"] = offset
            offset += ref["size"]


class IngestStore:
    """Writes batches of capture messages: tensors to blob packs, rows to the database."""

    def __init__(self, engine: Engine, blob_dir: Path, *, fsync: bool = True) -> None:
        """A store writing to ``engine`` and ``blob_dir`` (``fsync``: packs are durable
        before their rows are committed)."""
        self.engine = engine
        self.blobs = BlobStore(blob_dir)
        self.fsync = fsync

    @staticmethod
    def _sample(sample: CapturedSample | WireSample, received: Any) -> PreparedSample:
        # The hot loop of ingestion (one call per sample): plain dicts for the TensorRef
        # fields (the values are validated already), locals instead of repeated lookups.
        tensors: list[bytes] = []
        refs: list[list[dict[str, Any]]] = []
        sha256 = hashlib.sha256
        for wire in (sample.inputs, sample.outputs):
            out = []
            for t in wire:
                raw = tensor_bytes(t)
                tensors.append(raw)
                out.append(
                    {
                        "name": t.name,
                        "dtype": t.dtype,
                        "shape": t.shape,
                        "sha256": sha256(raw).hexdigest(),
                        "size": len(raw),
                        "pack": None,
                        "offset": 0,
                    }
                )
            refs.append(out)
        ts = sample.ts
        row = {
            "sample_id": sample.sample_id,
            "device_id": sample.device_id,
            "model": sample.model,
            "version": sample.version,
            "artifact_id": sample.artifact_id,
            "role": sample.role,
            "reason": sample.reason,
            "ts": ts if ts.tzinfo is UTC else _utc(ts),
            "top1": sample.top1,
            "confidence": sample.confidence,
            "entropy": sample.entropy,
            "inputs": refs[0],
            "outputs": refs[1],
            "received_at": received,
        }
        return PreparedSample(row, tensors)

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

    @classmethod
    def prepare(cls, messages: Sequence[tuple[str, bytes]]) -> PreparedBatch:
        """Parse ``messages`` (topic, payload), decode and check their tensors, build their
        rows and one pack of all their tensors; no I/O.

        Malformed messages (and samples whose tensors do not decode) are counted and logged;
        a sample or sketch id seen twice is kept once and counted as a duplicate.
        """
        batch = PreparedBatch()
        received = utcnow()
        for topic, payload in messages:
            try:
                message = decode_message(topic, payload)
            except ProtocolError as err:
                batch.malformed += 1
                log.warning("dropping a malformed message on %s: %s", topic, err)
                continue
            if isinstance(message, DriftSketch):
                if message.sketch_id in batch.sketches:
                    batch.sketches_duplicate += 1
                    continue
                batch.sketches[message.sketch_id] = cls._sketch_row(message, received)
                continue
            for sample in message.samples:
                if sample.sample_id in batch.samples:
                    batch.samples_duplicate += 1
                    continue
                try:
                    batch.samples[sample.sample_id] = cls._sample(sample, received)
                except ProtocolError as err:
                    batch.malformed += 1
                    log.warning("dropping sample %s on %s: %s", sample.sample_id, topic, err)
        batch.repack()
        batch.sample_count = len(batch.samples)
        return batch

    def commit(self, batch: PreparedBatch) -> IngestResult:
        """Store a prepared batch in one transaction: insert the rows of the samples the
        database does not hold yet, write the pack of their tensors (once, fsynced), commit.

        PostgreSQL first tries the common case, every sample new: one ``COPY`` of all rows
        (:func:`copy_new`). When a sample exists already (a re-delivery), or on SQLite, it
        asks which ones exist, drops them and packs the others again, so a re-sent sample
        never takes space twice; a sample another consumer inserts meanwhile is skipped by
        :func:`insert_ignore` (its bytes stay unreferenced in this pack). The pack is written
        after the rows' insert but before the commit: no row is ever visible without its
        bytes. Safe to call again with the same batch after a failure.
        """
        from sqlmodel import Session

        samples_table, sketches_table = _table(Sample), _table(Sketch)
        ids = list(batch.samples)
        with Session(self.engine) as session:
            postgres = session.get_bind().dialect.name == "postgresql"
            rows = [s.row for s in batch.samples.values()]
            if postgres and copy_new(session, samples_table, rows):
                inserted_samples = len(rows)
            else:
                known = existing_keys(session, samples_table, "sample_id", ids)
                if known:
                    batch.repack([i for i in ids if i not in known])
                rows = [s.row for s in batch.samples.values()]
                inserted_samples = insert_ignore(session, samples_table, rows, "sample_id")
            if rows:
                self.blobs.put(batch.pack, digest=batch.pack_sha256, fsync=self.fsync)
            inserted_sketches = insert_ignore(
                session, sketches_table, list(batch.sketches.values()), "sketch_id"
            )
            session.commit()
        return IngestResult(
            samples_inserted=inserted_samples,
            samples_duplicate=max(batch.sample_count, len(ids))
            - inserted_samples
            + batch.samples_duplicate,
            sketches_inserted=inserted_sketches,
            sketches_duplicate=len(batch.sketches) - inserted_sketches + batch.sketches_duplicate,
            malformed=batch.malformed,
            sketch_ids=list(batch.sketches),
        )

    def write(self, messages: Sequence[tuple[str, bytes]]) -> IngestResult:
        """Parse and store ``messages`` (topic, payload) in one transaction
        (:meth:`prepare`, then :meth:`commit`).

        Malformed messages (and samples whose tensors do not decode) are counted and logged;
        the others are stored.
        """
        return self.commit(self.prepare(messages))


_T = TypeVar("_T")
_U = TypeVar("_U")
_END = object()


def pipelined(
    batches: Iterable[_T], prepare: Callable[[_T], _U], *, depth: int = 1
) -> Iterator[tuple[_T, _U]]:
    """``(batch, prepare(batch))`` for each batch, ``prepare`` running in a helper thread up to
    ``depth`` batches ahead of the consumer, so preparing the next batch overlaps whatever
    the consumer does with this one. An exception in ``batches`` or ``prepare`` is raised
    here, at the position it happened.
    """
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    closed = threading.Event()

    def put(item: Any) -> bool:
        while not closed.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put((batch, prepare(batch))):
                    return
        except BaseException as err:  # handed to the consumer, raised there
            put(err)
            return
        put(_END)

    thread = threading.Thread(target=produce, name="ingest-prepare", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closed.set()
        thread.join(5.0)


def freeze_startup_heap() -> None:
    """Put every object alive now out of the cyclic garbage collector's reach (``gc.freeze``).

    A service's startup heap (modules, classes, pydantic schemas, SQLAlchemy metadata: some
    100,000 objects) never becomes garbage, but CPython's full collections walk all of it,
    and ingestion allocates enough short-lived containers (parsed payloads, rows) to set one
    off about once per batch: that doubled ``IngestStore.prepare``'s time in the benchmark
    (docs/dataloop.md, "Tensor storage"). ``gc.freeze`` is CPython's facility for exactly
    this; garbage made after the call is collected as usual. Process-wide, so the service
    entry point (:meth:`Ingestor.serve_forever`) calls it, not the library code.
    """
    gc.collect()
    gc.freeze()


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
        overlap: bool = False,
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
            overlap: prepare (parse, decode) the next batch in a helper thread while this
                one is written. Off by default: measured on a busy 2-vCPU machine it was
                slower than in turn (the threads contend for the GIL; docs/benchmarks.md).

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
        self.overlap = overlap
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
            freeze_startup_heap()
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

    def _batches(self) -> Iterator[list[_Message]]:
        while not self._stopping.is_set():
            batch = self._next_batch()
            if batch:
                yield batch

    def _prepare(self, batch: list[_Message]) -> PreparedBatch | None:
        try:
            return self.store.prepare([(m.topic, m.payload) for m in batch])
        except Exception:  # a bug, not a bad message: _write prepares message by message
            log.exception("preparing a batch of %d messages failed", len(batch))
            return None

    def _work(self) -> None:
        if self.overlap:  # preparing batch k+1 overlaps writing batch k
            for batch, prepared in pipelined(self._batches(), self._prepare):
                self._handle(batch, prepared)
            return
        for batch in self._batches():
            self._handle(batch)

    def _write(
        self, batch: list[_Message], prepared: PreparedBatch | None = None
    ) -> IngestResult | None:
        """Write ``batch`` (``prepared`` already, or not), retrying while the database is
        unreachable (None: stopping).

        A batch the database refuses for its content (a value it cannot store) is written
        message by message, and a message it still refuses is counted as malformed, so one
        bad message can neither block the consumer nor take its batch down with it.
        """
        from sqlalchemy.exc import InterfaceError, OperationalError

        while True:
            try:
                if prepared is None:
                    prepared = self.store.prepare([(m.topic, m.payload) for m in batch])
                return self.store.commit(prepared)
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

    def _handle(self, batch: list[_Message], prepared: PreparedBatch | None = None) -> None:
        result = self._write(batch, prepared)
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
