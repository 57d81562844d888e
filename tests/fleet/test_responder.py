"""Responder and jobs end to end over a real Mosquitto broker, plus the pure chunk planner."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agent import protocol
from agent.protocol import ChunkFrame, ChunkRequest, JobNotify, JobState, JobUpdate
from fleet.store import ArtifactStore, StoredArtifact

from .conftest import Broker, Keys

mqtt = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from fleet.cli import register  # noqa: E402
from fleet.jobs import JobTimeoutError, JobWatcher, publish_job  # noqa: E402
from fleet.responder import (  # noqa: E402
    BrokerConfig,
    BrokerError,
    MqttSession,
    Responder,
    plan_chunks,
)

CHUNK = 64 * 1024
TIMEOUT = 5.0


# ---------------------------------------------------------------- pure planner


def _req(ranges: list[tuple[int, int]]) -> ChunkRequest:
    return ChunkRequest(request_id="r", artifact_id="a" * 64, chunk_size=1024, ranges=ranges)


@pytest.mark.parametrize(
    ("ranges", "count", "cap", "indices", "error_starts", "truncated"),
    [
        ([(0, 3)], 10, 64, [0, 1, 2], [], 0),
        ([(8, 20)], 10, 64, [8, 9], [], 0),
        ([(10, 12)], 10, 64, [], [10], 0),
        ([(0, 2), (1, 3), (12, 13)], 10, 64, [0, 1, 2], [12], 0),
        ([(5, 6), (0, 1)], 10, 64, [5, 0], [], 0),
        ([(0, 10)], 10, 4, [0, 1, 2, 3], [], 6),
        ([(0, 1)], 1, 64, [0], [], 0),
    ],
)
def test_plan_chunks(
    ranges: list[tuple[int, int]],
    count: int,
    cap: int,
    indices: list[int],
    error_starts: list[int],
    truncated: int,
) -> None:
    plan = plan_chunks(_req(ranges), count=count, max_chunks=cap)
    assert plan.indices == indices
    assert [i for i, _ in plan.errors] == error_starts
    assert all(f"outside 0..{count - 1}" in reason for _, reason in plan.errors)
    assert plan.truncated == truncated


# ---------------------------------------------------------------- helpers


class Device:
    """A fake device: plain paho, its own credentials, collects chunk frames."""

    def __init__(self, broker: Broker, name: str) -> None:
        self.name = name
        self.frames: queue.Queue[ChunkFrame] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._acks: dict[int, str] = {}
        self._subscribed = threading.Event()
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{name}-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(name, broker.passwords[name])
        client.on_message = self._on_message
        client.on_subscribe = lambda c, u, mid, codes, p: self._subscribed.set()
        client.on_publish = lambda c, u, mid, code, p: self._acks.__setitem__(mid, str(code))
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        self.client = client

    def _on_message(self, client: object, userdata: object, message: object) -> None:
        topic, payload = message.topic, bytes(message.payload)  # type: ignore[attr-defined]
        if topic.endswith("/artifacts/data"):
            self.frames.put(protocol.decode_frame(payload))
        else:
            self.messages.put((topic, payload))

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(TIMEOUT)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> str:
        """Publish at QoS 1; return the broker's PUBACK reason."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()
        return self._acks[info.mid]

    def request(
        self,
        artifact_id: str,
        ranges: list[tuple[int, int]],
        *,
        chunk_size: int = CHUNK,
        as_device: str | None = None,
    ) -> str:
        req = ChunkRequest(
            request_id=uuid.uuid4().hex[:8],
            artifact_id=artifact_id,
            chunk_size=chunk_size,
            ranges=ranges,
        )
        return self.publish(protocol.artifacts_req(as_device or self.name), req.to_bytes())

    def take(self, n: int, timeout: float = TIMEOUT) -> list[ChunkFrame]:
        deadline = time.monotonic() + timeout
        got = []
        while len(got) < n:
            got.append(self.frames.get(timeout=max(0.01, deadline - time.monotonic())))
        return got

    def assert_quiet(self, within: float = 0.5) -> None:
        with pytest.raises(queue.Empty):
            self.frames.get(timeout=within)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def store(tmp_path: Path, keys: Keys) -> Iterator[ArtifactStore]:
    with ArtifactStore(tmp_path / "store", keys.public) as opened:
        yield opened


@pytest.fixture()
def artifact(store: ArtifactStore, signed_bundle: Path) -> StoredArtifact:
    stored = store.put_bundle(signed_bundle)
    store.grant("dev-a", stored.artifact_id)
    return stored


@pytest.fixture()
def start_responder(broker: Broker, store: ArtifactStore) -> Iterator[Callable[..., Responder]]:
    started: list[Responder] = []

    def start(**kwargs: object) -> Responder:
        responder = Responder(
            store,
            store.entitlements,
            host="127.0.0.1",
            port=broker.port,
            username="responder",
            password=broker.passwords["responder"],
            **kwargs,  # type: ignore[arg-type]
        )
        responder.start(timeout=TIMEOUT)
        started.append(responder)
        return responder

    yield start
    for responder in started:
        responder.stop()


@pytest.fixture()
def device(broker: Broker) -> Iterator[Callable[[str], Device]]:
    made: list[Device] = []

    def make(name: str) -> Device:
        dev = Device(broker, name)
        dev.subscribe(protocol.artifacts_data(name))
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.close()


def _config(broker: Broker, user: str = "fleet", password: str | None = None) -> BrokerConfig:
    return BrokerConfig(
        host="127.0.0.1",
        port=broker.port,
        username=user,
        password=password or broker.passwords[user],
    )


# ---------------------------------------------------------------- responder


def test_device_downloads_the_transfer_file_byte_exactly(
    start_responder: Callable[..., Responder],
    device: Callable[[str], Device],
    artifact: StoredArtifact,
) -> None:
    responder = start_responder()
    dev = device("dev-a")
    info = artifact.transfer
    count = protocol.chunk_count(info.size, CHUNK)
    assert count > 40
    parts: dict[int, bytes] = {}
    window = 16
    for start in range(0, count, window):
        stop = min(count, start + window)
        assert dev.request(artifact.artifact_id, [(start, stop)]) == "Success"
        for frame in dev.take(stop - start):
            assert not frame.error, frame.reason
            assert frame.artifact_id == artifact.artifact_id and frame.count == count
            parts[frame.index] = frame.payload
    assert sorted(parts) == list(range(count))
    data = b"".join(parts[i] for i in range(count))
    assert len(data) == info.size
    assert hashlib.sha256(data).hexdigest() == info.sha256
    # The responder counts a chunk after paho took it, so the device may see the last frame
    # a moment before the counter moves: wait for the counters to settle.
    deadline = time.monotonic() + 5
    while responder.stats["chunks_sent"] < count and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = responder.stats
    assert stats["requests"] == -(-count // window)
    assert stats["chunks_sent"] == count and stats["bytes_sent"] == info.size
    assert stats["errors"] == stats["malformed"] == stats["dropped"] == 0


def test_ranges_are_clamped_capped_and_out_of_range_is_an_error_frame(
    start_responder: Callable[..., Responder],
    device: Callable[[str], Device],
    artifact: StoredArtifact,
) -> None:
    responder = start_responder(max_chunks_per_request=8)
    dev = device("dev-a")
    count = protocol.chunk_count(artifact.transfer.size, CHUNK)
    dev.request(artifact.artifact_id, [(count - 2, count + 50)])
    assert sorted(f.index for f in dev.take(2)) == [count - 2, count - 1]
    dev.request(artifact.artifact_id, [(count, count + 3)])
    (frame,) = dev.take(1)
    assert frame.error and frame.index == count and f"outside 0..{count - 1}" in frame.reason
    dev.request(artifact.artifact_id, [(0, 30)])
    assert [f.index for f in dev.take(8)] == list(range(8))
    dev.assert_quiet(0.3)
    stats = responder.stats
    assert stats["errors"] == 1 and stats["chunks_sent"] == 10 and stats["failures"] == 0


def test_not_entitled_and_unknown_artifacts_get_error_frames(
    start_responder: Callable[..., Responder],
    device: Callable[[str], Device],
    artifact: StoredArtifact,
    store: ArtifactStore,
) -> None:
    responder = start_responder()
    dev_b = device("dev-b")
    dev_b.request(artifact.artifact_id, [(3, 5)])
    (frame,) = dev_b.take(1)
    assert frame.error and frame.index == 3 and frame.count == 0
    assert frame.reason == f"device 'dev-b' is not entitled to artifact {artifact.artifact_id}"
    dev_b.assert_quiet(0.3)
    unknown = "0" * 64
    store.entitlements.grant("dev-b", unknown)  # granted but never stored
    dev_b.request(unknown, [(0, 1)])
    (frame,) = dev_b.take(1)
    assert frame.error and f"no artifact {unknown}" in frame.reason
    # Revocation takes effect at once.
    store.revoke("dev-a", artifact.artifact_id)
    dev_a = device("dev-a")
    dev_a.request(artifact.artifact_id, [(0, 1)])
    assert "not entitled" in dev_a.take(1)[0].reason
    deadline = time.monotonic() + TIMEOUT  # counted after the publish, so maybe after receipt
    while responder.stats["errors"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert responder.stats["errors"] == 3 and responder.stats["chunks_sent"] == 0


def test_a_device_cannot_request_for_another(
    start_responder: Callable[..., Responder],
    device: Callable[[str], Device],
    artifact: StoredArtifact,
    store: ArtifactStore,
) -> None:
    responder = start_responder()
    store.grant("dev-b", artifact.artifact_id)
    dev_a = device("dev-a")
    dev_a.subscribe(protocol.artifacts_data("dev-b"))  # granted by the broker, but never delivered
    reason = dev_a.request(artifact.artifact_id, [(0, 4)], as_device="dev-b")
    assert reason == "Not authorized"
    dev_a.assert_quiet(1.0)
    assert responder.stats["requests"] == 0


def test_malformed_requests_are_dropped_and_serving_goes_on(
    start_responder: Callable[..., Responder],
    device: Callable[[str], Device],
    artifact: StoredArtifact,
) -> None:
    responder = start_responder()
    dev = device("dev-a")
    topic = protocol.artifacts_req("dev-a")
    good = json.loads(
        ChunkRequest(
            request_id="x", artifact_id=artifact.artifact_id, chunk_size=CHUNK, ranges=[(0, 1)]
        ).to_bytes()
    )
    bad_payloads = [
        b"\xff not json",
        b"[1, 2]",
        json.dumps({**good, "schema_version": 2}).encode(),
        json.dumps({**good, "ranges": [[5, 2]]}).encode(),
        json.dumps({**good, "ranges": [[-1, 2]]}).encode(),
        json.dumps({**good, "ranges": []}).encode(),
        json.dumps({**good, "chunk_size": 10}).encode(),
        json.dumps({**good, "artifact_id": "../../etc/passwd"}).encode(),
        json.dumps({**good, "surprise": 1}).encode(),
        json.dumps({**good, "pad": "x" * (protocol.MAX_JSON_PAYLOAD + 10)}).encode(),
        b"",
    ]
    for payload in bad_payloads:
        assert dev.publish(topic, payload) == "Success"
    dev.assert_quiet(0.5)
    dev.request(artifact.artifact_id, [(1, 3)])
    assert sorted(f.index for f in dev.take(2)) == [1, 2]
    stats = responder.stats
    assert stats["malformed"] == len(bad_payloads)
    assert stats["requests"] == 1 and stats["errors"] == 0


def test_two_responders_share_the_load(
    start_responder: Callable[..., Responder],
    device: Callable[[str], Device],
    artifact: StoredArtifact,
) -> None:
    first, second = start_responder(), start_responder()
    dev = device("dev-a")
    for i in range(20):
        dev.request(artifact.artifact_id, [(i, i + 1)])
    assert sorted(f.index for f in dev.take(20)) == list(range(20))
    a, b = first.stats["requests"], second.stats["requests"]
    assert a > 0 and b > 0 and a + b == 20


class _GatedSource:
    """A chunk source whose reads block until the gate opens (a stuck worker)."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.gate = threading.Event()

    def transfer_info(self, artifact_id: str) -> protocol.TransferInfo:
        return self.store.transfer_info(artifact_id)

    def read_chunk(self, artifact_id: str, index: int, chunk_size: int) -> bytes:
        self.gate.wait(TIMEOUT)
        return self.store.read_chunk(artifact_id, index, chunk_size)


def test_full_queue_drops_and_counts(
    broker: Broker,
    store: ArtifactStore,
    device: Callable[[str], Device],
    artifact: StoredArtifact,
) -> None:
    source = _GatedSource(store)
    responder = Responder(
        source,
        store.entitlements,
        host="127.0.0.1",
        port=broker.port,
        username="responder",
        password=broker.passwords["responder"],
        queue_size=1,
    )
    responder.start(timeout=TIMEOUT)
    try:
        dev = device("dev-a")
        for i in range(6):
            dev.request(artifact.artifact_id, [(i, i + 1)])
        # One request in the worker's hands (stuck), at most one queued, the rest dropped.
        deadline = time.monotonic() + TIMEOUT
        while responder.stats["dropped"] < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        dropped = responder.stats["dropped"]
        assert dropped in (4, 5)
        source.gate.set()
        frames = dev.take(6 - dropped)
        assert frames[0].index == 0 and not any(f.error for f in frames)
        dev.assert_quiet(0.3)
        assert responder.stats["requests"] == 6 - dropped
    finally:
        responder.stop()


def test_wrong_credentials_fail_fast(broker: Broker, store: ArtifactStore) -> None:
    responder = Responder(
        store,
        store.entitlements,
        host="127.0.0.1",
        port=broker.port,
        username="responder",
        password="wrong",
    )
    started = time.monotonic()
    with pytest.raises(BrokerError, match="refused the connection as 'responder'"):
        responder.start(timeout=TIMEOUT)
    assert time.monotonic() - started < TIMEOUT
    with pytest.raises(ValueError, match="max_chunks_per_request must be at least 1, got 0"):
        Responder(
            store,
            store.entitlements,
            host="h",
            port=1,
            username="u",
            password="p",
            max_chunks_per_request=0,
        )


# ---------------------------------------------------------------- jobs


def test_publish_job_and_watch_updates(
    broker: Broker, store: ArtifactStore, signed_bundle: Path, device: Callable[[str], Device]
) -> None:
    stored = store.put_bundle(signed_bundle)
    with JobWatcher(_config(broker)) as watcher:
        job = publish_job(
            _config(broker), store=store, device_id="dev-a", artifact_id=stored.artifact_id
        )
        assert store.is_entitled("dev-a", stored.artifact_id)
        assert (
            job.signature
            == base64.b64encode((signed_bundle / "manifest.sig").read_bytes()).decode()
        )
        assert job.transfer == stored.transfer and job.profile == "generic/x86_64"
        assert (job.model.name, job.model.version, job.kind) == ("m", "1", "deploy")
        # The device subscribes later and still gets the job (retained).
        dev = device("dev-a")
        dev.subscribe(protocol.jobs_notify("dev-a"))
        topic, payload = dev.messages.get(timeout=TIMEOUT)
        assert topic == protocol.jobs_notify("dev-a")
        assert protocol.decode(JobNotify, payload) == job
        update_topic = protocol.jobs_update("dev-a")
        for state in (JobState.IN_PROGRESS, JobState.SUCCEEDED):
            update = JobUpdate(
                job_id=job.job_id, device_id="dev-a", artifact_id=job.artifact_id, state=state
            )
            assert dev.publish(update_topic, update.to_bytes()) == "Success"
        spoof = JobUpdate(
            job_id=job.job_id,
            device_id="dev-b",
            artifact_id=job.artifact_id,
            state=JobState.FAILED,
        )
        dev.publish(update_topic, spoof.to_bytes())
        dev.publish(update_topic, b"not json")
        done = watcher.wait_for(job.job_id, [JobState.SUCCEEDED, "FAILED"], TIMEOUT)
        assert done.state is JobState.SUCCEEDED and done.device_id == "dev-a"
        deadline = time.monotonic() + TIMEOUT
        while watcher.malformed < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.malformed == 2
        assert [u.state for u in watcher.updates(job.job_id)] == [
            JobState.IN_PROGRESS,
            JobState.SUCCEEDED,
        ]
        with pytest.raises(JobTimeoutError, match="last seen: no update"):
            watcher.wait_for("other-job", ["SUCCEEDED"], 0.2)


def test_publish_job_failure_withdraws_the_new_grant(
    broker: Broker, store: ArtifactStore, signed_bundle: Path
) -> None:
    stored = store.put_bundle(signed_bundle)
    with pytest.raises(BrokerError, match="refused the connection"):
        publish_job(
            _config(broker, password="wrong"),
            store=store,
            device_id="dev-a",
            artifact_id=stored.artifact_id,
            timeout=TIMEOUT,
        )
    assert not store.is_entitled("dev-a", stored.artifact_id)
    # The responder user may not publish jobs: the broker refuses the PUBACK.
    with pytest.raises(BrokerError, match="refused the publish .* Not authorized"):
        publish_job(
            _config(broker, user="responder"),
            store=store,
            device_id="dev-a",
            artifact_id=stored.artifact_id,
        )
    assert not store.is_entitled("dev-a", stored.artifact_id)


def test_cli_deploy_publishes_a_retained_job(
    broker: Broker,
    store: ArtifactStore,
    signed_bundle: Path,
    keys: Keys,
    device: Callable[[str], Device],
) -> None:
    stored = store.put_bundle(signed_bundle)

    @click.group()
    def root() -> None:
        pass

    register(root)
    base = [
        "--store",
        str(store.root),
        "--public-key",
        str(keys.public_path),
        "--port",
        str(broker.port),
    ]
    result = CliRunner().invoke(
        root,
        [
            "fleet",
            "deploy",
            stored.artifact_id,
            "--device",
            "dev-a",
            "--job-id",
            "j1",
            *base,
            "--password",
            broker.passwords["fleet"],
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["job"]["job_id"] == "j1"
    dev = device("dev-a")
    dev.subscribe(protocol.jobs_notify("dev-a"))
    assert protocol.decode(JobNotify, dev.messages.get(timeout=TIMEOUT)[1]).job_id == "j1"
    no_password = CliRunner().invoke(
        root, ["fleet", "deploy", stored.artifact_id, "--device", "dev-a", *base]
    )
    assert no_password.exit_code == 2 and "EDGELOOP_FLEET_PASSWORD" in no_password.stderr
    unknown = CliRunner().invoke(
        root, ["fleet", "deploy", "ab" * 32, "--device", "dev-a", *base, "--password", "x"]
    )
    assert unknown.exit_code == 2 and f"no artifact {'ab' * 32}" in unknown.stderr


def test_responder_resubscribes_after_the_broker_restarts(
    broker: Broker,
    start_responder: Callable[..., Responder],
    device: Callable[[str], Device],
    artifact: StoredArtifact,
) -> None:
    responder = start_responder()
    broker.process.kill()
    broker.process.start()
    responder.session.wait_ready(TIMEOUT)  # reconnected (backoff from 1 s) and re-subscribed
    dev = device("dev-a")
    dev.request(artifact.artifact_id, [(0, 2)])
    assert sorted(f.index for f in dev.take(2)) == [0, 1]


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "clean"])
def test_requests_sent_while_the_responder_restarts_are_answered_after(
    start_responder: Callable[..., Responder],
    device: Callable[[str], Device],
    artifact: StoredArtifact,
    persistent: bool,
) -> None:
    client_id = f"edgeloop-responder-test-{uuid.uuid4().hex[:6]}"
    first = start_responder(client_id=client_id if persistent else None)
    dev = device("dev-a")
    dev.request(artifact.artifact_id, [(0, 1)])
    assert [f.index for f in dev.take(1)] == [0]
    first.stop()  # a restart: no responder is connected now
    accepted = dev.request(artifact.artifact_id, [(1, 3)])
    assert accepted == ("Success" if persistent else "No matching subscribers")
    second = start_responder(client_id=client_id if persistent else None)
    if persistent:  # the broker queued the request in the session and delivers it now
        assert sorted(f.index for f in dev.take(2)) == [1, 2]
        assert second.stats["requests"] == 1
    else:  # the control: a clean session loses what was sent meanwhile
        dev.assert_quiet(within=1.0)
        assert second.stats["requests"] == 0


def test_a_persistent_session_needs_a_fixed_client_id() -> None:
    config = BrokerConfig("127.0.0.1", 1, "responder", "pw")
    with pytest.raises(ValueError, match="needs a fixed client_id"):
        MqttSession(config, role="responder", session_expiry_s=60)


def test_cli_responder_serves_until_sigterm(
    broker: Broker,
    store: ArtifactStore,
    keys: Keys,
    device: Callable[[str], Device],
    artifact: StoredArtifact,
    tmp_path: Path,
) -> None:
    script = (
        "import click\n"
        "from fleet.cli import register\n"
        "root = click.Group()\n"
        "register(root)\n"
        "root()\n"
    )
    env = {
        **os.environ,
        "EDGELOOP_FLEET_PORT": str(broker.port),
        "EDGELOOP_FLEET_PASSWORD": broker.passwords["responder"],
        "EDGELOOP_FLEET_STORE": str(store.root),
        "EDGELOOP_FLEET_PUBLIC_KEY": str(keys.public_path),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "fleet", "responder"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        dev = device("dev-a")
        deadline = time.monotonic() + TIMEOUT
        frames: list[ChunkFrame] = []
        while not frames and time.monotonic() < deadline:  # until its subscription is live
            dev.request(artifact.artifact_id, [(0, 1)])
            try:
                frames.append(dev.frames.get(timeout=0.3))
            except queue.Empty:
                assert proc.poll() is None, proc.communicate()[1]
        assert frames and frames[0].index == 0 and not frames[0].error
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert b"responder stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
