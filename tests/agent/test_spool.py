"""The store-and-forward spool (agent.spool): bounds, full policies, crash safety, draining
over a real Mosquitto with PUBACK-gated deletes."""

from __future__ import annotations

import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import protocol
from agent.capture import CaptureEvent, encode_sample, make_sample, stats_of
from agent.config import BrokerSettings
from agent.spool import Spool, SpoolError, drain_once, sample_batch
from fleet.broker import MosquittoProcess

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {"fleet": "fleet-pw", "dev-1": "dev-1-pw", "dev-2": "dev-2-pw"}


def sample_payload(i: int = 0, *, device: str = "dev-1") -> tuple[str, bytes]:
    """A real encoded CapturedSample (about 400 bytes)."""
    event = CaptureEvent(
        model="m",
        version="1",
        artifact_id=None,
        role="primary",
        inputs=[np.full((1, 4), i, np.float32)],
        outputs=[np.array([[0.4, 0.6]], np.float32)],
    )
    sample = make_sample(event, stats_of(event.outputs), "every_nth")
    return sample.sample_id, encode_sample(sample, device)


def test_put_peek_ack(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=10_000)
    items = [sample_payload(i) for i in range(5)]
    for item_id, payload in items:
        assert spool.put("sample", item_id, payload)
    assert spool.put("sketch", "k1", b"{}")
    assert len(spool) == 6
    assert spool.used_bytes == sum(len(p) for _, p in items) + 2
    got = spool.peek("sample", limit=3)
    assert [i.item_id for i in got] == [i for i, _ in items[:3]]
    one = spool.peek("sample", limit=5, max_bytes=1)  # the first item always comes
    assert len(one) == 1
    assert spool.ack(i.seq for i in got) == 3
    assert spool.ack([got[0].seq]) == 0  # already gone
    assert [i.item_id for i in spool.peek("sample", limit=10)] == [i for i, _ in items[3:]]
    assert [i.item_id for i in spool.peek("sketch", limit=10)] == ["k1"]
    assert spool.put("sample", items[3][0], items[3][1])  # duplicate id: kept once
    assert len(spool) == 3


@pytest.mark.parametrize(
    ("when_full", "kept", "counter"),
    [
        ("drop_oldest", range(5, 15), "spool_full_oldest"),
        ("reject_new", range(10), "spool_full_rejected"),
    ],
)
def test_full_policies_keep_the_bound_and_count_exactly(
    tmp_path: Path, when_full: str, kept: range, counter: str
) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1000, when_full=when_full)  # type: ignore[arg-type]
    results = [spool.put("sample", f"id{i}", bytes(100)) for i in range(15)]
    assert spool.used_bytes == 1000 and len(spool) == 10
    assert spool.ids() == [f"id{i}" for i in kept]
    assert spool.counters() == {counter: 5}
    assert results.count(False) == (5 if when_full == "reject_new" else 0)
    # an item larger than half the spool drops several oldest at once
    spool.set_limits(max_bytes=1000, when_full="drop_oldest")
    assert spool.put("sample", "big", bytes(350))
    assert spool.used_bytes <= 1000 and spool.ids()[-1] == "big"
    expected_oldest = 4 + (5 if when_full == "drop_oldest" else 0)
    assert spool.counters().get("spool_full_oldest") == expected_oldest


def test_too_large_and_invalid_limits(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=100)
    assert not spool.put("sample", "x", bytes(101))
    assert spool.counters() == {"too_large": 1} and len(spool) == 0
    with pytest.raises(SpoolError, match="'drop_newest' is not valid; choose from: drop_oldest"):
        spool.set_limits(max_bytes=100, when_full="drop_newest")
    with pytest.raises(SpoolError, match="spool bound 0 bytes"):
        spool.set_limits(max_bytes=0, when_full="reject_new")
    assert spool.max_bytes == 100 and spool.when_full == "drop_oldest"  # unchanged


def test_bad_path_names_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpoolError, match="cannot open the capture spool '.*file/s.db'"):
        Spool(tmp_path / "file" / "s.db", max_bytes=100)


def test_survives_restart_with_counters(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1000, when_full="reject_new")
    for i in range(12):
        spool.put("sample", f"id{i}", bytes(100))
    spool.count("budget", 7)  # pending, written on close
    spool.close()
    again = Spool(tmp_path / "s.db", max_bytes=1000)
    assert again.ids() == [f"id{i}" for i in range(10)]
    assert again.used_bytes == 1000
    assert again.counters() == {"budget": 7, "spool_full_rejected": 2}
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agent.spool import Spool
    spool = Spool(Path(sys.argv[1]), max_bytes=50_000, when_full="drop_oldest")
    i = 0
    while True:
        spool.put("sample", f"id{i:06d}", bytes(500 + i % 7))
        spool.count("budget")
        print(f"id{i:06d}", flush=True)
        i += 1
    """
)


def test_sigkill_mid_write_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    written = [proc.stdout.readline().strip() for _ in range(300)]  # > the bound: drops too
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    spool = Spool(path, max_bytes=50_000)
    ids = spool.ids()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = db.execute("SELECT COALESCE(SUM(size), 0) FROM items").fetchone()[0]
    assert spool.used_bytes == stored <= 50_000
    # every put that returned is there unless the bound dropped it (oldest first, counted)
    last = written[-1]
    assert last in ids
    kept_written = [i for i in written if i >= ids[0]]
    assert set(kept_written) <= set(ids)
    dropped = spool.counters().get("spool_full_oldest", 0)
    assert ids[0] == f"id{dropped:06d}"  # exactly the dropped ones are missing


# ------------------------------------------------------------------ draining over Mosquitto


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    pytest.importorskip("paho.mqtt.client")
    process = MosquittoProcess(tmp_path / "broker", users=dict(PASSWORDS))
    process.start()
    try:
        yield process
    finally:
        process.stop()


class Collector:
    """A fleet-side subscriber that keeps every message of some topics (a real paho client)."""

    def __init__(
        self,
        port: int,
        topics: list[str],
        *,
        user: str = "fleet",
        password: str | None = None,
        persistent: bool = False,
    ) -> None:
        """``persistent``: a session that outlives a broker restart (messages queued for it)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"collector-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(user, password or PASSWORDS[user])

        def on_connect(c: Any, *_: Any) -> None:
            for topic in topics:
                c.subscribe(topic, qos=1)

        def on_subscribe(*_: Any) -> None:
            self._ready.set()

        def on_message(_c: Any, _u: Any, message: Any) -> None:
            with self._lock:
                self.messages.append((message.topic, bytes(message.payload)))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600 if persistent else 0
        client.reconnect_delay_set(0.1, 0.5)
        client.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
        client.loop_start()
        self.client = client
        assert self._ready.wait(10), "collector did not subscribe"
        time.sleep(0.2)  # every subscription acknowledged

    def samples(self) -> list[protocol.CapturedSample]:
        out = []
        for topic, payload in self.snapshot():
            if topic.endswith("/capture/samples"):
                batch = protocol.decode(
                    protocol.SampleBatch, payload, max_bytes=protocol.MAX_SAMPLE_BATCH_PAYLOAD
                )
                out.extend(batch.samples)
        return out

    def batches(self) -> list[protocol.SampleBatch]:
        return [
            protocol.decode(protocol.SampleBatch, p, max_bytes=protocol.MAX_SAMPLE_BATCH_PAYLOAD)
            for t, p in self.snapshot()
            if t.endswith("/capture/samples")
        ]

    def sketches(self) -> list[protocol.DriftSketch]:
        return [
            protocol.decode(protocol.DriftSketch, p, max_bytes=protocol.MAX_SKETCH_PAYLOAD)
            for t, p in self.snapshot()
            if t.endswith("/capture/sketch")
        ]

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def wait(self, predicate: Any, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return bool(predicate())

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _link(port: int, device: str = "dev-1") -> Any:
    from agent.mqtt import MqttLink

    link = MqttLink(
        BrokerSettings(port=port, username=device, password=PASSWORDS[device], keepalive_s=2,
                       reconnect_min_s=0.1, reconnect_max_s=0.5),
        device_id=device,
        agent_version="test",
        events=queue.Queue(),
        subscriptions=[],
    )  # fmt: skip
    link.start()
    assert link.wait_connected(10)
    return link


@pytest.mark.mqtt
def test_drain_deletes_only_after_puback(tmp_path: Path, broker: MosquittoProcess) -> None:
    collector = Collector(broker.port, [protocol.all_devices("capture/#")])
    link = _link(broker.port)
    spool = Spool(tmp_path / "s.db", max_bytes=1_000_000)
    try:
        items = [sample_payload(i) for i in range(25)]
        for item_id, payload in items:
            spool.put("sample", item_id, payload)
        spool.put("sketch", "a" * 32, b'{"schema_version":1}')
        spool.count("budget", 3)
        sent = drain_once(spool, link, device_id="dev-1", batch_size=10, timeout=5)
        assert sent == (10, 1) and len(spool) == 15
        while len(spool):
            assert drain_once(spool, link, device_id="dev-1", batch_size=10, timeout=5)[0] > 0
        assert collector.wait(lambda: len(collector.samples()) == 25)
        assert [s.sample_id for s in collector.samples()] == [i for i, _ in items]
        batches = collector.batches()
        assert [len(b.samples) for b in batches] == [10, 10, 5]
        assert all(b.dropped == {"budget": 3} and b.device_id == "dev-1" for b in batches)
        # broker gone: nothing is acknowledged, nothing deleted
        for item_id, payload in items[:3]:
            spool.put("sample", item_id + "-again", payload)
        broker.stop()
        deadline = time.monotonic() + 10
        while link.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert drain_once(spool, link, device_id="dev-1", batch_size=10, timeout=1) == (0, 0)
        assert len(spool) == 3
    finally:
        link.stop(clean=False)
        collector.stop()


def test_batch_envelope_is_a_sample_batch() -> None:
    payloads = [sample_payload(i)[1] for i in range(3)]
    batch = protocol.decode(
        protocol.SampleBatch,
        sample_batch("dev-1", payloads, {"budget": 2}),
        max_bytes=protocol.MAX_SAMPLE_BATCH_PAYLOAD,
    )
    assert len(batch.samples) == 3 and batch.dropped == {"budget": 2}


def test_batches_respect_the_byte_limit(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=10_000_000)
    for i in range(40):
        spool.put("sample", f"id{i}", b"x" * 10_000)
    items = spool.peek("sample", limit=1000, max_bytes=protocol.MAX_SAMPLE_BATCH_PAYLOAD)
    assert sum(len(i.payload) for i in items) <= protocol.MAX_SAMPLE_BATCH_PAYLOAD
    assert len(items) == protocol.MAX_SAMPLE_BATCH_PAYLOAD // 10_000
