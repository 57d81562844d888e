"""Local inference over the Open Inference Protocol v2 (KServe v2) REST API.

Endpoints (JSON unless noted; errors are ``{"error": "..."}``)::

    GET  /v2/health/live                         200 {"live": true}
    GET  /v2/health/ready                        200 when every registered model is loaded, else 503
    GET  /v2                                     server metadata (name, version, extensions)
    GET  /v2/models/{name}[/versions/{v}]        model metadata (platform, inputs, outputs)
    GET  /v2/models/{name}[/versions/{v}]/ready  200 / 503 / 404
    POST /v2/models/{name}[/versions/{v}]/infer  inference (JSON or binary tensor data)
    GET  /metrics                                Prometheus text (agent.metrics)

Status codes: 400 for a request that does not match the model (the message names the
expected signature, e.g. ``expected input 'input' FP32 [1,3,16,16]``), 404 for an unknown
model or version, 503 when a model already runs its maximum of concurrent inferences (the
semaphore is waited on for ``queue_timeout_s`` only) or is not loaded yet, 500 when the
runtime fails.

The binary tensor data extension is supported both ways: a request whose JSON header is
followed by raw little-endian tensor bytes (header ``Inference-Header-Content-Length``,
``parameters.binary_data_size`` per input), and binary outputs when an output asks for
``binary_data`` or the request sets ``binary_data_output`` (as ``tritonclient`` does).

Routing: a :class:`ModelRepository` maps a name to a :class:`ModelEntry`: a primary version,
an optional candidate that gets a fraction of the traffic (A/B; decided by a hash of the
request ``id`` when one is given, else at random), and an optional shadow that receives a
copy of each request the primary answered, *after* the answer was sent, on a small bounded
executor (dropped when busy). Only the answering model's outputs are returned; shadow
outputs are compared with the primary's and recorded (metrics and :class:`ShadowStats`).
Entries are replaced atomically: a request takes a snapshot of the entry when it starts, so
a request that started on the old version finishes on it.

Inference runs on the HTTP server's threads, never on the MQTT network thread.

Capture (docs/dataloop.md): when ``InferenceServer.capture`` is set, each answered request is
handed to it after the response was sent (with a shadow: after the comparison, with the
shadow's top-1 disagreement); it only enqueues on a bounded queue, so it never slows or fails
a request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

import edgeloop
from agent import protocol
from agent.capture import CaptureEvent
from agent.metrics import AgentMetrics, LatencyTracker
from agent.runtimes import (
    Array,
    InvalidInputError,
    LoadedModel,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerBusyError,
    ServingError,
    Signature,
    format_shape,
)
from compiler.manifest import TensorSpec

logger = logging.getLogger(__name__)

Role = Literal["primary", "candidate", "shadow"]
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
EXTENSIONS = ["binary_tensor_data"]

# numpy dtype name -> OIP v2 datatype (BYTES and BF16 are not served).
V2_DATATYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
PLATFORMS = {"tvm": "tvm_relax_vm", "onnxruntime": "onnxruntime_onnx", "tflite": "tensorflow_lite"}


def v2_datatype(dtype: str) -> str:
    """The v2 datatype name of a numpy dtype name (``float32`` -> ``FP32``)."""
    return V2_DATATYPES.get(np.dtype(dtype).name, np.dtype(dtype).name.upper())


def describe_tensors(kind: str, specs: tuple[TensorSpec, ...]) -> str:
    """``expected input 'input' FP32 [1,3,16,16]`` in v2 datatype names."""
    noun = kind if len(specs) == 1 else f"{kind}s"
    body = ", ".join(f"{s.name!r} {v2_datatype(s.dtype)} {format_shape(s.shape)}" for s in specs)
    return f"expected {noun} {body}"


# ------------------------------------------------------------------ wire models


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestInput(_Wire):
    """One input tensor of an inference request."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class RequestOutput(_Wire):
    """One requested output (``parameters.binary_data`` selects binary encoding)."""

    name: str
    parameters: dict[str, Any] = {}


class InferRequest(_Wire):
    """``POST .../infer`` body (its JSON part when binary data follows)."""

    id: str | None = None
    parameters: dict[str, Any] = {}
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    """One output tensor of an inference response."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    """``POST .../infer`` response (its JSON part when binary data follows)."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    """Name, datatype and shape of one input or output in model metadata."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}`` response."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


# ------------------------------------------------------------------ repository


@dataclass(frozen=True)
class ServedVersion:
    """One loaded version of a model."""

    version: str
    model: LoadedModel
    artifact_id: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """What is served under one model name: primary, optional A/B candidate and shadow.

    Raises:
        ValueError: versions are not distinct, the fraction is outside [0, 1], or a
            candidate or shadow takes other inputs than the primary.
    """

    primary: ServedVersion
    candidate: ServedVersion | None = None
    candidate_fraction: float = 0.0
    shadow: ServedVersion | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.candidate_fraction <= 1.0:
            raise ValueError(f"candidate_fraction {self.candidate_fraction} is not in [0, 1]")
        versions = [served.version for served, _ in self.members()]
        if len(set(versions)) != len(versions):
            raise ValueError(f"served versions must be distinct, got {versions}")
        expected = self.primary.model.signature.inputs
        for served, role in self.members()[1:]:
            if served.model.signature.inputs != expected:
                raise ValueError(
                    f"{role} version {served.version!r} takes other inputs than the primary; "
                    f"{describe_tensors('input', expected)}"
                )

    def members(self) -> list[tuple[ServedVersion, Role]]:
        """Every served version with its role, primary first."""
        found: list[tuple[ServedVersion, Role]] = [(self.primary, "primary")]
        if self.candidate is not None:
            found.append((self.candidate, "candidate"))
        if self.shadow is not None:
            found.append((self.shadow, "shadow"))
        return found


def unit_hash(name: str, request_id: str) -> float:
    """A request id's deterministic position in [0, 1) for A/B routing of ``name``."""
    digest = hashlib.blake2b(f"{name}\0{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True)
class ShadowSnapshot:
    """Shadow comparison totals of one model, for heartbeats."""

    comparisons: int
    top1_disagreements: int
    mean_top1_agreement: float | None
    last_max_abs_diff: float | None
    max_abs_diff: float | None
    dropped: int
    errors: int


class ShadowStats:
    """Running totals of shadow-vs-primary comparisons (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._comparisons = 0
        self._top1_rated = 0
        self._top1_sum = 0.0
        self._disagreements = 0
        self._last_diff: float | None = None
        self._max_diff: float | None = None
        self._dropped = 0
        self._errors = 0

    def record(self, max_abs_diff: float, top1_agreement: float | None) -> None:
        """Add one comparison."""
        with self._lock:
            self._comparisons += 1
            self._last_diff = max_abs_diff
            self._max_diff = max(max_abs_diff, self._max_diff or 0.0)
            if top1_agreement is not None:
                self._top1_rated += 1
                self._top1_sum += top1_agreement
                self._disagreements += top1_agreement < 1.0

    def dropped(self) -> None:
        """Count one request not mirrored because the shadow queue was full."""
        with self._lock:
            self._dropped += 1

    def error(self) -> None:
        """Count one shadow run or comparison that failed."""
        with self._lock:
            self._errors += 1

    def snapshot(self) -> ShadowSnapshot:
        """The totals so far."""
        with self._lock:
            return ShadowSnapshot(
                comparisons=self._comparisons,
                top1_disagreements=self._disagreements,
                mean_top1_agreement=(
                    self._top1_sum / self._top1_rated if self._top1_rated else None
                ),
                last_max_abs_diff=self._last_diff,
                max_abs_diff=self._max_diff,
                dropped=self._dropped,
                errors=self._errors,
            )


@dataclass
class ModelStats:
    """Per-model statistics the agent puts in heartbeats (kept across version swaps)."""

    latency: LatencyTracker = field(default_factory=LatencyTracker)
    shadow: ShadowStats = field(default_factory=ShadowStats)


def compare_outputs(primary: list[Array], shadow: list[Array]) -> tuple[float, float | None]:
    """Max absolute difference over all outputs, and top-1 agreement over classifier rows.

    Top-1 agreement is the fraction of rows (last axis = classes, more than one class) of
    floating outputs whose argmax is equal; None when no output is such a classifier.

    Raises:
        ValueError: the output counts or shapes differ.
    """
    if len(primary) != len(shadow):
        raise ValueError(f"shadow returned {len(shadow)} outputs, primary {len(primary)}")
    max_diff = 0.0
    agree = rows = 0
    for p, s in zip(primary, shadow, strict=True):
        if p.shape != s.shape:
            raise ValueError(
                f"shadow output shape {format_shape(s.shape)} != primary {format_shape(p.shape)}"
            )
        if p.size:
            diff = np.abs(p.astype(np.float64) - s.astype(np.float64))
            max_diff = max(max_diff, float(np.max(diff)))
        if np.issubdtype(p.dtype, np.floating) and p.ndim >= 1 and p.shape[-1] > 1:
            top_p, top_s = np.argmax(p, axis=-1), np.argmax(s, axis=-1)
            agree += int(np.count_nonzero(top_p == top_s))
            rows += int(top_p.size)
    return max_diff, (agree / rows if rows else None)


@dataclass
class _Slot:
    entry: ModelEntry | None
    gate: threading.BoundedSemaphore
    stats: ModelStats


class ModelRepository:
    """Model name -> :class:`ModelEntry`, replaced atomically; per-model admission control.

    Args:
        max_concurrency: inferences one model may run at once; more wait up to
            ``queue_timeout_s`` for a slot, then get 503.
        queue_timeout_s: how long a request waits for a slot.
        seed: seed of the A/B coin for requests without an id (None: from the OS).
    """

    def __init__(
        self, *, max_concurrency: int = 4, queue_timeout_s: float = 0.05, seed: int | None = None
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency {max_concurrency} must be at least 1")
        self.max_concurrency = max_concurrency
        self.queue_timeout_s = queue_timeout_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}

    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            slot = _Slot(None, threading.BoundedSemaphore(self.max_concurrency), ModelStats())
            self._slots[name] = slot
        return slot

    def register(self, name: str) -> None:
        """Announce a model that is being loaded: the server is not ready until it is set."""
        with self._lock:
            self._slot(name)

    def set(self, name: str, entry: ModelEntry) -> ModelEntry | None:
        """Serve ``entry`` under ``name`` from now on; return the entry it replaced.

        Requests already running keep the entry they started with.
        """
        with self._lock:
            slot = self._slot(name)
            previous, slot.entry = slot.entry, entry
        return previous

    def remove(self, name: str) -> ModelEntry | None:
        """Stop serving ``name``; return its last entry."""
        with self._lock:
            slot = self._slots.pop(name, None)
        return None if slot is None else slot.entry

    def names(self) -> list[str]:
        """Registered model names, sorted."""
        with self._lock:
            return sorted(self._slots)

    def get(self, name: str) -> ModelEntry:
        """The current entry of ``name``.

        Raises:
            ModelNotFoundError: no such model is registered.
            ModelNotReadyError: it is registered but not loaded yet.
        """
        slot = self._slots.get(name)
        if slot is None:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(f"unknown model {name!r}; served models: {known}")
        entry = slot.entry
        if entry is None:
            raise ModelNotReadyError(f"model {name!r} is registered but not loaded yet")
        return entry

    def is_ready(self, name: str) -> bool:
        """Whether ``name`` has a loaded entry (ModelNotFoundError if unknown)."""
        try:
            self.get(name)
        except ModelNotReadyError:
            return False
        return True

    def ready(self) -> bool:
        """Whether every registered model is loaded."""
        with self._lock:
            return all(slot.entry is not None for slot in self._slots.values())

    def stats(self, name: str) -> ModelStats:
        """Latency and shadow statistics of ``name`` (ModelNotFoundError if unknown)."""
        slot = self._slots.get(name)
        if slot is None:
            raise ModelNotFoundError(f"unknown model {name!r}")
        return slot.stats

    # -------------------------------------------------------------- the daemon's view

    def set_model(
        self, name: str, version: str, artifact_id: str, runtime: str, model: LoadedModel
    ) -> None:
        """Make ``model`` the primary of ``name``; requests in flight finish on the old one.

        A candidate or shadow already configured stays when it still fits (other version,
        same inputs), else it is dropped. ``runtime`` is informational (``model.runtime``
        is what metadata reports); the argument order matches ``agent.daemon.Serving``.
        """
        primary = ServedVersion(version=version, model=model, artifact_id=artifact_id)
        with self._lock:
            slot = self._slot(name)
            old = slot.entry
            entry = ModelEntry(primary=primary)
            if old is not None:
                try:
                    entry = ModelEntry(
                        primary=primary,
                        candidate=old.candidate,
                        candidate_fraction=old.candidate_fraction,
                        shadow=old.shadow,
                    )
                except ValueError as err:
                    logger.warning("model %s: dropping candidate/shadow (%s)", name, err)
            slot.entry = entry
        logger.info("model %s: serving version %s (%s) as primary", name, version, runtime)

    def remove_model(self, name: str) -> None:
        """Stop serving ``name`` (requests in flight finish)."""
        self.remove(name)

    def set_secondary(
        self,
        name: str,
        *,
        role: str,
        version: str,
        artifact_id: str,
        model: LoadedModel,
        fraction: float = 0.0,
    ) -> None:
        """Serve ``model`` as the A/B ``candidate`` (with ``fraction`` of the traffic) or the
        ``shadow`` of ``name`` beside its primary.

        Raises:
            ModelNotFoundError: ``name`` has no primary to split with or compare against.
            ValueError: wrong role, same version as another member, or other inputs.
        """
        if role not in ("candidate", "shadow"):
            raise ValueError(f"role {role!r} is not valid; choose from: candidate, shadow")
        served = ServedVersion(version=version, model=model, artifact_id=artifact_id)
        with self._lock:
            slot = self._slots.get(name)
            old = slot.entry if slot is not None else None
            if slot is None or old is None:
                raise ModelNotFoundError(f"model {name!r} has no primary version to pair with")
            if role == "candidate":
                entry = ModelEntry(
                    primary=old.primary,
                    candidate=served,
                    candidate_fraction=fraction,
                    shadow=old.shadow,
                )
            else:
                entry = ModelEntry(
                    primary=old.primary,
                    candidate=old.candidate,
                    candidate_fraction=old.candidate_fraction,
                    shadow=served,
                )
            slot.entry = entry

    def clear_secondary(self, name: str, *, role: str) -> None:
        """Stop serving the candidate or shadow of ``name`` (no-op if there is none)."""
        with self._lock:
            slot = self._slots.get(name)
            old = slot.entry if slot is not None else None
            if slot is None or old is None:
                return
            if role == "candidate":
                slot.entry = ModelEntry(primary=old.primary, shadow=old.shadow)
            else:
                slot.entry = ModelEntry(
                    primary=old.primary,
                    candidate=old.candidate,
                    candidate_fraction=old.candidate_fraction,
                )

    def infer(self, name: str, inputs: list[Array]) -> list[Array]:
        """Run ``inputs`` on the primary of ``name`` through admission control (health checks).

        Raises:
            ServingError: unknown or unloaded model, overload, bad inputs, runtime failure.
        """
        entry = self.get(name)
        stats = self.stats(name)
        try:
            with self.admit(name):
                start = time.perf_counter()
                outputs = entry.primary.model.infer(inputs)
        except ServingError:
            stats.latency.error()
            raise
        stats.latency.observe((time.perf_counter() - start) * 1000.0)
        return outputs

    def loaded(self) -> list[protocol.LoadedModel]:
        """Every served version with its role, for heartbeats."""
        with self._lock:
            entries = [(name, slot.entry) for name, slot in sorted(self._slots.items())]
        return [
            protocol.LoadedModel(
                name=name,
                version=served.version,
                artifact_id=served.artifact_id or "",
                runtime=served.model.runtime,
                role=role,
            )
            for name, entry in entries
            if entry is not None
            for served, role in entry.members()
        ]

    def shadow(self) -> dict[str, protocol.ShadowSummary]:
        """Per-model shadow agreement totals of the models that have a shadow, for heartbeats."""
        with self._lock:
            slots = sorted(self._slots.items())
        out = {}
        for name, slot in slots:
            if slot.entry is None or slot.entry.shadow is None:
                continue
            snap = slot.stats.shadow.snapshot()
            out[name] = protocol.ShadowSummary(
                comparisons=snap.comparisons,
                top1_disagreements=snap.top1_disagreements,
                max_abs_diff=snap.max_abs_diff,
            )
        return out

    def latency(self) -> dict[str, protocol.LatencySummary]:
        """Per-model latency percentiles over each tracker's rolling window, for heartbeats."""
        with self._lock:
            slots = sorted(self._slots.items())
        return {name: slot.stats.latency.summary() for name, slot in slots}

    @contextmanager
    def admit(self, name: str) -> Iterator[None]:
        """Hold one of ``name``'s inference slots (ServerBusyError when none frees in time)."""
        slot = self._slots.get(name)
        if slot is None:
            raise ModelNotFoundError(f"unknown model {name!r}")
        gate = slot.gate
        if not gate.acquire(timeout=self.queue_timeout_s):
            raise ServerBusyError(
                f"model {name!r} is overloaded: {self.max_concurrency} inference(s) already "
                f"running; retry later"
            )
        try:
            yield
        finally:
            gate.release()

    def route(
        self, name: str, entry: ModelEntry, *, version: str | None, request_id: str | None
    ) -> tuple[ServedVersion, Role]:
        """The version that answers a request, and its role.

        Raises:
            ModelNotFoundError: an explicit ``version`` is not served.
        """
        if version is not None:
            for served, role in entry.members():
                if served.version == version:
                    return served, role
            versions = ", ".join(served.version for served, _ in entry.members())
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r}; served versions: {versions}"
            )
        if entry.candidate is not None and entry.candidate_fraction > 0.0:
            draw = unit_hash(name, request_id) if request_id else self._rng.random()
            if draw < entry.candidate_fraction:
                return entry.candidate, "candidate"
        return entry.primary, "primary"


# ------------------------------------------------------------------ request handling


@dataclass
class Response:
    """An HTTP response, and work the sender must run once it was sent (shadow mirroring)."""

    status: int
    body: bytes
    content_type: str = JSON_CONTENT_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    after: Callable[[], None] | None = None


def _json(status: int, payload: BaseModel | Mapping[str, Any]) -> Response:
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json(exclude_none=True).encode()
    else:
        body = json.dumps(payload).encode()
    return Response(status, body)


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


def decode_inputs(
    signature: Signature, request: InferRequest, *, binary: memoryview, model_name: str
) -> list[Array]:
    """Turn a request's input tensors into arrays in the model's declared order.

    Raises:
        InvalidInputError: an unknown, missing or duplicate input, or a wrong datatype,
            shape or amount of data; the message names the expected signature.
    """
    expected = describe_tensors("input", signature.inputs)
    specs = {spec.name: (index, spec) for index, spec in enumerate(signature.inputs)}
    arrays: list[Array | None] = [None] * len(specs)
    offset = 0
    for tensor in request.inputs:
        if tensor.name not in specs:
            raise InvalidInputError(
                f"model {model_name!r} has no input {tensor.name!r}; {expected}"
            )
        index, spec = specs[tensor.name]
        if arrays[index] is not None:
            raise InvalidInputError(f"input {tensor.name!r} is given twice; {expected}")
        datatype = v2_datatype(spec.dtype)
        if tensor.datatype != datatype:
            raise InvalidInputError(
                f"input {tensor.name!r} has datatype {tensor.datatype}; {expected}"
            )
        if tensor.shape != spec.shape:
            raise InvalidInputError(
                f"input {tensor.name!r} has shape {format_shape(tensor.shape)}; {expected}"
            )
        dtype = np.dtype(spec.dtype)
        count = int(np.prod(spec.shape, dtype=np.int64))
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if size != count * dtype.itemsize:
                raise InvalidInputError(
                    f"input {tensor.name!r} has binary_data_size {size}; {datatype} "
                    f"{format_shape(spec.shape)} takes {count * dtype.itemsize} bytes"
                )
            if offset + size > len(binary):
                raise InvalidInputError(
                    f"input {tensor.name!r} needs {size} bytes of binary data at offset "
                    f"{offset}; the request carries {len(binary)}"
                )
            raw = np.frombuffer(binary[offset : offset + size], dtype=dtype.newbyteorder("<"))
            offset += size
            array: Array = raw.astype(dtype, copy=False).reshape(spec.shape)
        else:
            if tensor.data is None:
                raise InvalidInputError(
                    f"input {tensor.name!r} has neither data nor binary_data_size; {expected}"
                )
            try:
                array = np.asarray(tensor.data, dtype=dtype)
            except (TypeError, ValueError) as err:
                raise InvalidInputError(
                    f"input {tensor.name!r}: data is not {count} {datatype} values ({err}); "
                    f"{expected}"
                ) from err
            if array.size != count:
                raise InvalidInputError(
                    f"input {tensor.name!r} has {array.size} values where shape "
                    f"{format_shape(spec.shape)} needs {count}; {expected}"
                )
            array = array.reshape(spec.shape)
        array.flags.writeable = False  # shared with the shadow run: nobody may change it
        arrays[index] = array
    missing = [s.name for s, a in zip(signature.inputs, arrays, strict=True) if a is None]
    if missing:
        raise InvalidInputError(
            f"missing input(s) {', '.join(repr(m) for m in missing)}; {expected}"
        )
    if offset != len(binary):
        raise InvalidInputError(
            f"the request carries {len(binary)} bytes of binary data, the inputs use {offset}"
        )
    return [a for a in arrays if a is not None]


def encode_outputs(
    signature: Signature, request: InferRequest, *, outputs: list[Array], model_name: str
) -> tuple[list[ResponseOutput], list[bytes]]:
    """Select the requested outputs and encode each as JSON data or binary bytes.

    Raises:
        InvalidInputError: an unknown output is requested, or an unsupported extension.
    """
    default_binary = bool(request.parameters.get("binary_data_output", False))
    by_name = {spec.name: i for i, spec in enumerate(signature.outputs)}
    wanted: list[tuple[int, bool]]
    if request.outputs is None:
        wanted = [(i, default_binary) for i in range(len(signature.outputs))]
    else:
        wanted = []
        for requested in request.outputs:
            if requested.name not in by_name:
                raise InvalidInputError(
                    f"model {model_name!r} has no output {requested.name!r}; "
                    f"{describe_tensors('output', signature.outputs)}"
                )
            if requested.parameters.get("classification"):
                raise InvalidInputError("the classification extension is not supported")
            binary = requested.parameters.get("binary_data", default_binary)
            wanted.append((by_name[requested.name], bool(binary)))
    encoded: list[ResponseOutput] = []
    chunks: list[bytes] = []
    for index, binary in wanted:
        spec = signature.outputs[index]
        array = np.asarray(outputs[index], dtype=np.dtype(spec.dtype))
        datatype = v2_datatype(spec.dtype)
        shape = [int(d) for d in array.shape]
        if binary:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            chunks.append(raw)
            encoded.append(
                ResponseOutput(
                    name=spec.name,
                    datatype=datatype,
                    shape=shape,
                    parameters={"binary_data_size": len(raw)},
                )
            )
        else:
            encoded.append(
                ResponseOutput(
                    name=spec.name, datatype=datatype, shape=shape, data=array.ravel().tolist()
                )
            )
    return encoded, chunks


class _ShadowRunner:
    """A small bounded executor for shadow runs; submissions beyond its queue are dropped.

    A request announces its shadow run before its response is sent and submits it after,
    so :meth:`wait_idle` also covers runs whose primary answer is still being written.
    """

    def __init__(self, *, workers: int, queue: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shadow")
        self._slots = threading.BoundedSemaphore(workers + queue)
        self._idle = threading.Condition()
        self._pending = 0

    def announce(self) -> None:
        with self._idle:
            self._pending += 1

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue an announced job; False (and the announcement withdrawn) when full."""
        if not self._slots.acquire(blocking=False):
            self._settle()
            return False
        try:
            self._executor.submit(self._run, job)
        except RuntimeError:  # shut down
            self._slots.release()
            self._settle()
            return False
        return True

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:  # a shadow must never take anything down
            logger.exception("shadow run failed")
        finally:
            self._slots.release()
            self._settle()

    def _settle(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


_REASONS = {400: "invalid", 404: "not_found", 503: "busy"}


class InferenceServer:
    """The OIP v2 REST server over a :class:`ModelRepository`.

    We use the standard library's ``ThreadingHTTPServer`` rather than a web framework: the
    device needs no extra dependency, and the per-request overhead stays under 0.3 ms
    (HTTP/1.1 keep-alive, TCP_NODELAY, headers and body written in one send).

    Args:
        repository: the models to serve.
        metrics: where to record metrics (a fresh :class:`AgentMetrics` if None).
        shadow_workers: threads that run shadow models.
        shadow_queue: shadow runs that may wait for a worker; more are dropped.
        max_body_bytes: larger request bodies get 413.
        idle_timeout_s: a keep-alive connection idle this long is closed.
    """

    def __init__(
        self,
        repository: ModelRepository,
        *,
        metrics: AgentMetrics | None = None,
        shadow_workers: int = 1,
        shadow_queue: int = 4,
        max_body_bytes: int = 64 << 20,
        idle_timeout_s: float = 30.0,
    ) -> None:
        self.repository = repository
        self.metrics = metrics or AgentMetrics()
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self._shadow_workers = shadow_workers
        self._shadow_queue = shadow_queue
        self._shadow: _ShadowRunner | None = None
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conn_lock = threading.Condition()
        self._connections: set[socket.socket] = set()
        self._in_flight = 0
        #: Where answered inferences go for the data loop (``DataLoop.offer``: a bounded
        #: queue, never blocks); called after the answer was sent, never on error.
        self.capture: Callable[[CaptureEvent], None] | None = None
        self._capture_seqs: dict[str, int] = {}
        self._capture_seq_lock = threading.Lock()

    # -------------------------------------------------------------- lifecycle

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind and serve on a background thread.

        Args:
            host: address to bind.
            port: TCP port; 0 picks a free one.

        Returns:
            The bound port.

        Raises:
            RuntimeError: the server is already running.
            OSError: the address cannot be bound.
        """
        if self._httpd is not None:
            raise RuntimeError("the inference server is already running")
        handler = type("Handler", (_Handler,), {"timeout": self.idle_timeout_s})
        httpd = _HTTPServer((host, port), handler)
        httpd.app = self
        self._shadow = _ShadowRunner(workers=self._shadow_workers, queue=self._shadow_queue)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="oip-http", daemon=True
        )
        self._thread.start()
        return self.port

    @property
    def port(self) -> int:
        """The bound port (RuntimeError when not started)."""
        if self._httpd is None:
            raise RuntimeError("the inference server is not running")
        return int(self._httpd.server_address[1])

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop accepting, let running requests finish (up to ``timeout_s``), close the rest."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        with self._conn_lock:
            self._conn_lock.wait_for(lambda: self._in_flight == 0, timeout=timeout_s)
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._shadow is not None:
            self._shadow.shutdown()

    def wait_shadow_idle(self, timeout_s: float) -> bool:
        """Wait until no shadow run is queued or running; False on timeout."""
        return self._shadow is None or self._shadow.wait_idle(timeout_s)

    # -------------------------------------------------------------- routing

    def handle(self, method: str, target: str, headers: Message, body: bytes) -> Response:
        """Answer one HTTP request (no socket involved; the handler calls this)."""
        parts = [unquote(p) for p in urlsplit(target).path.strip("/").split("/")]
        try:
            return self._route(method, parts, headers, body)
        except ServingError as err:
            return _error(err.http_status, str(err))

    def _route(self, method: str, parts: list[str], headers: Message, body: bytes) -> Response:
        get_only = method == "GET"
        if parts == ["metrics"] and get_only:
            text, content_type = self.metrics.render()
            return Response(200, text, content_type)
        if parts[:1] != ["v2"]:
            return _error(404, f"no route for {method} /{'/'.join(parts)}")
        rest = parts[1:]
        if rest in ([], ["health", "live"], ["health", "ready"]):
            if not get_only:
                return _method_not_allowed(method, "GET")
            if not rest:
                return _json(
                    200,
                    {
                        "name": "edgeloop-agent",
                        "version": edgeloop.__version__,
                        "extensions": EXTENSIONS,
                    },
                )
            if rest[1] == "live":
                return _json(200, {"live": True})
            ready = self.repository.ready()
            return _json(200 if ready else 503, {"ready": ready})
        if len(rest) < 2 or rest[0] != "models":
            return _error(404, f"no route for {method} /{'/'.join(parts)}")
        name, tail = rest[1], rest[2:]
        version: str | None = None
        if tail[:1] == ["versions"]:
            if len(tail) < 2:
                return _error(404, f"no route for {method} /{'/'.join(parts)}")
            version, tail = tail[1], tail[2:]
        if tail == ["infer"]:
            if method != "POST":
                return _method_not_allowed(method, "POST")
            return self._infer(name, version, headers, body)
        if tail not in ([], ["ready"]):
            return _error(404, f"no route for {method} /{'/'.join(parts)}")
        if not get_only:
            return _method_not_allowed(method, "GET")
        if tail == ["ready"]:
            try:
                entry = self.repository.get(name)
            except ModelNotReadyError:
                return _json(503, {"name": name, "ready": False})
            if version is not None:
                self.repository.route(name, entry, version=version, request_id=None)
            return _json(200, {"name": name, "ready": True})
        return _json(200, self._metadata(name, version))

    def _metadata(self, name: str, version: str | None) -> ModelMetadata:
        entry = self.repository.get(name)
        if version is None:
            served, versions = entry.primary, [s.version for s, _ in entry.members()]
        else:
            served, _ = self.repository.route(name, entry, version=version, request_id=None)
            versions = [served.version]
        signature = served.model.signature
        return ModelMetadata(
            name=name,
            versions=versions,
            platform=PLATFORMS.get(served.model.runtime, served.model.runtime),
            inputs=[_tensor_metadata(s) for s in signature.inputs],
            outputs=[_tensor_metadata(s) for s in signature.outputs],
        )

    # -------------------------------------------------------------- inference

    def _infer(self, name: str, version: str | None, headers: Message, body: bytes) -> Response:
        entry = self.repository.get(name)  # the snapshot this request runs on
        stats = self.repository.stats(name)
        served, role = entry.primary, "primary"
        try:
            request, binary = _parse_request(headers, body)
            served, role = self.repository.route(
                name, entry, version=version, request_id=request.id
            )
            signature = served.model.signature
            inputs = decode_inputs(signature, request, binary=binary, model_name=name)
            with self.repository.admit(name):
                start = time.perf_counter()
                outputs = served.model.infer(inputs)
                elapsed = time.perf_counter() - start
            encoded, chunks = encode_outputs(signature, request, outputs=outputs, model_name=name)
        except ServingError as err:
            reason = _REASONS.get(err.http_status, "failed")
            self.metrics.observe_error(name, served.version, role=role, reason=reason)
            stats.latency.error()
            raise
        self.metrics.observe_inference(name, served.version, role=role, seconds=elapsed)
        stats.latency.observe(elapsed * 1000.0)
        header = (
            InferResponse(
                model_name=name, model_version=served.version, id=request.id, outputs=encoded
            )
            .model_dump_json(exclude_none=True)
            .encode()
        )
        if chunks:
            response = Response(
                200,
                b"".join([header, *chunks]),
                BINARY_CONTENT_TYPE,
                {HEADER_LENGTH: str(len(header))},
            )
        else:
            response = Response(200, header)
        # Numbered here, before the answer leaves: the capture hand-over runs after it, on
        # this request's thread, so two requests' events may reach the data loop swapped.
        seq = self._capture_seq(name) if self.capture is not None else 0
        if role == "primary" and entry.shadow is not None:
            response.after = self._shadow_job(name, entry, inputs, outputs, stats, seq)
        elif self.capture is not None:
            response.after = self._capture_job(name, served, role, inputs, outputs, seq=seq)
        return response

    def _capture_seq(self, name: str) -> int:
        """The next answered-request number of model ``name`` (CaptureEvent.seq)."""
        with self._capture_seq_lock:
            seq = self._capture_seqs.get(name, 0) + 1
            self._capture_seqs[name] = seq
            return seq

    def _capture_job(
        self,
        name: str,
        served: ServedVersion,
        role: str,
        inputs: list[Array],
        outputs: list[Array],
        shadow_disagreement: bool | None = None,
        *,
        seq: int = 0,
    ) -> Callable[[], None]:
        """Hand an answered inference to the data loop (after the answer was sent)."""
        sink = self.capture

        def offer() -> None:
            if sink is None:
                return
            try:
                sink(
                    CaptureEvent(
                        model=name,
                        version=served.version,
                        artifact_id=served.artifact_id,
                        role=role,
                        inputs=inputs,
                        outputs=outputs,
                        shadow_disagreement=shadow_disagreement,
                        input_names=[t.name for t in served.model.signature.inputs],
                        output_names=[t.name for t in served.model.signature.outputs],
                        seq=seq,
                    )
                )
            except Exception:  # capture must never fail a request
                logger.exception("capture of a %s inference failed", name)

        return offer

    def _shadow_job(
        self,
        name: str,
        entry: ModelEntry,
        inputs: list[Array],
        primary_outputs: list[Array],
        stats: ModelStats,
        seq: int = 0,
    ) -> Callable[[], None]:
        shadow = entry.shadow
        assert shadow is not None
        primary_version = entry.primary.version

        def compare() -> None:
            try:
                shadow_outputs = shadow.model.infer(inputs)
                max_diff, top1 = compare_outputs(primary_outputs, shadow_outputs)
            except (ServingError, ValueError) as err:
                logger.warning("shadow %s version %s failed: %s", name, shadow.version, err)
                stats.shadow.error()
                self.metrics.shadow_errors.labels(name).inc()
                capture(None)
                return
            capture(None if top1 is None else top1 < 1.0)
            stats.shadow.record(max_diff, top1)
            self.metrics.observe_shadow(
                name, primary_version, shadow.version, max_abs_diff=max_diff, top1_agreement=top1
            )

        def capture(disagreement: bool | None) -> None:
            if self.capture is not None:
                self._capture_job(
                    name, entry.primary, "primary", inputs, primary_outputs, disagreement, seq=seq
                )()

        runner = self._shadow
        if runner is not None:
            runner.announce()

        def submit() -> None:
            if runner is None or not runner.submit(compare):
                stats.shadow.dropped()
                self.metrics.shadow_dropped.labels(name).inc()
                capture(None)

        return submit

    # -------------------------------------------------------------- connection bookkeeping

    def _opened(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.add(conn)

    def _closed(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.discard(conn)

    def _begin(self) -> None:
        with self._conn_lock:
            self._in_flight += 1

    def _end(self) -> None:
        with self._conn_lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._conn_lock.notify_all()


def _tensor_metadata(spec: TensorSpec) -> TensorMetadata:
    return TensorMetadata(name=spec.name, datatype=v2_datatype(spec.dtype), shape=spec.shape)


def _method_not_allowed(method: str, allowed: str) -> Response:
    response = _error(405, f"method {method} is not allowed here; use {allowed}")
    response.headers["Allow"] = allowed
    return response


def _parse_request(headers: Message, body: bytes) -> tuple[InferRequest, memoryview]:
    """Split the JSON header from binary data and validate it (InvalidInputError if bad)."""
    view = memoryview(body)
    header_length = headers.get(HEADER_LENGTH)
    json_part: bytes
    if header_length is None:
        json_part, binary = body, view[len(view) :]
    else:
        try:
            split = int(header_length)
        except ValueError:
            split = -1
        if not 0 <= split <= len(view):
            raise InvalidInputError(
                f"{HEADER_LENGTH} {header_length!r} is not a length within the "
                f"{len(view)}-byte body"
            )
        json_part, binary = body[:split], view[split:]
    try:
        return InferRequest.model_validate_json(json_part), binary
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()
        )
        raise InvalidInputError(f"invalid inference request: {problems}") from err


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    app: InferenceServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
    server_version = "edgeloop-agent/" + edgeloop.__version__
    disable_nagle_algorithm = True
    wbufsize = 1 << 16  # headers and body leave in one send when the handler flushes

    @property
    def app(self) -> InferenceServer:
        return cast(_HTTPServer, self.server).app

    def setup(self) -> None:
        super().setup()
        self.app._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.app._closed(self.connection)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        app = self.app
        app._begin()
        response: Response | None = None
        try:
            response = self._respond(app, method)
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            for key, value in response.headers.items():
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(response.body)
            self.wfile.flush()
        finally:
            app._end()
            if response is not None and response.after is not None:
                response.after()  # after the answer left, even if the client went away

    def _respond(self, app: InferenceServer, method: str) -> Response:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return _error(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            return _error(400, "Content-Length is not an integer")
        if length < 0 or length > app.max_body_bytes:
            self.close_connection = True
            return _error(413, f"request body of {length} bytes exceeds {app.max_body_bytes}")
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            self.close_connection = True
            return _error(400, f"request body ended after {len(body)} of {length} bytes")
        try:
            return app.handle(method, self.path, self.headers, body)
        except Exception as err:  # the edge: never drop a connection without an answer
            logger.exception("unhandled error for %s %s", method, self.path)
            return _error(500, f"internal error: {err}")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        logger.debug("%s - %s", self.address_string(), format % args)
