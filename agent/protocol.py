"""The device protocol over MQTT (docs/protocol.md): topics, payloads and the chunk frame.

The one module both the agent and the fleet's responder import. Pure: pydantic, struct,
hashlib and (for the data loop's sketch payloads) ``agent.sketches``, which is numpy only.
Bump ``SCHEMA_VERSION`` on incompatible payload changes.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.sketches import SketchCounts, SketchSpec

SCHEMA_VERSION = 1
PREFIX = "edgeloop/v1"
RESPONDER_GROUP = "edgeloop-responders"
DEFAULT_CHUNK_SIZE = 128 * 1024
MAX_JSON_PAYLOAD = 64 * 1024
# Starts with a letter or digit, so '.' and '..' never become directory names.
_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_CHUNK_INDEX = 2**32 - 1
MAX_CHUNKS_PER_REQUEST = 4096


class ProtocolError(ValueError):
    """A payload or topic that does not follow the protocol (logged and dropped)."""


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if valid, else raise ProtocolError naming it and the rule."""
    if not _DEVICE_ID_RE.match(device_id):
        raise ProtocolError(
            f"device id {device_id!r} is invalid; use 1-64 of A-Z a-z 0-9 '_' '.' '-', "
            "starting with a letter or digit"
        )
    return device_id


# ---------------------------------------------------------------- topics


def device_root(device_id: str) -> str:
    """``edgeloop/v1/devices/{device_id}``."""
    return f"{PREFIX}/devices/{check_device_id(device_id)}"


def status(device_id: str) -> str:
    """Retained online/offline status."""
    return f"{device_root(device_id)}/status"


def heartbeat(device_id: str) -> str:
    """Periodic heartbeat."""
    return f"{device_root(device_id)}/heartbeat"


def jobs_notify(device_id: str) -> str:
    """Jobs for the device (retained)."""
    return f"{device_root(device_id)}/jobs/notify"


def jobs_update(device_id: str) -> str:
    """Job progress from the device."""
    return f"{device_root(device_id)}/jobs/update"


def artifacts_req(device_id: str) -> str:
    """Chunk requests from the device."""
    return f"{device_root(device_id)}/artifacts/req"


def artifacts_data(device_id: str) -> str:
    """Chunk frames for the device."""
    return f"{device_root(device_id)}/artifacts/data"


def responder_subscription() -> str:
    """Shared subscription that load-balances chunk requests over responders."""
    return f"$share/{RESPONDER_GROUP}/{PREFIX}/devices/+/artifacts/req"


def all_devices(leaf: str) -> str:
    """Wildcard over every device for one leaf, e.g. ``all_devices('jobs/update')``."""
    return f"{PREFIX}/devices/+/{leaf}"


def parse_device_topic(topic: str) -> tuple[str, str]:
    """Split ``edgeloop/v1/devices/{id}/{leaf}`` into ``(id, leaf)``.

    Raises:
        ProtocolError: the topic is not under the device tree.
    """
    head = f"{PREFIX}/devices/"
    if not topic.startswith(head):
        raise ProtocolError(f"topic {topic!r} is not under {head}")
    device_id, sep, leaf = topic[len(head) :].partition("/")
    if not sep or not leaf:
        raise ProtocolError(f"topic {topic!r} has no leaf after the device id")
    return check_device_id(device_id), leaf


# ---------------------------------------------------------------- payloads


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1

    @field_validator("schema_version", mode="before")
    @classmethod
    def _int_version(cls, value: object) -> object:
        # JSON true and 1.0 equal 1 but are not a schema version (decode's rule).
        if type(value) is not int:
            raise ValueError(f"schema_version must be the integer {SCHEMA_VERSION}")
        return value

    def to_bytes(self) -> bytes:
        """JSON encoding for the wire."""
        return self.model_dump_json().encode()


def _now() -> datetime:
    return datetime.now(UTC)


class Status(_Payload):
    """Retained presence of a device."""

    device_id: str
    state: Literal["online", "offline"]
    agent_version: str
    reason: str | None = None
    ts: datetime = Field(default_factory=_now)


class LatencySummary(_Payload):
    """Inference latency percentiles of one model over the last heartbeat interval."""

    count: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None


class LoadedModel(_Payload):
    """A model the agent serves."""

    name: str
    version: str
    artifact_id: str
    runtime: str
    role: Literal["primary", "candidate", "shadow"] = "primary"


class HardwareFacts(_Payload):
    """What the device is."""

    arch: str
    profile: str
    cpu_features: list[str] = Field(default_factory=list)
    cpu_count: int
    accelerators: list[str] = Field(default_factory=list)
    memory_free_mib: int | None = None
    disk_free_mib: int | None = None


class ShadowSummary(_Payload):
    """How a model's shadow version agreed with its primary (totals since it started)."""

    comparisons: int = 0
    top1_disagreements: int = 0
    max_abs_diff: float | None = None

    @property
    def disagreement(self) -> float | None:
        """Share of compared requests whose top-1 class differed (None before any)."""
        return self.top1_disagreements / self.comparisons if self.comparisons else None


class Heartbeat(_Payload):
    """Periodic health report of an agent."""

    device_id: str
    agent_version: str
    uptime_s: float
    models: list[LoadedModel] = Field(default_factory=list)
    runtimes: list[str] = Field(default_factory=list)
    hardware: HardwareFacts
    inference: dict[str, LatencySummary] = Field(default_factory=dict)
    shadow: dict[str, ShadowSummary] = Field(default_factory=dict)
    ts: datetime = Field(default_factory=_now)


class TransferInfo(_Payload):
    """The stored transfer file of an artifact (deterministic tar of the bundle)."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0)


class ModelVersion(_Payload):
    """Name and version of a model."""

    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)


class JobNotify(_Payload):
    """A deployment or rollback job for one device."""

    job_id: str = Field(min_length=1, max_length=128)
    kind: Literal["deploy", "rollback", "retire"] = Field(
        default="deploy",
        description="deploy or rollback installs artifact_id in role; retire stops serving it "
        "as the model's candidate or shadow",
    )
    role: Literal["primary", "candidate", "shadow"] = "primary"
    traffic_fraction: float = Field(
        default=0.1, ge=0.0, le=1.0, description="share of requests a candidate answers"
    )
    artifact_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    model: ModelVersion
    profile: str
    signature: str = Field(description="base64 of the bundle's manifest.sig")
    transfer: TransferInfo
    created_at: datetime = Field(default_factory=_now)
    cancel: bool = Field(
        default=False,
        description="withdraw job_id: the agent stops it unless it already activated, and "
        "reports CANCELED (or the result it reached); published retained in place of the job",
    )

    def to_bytes(self) -> bytes:
        """JSON for the wire; ``cancel`` only when set, so agents older than it still parse
        every job that is not a cancel."""
        return self.model_dump_json(exclude=None if self.cancel else {"cancel"}).encode()


class JobState(StrEnum):
    """Per-device job states (AWS IoT Jobs style)."""

    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    ROLLED_BACK = "ROLLED_BACK"

    @property
    def terminal(self) -> bool:
        """Whether no further transition is possible."""
        return self not in (JobState.QUEUED, JobState.IN_PROGRESS)

    def allowed_next(self) -> frozenset[JobState]:
        """The states a job in this state may move to (empty when terminal).

        A job may end straight from QUEUED (refused before any work, already active,
        canceled, timed out), and IN_PROGRESS repeats once per step.
        """
        if self.terminal:
            return frozenset()
        return frozenset(s for s in JobState if s is not JobState.QUEUED)


class JobUpdate(_Payload):
    """Progress of a job on a device."""

    job_id: str
    device_id: str
    artifact_id: str
    state: JobState
    step: str | None = None
    chunks_done: int | None = None
    chunks_total: int | None = None
    reason: str | None = None
    ts: datetime = Field(default_factory=_now)


class ChunkRequest(_Payload):
    """Chunks the agent asks for: half-open index ranges ``[start, stop)``."""

    request_id: str = Field(min_length=1, max_length=64)
    artifact_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    chunk_size: int = Field(ge=1024, le=16 * 1024 * 1024)
    ranges: list[tuple[int, int]] = Field(min_length=1, max_length=256)

    @field_validator("ranges")
    @classmethod
    def _ordered(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        total = 0
        for start, stop in value:
            if not 0 <= start < stop:
                raise ValueError(f"range [{start}, {stop}) is empty or negative")
            if stop > MAX_CHUNK_INDEX:
                raise ValueError(f"range [{start}, {stop}) exceeds chunk index {MAX_CHUNK_INDEX}")
            total += stop - start
        if total > MAX_CHUNKS_PER_REQUEST:
            raise ValueError(
                f"request asks for {total} chunks; at most {MAX_CHUNKS_PER_REQUEST} per request"
            )
        return value

    def indices(self) -> list[int]:
        """Every chunk index asked for, in order, without duplicates."""
        seen: dict[int, None] = {}
        for start, stop in self.ranges:
            for i in range(start, stop):
                seen[i] = None
        return list(seen)


P = TypeVar("P", bound=_Payload)


def decode(model: type[P], payload: bytes, *, max_bytes: int = MAX_JSON_PAYLOAD) -> P:
    """Parse a JSON payload into ``model``.

    Raises:
        ProtocolError: oversized, not JSON, wrong schema_version, or invalid fields.
    """
    if len(payload) > max_bytes:
        raise ProtocolError(f"{model.__name__} payload of {len(payload)} bytes exceeds {max_bytes}")
    try:
        # pydantic-core parses and validates in one pass (a third of the time of json.loads
        # and model_validate); whatever it refuses takes the path below for a precise message.
        return model.model_validate_json(payload)
    except ValidationError:
        pass
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"{model.__name__} payload is not JSON: {err}") from err
    version_ok = isinstance(data, dict) and type(data.get("schema_version")) is int
    if not version_ok or data.get("schema_version") != SCHEMA_VERSION:
        version = data.get("schema_version") if isinstance(data, dict) else None
        raise ProtocolError(
            f"{model.__name__} schema_version {version!r} is not supported "
            f"(expected {SCHEMA_VERSION})"
        )
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ProtocolError(f"invalid {model.__name__}: {where}: {first['msg']}") from err


# ---------------------------------------------------------------- chunk frames

_FRAME = struct.Struct(">4sBBII32s32sI")
FRAME_MAGIC = b"ELCK"
FRAME_VERSION = 1
FRAME_HEADER_SIZE = _FRAME.size
FLAG_ERROR = 0x01


@dataclass(frozen=True)
class ChunkFrame:
    """One chunk of an artifact's transfer file (or an error answer)."""

    artifact_id: str
    index: int
    count: int
    payload: bytes
    error: bool = False

    def encode(self) -> bytes:
        """Binary frame: header (82 bytes) + payload."""
        return (
            _FRAME.pack(
                FRAME_MAGIC,
                FRAME_VERSION,
                FLAG_ERROR if self.error else 0,
                self.index,
                self.count,
                bytes.fromhex(self.artifact_id),
                hashlib.sha256(self.payload).digest(),
                len(self.payload),
            )
            + self.payload
        )

    @property
    def reason(self) -> str:
        """The error reason of an error frame."""
        try:
            return str(json.loads(self.payload)["reason"])
        except (ValueError, KeyError, TypeError):
            return self.payload[:200].decode(errors="replace")

    @classmethod
    def error_frame(cls, artifact_id: str, index: int, reason: str) -> ChunkFrame:
        """An error answer to a request (unknown artifact, not entitled, bad range)."""
        return cls(artifact_id, index, 0, json.dumps({"reason": reason}).encode(), error=True)


def decode_frame(data: bytes) -> ChunkFrame:
    """Parse and check a frame (magic, version, length, payload sha256).

    Raises:
        ProtocolError: naming what is wrong.
    """
    if len(data) < FRAME_HEADER_SIZE:
        raise ProtocolError(f"chunk frame of {len(data)} bytes is shorter than its header")
    magic, version, flags, index, count, artifact, digest, length = _FRAME.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise ProtocolError(f"chunk frame magic {magic!r} is not {FRAME_MAGIC!r}")
    if version != FRAME_VERSION:
        raise ProtocolError(f"chunk frame version {version} is not supported")
    payload = data[FRAME_HEADER_SIZE:]
    if len(payload) != length:
        raise ProtocolError(f"chunk {index} payload has {len(payload)} bytes; header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise ProtocolError(f"chunk {index} payload does not match its sha256")
    return ChunkFrame(artifact.hex(), index, count, payload, error=bool(flags & FLAG_ERROR))


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks of a file."""
    return max(1, -(-size // chunk_size))


def max_chunk_size(max_packet: int | None, topic: str, wanted: int = DEFAULT_CHUNK_SIZE) -> int:
    """Largest chunk size ≤ ``wanted`` whose frame fits the broker's maximum packet size.

    MQTT 5 PUBLISH overhead: fixed header (≤ 5), topic length (2) + topic, packet id (2),
    properties length (≤ 4); we reserve 64 bytes more for properties.
    """
    if max_packet is None:
        return wanted
    overhead = 5 + 2 + len(topic.encode()) + 2 + 4 + 64 + FRAME_HEADER_SIZE
    room = max_packet - overhead
    if room < 1024:
        raise ProtocolError(f"broker maximum packet size {max_packet} is too small for chunks")
    return min(wanted, room)


# ---------------------------------------------------------------- data loop (issue 6)
# Desired state (fleet → device) carries the capture policy; captured samples and drift
# sketches go back on the device's capture topics. The device side is agent/dataloop.py,
# agent/capture.py and agent/spool.py; docs/dataloop.md has the sizes and semantics.

#: Largest DesiredState payload: sketch specs carry bin edges (256 features x 11 edges).
MAX_DESIRED_PAYLOAD = 1024 * 1024
#: Largest SampleBatch payload the agent sends (and the cloud accepts).
MAX_SAMPLE_BATCH_PAYLOAD = 256 * 1024
#: Largest encoded sample; a batch always fits at least one.
MAX_SAMPLE_BYTES = 192 * 1024
#: Largest DriftSketch payload.
MAX_SKETCH_PAYLOAD = 128 * 1024


def desired(device_id: str) -> str:
    """Desired state of the device (retained, fleet → device)."""
    return f"{device_root(device_id)}/desired"


def capture_samples(device_id: str) -> str:
    """Captured samples, batched (device → cloud)."""
    return f"{device_root(device_id)}/capture/samples"


def capture_sketch(device_id: str) -> str:
    """Drift sketches, one window of one model per message (device → cloud)."""
    return f"{device_root(device_id)}/capture/sketch"


class SelectionRules(_Payload):
    """Which inferences are captured; the first rule that matches names the reason."""

    schema_version: Literal[1] = 1
    low_confidence_below: float | None = Field(
        default=None, ge=0.0, le=1.0, description="top-1 probability below this"
    )
    high_entropy_above: float | None = Field(
        default=None, ge=0.0, le=1.0, description="normalized entropy above this"
    )
    shadow_disagreement: bool = Field(
        default=False, description="the shadow's top-1 class differed from the primary's"
    )
    every_nth: int | None = Field(
        default=None, ge=1, description="every Nth inference of a model (1 = all)"
    )


class CapturePolicy(_Payload):
    """What the device captures and sketches, and how much it may send."""

    schema_version: Literal[1] = 1
    enabled: bool = True
    sample_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="probability that an inference no rule selected is captured anyway",
    )
    rules: SelectionRules = Field(default_factory=SelectionRules)
    models: list[str] | None = Field(
        default=None, description="model names to capture (None: every model)"
    )
    bytes_per_hour: int = Field(
        default=50 * 1024 * 1024, ge=0, description="token-bucket budget of encoded samples"
    )
    max_sample_bytes: int = Field(default=64 * 1024, ge=256, le=MAX_SAMPLE_BYTES)
    max_spool_bytes: int | None = Field(
        default=None, ge=64 * 1024, description="spool bound (None: the agent's configured one)"
    )
    when_full: Literal["drop_oldest", "reject_new"] = "drop_oldest"
    sketch_interval_s: float = Field(default=60.0, ge=0.1, le=86400.0)
    sketches: dict[str, SketchSpec] = Field(
        default_factory=dict, description="sketch spec per model name or artifact id"
    )
    batch_size: int = Field(default=32, ge=1, le=1000, description="samples per SampleBatch")


class DesiredState(_Payload):
    """Retained desired state of a device; a higher ``revision`` replaces the applied one."""

    revision: int = Field(ge=0)
    capture: CapturePolicy | None = Field(default=None, description="None: capture off")


class Tensor(_Payload):
    """A tensor as raw little-endian C-order bytes in base64, with its dtype and shape."""

    schema_version: Literal[1] = 1
    name: str = Field(default="", max_length=128)
    dtype: str = Field(pattern=r"^(bool|u?int(8|16|32|64)|float(16|32|64))$")
    shape: list[int]
    data: str = Field(description="base64 of the raw little-endian bytes")


class CapturedSample(_Payload):
    """One captured inference; ``sample_id`` is unique so the cloud can deduplicate."""

    sample_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="uuid4 hex")
    device_id: str
    model: str
    version: str
    artifact_id: str | None = None
    role: Literal["primary", "candidate", "shadow"] = "primary"
    ts: datetime
    reason: Literal["low_confidence", "high_entropy", "shadow_disagreement", "every_nth", "random"]
    top1: int | None = None
    confidence: float | None = None
    entropy: float | None = None
    inputs: list[Tensor]
    outputs: list[Tensor]


class SampleBatch(_Payload):
    """Samples sent together, and the device's drop counters (totals since the spool began)."""

    device_id: str
    sent_at: datetime = Field(default_factory=_now)
    dropped: dict[str, int] = Field(default_factory=dict)
    samples: list[CapturedSample] = Field(min_length=1)


class DriftSketch(_Payload):
    """One model's drift sketch over one window, on the spec's bin edges."""

    sketch_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="uuid4 hex")
    device_id: str
    model: str
    version: str
    artifact_id: str | None = None
    spec_key: str = Field(description="the key of the spec in CapturePolicy.sketches")
    spec_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of the spec's JSON")
    window_start: datetime
    window_end: datetime
    counts: SketchCounts
    dropped: dict[str, int] = Field(default_factory=dict)
