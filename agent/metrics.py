"""Agent metrics: Prometheus series on a private registry, and latency percentiles for heartbeats.

Every series lives on the :class:`AgentMetrics` instance's own ``CollectorRegistry`` (never
the process-global one), so two agents or two tests in one process never collide. The
inference server (``agent.server``) serves :meth:`AgentMetrics.render` at ``GET /metrics``.

Series (all prefixed ``edgeloop_``):

* ``inference_requests_total{model,version,role}`` and ``inference_errors_total{...,reason}``
* ``inference_latency_seconds{model,version,role}`` histogram, sub-millisecond buckets
* ``shadow_comparisons_total``, ``shadow_top1_disagreements_total``,
  ``shadow_max_abs_diff`` (last comparison), ``shadow_top1_agreement`` (last comparison),
  ``shadow_dropped_total{model}``, ``shadow_errors_total{model}``
* daemon hooks: ``job_state_transitions_total{state}``, ``transfer_bytes_total``,
  ``transfer_chunks_total{outcome}``, ``active_model_info{model,version,artifact_id,runtime,role}``
* data loop: ``capture_selected_total{reason}``, ``capture_spooled_total{kind}``,
  ``capture_dropped_total{reason}``, ``capture_sent_total{kind}``, ``capture_spool_bytes``
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent.protocol import LatencySummary

# Seconds: 50 us .. 2.5 s, dense below 1 ms where most edge inferences land.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_MODEL_LABELS = ("model", "version", "role")
_SHADOW_LABELS = ("model", "primary_version", "shadow_version")


class AgentMetrics:
    """The agent's Prometheus series on a dedicated registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.inference_requests = Counter(
            "edgeloop_inference_requests",
            "Inference requests answered or failed, by model, version and role.",
            _MODEL_LABELS,
            registry=reg,
        )
        self.inference_errors = Counter(
            "edgeloop_inference_errors",
            "Inference requests that failed, by reason (invalid, busy, failed, not_found).",
            (*_MODEL_LABELS, "reason"),
            registry=reg,
        )
        self.inference_latency = Histogram(
            "edgeloop_inference_latency_seconds",
            "Time spent in the runtime per successful inference.",
            _MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.shadow_comparisons = Counter(
            "edgeloop_shadow_comparisons",
            "Requests mirrored to a shadow model and compared with the primary.",
            _SHADOW_LABELS,
            registry=reg,
        )
        self.shadow_top1_disagreements = Counter(
            "edgeloop_shadow_top1_disagreements",
            "Shadow comparisons whose top-1 class differed from the primary's in any row.",
            _SHADOW_LABELS,
            registry=reg,
        )
        self.shadow_max_abs_diff = Gauge(
            "edgeloop_shadow_max_abs_diff",
            "Max absolute difference between shadow and primary outputs (last comparison).",
            _SHADOW_LABELS,
            registry=reg,
        )
        self.shadow_top1_agreement = Gauge(
            "edgeloop_shadow_top1_agreement",
            "Fraction of rows whose top-1 class agreed (last comparison).",
            _SHADOW_LABELS,
            registry=reg,
        )
        self.shadow_dropped = Counter(
            "edgeloop_shadow_dropped",
            "Requests not mirrored to the shadow model because its queue was full.",
            ("model",),
            registry=reg,
        )
        self.shadow_errors = Counter(
            "edgeloop_shadow_errors",
            "Shadow runs that raised an error.",
            ("model",),
            registry=reg,
        )
        self.job_states = Counter(
            "edgeloop_job_state_transitions",
            "Deployment job state transitions, by the state entered.",
            ("state",),
            registry=reg,
        )
        self.transfer_bytes = Counter(
            "edgeloop_transfer_bytes",
            "Artifact bytes received over MQTT.",
            registry=reg,
        )
        self.transfer_chunks = Counter(
            "edgeloop_transfer_chunks",
            "Artifact chunks, by outcome (received, duplicate, corrupt, requested).",
            ("outcome",),
            registry=reg,
        )
        self.active_model = Gauge(
            "edgeloop_active_model_info",
            "1 for each model version the agent serves, with its artifact id and runtime.",
            ("model", "version", "artifact_id", "runtime", "role"),
            registry=reg,
        )
        self._active_lock = threading.Lock()
        self._active: dict[tuple[str, str], tuple[str, str, str, str, str]] = {}
        self._dataloop_series(reg)

    def _dataloop_series(self, reg: CollectorRegistry) -> None:
        """Series of the data loop (agent.dataloop): capture, spool, drain."""
        self.capture_selected = Counter(
            "edgeloop_capture_selected",
            "Inferences the capture policy selected, by reason.",
            ("reason",),
            registry=reg,
        )
        self.capture_spooled = Counter(
            "edgeloop_capture_spooled",
            "Items written to the capture spool, by kind (sample, sketch).",
            ("kind",),
            registry=reg,
        )
        self.capture_dropped = Counter(
            "edgeloop_capture_dropped",
            "Captured items dropped, by reason (queue_full, budget, too_large, redacted, "
            "hook_error, spool_full, sketch_error).",
            ("reason",),
            registry=reg,
        )
        self.capture_sent = Counter(
            "edgeloop_capture_sent",
            "Spooled items the broker acknowledged, by kind.",
            ("kind",),
            registry=reg,
        )
        self.capture_spool_bytes = Gauge(
            "edgeloop_capture_spool_bytes",
            "Bytes of payload waiting in the capture spool.",
            registry=reg,
        )

    # -------------------------------------------------------------- inference

    def observe_inference(self, model: str, version: str, *, role: str, seconds: float) -> None:
        """Count one successful inference and record its runtime latency."""
        self.inference_requests.labels(model, version, role).inc()
        self.inference_latency.labels(model, version, role).observe(seconds)

    def observe_error(self, model: str, version: str, *, role: str, reason: str) -> None:
        """Count one failed inference request (``reason``: invalid, busy, failed, not_found)."""
        self.inference_requests.labels(model, version, role).inc()
        self.inference_errors.labels(model, version, role, reason).inc()

    def observe_shadow(
        self,
        model: str,
        primary_version: str,
        shadow_version: str,
        *,
        max_abs_diff: float,
        top1_agreement: float | None,
    ) -> None:
        """Record one shadow comparison."""
        labels = (model, primary_version, shadow_version)
        self.shadow_comparisons.labels(*labels).inc()
        self.shadow_max_abs_diff.labels(*labels).set(max_abs_diff)
        if top1_agreement is not None:
            self.shadow_top1_agreement.labels(*labels).set(top1_agreement)
            if top1_agreement < 1.0:
                self.shadow_top1_disagreements.labels(*labels).inc()

    # -------------------------------------------------------------- daemon hooks

    def job_state(self, state: str) -> None:
        """Count a deployment job entering ``state``."""
        self.job_states.labels(state).inc()

    def transfer_chunk(self, size: int, *, outcome: str = "received") -> None:
        """Count one artifact chunk (and its bytes when received)."""
        self.transfer_chunks.labels(outcome).inc()
        if outcome == "received":
            self.transfer_bytes.inc(size)

    def set_active_model(
        self, model: str, *, version: str, artifact_id: str, runtime: str, role: str = "primary"
    ) -> None:
        """Mark the version of ``model`` serving as ``role``, replacing the previous one."""
        labels = (model, version, artifact_id, runtime, role)
        with self._active_lock:
            old = self._active.get((model, role))
            if old is not None and old != labels:
                self.active_model.remove(*old)
            self._active[(model, role)] = labels
            self.active_model.labels(*labels).set(1)

    def clear_active_model(self, model: str, *, role: str = "primary") -> None:
        """Forget the version of ``model`` that served as ``role``."""
        with self._active_lock:
            old = self._active.pop((model, role), None)
            if old is not None:
                self.active_model.remove(*old)

    # -------------------------------------------------------------- exposition

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of an ascending, non-empty list."""
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class LatencyTracker:
    """p50/p95/p99 of the latencies seen in a rolling time window, for heartbeats.

    Keeps at most ``max_samples`` recent samples (older ones fall off first), so memory is
    bounded whatever the request rate. Thread-safe.
    """

    def __init__(
        self,
        *,
        window_s: float = 60.0,
        max_samples: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._errors: deque[float] = deque(maxlen=max_samples)

    def observe(self, latency_ms: float) -> None:
        """Record one successful request's latency in milliseconds."""
        with self._lock:
            self._samples.append((self._clock(), latency_ms))

    def error(self) -> None:
        """Record one failed request."""
        with self._lock:
            self._errors.append(self._clock())

    def summary(self) -> LatencySummary:
        """Count, errors and percentiles over the window (percentiles None when empty)."""
        with self._lock:
            horizon = self._clock() - self.window_s
            while self._samples and self._samples[0][0] < horizon:
                self._samples.popleft()
            while self._errors and self._errors[0] < horizon:
                self._errors.popleft()
            values = sorted(ms for _, ms in self._samples)
            errors = len(self._errors)
        if not values:
            return LatencySummary(count=0, errors=errors)
        return LatencySummary(
            count=len(values),
            errors=errors,
            p50_ms=percentile(values, 50),
            p95_ms=percentile(values, 95),
            p99_ms=percentile(values, 99),
        )
