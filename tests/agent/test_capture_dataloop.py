"""The data loop in one process (agent.dataloop): policy, sketches, budget, hook, queue, spool.

No broker here (the publisher is offline, so everything stays in the real SQLite spool);
delivery over Mosquitto is covered by test_spool.py and test_dataloop_e2e.py.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import protocol
from agent.capture import CaptureEvent, Sample
from agent.dataloop import DataLoop
from agent.metrics import AgentMetrics
from agent.protocol import CapturePolicy, DesiredState, SelectionRules
from agent.sketches import baseline_spec


class Offline:
    connected = False

    def publish_confirmed(self, topic: str, payload: bytes, *, timeout: float) -> bool:
        return False


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


SPEC = baseline_spec(np.random.default_rng(0).standard_normal((200, 4)), num_classes=2)


def _loop(tmp_path: Path, clock: Clock, **kwargs: Any) -> DataLoop:
    return DataLoop(
        device_id="dev-1",
        state_dir=tmp_path,
        spool_path=tmp_path / "capture" / "spool.db",
        max_spool_bytes=kwargs.pop("max_spool_bytes", 1_000_000),
        queue_size=kwargs.pop("queue_size", 8),
        publisher=Offline(),
        metrics=AgentMetrics(),
        clock=clock,
        rng=random.Random(0),
        **kwargs,
    )


def _event(confidence: float = 0.9, *, model: str = "m", shift: float = 0.0) -> CaptureEvent:
    p = np.array([[confidence, 1 - confidence]], np.float32)
    x = (np.random.default_rng(1).standard_normal((1, 4)) + shift).astype(np.float32)
    return CaptureEvent(
        model=model, version="1", artifact_id="a" * 64, role="primary", inputs=[x], outputs=[p]
    )


def _numbered(seq: int, *, model: str = "m") -> CaptureEvent:
    """An event as the server numbers it (CaptureEvent.seq) when it answers the request."""
    return dataclasses.replace(_event(model=model), seq=seq)


def _policy(**kwargs: Any) -> DesiredState:
    return DesiredState(revision=kwargs.pop("revision", 1), capture=CapturePolicy(**kwargs))


def test_every_nth_counts_requests_in_answer_order_not_arrival_order(tmp_path: Path) -> None:
    loop = _loop(tmp_path, Clock())
    loop.process(_numbered(1))  # answered before any policy: nothing, but counted as seen
    loop.process(_numbered(2))
    assert loop.apply(_policy(rules=SelectionRules(every_nth=3))) is None
    # Requests 3..10 answered after the policy; 8 and 9's hand-overs swapped on two threads.
    arrival = [3, 4, 5, 6, 7, 9, 8, 10]
    reasons = {seq: loop.process(_numbered(seq)) for seq in arrival}
    # every 3rd request since the policy (3 is its 1st), whatever the arrival order
    assert [seq for seq in sorted(reasons) if reasons[seq]] == [5, 8]
    # one answered before this policy but handed over after it is never an every_nth pick
    assert loop.apply(_policy(revision=2, rules=SelectionRules(every_nth=1))) is None
    assert loop.process(_numbered(10)) is None
    assert loop.process(_numbered(11)) == "every_nth"
    # models are numbered apart; unnumbered events (seq 0) count in arrival order
    assert loop.process(_numbered(1, model="other")) == "every_nth"
    assert loop.process(_event()) == "every_nth"


def test_policy_selects_budget_limits_and_sketches(tmp_path: Path) -> None:
    clock = Clock()
    loop = _loop(tmp_path, clock)
    assert loop.process(_event(0.1)) is None  # no policy yet: nothing
    assert loop.apply(
        _policy(
            rules=SelectionRules(low_confidence_below=0.6, every_nth=5),
            bytes_per_hour=2000,
            sketches={"m": SPEC},
            sketch_interval_s=10,
        )
    ) is None  # fmt: skip
    reasons = [loop.process(_event(0.55 if i % 2 else 0.9)) for i in range(1, 11)]
    assert reasons == ["low_confidence", None] * 4 + ["low_confidence", "every_nth"]
    size = len(loop.spool.peek("sample", limit=1)[0].payload)
    admitted = 2000 // size
    assert len(loop.spool) == admitted  # the hour's budget, the rest counted
    assert loop.spool.counters() == {"budget": 6 - admitted}
    clock.t += 3600  # a refilled budget admits again
    assert loop.process(_event(0.55)) == "low_confidence"
    assert len(loop.spool) == admitted + 1
    clock.t += 10
    loop.tick()  # the sketch window closes
    sketches = loop.spool.peek("sketch", limit=10)
    assert len(sketches) == 1
    sketch = protocol.decode(protocol.DriftSketch, sketches[0].payload)
    assert sketch.counts.n_samples == 11 and sketch.spec_key == "m"
    assert sum(sketch.counts.class_counts) == 11
    assert all(sum(row) == 11 for row in sketch.counts.feature_counts)
    assert sketch.dropped["budget"] == 6 - admitted


def test_models_filter_and_disabled(tmp_path: Path) -> None:
    loop = _loop(tmp_path, Clock())
    loop.apply(_policy(models=["other"], rules=SelectionRules(every_nth=1)))
    assert loop.process(_event()) is None
    loop.apply(_policy(revision=2, enabled=False, rules=SelectionRules(every_nth=1)))
    assert loop.process(_event()) is None
    loop.apply(_policy(revision=3, rules=SelectionRules(every_nth=1)))
    assert loop.process(_event()) == "every_nth"


def test_revisions_stale_refused_same_ignored_and_persisted(tmp_path: Path) -> None:
    loop = _loop(tmp_path, Clock())
    assert loop.apply(_policy(revision=5, rules=SelectionRules(every_nth=1))) is None
    refused = loop.apply(_policy(revision=4))
    assert refused == "desired state revision 4 is older than the applied revision 5"
    assert loop.apply(_policy(revision=5, enabled=False)) is None  # same revision: no change
    assert loop.policy is not None and loop.policy.enabled
    loop.stop()
    again = _loop(tmp_path, Clock())  # a restart applies the stored state before any broker
    assert again.desired is not None and again.desired.revision == 5
    assert again.process(_event()) == "every_nth"


def test_spool_limits_come_from_the_policy(tmp_path: Path) -> None:
    loop = _loop(tmp_path, Clock())
    loop.apply(
        _policy(
            rules=SelectionRules(every_nth=1),
            max_spool_bytes=64 * 1024,
            when_full="reject_new",
            max_sample_bytes=100_000,
        )
    )
    payload_size = 0
    for _ in range(200):
        loop.process(_event())
        payload_size = payload_size or loop.spool.used_bytes
    assert loop.spool.used_bytes <= 64 * 1024
    kept = len(loop.spool)
    assert kept == 64 * 1024 // payload_size
    assert loop.spool.counters() == {"spool_full_rejected": 200 - kept}


def test_too_large_samples_are_dropped(tmp_path: Path) -> None:
    loop = _loop(tmp_path, Clock())
    loop.apply(_policy(rules=SelectionRules(every_nth=1), max_sample_bytes=256))
    assert loop.process(_event()) == "every_nth"
    assert loop.spool.counters() == {"too_large": 1} and len(loop.spool) == 0


@pytest.fixture()
def hooks() -> Iterator[None]:
    module = types.ModuleType("el_dataloop_hooks")

    def drop_confident(sample: Sample) -> Sample | None:
        return None if (sample.stats.confidence or 0) > 0.8 else sample

    def crash(sample: Sample) -> Sample:
        raise ValueError("bug in the hook")

    module.drop_confident = drop_confident  # type: ignore[attr-defined]
    module.crash = crash  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield
    del sys.modules[module.__name__]


def test_redaction_hook_drops_and_errors_are_counted(tmp_path: Path, hooks: None) -> None:
    loop = _loop(tmp_path / "a", Clock(), hook="el_dataloop_hooks:drop_confident")
    loop.apply(_policy(rules=SelectionRules(every_nth=1)))
    assert loop.process(_event(0.9)) == "every_nth"  # selected, then redacted
    assert loop.process(_event(0.7)) == "every_nth"
    assert loop.spool.counters() == {"redacted": 1} and len(loop.spool) == 1
    crashing = _loop(tmp_path / "b", Clock(), hook="el_dataloop_hooks:crash")
    crashing.apply(_policy(rules=SelectionRules(every_nth=1)))
    assert crashing.process(_event()) == "every_nth"  # the agent goes on
    assert crashing.spool.counters() == {"hook_error": 1} and len(crashing.spool) == 0


def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    loop = _loop(tmp_path, Clock(), queue_size=2)  # not started: nobody takes events
    for _ in range(5):
        loop.offer(_event())
    assert loop.spool.counters() == {"queue_full": 3}
    text = loop.metrics.render()[0].decode()
    assert 'edgeloop_capture_dropped_total{reason="queue_full"} 3.0' in text


def test_sketches_count_every_inference_when_the_queue_overflows(tmp_path: Path) -> None:
    from agent.sketches import SketchAccumulator

    clock = Clock()
    loop = _loop(tmp_path, clock, queue_size=2)  # not started: the queue fills at once
    loop.apply(
        _policy(
            models=["m"],
            rules=SelectionRules(every_nth=1),
            bytes_per_hour=0,  # and every selected sample is throttled too
            sketches={"m": SPEC},
            sketch_interval_s=10,
        )
    )
    events = [_event(0.6 + 0.03 * i, shift=0.5 * i) for i in range(10)]
    for event in events:
        loop.offer(event)
    loop.offer(_event(model="other"))  # not captured: neither queued nor sketched
    assert loop.spool.counters() == {"queue_full": 9}
    while not loop._queue.empty():  # what the capture thread would do with the two queued
        loop.process(loop._queue.get_nowait())
    clock.t += 10
    loop.tick()
    (item,) = loop.spool.peek("sketch", limit=10)
    sketch = protocol.decode(protocol.DriftSketch, item.payload)
    want = SketchAccumulator(SPEC)
    for event in events:
        want.update(event.inputs[0], event.outputs[0])
    assert sketch.counts.n_samples == 10  # all ten inferences, not the two queued
    assert sketch.counts == want.take()
    assert sketch.dropped == {"queue_full": 9, "budget": 2}
    assert len(loop.spool.peek("sample", limit=10)) == 0


def test_sketch_of_wrong_shape_is_counted_not_raised(tmp_path: Path) -> None:
    loop = _loop(tmp_path, Clock())
    loop.apply(_policy(sketches={"m": SPEC}))
    event = _event()
    bad = CaptureEvent(
        model="m",
        version="1",
        artifact_id=None,
        role="primary",
        inputs=[np.zeros((1, 5), np.float32)],
        outputs=event.outputs,
    )
    assert loop.process(bad) is None
    assert loop.spool.counters() == {"sketch_error": 1}


# ------------------------------------------------------------------ through the OIP server


def _served(version: str, sign: float) -> Any:
    from agent.runtimes import LoadedModel, Signature
    from agent.server import ServedVersion
    from compiler.manifest import TensorSpec

    class Fn(LoadedModel):
        def _run(self, inputs: list[Any]) -> list[Any]:
            return [sign * inputs[0][:, :3]]

    sig = Signature(
        inputs=(TensorSpec(name="x", shape=[1, 4], dtype="float32"),),
        outputs=(TensorSpec(name="y", shape=[1, 3], dtype="float32"),),
    )
    return ServedVersion(version, Fn(sig, runtime="fake", thread_safe=True), f"{version * 64}")


def _post(port: int, model: str) -> int:
    import json
    import urllib.request

    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def test_server_hands_answers_and_shadow_disagreement_to_capture(tmp_path: Path) -> None:
    from agent.server import InferenceServer, ModelEntry, ModelRepository

    repo = ModelRepository()
    repo.set("m", ModelEntry(primary=_served("1", 1.0), shadow=_served("2", -1.0)))
    repo.set("plain", ModelEntry(primary=_served("3", 1.0)))
    loop = _loop(tmp_path, Clock())
    loop.apply(_policy(rules=SelectionRules(shadow_disagreement=True, every_nth=2)))
    server = InferenceServer(repo, shadow_queue=8)
    server.capture = loop.offer
    port = server.start("127.0.0.1", 0)
    loop.start()
    try:
        assert [_post(port, "m") for _ in range(3)] == [200] * 3
        assert [_post(port, "plain") for _ in range(4)] == [200] * 4
        assert server.wait_shadow_idle(10)
        deadline = time.monotonic() + 10
        while len(loop.spool) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        samples = [
            protocol.decode(protocol.CapturedSample, i.payload)
            for i in loop.spool.peek("sample", limit=10)
        ]
        reasons = sorted((s.model, s.reason) for s in samples)
        assert reasons == [("m", "shadow_disagreement")] * 3 + [("plain", "every_nth")] * 2
        assert all(s.inputs[0].name == "x" and s.outputs[0].name == "y" for s in samples)
        # a sink that raises never fails a request
        server.capture = lambda event: 1 / 0  # type: ignore[assignment,func-returns-value]
        assert _post(port, "plain") == 200
    finally:
        server.stop()
        loop.stop()
