"""Capture policy evaluation: which inferences leave the device, within which budget.

Pure (numpy and pydantic only, no MQTT, no SQLite, no threads): the data loop
(``agent.dataloop``) feeds it one :class:`CaptureEvent` per answered request and acts on the
answers. Every decision takes its inputs explicitly (the per-model inference count, the random
draw, the clock), so the tables in ``tests/agent/test_capture.py`` pin it down.

* :func:`select`: the reason an inference is captured (``low_confidence``, ``high_entropy``,
  ``shadow_disagreement``, ``every_nth``, ``random``), or None. Rules are tried in that order;
  the first that matches names the reason.
* :class:`TokenBucket`: the bytes-per-hour budget; capacity one hour's budget, refilled
  continuously from an injected clock.
* The redaction hook: a user ``module:function`` (agent config ``capture.redaction_hook``)
  that receives each selected :class:`Sample` and returns it, a modified copy, or None to drop
  it. :func:`run_hook` turns anything the hook raises into a counted drop.
* :func:`encode_sample`: the wire form (``protocol.CapturedSample``), tensors as base64 of
  their raw little-endian bytes.

Exception tree::

    CaptureError                 (ValueError)
    ├── HookError                the redaction hook cannot be loaded
    └── SpoolError               (agent.spool) the spool cannot be opened or is corrupt
"""

from __future__ import annotations

import base64
import importlib
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from agent import protocol
from agent.protocol import CapturePolicy, SelectionRules
from agent.sketches import confidence_top1, entropy

Array = npt.NDArray[Any]
Hook = Callable[["Sample"], "Sample | None"]

#: Reasons in the order the rules are tried.
REASONS = ("low_confidence", "high_entropy", "shadow_disagreement", "every_nth", "random")


class CaptureError(ValueError):
    """Root of the data loop's errors on the device (tree in the module docstring)."""


class HookError(CaptureError):
    """The redaction hook named in the config cannot be imported or is not callable."""


@dataclass(frozen=True)
class CaptureEvent:
    """One answered inference, as the server hands it over (arrays are read-only)."""

    model: str
    version: str
    artifact_id: str | None
    role: str
    inputs: list[Array]
    outputs: list[Array]
    shadow_disagreement: bool | None = None
    ts: float = field(default_factory=time.time)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    # The model's answered-request number, given while the request was answered (1, 2, ...;
    # 0: not numbered). Events reach the data loop in hand-over order, which two requests
    # answered on two server threads can swap; ``every_nth`` counts by this number.
    seq: int = 0


@dataclass(frozen=True)
class SampleStats:
    """What the rules look at: the least confident row of the first output."""

    top1: int | None = None
    confidence: float | None = None
    entropy: float | None = None
    shadow_disagreement: bool | None = None


def stats_of(outputs: list[Array], shadow_disagreement: bool | None = None) -> SampleStats:
    """Top-1 class, confidence and normalized entropy of the first output's least confident row.

    The first output is read as ``(N, K)`` logits or probabilities; an output that is not a
    float tensor with at least two classes gives no confidence or entropy (only the every-Nth
    and random rules can select it then).
    """
    if not outputs:
        return SampleStats(shadow_disagreement=shadow_disagreement)
    out = np.asarray(outputs[0])
    if out.dtype.kind != "f" or out.ndim == 0 or out.size == 0:
        return SampleStats(shadow_disagreement=shadow_disagreement)
    rows = out.reshape(out.shape[0], -1) if out.ndim > 1 else out.reshape(1, -1)
    if rows.shape[1] < 2 or not np.all(np.isfinite(rows)):
        return SampleStats(shadow_disagreement=shadow_disagreement)
    conf, top1 = confidence_top1(rows)
    ent = entropy(rows)
    worst = int(np.argmin(conf))
    return SampleStats(
        top1=int(top1[worst]),
        confidence=float(conf[worst]),
        entropy=float(ent.max()),
        shadow_disagreement=shadow_disagreement,
    )


def select(stats: SampleStats, policy: CapturePolicy, *, nth: int, draw: float) -> str | None:
    """The reason to capture an inference, or None.

    Args:
        stats: what the inference produced.
        policy: the capture policy in force.
        nth: 1-based count of this model's inferences since the policy was applied (below 1:
            answered before it, never ``every_nth``).
        draw: a uniform random number in [0, 1) for the ``sample_rate`` rule.

    Returns:
        The first matching reason of :data:`REASONS`, or None (also when capture is off).
    """
    if not policy.enabled:
        return None
    rules: SelectionRules = policy.rules
    if (
        rules.low_confidence_below is not None
        and stats.confidence is not None
        and stats.confidence < rules.low_confidence_below
    ):
        return "low_confidence"
    if (
        rules.high_entropy_above is not None
        and stats.entropy is not None
        and stats.entropy > rules.high_entropy_above
    ):
        return "high_entropy"
    if rules.shadow_disagreement and stats.shadow_disagreement:
        return "shadow_disagreement"
    if rules.every_nth is not None and nth >= 1 and nth % rules.every_nth == 0:
        return "every_nth"
    if draw < policy.sample_rate:
        return "random"
    return None


class TokenBucket:
    """A byte budget per hour: capacity one hour's worth, refilled continuously.

    A zero budget admits nothing. Thread-safe; ``clock`` returns seconds (monotonic).
    """

    def __init__(self, bytes_per_hour: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.capacity = float(bytes_per_hour)
        self.rate = bytes_per_hour / 3600.0
        self._tokens = self.capacity
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now

    def try_take(self, size: int) -> bool:
        """Take ``size`` bytes if the budget has them; False (nothing taken) otherwise."""
        with self._lock:
            self._refill()
            if size <= self._tokens:
                self._tokens -= size
                return True
            return False

    @property
    def available(self) -> float:
        """Bytes that could be taken now."""
        with self._lock:
            self._refill()
            return self._tokens


# ------------------------------------------------------------------ samples and the hook


@dataclass(frozen=True)
class Sample:
    """A selected inference on its way to the spool; what the redaction hook receives.

    A hook returns it unchanged, a modified copy (``dataclasses.replace(sample, inputs=[...])``)
    or None to drop it. Its arrays are read-only: build new ones to change them.
    """

    sample_id: str
    model: str
    version: str
    artifact_id: str | None
    role: str
    ts: float
    reason: str
    inputs: list[Array]
    outputs: list[Array]
    stats: SampleStats
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)


def new_id() -> str:
    """A unique sample or sketch id (uuid4, 32 hex digits)."""
    return uuid.uuid4().hex


def make_sample(event: CaptureEvent, stats: SampleStats, reason: str) -> Sample:
    """The sample for a selected event, with a fresh unique id."""
    return Sample(
        sample_id=new_id(),
        model=event.model,
        version=event.version,
        artifact_id=event.artifact_id,
        role=event.role,
        ts=event.ts,
        reason=reason,
        inputs=list(event.inputs),
        outputs=list(event.outputs),
        stats=stats,
        input_names=list(event.input_names),
        output_names=list(event.output_names),
    )


def load_hook(spec: str) -> Hook:
    """Import the redaction hook ``module:function``.

    Raises:
        HookError: the spec is malformed, the module cannot be imported, or the attribute is
            missing or not callable; the message names the spec.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HookError(f"redaction hook {spec!r} is not of the form 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a hook module may fail to import in any way
        raise HookError(f"redaction hook {spec!r}: cannot import {module_name!r}: {err}") from err
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise HookError(f"redaction hook {spec!r}: {module_name!r} has no {attr!r}")
    if not callable(target):
        raise HookError(f"redaction hook {spec!r} is not callable")
    hook: Hook = target
    return hook


def run_hook(hook: Hook | None, sample: Sample) -> tuple[Sample | None, str | None]:
    """Apply the hook; returns ``(sample or None, drop reason or None)``.

    Drop reasons: ``redacted`` (the hook returned None) and ``hook_error`` (it raised or
    returned something that is not a :class:`Sample`). Never raises.
    """
    if hook is None:
        return sample, None
    try:
        result = hook(sample)
    except Exception:  # a user hook must never take the agent down
        return None, "hook_error"
    if result is None:
        return None, "redacted"
    if not isinstance(result, Sample):
        return None, "hook_error"
    if result.sample_id != sample.sample_id:  # ids are ours: the cloud deduplicates on them
        result = replace(result, sample_id=sample.sample_id)
    return result, None


def encode_tensor(array: Array, name: str = "") -> protocol.Tensor:
    """A tensor as base64 of its raw little-endian C-order bytes."""
    a = np.asarray(array)
    le = a.astype(a.dtype.newbyteorder("<"), copy=False)
    data = np.ascontiguousarray(le).tobytes()
    return protocol.Tensor(
        name=name,
        dtype=a.dtype.name,
        shape=[int(d) for d in a.shape],
        data=base64.b64encode(data).decode(),
    )


def decode_tensor(tensor: protocol.Tensor) -> Array:
    """The array of a :class:`protocol.Tensor`.

    Raises:
        CaptureError: the byte count does not match the dtype and shape.
    """
    raw = base64.b64decode(tensor.data, validate=True)
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = math.prod(tensor.shape) * dtype.itemsize
    if len(raw) != expected:
        raise CaptureError(
            f"tensor {tensor.name!r} has {len(raw)} bytes; {tensor.dtype} "
            f"{tensor.shape} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tensor.shape)


def _names(names: list[str], count: int, prefix: str) -> list[str]:
    return [names[i] if i < len(names) else f"{prefix}{i}" for i in range(count)]


def to_wire(sample: Sample, device_id: str) -> protocol.CapturedSample:
    """The wire model of a sample."""
    return protocol.CapturedSample(
        sample_id=sample.sample_id,
        device_id=device_id,
        model=sample.model,
        version=sample.version,
        artifact_id=sample.artifact_id,
        role=sample.role,  # type: ignore[arg-type]  # validated by the model
        ts=datetime.fromtimestamp(sample.ts, UTC),
        reason=sample.reason,  # type: ignore[arg-type]
        top1=sample.stats.top1,
        confidence=sample.stats.confidence,
        entropy=sample.stats.entropy,
        inputs=[
            encode_tensor(a, n)
            for a, n in zip(
                sample.inputs, _names(sample.input_names, len(sample.inputs), "input"), strict=True
            )
        ],
        outputs=[
            encode_tensor(a, n)
            for a, n in zip(
                sample.outputs,
                _names(sample.output_names, len(sample.outputs), "output"),
                strict=True,
            )
        ],
    )


def encode_sample(sample: Sample, device_id: str) -> bytes:
    """The JSON of ``protocol.CapturedSample`` for a sample (what the spool stores)."""
    return to_wire(sample, device_id).to_bytes()
