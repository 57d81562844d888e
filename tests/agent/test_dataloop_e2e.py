"""The data loop with real parts: a retained desired state over Mosquitto → OIP inference on a
real agent process → samples and sketches on the capture topics; offline spooling, SIGKILL
mid-drain, malformed desired state, and the broker ACL between devices."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import protocol
from agent.capture import decode_tensor
from agent.protocol import CapturePolicy, DesiredState, SelectionRules
from agent.sketches import baseline_spec
from tests.agent.conftest import Artifacts
from tests.agent.harness import AgentProcess, Fleet, make_fleet
from tests.agent.test_spool import Collector

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]

RNG = np.random.default_rng(11)
SPEC = baseline_spec(RNG.standard_normal((500, 32)), num_classes=10)


@pytest.fixture()
def fleet(tmp_path: Path, artifacts: Artifacts) -> Iterator[Fleet]:
    f = make_fleet(tmp_path / "fleet", artifacts.public)
    f.start()
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture()
def collector(fleet: Fleet) -> Iterator[Collector]:
    c = Collector(
        fleet.broker.port,
        [protocol.all_devices("capture/#")],
        password=fleet.passwords["fleet"],
        persistent=True,
    )
    try:
        yield c
    finally:
        c.stop()


class CapturingAgent(AgentProcess):
    """The harness's agent with a ``[capture]`` section: batches leave 20 per second, so a
    SIGKILL lands mid-drain."""

    def write_config(self) -> Path:
        config = super().write_config()
        with config.open("a") as f:
            f.write("[capture]\ndrain_pause_s = 0.05\n")
        return config


@pytest.fixture()
def agent(fleet: Fleet, tmp_path: Path, artifacts: Artifacts) -> Iterator[AgentProcess]:
    a = CapturingAgent(fleet, "dev-1", tmp_path / "devices" / "dev-1" / "state")
    a.start()
    try:
        artifact_id = fleet.store.put_bundle(artifacts.v1).artifact_id
        fleet.deploy("dev-1", artifact_id, job_id="job-v1")
        done = fleet.wait("job-v1", ("SUCCEEDED", "FAILED"))
        assert done.state == "SUCCEEDED", (done.reason, a.log())
        yield a
    finally:
        a.kill()


def publish_desired(fleet: Fleet, device: str, payload: bytes) -> None:
    import paho.mqtt.publish as publish

    publish.single(
        protocol.desired(device),
        payload,
        qos=1,
        retain=True,
        hostname="127.0.0.1",
        port=fleet.broker.port,
        auth={"username": "fleet", "password": fleet.passwords["fleet"]},
        client_id=f"fleet-desired-{time.monotonic_ns()}",
        protocol=5,
    )


def desired(revision: int, **policy: Any) -> bytes:
    return DesiredState(revision=revision, capture=CapturePolicy(**policy)).to_bytes()


def wait_for(predicate: Any, timeout: float = 20.0, what: Any = "") -> None:
    """Poll ``predicate``; ``what`` (text, or a callable for text read at the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def wait_applied(agent: AgentProcess, revision: int) -> None:
    state = agent.state_dir / "capture" / "desired.json"

    def applied() -> bool:
        return state.exists() and f'"revision":{revision}' in state.read_text()

    wait_for(applied, 20, lambda: f"desired revision {revision}:\n{agent.log()}")


def spooled_ids(agent: AgentProcess) -> list[str]:
    return spool_state(agent)[0]


def spool_state(agent: AgentProcess) -> tuple[list[str], dict[str, int]]:
    """Sample ids and drop counters in the agent's spool (read beside the running agent)."""
    db = sqlite3.connect(agent.state_dir / "capture" / "spool.db")
    try:
        rows = db.execute("SELECT item_id FROM items WHERE kind = 'sample' ORDER BY seq")
        ids = [str(r[0]) for r in rows]
        counters = {str(k): int(v) for k, v in db.execute("SELECT name, value FROM counters")}
    finally:
        db.close()
    return ids, counters


def test_policy_to_samples_and_sketches_and_malformed_desired_state(
    fleet: Fleet, agent: AgentProcess, collector: Collector
) -> None:
    publish_desired(
        fleet,
        "dev-1",
        desired(
            1,
            rules=SelectionRules(every_nth=2),
            sketches={"mlp": SPEC},
            sketch_interval_s=0.5,
            batch_size=4,
        ),
    )
    wait_applied(agent, 1)
    xs = [RNG.standard_normal((1, 32)).astype(np.float32) for _ in range(10)]
    answers = [agent.infer("mlp", {"input": x}) for x in xs]
    wait_for(lambda: len(collector.samples()) == 5, what="5 samples")
    wait_for(
        lambda: sum(s.counts.n_samples for s in collector.sketches()) == 10, what="sketches of 10"
    )
    # Arrival order is not capture order (a batch whose PUBACK is late under load is sent again
    # after the next one): match each sample to the request it captured by its input.
    by_input = {x.tobytes(): i for i, x in enumerate(xs)}
    captured = {by_input[decode_tensor(s.inputs[0]).tobytes()]: s for s in collector.samples()}
    assert sorted(captured) == [1, 3, 5, 7, 9]  # every 2nd request, counted from the first
    samples = [captured[i] for i in sorted(captured)]
    assert len({s.sample_id for s in samples}) == 5
    for sample, x, answer in zip(samples, xs[1::2], answers[1::2], strict=True):
        assert (sample.device_id, sample.model, sample.version, sample.reason) == (
            "dev-1",
            "mlp",
            "1",
            "every_nth",
        )
        np.testing.assert_array_equal(decode_tensor(sample.inputs[0]), x)
        logits = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(1, 10)
        np.testing.assert_allclose(decode_tensor(sample.outputs[0]), logits, rtol=1e-6)
        assert sample.top1 == int(logits.argmax())
    sketch = collector.sketches()[0]
    assert sketch.device_id == "dev-1" and sketch.spec_key == "mlp"
    assert len(sketch.counts.feature_counts) == 32 and len(sketch.counts.class_counts) == 10

    # malformed desired states are refused with the reason logged; the old policy stays
    publish_desired(fleet, "dev-1", b'{"schema_version": 1, "revision": 2, "capture": 7}')
    publish_desired(fleet, "dev-1", b"\xff not json")
    wait_for(lambda: agent.log().count("refused desired state") >= 2, what="refusals")
    assert "capture: Input should be a valid dictionary" in agent.log()
    for x in xs[:4]:
        agent.infer("mlp", {"input": x})
    wait_for(lambda: len(collector.samples()) == 7, what="2 more samples under the old policy")

    # a device cannot publish on another device's capture topic
    import paho.mqtt.publish as publish

    forged = b'{"forged": true}'
    for topic in (protocol.capture_samples("dev-2"), protocol.capture_samples("dev-1")):
        publish.single(
            topic,
            forged,
            qos=1,
            hostname="127.0.0.1",
            port=fleet.broker.port,
            auth={"username": "dev-3", "password": fleet.passwords["dev-3"]},
            client_id="dev-3",
            protocol=5,
        )
    publish.single(
        protocol.capture_samples("dev-3"),
        forged,
        qos=1,
        hostname="127.0.0.1",
        port=fleet.broker.port,
        auth={"username": "dev-3", "password": fleet.passwords["dev-3"]},
        client_id="dev-3",
        protocol=5,
    )
    wait_for(
        lambda: any(t.endswith("dev-3/capture/samples") for t, _ in collector.snapshot()),
        what="dev-3's own capture message",
    )
    forged_topics = [t for t, p in collector.snapshot() if p == forged]
    assert forged_topics == [protocol.capture_samples("dev-3")]


def test_offline_spool_bounded_then_drained_across_sigkill(
    fleet: Fleet, agent: AgentProcess, collector: Collector
) -> None:
    publish_desired(
        fleet,
        "dev-1",
        desired(
            1,
            rules=SelectionRules(every_nth=1),
            max_spool_bytes=64 * 1024,
            when_full="drop_oldest",
            batch_size=1,
        ),
    )
    wait_applied(agent, 1)
    fleet.broker.stop()
    total = 130
    x = RNG.standard_normal((1, 32)).astype(np.float32)
    for _ in range(total):
        agent.infer("mlp", {"input": x})  # serving goes on while offline

    def all_accounted() -> bool:  # the capture thread has written or counted every sample
        ids, counters = spool_state(agent)
        return len(ids) + counters.get("spool_full_oldest", 0) == total

    wait_for(all_accounted, 60, lambda: f"{total} samples accounted for: {spool_state(agent)}")
    kept, counters = spool_state(agent)
    assert counters == {"spool_full_oldest": total - len(kept)}  # nothing else dropped
    db = sqlite3.connect(agent.state_dir / "capture" / "spool.db")
    used = db.execute("SELECT SUM(size) FROM items").fetchone()[0]
    db.close()
    assert used <= 64 * 1024, "the spool exceeded its bound"
    assert 0 < len(kept) < total

    fleet.broker.start()
    wait_for(lambda: len(collector.snapshot()) >= 3, 30, "the drain to start")
    agent.kill()  # SIGKILL mid-drain
    at_kill = {s.sample_id for s in collector.samples()}
    agent.start()  # the spool is still there; the drain resumes
    wait_for(
        lambda: {s.sample_id for s in collector.samples()} >= set(kept),
        60,
        lambda: f"every sample ({len(spooled_ids(agent))} still spooled):\n{agent.log()}",
    )
    received = collector.samples()
    ids = {s.sample_id for s in received}
    assert ids == set(kept), "lost or foreign samples"
    assert len(at_kill) < len(kept), "the kill was not mid-drain"
    # every batch reports the exact drops: nothing vanished without being counted
    last = collector.batches()[-1]
    assert last.dropped.get("spool_full_oldest", 0) == total - len(kept)
    wait_for(lambda: spooled_ids(agent) == [], what="an empty spool")
