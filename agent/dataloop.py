"""The device side of the data loop: capture, drift sketches and the store-and-forward drain.

Threads (none of them the MQTT network thread, none on the request path):

* the inference server calls :meth:`DataLoop.offer` after each answered request; it puts the
  event on a bounded queue; when the queue is full it counts a ``queue_full`` drop and adds
  the event to its drift sketch right there (a histogram update), so sketches count
  every inference even while samples are dropped;
* ``capture``: takes events off the queue, adds them to the model's drift sketch, evaluates
  the policy (``agent.capture``), runs the redaction hook, charges the byte budget and writes
  selected samples to the spool; every ``sketch_interval_s`` it closes the sketch windows and
  spools one ``DriftSketch`` per model that saw traffic;
* ``capture-drain``: while connected, publishes spooled sketches and sample batches at QoS 1
  and deletes them after the PUBACK (``agent.spool.drain_once``).

The policy arrives in the retained desired state (``agent.daemon`` decodes it and calls
:meth:`DataLoop.apply`); the last applied desired state is kept in
``state_dir/capture/desired.json`` so capture resumes after a restart before the broker is
reachable.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from agent import protocol
from agent.capture import (
    CaptureEvent,
    Hook,
    TokenBucket,
    load_hook,
    make_sample,
    new_id,
    run_hook,
    select,
    stats_of,
    to_wire,
)
from agent.metrics import AgentMetrics
from agent.protocol import CapturePolicy, DesiredState, ProtocolError
from agent.sketches import SketchAccumulator, SketchError, SketchSpec
from agent.spool import ConfirmedPublisher, Spool, drain_once

log = logging.getLogger(__name__)


@dataclass
class _Window:
    spec_key: str
    spec: SketchSpec
    spec_sha256: str
    model: str
    version: str
    artifact_id: str | None
    accumulator: SketchAccumulator
    start: float = field(default_factory=time.time)


class DataLoop:
    """Capture, sketches and drain for one device."""

    def __init__(
        self,
        *,
        device_id: str,
        state_dir: Path,
        spool_path: Path,
        max_spool_bytes: int,
        queue_size: int,
        publisher: ConfirmedPublisher,
        metrics: AgentMetrics | None = None,
        hook: Hook | str | None = None,
        drain_timeout_s: float = 10.0,
        drain_pause_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.device_id = device_id
        self.metrics = metrics or AgentMetrics()
        self.publisher = publisher
        self.drain_timeout_s = drain_timeout_s
        self.drain_pause_s = drain_pause_s
        self.max_packet: int | None = None
        self._state_file = state_dir / "capture" / "desired.json"
        self._configured_spool_bytes = max_spool_bytes
        self.spool = Spool(spool_path, max_bytes=max_spool_bytes)
        self.hook: Hook | None = load_hook(hook) if isinstance(hook, str) else hook
        self._clock = clock
        self._rng = rng or random.Random()
        self._queue: queue.Queue[CaptureEvent] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self.desired: DesiredState | None = None
        self.policy: CapturePolicy | None = None
        self._bucket = TokenBucket(0, clock=clock)
        self._seen: dict[str, int] = {}
        # Highest CaptureEvent.seq processed per model, and its value when the policy in
        # force was applied: nth = seq - base, in request order whatever the arrival order.
        self._last_seq: dict[str, int] = {}
        self._seq_base: dict[str, int] = {}
        self._windows: dict[tuple[str, str], _Window] = {}
        self._window_started = clock()
        self._stop = threading.Event()
        self._wake_drain = threading.Event()
        self._threads: list[threading.Thread] = []
        self._load_persisted()
        self.metrics.capture_spool_bytes.set(self.spool.used_bytes)

    # ------------------------------------------------------------ policy

    def _load_persisted(self) -> None:
        if not self._state_file.is_file():
            return
        try:
            desired = protocol.decode(
                DesiredState, self._state_file.read_bytes(), max_bytes=protocol.MAX_DESIRED_PAYLOAD
            )
        except (OSError, ProtocolError) as err:
            log.warning("ignoring the stored desired state %s: %s", self._state_file, err)
            return
        self._apply(desired)

    def apply(self, desired: DesiredState) -> str | None:
        """Apply a desired state; returns why it was refused, or None when applied.

        A revision lower than the applied one is refused (stale); the same revision again
        (a retained copy after a reconnect) changes nothing.
        """
        current = self.desired
        if current is not None and desired.revision < current.revision:
            return (
                f"desired state revision {desired.revision} is older than the applied "
                f"revision {current.revision}"
            )
        if current is not None and desired.revision == current.revision:
            return None
        self._apply(desired)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            f.write(desired.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self._state_file)
        log.info("applied desired state revision %d", desired.revision)
        return None

    def _apply(self, desired: DesiredState) -> None:
        policy = desired.capture
        with self._lock:
            self._flush_windows_locked()
            self.desired = desired
            self.policy = policy
            self._seen.clear()
            self._seq_base = dict(self._last_seq)
            self._windows.clear()
            self._window_started = self._clock()
            self._bucket = TokenBucket(policy.bytes_per_hour if policy else 0, clock=self._clock)
            if policy is not None:
                self.spool.set_limits(
                    max_bytes=policy.max_spool_bytes or self._configured_spool_bytes,
                    when_full=policy.when_full,
                )

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the capture and drain threads."""
        for target, name in ((self._capture_loop, "capture"), (self._drain_loop, "capture-drain")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads, spool the open sketch windows and close the spool."""
        self._stop.set()
        self._wake_drain.set()
        for thread in self._threads:
            thread.join(timeout)
        with self._lock:
            self._flush_windows_locked()
        self.spool.close()

    def wake_drain(self) -> None:
        """Drain now (the link came back)."""
        self._wake_drain.set()

    # ------------------------------------------------------------ the server's side

    def offer(self, event: CaptureEvent) -> None:
        """Hand over an answered inference; never raises, never waits for the queue.

        A full queue drops the event as a sample (counted as ``queue_full``) but still adds
        it to the drift sketch, here on the caller's thread: the sketch must count every
        inference, or drift would be measured on a throttled, biased subset. That may wait
        briefly for the capture thread's lock (held for one sketch update, or once per
        interval while the closed windows are spooled).
        """
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            try:
                self._drop("queue_full")
            finally:
                self._sketch_only(event)
        except Exception:  # the request path must never fail because of capture
            log.exception("capture offer failed")

    def _sketch_only(self, event: CaptureEvent) -> None:
        try:
            with self._lock:
                policy = self._policy_for_locked(event)
                if policy is not None:
                    self._sketch_locked(policy, event)
        except Exception:  # the request path must never fail because of capture
            log.exception("sketching a dropped %s event failed", event.model)

    # ------------------------------------------------------------ capture thread

    def _drop(self, reason: str, n: int = 1) -> None:
        self.spool.count(reason, n)
        self.metrics.capture_dropped.labels(reason).inc(n)

    def _capture_loop(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._queue.get(timeout=0.1)
            except queue.Empty:
                event = None
            try:
                if event is not None:
                    self.process(event)
                self.tick()
            except Exception:  # the capture thread must survive anything an event causes
                log.exception("unexpected error in the capture thread")

    def tick(self) -> None:
        """Close the sketch windows when the interval has passed."""
        policy = self.policy
        if policy is None:
            return
        with self._lock:
            if self._clock() - self._window_started >= policy.sketch_interval_s:
                self._flush_windows_locked()
                self._window_started = self._clock()

    def process(self, event: CaptureEvent) -> str | None:
        """Sketch and maybe capture one event.

        Returns:
            The reason it was selected (also when the hook, the size limit, the budget or the
            spool then dropped it, which is counted), or None.
        """
        with self._lock:
            if event.seq > 0:  # seen, whether or not a policy captures it
                last = self._last_seq.get(event.model, 0)
                self._last_seq[event.model] = max(last, event.seq)
            policy = self._policy_for_locked(event)
            if policy is None:
                return None
            self._sketch_locked(policy, event)
            if event.seq > 0:
                nth = event.seq - self._seq_base.get(event.model, 0)
            else:  # not numbered by the server: count in arrival order
                nth = self._seen.get(event.model, 0) + 1
                self._seen[event.model] = nth
            bucket = self._bucket
        stats = stats_of(event.outputs, event.shadow_disagreement)
        reason = select(stats, policy, nth=nth, draw=self._rng.random())
        if reason is None:
            return None
        self.metrics.capture_selected.labels(reason).inc()
        sample, dropped = run_hook(self.hook, make_sample(event, stats, reason))
        if sample is None:
            assert dropped is not None
            if dropped == "hook_error":
                log.warning("redaction hook failed on a %s sample; dropped", event.model)
            self._drop(dropped)
            return reason
        try:
            payload = to_wire(sample, self.device_id).to_bytes()
        except Exception as err:  # a hook may return arrays we cannot encode
            log.warning("cannot encode a %s sample: %s", event.model, err)
            self._drop("hook_error")
            return reason
        if len(payload) > policy.max_sample_bytes:
            self._drop("too_large")
            return reason
        if not bucket.try_take(len(payload)):
            self._drop("budget")
            return reason
        if self.spool.put("sample", sample.sample_id, payload):
            self.metrics.capture_spooled.labels("sample").inc()
            self._wake_drain.set()
        else:
            self.metrics.capture_dropped.labels("spool_full").inc()
        self.metrics.capture_spool_bytes.set(self.spool.used_bytes)
        return reason

    def _policy_for_locked(self, event: CaptureEvent) -> CapturePolicy | None:
        """The policy when it captures ``event``'s model, else None."""
        policy = self.policy
        if policy is None or not policy.enabled:
            return None
        if policy.models is not None and event.model not in policy.models:
            return None
        return policy

    def _sketch_locked(self, policy: CapturePolicy, event: CaptureEvent) -> None:
        key = (
            event.artifact_id
            if event.artifact_id and event.artifact_id in policy.sketches
            else event.model
        )
        spec = policy.sketches.get(key)
        if spec is None or not event.inputs:
            return
        window_key = (key, event.artifact_id or event.version)
        window = self._windows.get(window_key)
        if window is None:
            spec_json = spec.model_dump_json().encode()
            window = _Window(
                spec_key=key,
                spec=spec,
                spec_sha256=hashlib.sha256(spec_json).hexdigest(),
                model=event.model,
                version=event.version,
                artifact_id=event.artifact_id,
                accumulator=SketchAccumulator(spec),
            )
            self._windows[window_key] = window
        try:
            window.accumulator.update(event.inputs[0], event.outputs[0] if event.outputs else None)
        except SketchError as err:
            log.warning("sketch of %s: %s", event.model, err)
            self._drop("sketch_error")

    def _flush_windows_locked(self) -> None:
        now = time.time()
        for window in self._windows.values():
            if window.accumulator.n_samples == 0:
                continue
            sketch = protocol.DriftSketch(
                sketch_id=new_id(),
                device_id=self.device_id,
                model=window.model,
                version=window.version,
                artifact_id=window.artifact_id,
                spec_key=window.spec_key,
                spec_sha256=window.spec_sha256,
                window_start=datetime.fromtimestamp(window.start, UTC),
                window_end=datetime.fromtimestamp(now, UTC),
                counts=window.accumulator.take(),
                dropped=self.spool.counters(),
            )
            window.start = now
            if self.spool.put("sketch", sketch.sketch_id, sketch.to_bytes()):
                self.metrics.capture_spooled.labels("sketch").inc()
                self._wake_drain.set()
            else:
                self.metrics.capture_dropped.labels("spool_full").inc()
        self.metrics.capture_spool_bytes.set(self.spool.used_bytes)

    # ------------------------------------------------------------ drain thread

    def _max_batch_bytes(self) -> int:
        limit = protocol.MAX_SAMPLE_BATCH_PAYLOAD
        if self.max_packet is not None:
            topic = protocol.capture_samples(self.device_id)
            limit = min(limit, self.max_packet - (5 + 2 + len(topic) + 2 + 4 + 64))
        return limit

    def drain(self) -> tuple[int, int]:
        """One drain step; ``(samples, sketches)`` sent."""
        policy = self.policy
        samples, sketches = drain_once(
            self.spool,
            self.publisher,
            device_id=self.device_id,
            batch_size=policy.batch_size if policy else 32,
            max_batch_bytes=self._max_batch_bytes(),
            timeout=self.drain_timeout_s,
        )
        if samples:
            self.metrics.capture_sent.labels("sample").inc(samples)
        if sketches:
            self.metrics.capture_sent.labels("sketch").inc(sketches)
        self.metrics.capture_spool_bytes.set(self.spool.used_bytes)
        return samples, sketches

    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_drain.wait(1.0)
            self._wake_drain.clear()
            try:
                self.spool.flush()
                while not self._stop.is_set() and len(self.spool) and self.publisher.connected:
                    if self.drain() == (0, 0):
                        break
                    if self.drain_pause_s:
                        self._stop.wait(self.drain_pause_s)
            except Exception:
                log.exception("unexpected error in the capture drain")
                self._stop.wait(1.0)

    def status(self) -> dict[str, object]:
        """Spool and policy state (for logs and tests)."""
        return {
            "revision": self.desired.revision if self.desired else None,
            "spool_items": len(self.spool),
            "spool_bytes": self.spool.used_bytes,
            "dropped": self.spool.counters(),
        }
