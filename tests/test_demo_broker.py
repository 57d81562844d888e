"""The demo's embedded broker (amqtt, MQTT 3.1.1) and the clients' 3.1.1 mode, with real parts.

Pure: the ``$7$`` password check against Mosquitto's own hashes, the fleet's ACL as the
embedded broker reads it, the broker choice. Over a real amqtt broker process: MQTT 5 and
bad logins refused, the ACL between devices, retained messages only for one's own
subscriptions (amqtt 0.12.1 alone leaks them), the agent's persistent session across a
reconnect; then a real agent process over it: its retained desired state, a deployment whose
artifact comes through the fleet's responder, and an OIP request answered.
"""

from __future__ import annotations

import queue
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("amqtt")

from agent import protocol  # noqa: E402
from agent.config import BrokerSettings  # noqa: E402
from agent.mqtt import Connected, Event, Inbound, MqttLink, unshared  # noqa: E402
from edgeloop.loop.stack import DemoSetupError, choose_broker  # noqa: E402
from fleet.broker import EmbeddedBrokerProcess, render_acl  # noqa: E402
from fleet.broker_auth import MosquittoPasswordFile, mosquitto_hash  # noqa: E402
from fleet.embedded_broker import Acl, verify_mosquitto_hash  # noqa: E402
from fleet.responder import BrokerConfig, BrokerError, MqttSession  # noqa: E402
from tests.agent.harness import AgentProcess, Fleet  # noqa: E402

PASSWORDS = {"fleet": "fleet-pw", "responder": "resp-pw", "dev-1": "dev-1-pw", "dev-2": "d2-pw"}
DEVICES = "edgeloop/v1/devices"


# ---------------------------------------------------------------- pure


def test_the_password_check_accepts_mosquittos_own_hashes(tmp_path: Path) -> None:
    hashed = mosquitto_hash("s3cret")
    assert verify_mosquitto_hash("s3cret", hashed)
    assert not verify_mosquitto_hash("s3cret ", hashed)
    assert not verify_mosquitto_hash("s3cret", "$6$salt$digest")
    assert not verify_mosquitto_hash("s3cret", "$7$101$not-base64!$x")
    assert not verify_mosquitto_hash("", "")
    binary = shutil.which("mosquitto_passwd")
    if binary is None:
        return
    passwd = tmp_path / "passwd"
    passwd.write_text("dev-1:from-the-binary\n")
    subprocess.run([binary, "-U", str(passwd)], check=True, capture_output=True)
    written = passwd.read_text().strip().partition(":")[2]
    assert written.startswith("$7$")
    assert verify_mosquitto_hash("from-the-binary", written)
    assert not verify_mosquitto_hash("from-the-binarY", written)


def test_the_fleet_acl_confines_each_device_to_its_subtree() -> None:
    acl = Acl.parse(render_acl())
    assert acl.allows("dev-1", f"{DEVICES}/dev-1/status", "write")
    assert not acl.allows("dev-1", f"{DEVICES}/dev-2/status", "write")
    assert acl.allows("dev-1", f"{DEVICES}/dev-1/capture/samples", "write")
    assert acl.allows("dev-1", f"{DEVICES}/dev-1/desired", "read")
    assert not acl.allows("dev-1", f"{DEVICES}/dev-2/desired", "read")
    assert not acl.allows("dev-1", f"{DEVICES}/dev-1/desired", "write")
    assert acl.allows_subscribe("dev-1", f"{DEVICES}/dev-1/jobs/notify")
    assert not acl.allows_subscribe("dev-1", f"{DEVICES}/+/jobs/notify")
    assert not acl.allows_subscribe("dev-1", f"{DEVICES}/dev-1/#")
    assert acl.allows_subscribe("responder", f"{DEVICES}/+/artifacts/req")
    assert not acl.allows_subscribe("responder", f"{DEVICES}/#")
    assert acl.allows("responder", f"{DEVICES}/dev-1/artifacts/data", "write")
    assert not acl.allows("responder", f"{DEVICES}/dev-1/jobs/notify", "write")
    assert acl.allows_subscribe("fleet", f"{DEVICES}/+/jobs/update")
    assert acl.allows("fleet", f"{DEVICES}/dev-1/desired", "write")
    assert not acl.allows(None, f"{DEVICES}/dev-1/status", "write")  # anonymous
    assert not acl.allows("dev+", f"{DEVICES}/dev+/status", "write")  # never a wildcard %u
    with pytest.raises(ValueError, match="line 1"):
        Acl.parse("deny everything\n")


def test_the_broker_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mosquitto"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert choose_broker("auto") == "mosquitto"
    assert choose_broker("embedded") == "embedded"
    fake.unlink()
    assert choose_broker("auto") == "embedded"
    with pytest.raises(DemoSetupError, match="mosquitto is not installed"):
        choose_broker("mosquitto")
    with pytest.raises(ValueError, match="one of auto, mosquitto, embedded"):
        choose_broker("rabbitmq")


def test_the_protocol_settings() -> None:
    assert BrokerSettings().protocol == "5"
    assert BrokerSettings(protocol=5).protocol == "5"  # type: ignore[arg-type]  # TOML number
    assert BrokerSettings(protocol="3.1.1").protocol == "3.1.1"
    with pytest.raises(ValueError, match="protocol"):
        BrokerSettings(protocol="4")  # type: ignore[arg-type]
    assert unshared(f"$share/g/{DEVICES}/+/artifacts/req") == f"{DEVICES}/+/artifacts/req"
    assert unshared(f"{DEVICES}/+/status") == f"{DEVICES}/+/status"
    with pytest.raises(ValueError, match="malformed"):
        unshared("$share/g")
    session = MqttSession(
        BrokerConfig("h", 1, "u", "p", protocol="3.1.1"),
        role="t",
        subscriptions=(protocol.responder_subscription(),),
    )
    assert session.subscriptions == (f"{DEVICES}/+/artifacts/req",)


# ---------------------------------------------------------------- over the embedded broker


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[EmbeddedBrokerProcess]:
    b = EmbeddedBrokerProcess(tmp_path / "broker", users=dict(PASSWORDS))
    b.start()
    try:
        yield b
    finally:
        b.stop()
        assert not b.running


def _config(broker: EmbeddedBrokerProcess, user: str, **kw: Any) -> BrokerConfig:
    return BrokerConfig("127.0.0.1", broker.port, user, PASSWORDS[user], protocol="3.1.1", **kw)


def _collect(into: queue.Queue[tuple[str, bytes]]) -> Any:
    return lambda m: into.put((m.topic, bytes(m.payload)))


def _drain(q: queue.Queue[Any], wait: float = 0.5) -> list[Any]:
    time.sleep(wait)
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


@pytest.mark.mqtt
def test_logins_acl_and_retained_messages(broker: EmbeddedBrokerProcess) -> None:
    fleet = MqttSession(_config(broker, "fleet"), role="fleet")
    fleet.start(timeout=10)
    try:
        for refused in (
            BrokerConfig("127.0.0.1", broker.port, "fleet", PASSWORDS["fleet"], protocol="5"),
            BrokerConfig("127.0.0.1", broker.port, "fleet", "wrong", protocol="3.1.1"),
            BrokerConfig("127.0.0.1", broker.port, "nobody", "x", protocol="3.1.1"),
        ):
            session = MqttSession(refused, role="refused")
            with pytest.raises(BrokerError):
                session.start(timeout=3)
            session.stop()
        fleet.publish(f"{DEVICES}/dev-2/desired", b"dev-2's", retain=True, timeout=5)
        fleet.publish(f"{DEVICES}/dev-1/desired", b"dev-1's", retain=True, timeout=5)

        # dev-2 holds a subscription to its own desired state.
        got2: queue.Queue[tuple[str, bytes]] = queue.Queue()
        dev2 = MqttSession(
            _config(broker, "dev-2"),
            role="dev",
            subscriptions=(f"{DEVICES}/dev-2/desired",),
            on_message=_collect(got2),
        )
        dev2.start(timeout=10)
        assert _drain(got2) == [(f"{DEVICES}/dev-2/desired", b"dev-2's")]

        # dev-1 gets its own retained state only (amqtt 0.12.1 alone sends dev-1, on
        # connect, the retained messages of dev-2's filter too), and may not read dev-2's.
        got1: queue.Queue[tuple[str, bytes]] = queue.Queue()
        dev1 = MqttSession(
            _config(broker, "dev-1"),
            role="dev",
            subscriptions=(f"{DEVICES}/dev-1/desired",),
            on_message=_collect(got1),
        )
        dev1.start(timeout=10)
        assert _drain(got1) == [(f"{DEVICES}/dev-1/desired", b"dev-1's")]
        spy = MqttSession(
            _config(broker, "dev-1"), role="spy", subscriptions=(f"{DEVICES}/dev-2/desired",)
        )
        with pytest.raises(BrokerError, match="refused subscription"):
            spy.start(timeout=5)
        spy.stop()

        # A device publishing on another's topic is acknowledged (3.1.1) but never delivered.
        requests: queue.Queue[tuple[str, bytes]] = queue.Queue()
        responder = MqttSession(
            _config(broker, "responder"),
            role="responder",
            subscriptions=(protocol.responder_subscription(),),  # unshared in 3.1.1
            on_message=_collect(requests),
        )
        responder.start(timeout=10)
        dev1.publish(protocol.artifacts_req("dev-2"), b"spoofed", timeout=5)
        dev1.publish(protocol.artifacts_req("dev-1"), b"mine", timeout=5)
        assert _drain(requests) == [(protocol.artifacts_req("dev-1"), b"mine")]
        for s in (responder, dev1, dev2):
            s.stop()
    finally:
        fleet.stop()


def _next(events: queue.Queue[Event], kind: type, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(event, kind):
            return event
    raise AssertionError(f"no {kind.__name__} within {timeout} s")


@pytest.mark.mqtt
def test_the_agents_session_persists_across_a_reconnect(broker: EmbeddedBrokerProcess) -> None:
    settings = BrokerSettings(
        port=broker.port,
        username="dev-1",
        password=PASSWORDS["dev-1"],
        protocol="3.1.1",
        keepalive_s=2,
    )
    topics = [protocol.artifacts_data("dev-1")]
    status: queue.Queue[tuple[str, bytes]] = queue.Queue()
    fleet = MqttSession(
        _config(broker, "fleet"),
        role="fleet",
        subscriptions=(protocol.status("dev-1"),),
        on_message=_collect(status),
    )
    fleet.start(timeout=10)
    try:
        events: queue.Queue[Event] = queue.Queue()
        link = MqttLink(
            settings, device_id="dev-1", agent_version="t", events=events, subscriptions=topics
        )
        link.start()
        assert link.wait_connected(10)
        assert _next(events, Connected).session_present is False
        time.sleep(0.3)  # the SUBACK
        link.stop(clean=True)  # DISCONNECT: the session stays, no LWT
        assert any(b'"stopped"' in p for _, p in _drain(status))

        fleet.publish(protocol.artifacts_data("dev-1"), b"while away", timeout=5)

        events = queue.Queue()
        link = MqttLink(
            settings, device_id="dev-1", agent_version="t", events=events, subscriptions=topics
        )
        link.start()
        assert _next(events, Connected).session_present is True
        inbound = _next(events, Inbound)
        assert (inbound.topic, inbound.payload) == (protocol.artifacts_data("dev-1"), b"while away")
        assert any(b'"online"' in p for _, p in _drain(status))
        # A crash: the connection closes without DISCONNECT, the broker fires the retained LWT.
        # (A connection that only goes silent is never timed out: amqtt 0.12.1 ignores the
        # keepalive; docs/protocol.md.)
        link.stop(clean=False)
        sock = link._client.socket()
        assert sock is not None
        sock.close()
        assert any(b'"connection lost"' in p for _, p in _drain(status, 2.0))
    finally:
        fleet.stop()


# ---------------------------------------------------------------- a real agent over it


class Agent311(AgentProcess):
    """The test harness's agent process, configured for MQTT 3.1.1."""

    def write_config(self) -> Path:
        config = super().write_config()
        text = config.read_text().replace("[transfer]\n", 'protocol = "3.1.1"\n[transfer]\n', 1)
        config.write_text(text)
        return config


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A small MLP compiled for the host with the onnxruntime runtime (no TVM build)."""
    from compiler.pipeline import CompileRequest, compile_model
    from compiler.settings import CompilerSettings
    from compiler.signing import generate_keys
    from tests.compiler import models

    d = tmp_path_factory.mktemp("bundle")
    keys = generate_keys(d / "keys")
    onnx = models.export_onnx("mlp", d / "mlp.onnx")
    out = compile_model(
        CompileRequest(
            model=onnx,
            profile="generic/x86_64",
            output=d / "v1",
            model_name="mlp",
            model_version="1",
            runtime="onnxruntime",
            trials=0,
            signing_key=keys.private,
            samples=2,
        ),
        settings=CompilerSettings(config_dir=d / "cfg", cache_dir=d / "cache"),
    ).output
    return keys.public, out, onnx


@pytest.mark.mqtt
@pytest.mark.slow
def test_a_real_agent_over_the_embedded_broker(
    tmp_path: Path, onnx_bundle: tuple[Path, Path, Path]
) -> None:
    import onnxruntime as ort

    from compiler.signing import load_public_key
    from fleet.store import ArtifactStore

    public, bundle, onnx = onnx_bundle
    broker = EmbeddedBrokerProcess(
        tmp_path / "broker", users={k: PASSWORDS[k] for k in ("fleet", "responder")}
    )
    store = ArtifactStore(tmp_path / "store", load_public_key(public))
    fleet = Fleet(
        tmp_path,
        public,
        store,
        broker,  # type: ignore[arg-type]  # the same interface as MosquittoProcess
        passwords=dict(PASSWORDS),
        mqtt_protocol="3.1.1",
    )
    fleet.start()
    agent = Agent311(fleet, "dev-1", tmp_path / "devices" / "dev-1" / "state")
    try:
        # The device's login is added as the fleet API does it, while the broker runs.
        MosquittoPasswordFile(broker.password_file, reload=broker.reload).add_device(
            "dev-1", PASSWORDS["dev-1"]
        )
        desired = protocol.DesiredState(revision=3, capture=protocol.CapturePolicy(sample_rate=0.0))
        fleet_session = MqttSession(fleet.config("fleet"), role="desired")
        fleet_session.start(timeout=10)
        fleet_session.publish(protocol.desired("dev-1"), desired.to_bytes(), retain=True, timeout=5)
        fleet_session.stop()

        agent.start()
        applied = agent.state_dir / "capture" / "desired.json"
        deadline = time.monotonic() + 20
        while not (applied.exists() and '"revision":3' in applied.read_text()):
            assert time.monotonic() < deadline, f"desired state not applied:\n{agent.log()}"
            time.sleep(0.05)

        artifact_id = store.put_bundle(bundle).artifact_id
        fleet.deploy("dev-1", artifact_id, job_id="job-v1")
        done = fleet.wait("job-v1", ("SUCCEEDED", "FAILED"), timeout=60)
        assert done.state == "SUCCEEDED", (done.reason, agent.log())
        assert fleet.responder is not None and fleet.responder.stats["chunks_sent"] >= 1

        x = np.random.default_rng(3).standard_normal((1, 32)).astype(np.float32)
        result = agent.infer("mlp", {"input": x})
        assert result["model_version"] == "1"
        logits = np.asarray(result["outputs"][0]["data"], dtype=np.float32).reshape(1, -1)
        reference = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(
            logits, reference.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5
        )
        assert "MQTT 5" not in agent.log() and "refused" not in agent.log()
    finally:
        agent.kill()
        fleet.stop()
