"""The whole delivery path with real parts: compiler → store → job over Mosquitto → agent
pulls chunks → verifies → swaps → serves OIP; and everything that must go wrong safely."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import protocol
from tests.agent.conftest import Artifacts
from tests.agent.harness import AgentProcess, Fleet, make_fleet

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]


@pytest.fixture()
def fleet(tmp_path: Path, artifacts: Artifacts) -> Iterator[Fleet]:
    f = make_fleet(tmp_path / "fleet", artifacts.public)
    f.start()
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture()
def agents(fleet: Fleet, tmp_path: Path) -> Iterator[dict[str, AgentProcess]]:
    started: dict[str, AgentProcess] = {}

    def make(device: str, **kwargs: Any) -> AgentProcess:
        agent = AgentProcess(fleet, device, tmp_path / "devices" / device / "state", **kwargs)
        started[device] = agent
        return agent

    yield started  # type: ignore[misc]
    for agent in started.values():
        agent.kill()


def _agent(
    agents: Any, fleet: Fleet, tmp_path: Path, device: str = "dev-1", **kwargs: Any
) -> AgentProcess:
    agent = AgentProcess(fleet, device, tmp_path / "devices" / device / "state", **kwargs)
    agents[device] = agent
    return agent


def _reference(onnx: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


def _put(fleet: Fleet, bundle: Path) -> str:
    return fleet.store.put_bundle(bundle).artifact_id


X = np.random.default_rng(7).standard_normal((1, 32)).astype(np.float32)


def test_full_path_with_tritonclient(
    fleet: Fleet, agents: Any, tmp_path: Path, artifacts: Artifacts
) -> None:
    import tritonclient.http as httpclient

    agent = _agent(agents, fleet, tmp_path)
    agent.start()
    v1 = _put(fleet, artifacts.v1)
    with _qos_recorder(fleet, protocol.jobs_update("dev-1")) as delivered:
        fleet.deploy("dev-1", v1, job_id="job-v1")
        done = fleet.wait("job-v1", ("SUCCEEDED", "FAILED"))
        assert done.state == "SUCCEEDED", (done.reason, agent.log())
        time.sleep(0.2)
    steps = [u.step for u in fleet.watcher.updates("job-v1")]  # type: ignore[union-attr]
    assert {"downloading", "verifying", "activating", "health_check"} <= set(steps)
    # Progress at QoS 0, the end of the job at QoS 1 (subscribed at QoS 1: delivered as sent).
    assert ("SUCCEEDED", 1) in delivered and ("IN_PROGRESS", 0) in delivered, delivered
    assert {qos for state, qos in delivered if state in ("QUEUED", "IN_PROGRESS")} == {0}
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{agent.http_port}")
    assert client.is_server_live() and client.is_model_ready("mlp")
    for binary in (False, True):
        tensor = httpclient.InferInput("input", [1, 32], "FP32")
        tensor.set_data_from_numpy(X, binary_data=binary)
        result = client.infer(
            "mlp", [tensor], outputs=[httpclient.InferRequestedOutput("logits", binary_data=binary)]
        )
        np.testing.assert_allclose(
            result.as_numpy("logits"), _reference(artifacts.onnx, X), rtol=1e-4, atol=1e-5
        )
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'edgeloop_job_state_transitions_total{state="SUCCEEDED"} 1.0' in metrics
    assert "edgeloop_transfer_bytes_total" in metrics
    assert f'artifact_id="{v1}"' in metrics
    assert "edgeloop_inference_requests_total{" in metrics
    beat = protocol.Heartbeat.model_validate(_message(fleet, protocol.heartbeat("dev-1")))
    assert [(m.name, m.version, m.artifact_id) for m in beat.models] == [("mlp", "1", v1)]
    assert "tvm" in beat.runtimes and beat.hardware.profile == "generic/x86_64"
    assert beat.hardware.cpu_count >= 1 and beat.hardware.disk_free_mib
    assert beat.inference["mlp"].count >= 2 and beat.inference["mlp"].p50_ms is not None
    metadata = client.get_model_metadata("mlp")
    assert metadata["versions"] == ["1"] or "1" in metadata.get("versions", [])
    # The same job again (retained notify after a reconnect) is answered, not re-run.
    fleet.deploy("dev-1", v1, job_id="job-v1")
    time.sleep(1.0)
    assert [u.state for u in fleet.watcher.updates("job-v1")].count("SUCCEEDED") >= 2  # type: ignore[union-attr]
    assert agent.status()["mlp"]["active"]["artifact_id"] == v1


def _serving_version(agent: AgentProcess) -> str:
    return str(agent.infer("mlp", {"input": X})["model_version"])


def test_bad_artifacts_are_refused_and_v1_keeps_serving(
    fleet: Fleet, agents: Any, tmp_path: Path, artifacts: Artifacts
) -> None:
    agent = _agent(agents, fleet, tmp_path, chunk_timeout_s=1.0)
    agent.start()
    v1, v2 = _put(fleet, artifacts.v1), _put(fleet, artifacts.v2)
    fleet.deploy("dev-1", v2, job_id="v2")
    assert fleet.wait("v2", ("SUCCEEDED", "FAILED")).state == "SUCCEEDED"
    assert _serving_version(agent) == "2"

    # Older version without a rollback job: refused (anti-rollback).
    fleet.deploy("dev-1", v1, job_id="older")
    older = fleet.wait("older", ("SUCCEEDED", "FAILED"))
    assert older.state == "FAILED" and "older than the installed 2" in older.reason
    assert _serving_version(agent) == "2"

    # Wrong profile: refused before any download.
    arm = _put_unverified(fleet, artifacts.wrong_profile)
    fleet.deploy("dev-1", arm, job_id="arm")
    wrong = fleet.wait("arm", ("SUCCEEDED", "FAILED"))
    assert wrong.state == "FAILED" and "raspberry-pi/4b-aarch64" in wrong.reason
    assert _serving_version(agent) == "2"

    # Signed by another key: the store refuses it, so forge the store's copy directly.
    forged = _forge_store_entry(fleet, artifacts.other_key_bundle, tmp_path)
    fleet.deploy("dev-1", forged, job_id="forged")
    bad_sig = fleet.wait("forged", ("SUCCEEDED", "FAILED"))
    assert bad_sig.state == "FAILED" and "verification failed" in bad_sig.reason
    assert _serving_version(agent) == "2"

    # A corrupted stored transfer file (every chunk hash is right, the file hash is not).
    corrupt = _put(fleet, _rebuild(artifacts.v2, tmp_path / "v3", artifacts.key, version="3"))
    tar = fleet.workdir / "store" / "artifacts" / corrupt / "transfer.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    fleet.deploy("dev-1", corrupt, job_id="corrupt")
    bad = fleet.wait("corrupt", ("SUCCEEDED", "FAILED"), timeout=90)
    assert bad.state == "FAILED" and "sha256" in bad.reason
    assert _serving_version(agent) == "2"

    # A truncated stored transfer file: the last chunks come back short and are rejected.
    short = _put(fleet, _rebuild(artifacts.v2, tmp_path / "v4", artifacts.key, version="4"))
    tar = fleet.workdir / "store" / "artifacts" / short / "transfer.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    fleet.deploy("dev-1", short, job_id="short")
    truncated = fleet.wait("short", ("SUCCEEDED", "FAILED"), timeout=120)
    assert truncated.state == "FAILED", truncated
    assert _serving_version(agent) == "2"

    # Rollback job to v1 is allowed, then the agent's offline rollback goes back to v2.
    fleet.deploy("dev-1", v1, job_id="rollback", kind="rollback")
    assert fleet.wait("rollback", ("ROLLED_BACK", "FAILED")).state == "ROLLED_BACK"
    assert _serving_version(agent) == "1"
    agent.stop()
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "rollback",
            "mlp",
            "--config",
            str(agent.state_dir.parent / "dev-1.toml"),
        ],
        check=True,
        capture_output=True,
    )
    agent.start()
    assert _serving_version(agent) == "2"


def _rebuild(src: Path, out: Path, key: Path, *, version: str) -> Path:
    """Re-seal a compiled bundle as another version (same library, new manifest)."""
    from compiler import bundle
    from compiler.signing import load_private_key

    manifest, _ = bundle.read_manifest(src)
    fields = manifest.model_dump(mode="python", exclude={"files", "signing_key_id"})
    fields["model"]["version"] = version
    with bundle.staging_dir(out) as staging:
        for name in ("model.so", "report.json"):
            shutil.copy(src / name, staging / name)
        bundle.seal_bundle(staging, out, manifest_fields=fields, private_key=load_private_key(key))
    return out


def _put_unverified(fleet: Fleet, bundle_dir: Path) -> str:
    return fleet.store.put_bundle(bundle_dir).artifact_id


def _forge_store_entry(fleet: Fleet, bundle_dir: Path, tmp_path: Path) -> str:
    """Place a bundle signed by a foreign key into the store, bypassing its verification,
    as an attacker with write access to the store would."""
    from compiler.signing import load_public_key
    from fleet.store import ArtifactStore

    other_pub = bundle_dir.parent / "other-keys" / "signing-key.pub"
    if not other_pub.exists():
        other_pub = next(bundle_dir.parent.glob("other-keys/*.pub"))
    with ArtifactStore(fleet.workdir / "store", load_public_key(other_pub)) as lax:
        return lax.put_bundle(bundle_dir).artifact_id


def test_malformed_payloads_on_every_topic_are_dropped(
    fleet: Fleet, agents: Any, tmp_path: Path, artifacts: Artifacts
) -> None:
    from fleet.responder import MqttSession

    agent = _agent(agents, fleet, tmp_path)
    agent.start()
    session = MqttSession(fleet.config("fleet"), role="test")
    session.start()
    session.wait_ready(10)
    garbage = [
        b"",
        b"\x00\xff" * 10,
        b"{",
        b"[]",
        json.dumps({"schema_version": 2}).encode(),
        b"x" * (200 * 1024),
        b"ELCK" + b"\x01" * 100,
    ]
    for topic in (protocol.jobs_notify("dev-1"), protocol.artifacts_data("dev-1")):
        for payload in garbage:
            session.publish(topic, payload, qos=1, timeout=5)
    session.publish(protocol.jobs_notify("dev-1"), b"", qos=1, retain=True, timeout=5)
    session.stop()
    time.sleep(1.0)
    assert agent.proc is not None and agent.proc.poll() is None, agent.log()
    v1 = _put(fleet, artifacts.v1)
    fleet.deploy("dev-1", v1, job_id="after-garbage")
    assert fleet.wait("after-garbage", ("SUCCEEDED", "FAILED")).state == "SUCCEEDED", agent.log()


def _message(fleet: Fleet, topic: str, timeout: float = 15.0) -> dict[str, Any]:
    """The first message on ``topic`` (retained or live) as the fleet user sees it."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[bytes] = []
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set("fleet", fleet.passwords["fleet"])
    client.on_message = lambda c, u, m: got.append(bytes(m.payload))
    client.connect("127.0.0.1", fleet.broker.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    assert got, f"no message on {topic}"
    data: dict[str, Any] = json.loads(got[-1])
    return data


@contextlib.contextmanager
def _qos_recorder(fleet: Fleet, topic: str) -> Iterator[list[tuple[str, int]]]:
    """(state, QoS) of every JobUpdate delivered on ``topic`` to a QoS 1 subscription."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[tuple[str, int]] = []
    subscribed = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set("fleet", fleet.passwords["fleet"])
    client.on_message = lambda c, u, m: got.append((json.loads(m.payload)["state"], m.qos))
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect("127.0.0.1", fleet.broker.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        assert subscribed.wait(10), f"not subscribed to {topic}"
        yield got
    finally:
        client.loop_stop()
        client.disconnect()


def _status(fleet: Fleet, device: str) -> dict[str, Any]:
    return _message(fleet, protocol.status(device))


def test_lwt_marks_killed_agent_offline_but_clean_stop_says_stopped(
    fleet: Fleet, agents: Any, tmp_path: Path
) -> None:
    agent = _agent(agents, fleet, tmp_path, keepalive_s=2)
    agent.start()
    deadline = time.monotonic() + 10
    while _status(fleet, "dev-1")["state"] != "online":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    killed_at = time.monotonic()
    agent.kill()
    while True:
        status = _status(fleet, "dev-1")
        if status["state"] == "offline":
            break
        assert time.monotonic() - killed_at < 2 * 1.5 + 3, "LWT not delivered in time"
        time.sleep(0.2)
    assert status["reason"] == "connection lost"
    assert time.monotonic() - killed_at <= 1.5 * 2 + 3
    agent.start()
    while _status(fleet, "dev-1")["state"] != "online":
        time.sleep(0.2)
    assert agent.stop() == 0
    status = _status(fleet, "dev-1")
    assert status["state"] == "offline" and status["reason"] == "stopped"
    time.sleep(1.5 * 2 + 1)  # no LWT may overwrite it afterwards
    assert _status(fleet, "dev-1")["reason"] == "stopped"


def _wait_progress(fleet: Fleet, job_id: str, fraction: float, timeout: float = 60) -> None:
    assert fleet.watcher is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for update in fleet.watcher.updates(job_id):
            if (
                update.chunks_done
                and update.chunks_total
                and (update.chunks_done / update.chunks_total >= fraction)
            ):
                return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {fraction:.0%}")


def test_broker_killed_mid_transfer_resumes_within_one_window(
    fleet: Fleet, agents: Any, tmp_path: Path, artifacts: Artifacts
) -> None:
    window = 8
    # A generous chunk timeout: on a loaded CI box a short one fires spuriously and
    # re-requests chunks that were only slow, which is not what this test measures; chunks
    # in flight at the kill are re-requested at once on reconnect anyway.
    agent = _agent(
        agents, fleet, tmp_path, window=window, chunk_size=64 * 1024, chunk_timeout_s=6.0
    )
    agent.start()
    stored = fleet.store.put_bundle(artifacts.big)
    count = protocol.chunk_count(stored.transfer.size, 64 * 1024)
    assert stored.transfer.size > 4 * 1024 * 1024
    fleet.deploy("dev-1", stored.artifact_id, job_id="big")
    _wait_progress(fleet, "big", 0.3)
    assert fleet.responder is not None
    fleet.broker.kill()
    assert fleet.watcher is not None
    assert "SUCCEEDED" not in [u.state for u in fleet.watcher.updates("big")]
    time.sleep(0.5)
    fleet.broker.start()
    done = fleet.wait("big", ("SUCCEEDED", "FAILED"), timeout=120)
    assert done.state == "SUCCEEDED", (done.reason, agent.log())
    sent = fleet.responder.stats["chunks_sent"]
    # Frames published while the responder was disconnected count as publish failures even
    # when paho queues and sends them after reconnecting, so only the upper bound is exact.
    assert sent <= count + window, (sent, count)
    active = agent.status()["big"]["active"]
    assert active["artifact_id"] == stored.artifact_id


def test_agent_killed_mid_transfer_resumes(
    fleet: Fleet, agents: Any, tmp_path: Path, artifacts: Artifacts
) -> None:
    window = 8
    agent = _agent(
        agents, fleet, tmp_path, window=window, chunk_size=64 * 1024, chunk_timeout_s=6.0
    )
    agent.start()
    stored = fleet.store.put_bundle(artifacts.big)
    count = protocol.chunk_count(stored.transfer.size, 64 * 1024)
    fleet.deploy("dev-1", stored.artifact_id, job_id="big-kill")
    _wait_progress(fleet, "big-kill", 0.4)
    agent.kill()
    part_state = json.loads(next((agent.state_dir / "transfers").glob("*.json")).read_text())
    assert part_state["artifact_id"] == stored.artifact_id
    agent.start()
    done = fleet.wait("big-kill", ("SUCCEEDED", "FAILED"), timeout=120)
    assert done.state == "SUCCEEDED", (done.reason, agent.log())
    assert fleet.responder is not None
    # A killed agent loses the chunks in flight and those received since its last flush
    # (the bitmap is made durable once per window): at most two windows.
    assert fleet.responder.stats["chunks_sent"] <= count + 2 * window
    assert not list((agent.state_dir / "transfers").glob("*.part"))


def test_killed_at_random_points_active_is_old_or_new(
    fleet: Fleet, agents: Any, tmp_path: Path, artifacts: Artifacts
) -> None:
    import os
    import random

    from agent.slots import ModelStore
    from compiler.bundle import verify_bundle
    from compiler.signing import load_public_key

    runs = int(os.environ.get("KILL_RUNS", "30"))
    rng = random.Random(20261126)
    public = load_public_key(artifacts.public)
    versions = {_put(fleet, artifacts.v1): "1", _put(fleet, artifacts.v2): "2"}
    by_version = {v: a for a, v in versions.items()}
    agent = _agent(agents, fleet, tmp_path, chunk_size=16 * 1024, window=4)
    agent.start()
    fleet.deploy("dev-1", by_version["1"], job_id="base")
    assert fleet.wait("base", ("SUCCEEDED", "FAILED")).state == "SUCCEEDED"
    store = ModelStore(agent.state_dir)
    # A swap between two stored versions takes milliseconds; kills spread over seconds would
    # almost all land after it. Aim them at the job's own duration on this box: the fastest
    # of three untimed flips after a first (a slow outlier would widen the window until
    # nearly every kill landed after the swap), kills up to three times that after the job
    # is published.
    took = []
    for flip, version in enumerate(("2", "1", "2", "1")):
        start = time.monotonic()
        kind = "deploy" if version == "2" else "rollback"
        fleet.deploy("dev-1", by_version[version], job_id=f"flip-{flip}", kind=kind)
        ended = fleet.wait(f"flip-{flip}", ("SUCCEEDED", "ROLLED_BACK", "FAILED"))
        assert ended.state != "FAILED"
        took.append(time.monotonic() - start)
    window = 3 * min(took[1:])
    outcomes = {"old": 0, "new": 0}
    for run in range(runs):
        current = store.active("mlp")
        assert current is not None
        old = current.manifest.model.version
        new = "2" if old == "1" else "1"
        fleet.deploy(
            "dev-1",
            by_version[new],
            job_id=f"run-{run}",
            kind="deploy" if new == "2" else "rollback",
        )
        time.sleep(rng.uniform(0.0, window))
        agent.kill()
        after = store.active("mlp")
        assert after is not None, f"run {run}: no active model after the kill"
        assert after.artifact_id in versions, f"run {run}: active is {after.artifact_id}"
        verify_bundle(after.path, public)  # complete and intact, never partial
        outcomes["new" if after.manifest.model.version == new else "old"] += 1
        agent.start()
        served = _serving_version(agent)
        assert served in ("1", "2")
        # The restarted agent finishes (or re-answers) the job; it ends on the new version.
        assert fleet.wait(f"run-{run}", ("SUCCEEDED", "ROLLED_BACK", "FAILED")).state != "FAILED"
        assert store.active("mlp").manifest.model.version == new  # type: ignore[union-attr]
    assert outcomes["old"] > 0 and outcomes["new"] > 0, (outcomes, took)


def test_candidate_split_shadow_and_promotion_via_jobs(
    fleet: Fleet, agents: Any, tmp_path: Path, artifacts: Artifacts
) -> None:
    import urllib.request

    agent = _agent(agents, fleet, tmp_path)
    agent.start()
    v1, v2 = _put(fleet, artifacts.v1), _put(fleet, artifacts.v2)
    fleet.deploy("dev-1", v1, job_id="primary")
    assert fleet.wait("primary", ("SUCCEEDED", "FAILED")).state == "SUCCEEDED"
    from fleet.jobs import publish_job

    publish_job(
        fleet.config("fleet"),
        store=fleet.store,
        device_id="dev-1",
        artifact_id=v2,
        job_id="candidate",
        role="candidate",
        traffic_fraction=0.5,
    )
    assert fleet.wait("candidate", ("SUCCEEDED", "FAILED")).state == "SUCCEEDED", agent.log()
    served = [_serving_version(agent) for _ in range(60)]
    assert 10 < served.count("2") < 50 and served.count("1") + served.count("2") == 60
    publish_job(
        fleet.config("fleet"),
        store=fleet.store,
        device_id="dev-1",
        artifact_id=v2,
        job_id="retire",
        kind="retire",
        role="candidate",
    )
    assert fleet.wait("retire", ("SUCCEEDED", "FAILED")).state == "SUCCEEDED"
    assert {_serving_version(agent) for _ in range(20)} == {"1"}

    publish_job(
        fleet.config("fleet"),
        store=fleet.store,
        device_id="dev-1",
        artifact_id=v2,
        job_id="shadow",
        role="shadow",
    )
    assert fleet.wait("shadow", ("SUCCEEDED", "FAILED")).state == "SUCCEEDED"
    agent.stop()
    agent.start()  # the shadow survives a restart
    assert {_serving_version(agent) for _ in range(20)} == {"1"}  # only the primary answers
    time.sleep(0.5)
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert "edgeloop_shadow_comparisons_total" in metrics
    comparisons = [
        line
        for line in metrics.splitlines()
        if line.startswith("edgeloop_shadow_comparisons_total{")
    ]
    assert comparisons and float(comparisons[0].rsplit(" ", 1)[1]) >= 1
    time.sleep(1.5)  # a heartbeat after the shadow traffic carries its agreement
    beat = protocol.Heartbeat.model_validate(_message(fleet, protocol.heartbeat("dev-1")))
    assert beat.shadow["mlp"].comparisons >= 1
    assert beat.shadow["mlp"].disagreement is not None

    fleet.deploy("dev-1", v2, job_id="promote")
    assert fleet.wait("promote", ("SUCCEEDED", "FAILED")).state == "SUCCEEDED"
    assert {_serving_version(agent) for _ in range(10)} == {"2"}
    roles = json.loads((agent.state_dir / "models" / "mlp" / "roles.json").read_text())
    assert roles == {}
