"""Benchmark: goodput of the agent's chunked MQTT transfer against raw paho QoS 1.

For each chunk size (16, 64 and 128 KiB by default) and the same ~20 MB transfer file, in one
run, through one private Mosquitto (``fleet.broker.MosquittoProcess``: users, ACL,
persistence, as in the tests):

* **ours**: the real delivery path. A signed bundle with a random 20 MB ``model.onnx`` is put
  in a real ``fleet.store.ArtifactStore``; a real ``fleet.responder.Responder`` serves it; a
  job is published with ``fleet.jobs.publish_job``; a real agent daemon
  (``python -m agent run``, a separate process) downloads it with its default window and
  persistence (every chunk is written, fdatasync'ed and its bitmap saved). The time is taken
  from the agent's own ``JobUpdate`` timestamps: from ``IN_PROGRESS/downloading`` to the
  progress update with every chunk in. The job then FAILS at activation (the "model" is
  random bytes); that is after the measurement.
* **raw**: a paho publisher (user ``responder``) publishes the same bytes as N QoS 1
  messages of the same chunk size to ``artifacts_data('dev-raw')``, which a paho subscriber
  (user ``dev-raw``) receives; time from the first publish to the last message received.
  The publisher's in-flight window (``max_inflight_messages_set``) is the agent's window, so
  both sides have at most ``window`` chunks unacknowledged.

Diagnostic rows, same broker and responder: **direct-durable**, a device written here (its
own process: paho, ``agent.protocol``, ``agent.download.Download``, so the agent's per-chunk
durability); **direct-nosync**, the same with ``agent.transfer.Transfer`` and ``pwrite``
only (the protocol and window without per-chunk durability); **disk-only**,
``Download.accept`` of pre-built frames without any network. ``--tcp-nodelay`` sets
Mosquitto's ``set_tcp_nodelay`` and ``TCP_NODELAY`` on every client socket this script
owns (not the agent daemon's).

Ratio = ours goodput / raw goodput (issue target >= 0.8), median of ``--repeats``
interleaved runs. Then the broker is killed (SIGKILL) ``--kills`` times, at points spread
over 15-85 % of a transfer, and restarted on the same port 0.5 s later; the frames the
responder built more than once (counted by wrapping the store it reads chunks from) are
compared with the window (target <= one window), next to the duplicates the agent received.

It prints numbers and asserts none: a benchmark, not a test. Usage::

    python3 bench/mqtt_transfer.py                 # 20 MB, 3 chunk sizes, 3 repeats: ~2 min
    python3 bench/mqtt_transfer.py --quick         # 1 repeat, 1 kill: under a minute
    python3 bench/mqtt_transfer.py --tcp-nodelay --kills 0
    python3 bench/mqtt_transfer.py --chunk-kib 64 --window 32 --kills 15 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol
from agent.download import Download
from agent.transfer import Transfer, ranges_of
from compiler import bundle
from compiler.signing import generate_keys, load_private_key, load_public_key
from fleet.broker import MosquittoProcess
from fleet.jobs import JobWatcher, publish_job
from fleet.responder import BrokerConfig, Responder
from fleet.store import ArtifactStore

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "dev-bench"
RAW_DEVICE = "dev-raw"
DIRECT_DEVICE = "dev-direct"
PASSWORDS = {
    "fleet": "fleet-pw",
    "responder": "responder-pw",
    DEVICE: "device-pw",
    RAW_DEVICE: "raw-pw",
    DIRECT_DEVICE: "direct-pw",
}
PROFILE = "generic/x86_64"


@dataclass
class Run:
    """One timed transfer."""

    kind: str
    chunk_kib: int
    seconds: float
    nbytes: int

    @property
    def mb_per_s(self) -> float:
        """Goodput in MB/s (10^6 bytes)."""
        return self.nbytes / self.seconds / 1e6


@dataclass
class KillResult:
    """The broker-kill run: what was sent twice, against the window."""

    chunk_kib: int
    window: int
    chunks: int
    killed_at_chunk: int
    frames_built: int
    resent_frames: int
    resent_bytes: int
    duplicates_received: int
    requests: int
    publish_failures: int
    dropped_requests: int
    outage_s: float
    agent_resumed_s: float | None
    responder_ready_s: float
    kill_to_complete_s: float | None
    total_s: float
    state: str


@dataclass
class Report:
    """Everything the run measured (``--json``)."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- fixtures


class Bundles:
    """Signed bundles sharing one random 'model' (new version = new artifact id)."""

    def __init__(self, workdir: Path, key: Path, size: int) -> None:
        self.workdir = workdir
        self.key = load_private_key(key)
        self.model = os.urandom(size)
        self.version = 0

    def make(self) -> Path:
        """Seal the next version of the bundle."""
        self.version += 1
        out = self.workdir / f"bundle-{self.version}"
        fields: dict[str, Any] = {
            "model": {"name": "bench", "version": str(self.version)},
            "profile": PROFILE,
            "isa": "x86_64",
            "target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
            "runtime": "onnxruntime",
            "runtime_reason": "benchmark: random bytes, fails at activation",
            "entry": "model.onnx",
            "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
            "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}],
            "toolchain": {"edgeloop": "0.1.0"},
            "tuning": {},
            "source_model": {"format": "onnx", "filename": "m.onnx", "sha256": "0" * 64},
            "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        }
        with bundle.staging_dir(out) as staging:
            (staging / "model.onnx").write_bytes(self.model)
            (staging / "report.json").write_text("{}")
            bundle.seal_bundle(staging, out, manifest_fields=fields, private_key=self.key)
        return out


class AgentProc:
    """``python -m agent run`` for DEVICE as a separate process."""

    def __init__(
        self, workdir: Path, *, port: int, public_key: Path, chunk_size: int, window: int
    ) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "agent.toml"
        self.config.write_text(
            f'device_id = "{DEVICE}"\n'
            f'profile = "{PROFILE}"\n'
            f'state_dir = "{self.state_dir}"\n'
            f'trusted_key = "{public_key}"\n'
            "[broker]\n"
            f'host = "127.0.0.1"\nport = {port}\n'
            f'username = "{DEVICE}"\npassword = "{PASSWORDS[DEVICE]}"\n'
            "keepalive_s = 5\nreconnect_min_s = 0.2\nreconnect_max_s = 2.0\n"
            "[transfer]\n"
            f"chunk_size = {chunk_size}\nwindow = {window}\nchunk_timeout_s = 5.0\n"
            '[http]\nhost = "127.0.0.1"\nport = 0\n'
        )
        port_file = self.state_dir / "http.port"
        port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_AGENT_")}
        self.log = (workdir / "agent.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            cwd=ROOT,
            stdout=self.log,
            stderr=self.log,
            env=env,
        )
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start; see {workdir / 'agent.log'}")
            time.sleep(0.05)
        self.http_port = int(port_file.read_text())

    def metric(self, name: str, label: str = "") -> float:
        """One sample of the agent's /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith(name) and label in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


class CountingSource:
    """The store as the responder's ``ChunkSource``, counting the chunks it reads.

    The responder reads a chunk once per frame it builds, so reads beyond the first of an
    index are frames sent again (whether or not paho got them out before the broker died).
    """

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.reads: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()

    def transfer_info(self, artifact_id: str) -> protocol.TransferInfo:
        """As the store's."""
        return self.store.transfer_info(artifact_id)

    def read_chunk(self, artifact_id: str, index: int, chunk_size: int) -> bytes:
        """As the store's, counted."""
        with self._lock:
            self.reads[(artifact_id, index)] += 1
        return self.store.read_chunk(artifact_id, index, chunk_size)

    def resent(self, artifact_id: str) -> int:
        """Frames of ``artifact_id`` built more than once."""
        with self._lock:
            return sum(n - 1 for (a, _), n in self.reads.items() if a == artifact_id and n > 1)

    def frames(self, artifact_id: str) -> int:
        """Frames of ``artifact_id`` built in all."""
        with self._lock:
            return sum(n for (a, _), n in self.reads.items() if a == artifact_id)


class Fleet:
    """Broker, store, responder and job watcher."""

    def __init__(self, workdir: Path, *, nodelay: bool = False) -> None:
        keys = generate_keys(workdir / "keys")
        self.private_key = keys.private
        self.public_key = keys.public
        self.broker = MosquittoProcess(workdir / "broker", users=dict(PASSWORDS))
        self.broker.write_config()
        if nodelay:  # diagnostic: Mosquitto's default is Nagle on (set_tcp_nodelay false)
            with self.broker.config_file.open("a") as fh:
                fh.write("set_tcp_nodelay true\n")
        self.broker.start()
        self.store = ArtifactStore(workdir / "store", load_public_key(keys.public))
        self.source = CountingSource(self.store)
        self.responder = Responder(
            self.source,
            self.store,
            host="127.0.0.1",
            port=self.broker.port,
            username="responder",
            password=PASSWORDS["responder"],
        )
        if nodelay:
            self.responder.session.client.on_socket_open = _nodelay
        self.responder.start(timeout=10)
        self.watcher = JobWatcher(self.config("fleet"))
        self.watcher.start(timeout=10)

    def config(self, user: str) -> BrokerConfig:
        """How ``user`` reaches the broker."""
        return BrokerConfig("127.0.0.1", self.broker.port, user, PASSWORDS[user])

    def stop(self) -> None:
        """Stop everything (best effort)."""
        self.watcher.stop()
        self.responder.stop()
        self.store.close()
        self.broker.stop()


# ---------------------------------------------------------------- ours


def _wait_all_chunks(fleet: Fleet, job_id: str, timeout: float) -> list[protocol.JobUpdate]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        updates = fleet.watcher.updates(job_id)
        if any(u.state.terminal for u in updates):
            return updates
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish within {timeout:g} s")


def _download_seconds(updates: list[protocol.JobUpdate]) -> float:
    """From the first 'downloading' update to the one with every chunk in (agent clock)."""
    start = next(u.ts for u in updates if u.step == "downloading")
    end = next(
        u.ts for u in updates if u.chunks_total is not None and u.chunks_done == u.chunks_total
    )
    return (end - start).total_seconds()


def run_ours(
    fleet: Fleet, bundles: Bundles, chunk_kib: int, *, timeout: float = 300
) -> tuple[Run, bytes]:
    """Deploy a fresh version to the running agent; time its download.

    Returns the run and the transfer file's bytes (for the raw peer).
    """
    stored = fleet.store.put_bundle(bundles.make())
    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    publish_job(
        fleet.config("fleet"),
        store=fleet.store,
        device_id=DEVICE,
        artifact_id=stored.artifact_id,
        job_id=job_id,
    )
    updates = _wait_all_chunks(fleet, job_id, timeout)
    if not any(u.chunks_total is not None and u.chunks_done == u.chunks_total for u in updates):
        final = updates[-1]
        raise RuntimeError(f"job {job_id} ended {final.state} before the download: {final.reason}")
    run = Run("ours", chunk_kib, _download_seconds(updates), stored.transfer.size)
    return run, fleet.store.blobs.read_bytes(stored.transfer_key)


# ---------------------------------------------------------------- ours, in-bench device


def run_direct(
    fleet: Fleet,
    bundles: Bundles,
    chunk_kib: int,
    *,
    window: int,
    durable: bool,
    workdir: Path,
    nodelay: bool,
    timeout: float = 300,
) -> Run:
    """The device side as a small paho program of this file, in its own process.

    It uses the agent's protocol and window logic (``agent.protocol``,
    ``agent.transfer.Transfer``). ``durable``: chunks go through ``agent.download.Download``
    (pwrite, fdatasync and the bitmap persisted per chunk), as in the agent. Otherwise
    chunks are only ``pwrite``-n: the ceiling of the protocol, responder and broker with
    this window, without per-chunk durability.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stored = fleet.store.put_bundle(bundles.make())
    fleet.store.grant(DIRECT_DEVICE, stored.artifact_id)
    spec = {
        "port": fleet.broker.port,
        "artifact_id": stored.artifact_id,
        "sha256": stored.transfer.sha256,
        "size": stored.transfer.size,
        "chunk_size": chunk_kib * 1024,
        "window": window,
        "durable": durable,
        "workdir": str(workdir),
        "nodelay": nodelay,
        "timeout": timeout,
    }
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--device-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"device worker failed ({out.returncode}): {out.stderr[-2000:]}")
    seconds = float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    kind = "direct-durable" if durable else "direct-nosync"
    return Run(kind, chunk_kib, seconds, stored.transfer.size)


def device_worker(spec: dict[str, Any]) -> dict[str, float]:
    """Child process of :func:`run_direct`: download one artifact, return the seconds taken.

    The timing starts once subscribed (before the first request) and stops when every chunk
    is on disk; the whole-file sha256 is checked afterwards, outside the timing.
    """
    chunk_size = int(spec["chunk_size"])
    port = int(spec["port"])
    artifact_id = str(spec["artifact_id"])
    info = protocol.TransferInfo(sha256=spec["sha256"], size=spec["size"])
    workdir = Path(spec["workdir"])
    frames: queue.Queue[bytes] = queue.Queue()
    subscribed = threading.Event()
    client = _client(DIRECT_DEVICE, port, "direct")
    if spec["nodelay"]:
        client.on_socket_open = _nodelay
    client.on_message = lambda c, u, m: frames.put(bytes(m.payload))
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect("127.0.0.1", port, clean_start=True)
    client.loop_start()
    client.subscribe(protocol.artifacts_data(DIRECT_DEVICE), qos=1)
    req_topic = protocol.artifacts_req(DIRECT_DEVICE)
    download: Download | None = None
    transfer = Transfer(artifact_id, info.sha256, info.size, chunk_size)
    part = workdir / f"{artifact_id}.nosync.part"
    fd = -1
    try:
        if not subscribed.wait(10):
            raise RuntimeError("direct device did not subscribe")
        start = time.perf_counter()
        if spec["durable"]:
            download = Download(workdir, artifact_id=artifact_id, info=info, chunk_size=chunk_size)
            transfer = download.transfer
        else:
            with part.open("wb") as fh:
                fh.truncate(info.size)
            fd = os.open(part, os.O_RDWR)
        deadline = time.monotonic() + float(spec["timeout"])
        while not transfer.complete:
            if time.monotonic() > deadline:
                raise TimeoutError(f"direct: {transfer.done}/{transfer.count} chunks")
            try:
                frame: protocol.ChunkFrame | None = protocol.decode_frame(frames.get(timeout=0.2))
            except queue.Empty:
                frame = None
            if frame is not None:
                if frame.error:
                    raise RuntimeError(f"responder refused: {frame.reason}")
                if download is not None:
                    download.accept(frame)
                elif transfer.mark(frame.index):
                    os.pwrite(fd, frame.payload, frame.index * chunk_size)
            wanted = transfer.next_request(
                now=time.monotonic(), window=int(spec["window"]), timeout=5.0
            )
            if wanted:
                request = protocol.ChunkRequest(
                    request_id=uuid.uuid4().hex[:16],
                    artifact_id=artifact_id,
                    chunk_size=chunk_size,
                    ranges=ranges_of(sorted(wanted)),
                )
                client.publish(req_topic, request.to_bytes(), qos=1)
        seconds = time.perf_counter() - start
        if download is not None:
            download.finish()
        elif bundle.sha256_file(part) != info.sha256:
            raise RuntimeError("direct: the downloaded file's sha256 is wrong")
        return {"seconds": seconds}
    finally:
        client.disconnect()
        client.loop_stop()
        if download is not None:
            download.discard()
        if fd >= 0:
            os.close(fd)
        part.unlink(missing_ok=True)


def _nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho ``on_socket_open``: disable Nagle's algorithm on the client's socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run_disk_only(size: int, chunk_kib: int, workdir: Path) -> Run:
    """``Download.accept`` of pre-built frames, no network: the agent's per-chunk disk cost."""
    chunk_size = chunk_kib * 1024
    data = os.urandom(size)
    artifact_id = uuid.uuid4().hex * 2
    info = protocol.TransferInfo(sha256=hashlib.sha256(data).hexdigest(), size=size)
    count = protocol.chunk_count(size, chunk_size)
    frames = [
        protocol.ChunkFrame(artifact_id, i, count, data[i * chunk_size : (i + 1) * chunk_size])
        for i in range(count)
    ]
    download = Download(workdir, artifact_id=artifact_id, info=info, chunk_size=chunk_size)
    try:
        start = time.perf_counter()
        for frame in frames:
            download.accept(frame)
        seconds = time.perf_counter() - start
    finally:
        download.discard()
    return Run("disk-only", chunk_kib, seconds, size)


# ---------------------------------------------------------------- raw paho


def _client(user: str, port: int, role: str) -> mqtt.Client:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-{role}-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(user, PASSWORDS[user])
    return client


def run_raw(
    port: int, data: bytes, chunk_kib: int, *, window: int, nodelay: bool, timeout: float = 300
) -> Run:
    """Publish ``data`` as QoS 1 chunks; time first publish to last message received."""
    size = chunk_kib * 1024
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    topic = protocol.artifacts_data(RAW_DEVICE)
    received: list[bytes] = []
    last = [0.0]
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received.append(bytes(message.payload))
        if len(received) == len(chunks):
            last[0] = time.perf_counter()
            done.set()

    sub = _client(RAW_DEVICE, port, "raw-sub")
    pub = _client("responder", port, "raw-pub")
    if nodelay:
        sub.on_socket_open = pub.on_socket_open = _nodelay
    sub.on_message = on_message
    sub.on_subscribe = lambda *args: subscribed.set()
    sub.connect("127.0.0.1", port, clean_start=True)
    sub.loop_start()
    sub.subscribe(topic, qos=1)
    pub.max_inflight_messages_set(window)
    pub.max_queued_messages_set(0)  # unlimited: paho holds what exceeds the window
    connected = threading.Event()
    pub.on_connect = lambda *args: connected.set()
    pub.connect("127.0.0.1", port, clean_start=True)
    pub.loop_start()
    try:
        if not (subscribed.wait(10) and connected.wait(10)):
            raise RuntimeError("raw paho clients did not connect")
        start = time.perf_counter()
        for chunk in chunks:
            pub.publish(topic, chunk, qos=1)
        if not done.wait(timeout):
            raise TimeoutError(f"raw: {len(received)}/{len(chunks)} messages in {timeout} s")
        if b"".join(received) != data:
            raise RuntimeError("raw: received bytes differ from the sent ones (order or loss)")
        return Run("raw", chunk_kib, last[0] - start, len(data))
    finally:
        for client in (pub, sub):
            client.disconnect()
            client.loop_stop()


# ---------------------------------------------------------------- broker kill


def run_kill(
    fleet: Fleet, bundles: Bundles, agent: AgentProc, chunk_kib: int, *, window: int, at: float
) -> KillResult:
    """Kill the broker at ``at`` of a transfer, restart it, and count what was sent twice."""
    stored = fleet.store.put_bundle(bundles.make())
    count = protocol.chunk_count(stored.transfer.size, chunk_kib * 1024)
    before = fleet.responder.stats
    dup_label = 'outcome="duplicate"'
    dup_before = agent.metric("edgeloop_transfer_chunks_total", dup_label)
    job_id = f"bench-kill-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    publish_job(
        fleet.config("fleet"),
        store=fleet.store,
        device_id=DEVICE,
        artifact_id=stored.artifact_id,
        job_id=job_id,
    )
    killed_at = 0
    deadline = time.monotonic() + 120
    while not killed_at and time.monotonic() < deadline:
        for update in fleet.watcher.updates(job_id):
            if update.chunks_done and update.chunks_total and update.chunks_done >= at * count:
                killed_at = update.chunks_done
        time.sleep(0.01)
    if not killed_at:
        raise TimeoutError(f"job {job_id} never reached {at:.0%}")
    down = time.monotonic()
    killed_wall = datetime.now(UTC)
    fleet.broker.kill()
    time.sleep(0.5)
    fleet.broker.start()
    outage = time.monotonic() - down
    while not fleet.responder.session.ready and time.monotonic() - down < 60:
        time.sleep(0.01)
    responder_ready = time.monotonic() - down
    fleet.watcher.session.wait_ready(30)
    updates = _wait_all_chunks(fleet, job_id, 300)
    total = time.monotonic() - started
    resumed = [u.ts for u in updates if u.step == "resuming"]
    finished = [u.ts for u in updates if u.chunks_total and u.chunks_done == u.chunks_total]
    time.sleep(1.0)  # late duplicates
    after = fleet.responder.stats
    resent = fleet.source.resent(stored.artifact_id)
    duplicates = agent.metric("edgeloop_transfer_chunks_total", dup_label) - dup_before
    return KillResult(
        chunk_kib=chunk_kib,
        window=window,
        chunks=count,
        killed_at_chunk=killed_at,
        frames_built=fleet.source.frames(stored.artifact_id),
        resent_frames=resent,
        resent_bytes=resent * chunk_kib * 1024,
        duplicates_received=int(duplicates),
        requests=after["requests"] - before["requests"],
        publish_failures=after["publish_failures"] - before["publish_failures"],
        dropped_requests=after["dropped"] - before["dropped"],
        outage_s=round(outage, 3),
        agent_resumed_s=round((resumed[0] - killed_wall).total_seconds(), 2) if resumed else None,
        responder_ready_s=round(responder_ready, 2),
        kill_to_complete_s=(
            round((finished[0] - killed_wall).total_seconds(), 2) if finished else None
        ),
        total_s=round(total, 3),
        state=f"{updates[-1].state.value}: {updates[-1].reason}",
    )


# ---------------------------------------------------------------- main


def _machine() -> dict[str, Any]:
    from importlib import metadata

    mosquitto = subprocess.run(
        ["mosquitto", "-h"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "paho_mqtt": metadata.version("paho-mqtt"),
        "mosquitto": mosquitto[0] if mosquitto else "?",
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print tables; write ``--json`` if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat per chunk size")
    parser.add_argument("--size-mb", type=float, default=20.0, help="model size (10^6 bytes)")
    parser.add_argument("--chunk-kib", default="16,64,128", help="comma-separated chunk sizes")
    parser.add_argument("--window", type=int, default=16, help="chunks in flight (agent default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kill-chunk-kib", type=int, default=64)
    parser.add_argument(
        "--kills", type=int, default=5, help="broker kills, spread over 15-85 %% of transfers"
    )
    parser.add_argument(
        "--tcp-nodelay",
        action="store_true",
        help="diagnostic: TCP_NODELAY on the broker (set_tcp_nodelay), the responder, the "
        "in-bench device and the raw clients (not the agent daemon, which we cannot reach)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--device-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device_worker is not None:
        print(json.dumps(device_worker(json.loads(args.device_worker))))
        return 0
    chunk_sizes = [int(c) for c in args.chunk_kib.split(",")]
    repeats = 1 if args.quick else args.repeats
    nodelay = bool(args.tcp_nodelay)
    report = Report(
        machine=_machine(),
        settings={
            "size_bytes": int(args.size_mb * 1e6),
            "chunk_kib": chunk_sizes,
            "window": args.window,
            "repeats": repeats,
            "tcp_nodelay": nodelay,
            "agent": "python -m agent run (separate process), default persistence",
            "responder": "fleet.responder.Responder defaults (window 64 frames, 32 MiB)",
            "raw": f"paho QoS1, max_inflight_messages={args.window}, one topic",
            "broker": "MosquittoProcess (persistence, max_inflight_messages 64)",
        },
    )
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-mqtt-") as tmp:
        work = Path(tmp)
        fleet = Fleet(work / "fleet", nodelay=nodelay)
        bundles = Bundles(work / "bundles", fleet.private_key, int(args.size_mb * 1e6))
        try:
            for chunk_kib in chunk_sizes:
                _measure_chunk_size(
                    report, fleet, bundles, work, chunk_kib, repeats=repeats, window=args.window
                )
            if args.kills > 0:
                agent = AgentProc(
                    work / "agent-kill",
                    port=fleet.broker.port,
                    public_key=fleet.public_key,
                    chunk_size=args.kill_chunk_kib * 1024,
                    window=args.window,
                )
                try:
                    kills = 1 if args.quick else args.kills
                    points = (
                        [0.5]
                        if kills == 1
                        else [0.15 + 0.7 * i / (kills - 1) for i in range(kills)]
                    )
                    for at in points:
                        kill = run_kill(
                            fleet, bundles, agent, args.kill_chunk_kib, window=args.window, at=at
                        )
                        report.kills.append(asdict(kill))
                finally:
                    agent.stop()
        finally:
            fleet.stop()
    report.machine["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    _print(report)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


def _measure_chunk_size(
    report: Report,
    fleet: Fleet,
    bundles: Bundles,
    work: Path,
    chunk_kib: int,
    *,
    repeats: int,
    window: int,
) -> None:
    """Interleaved repeats of every variant at one chunk size, then its summary row."""
    nodelay = bool(report.settings["tcp_nodelay"])
    agent = AgentProc(
        work / f"agent-{chunk_kib}",
        port=fleet.broker.port,
        public_key=fleet.public_key,
        chunk_size=chunk_kib * 1024,
        window=window,
    )
    try:
        for _ in range(repeats):
            ours, data = run_ours(fleet, bundles, chunk_kib)
            _record(report, ours)
            for durable in (True, False):
                direct = run_direct(
                    fleet,
                    bundles,
                    chunk_kib,
                    window=window,
                    durable=durable,
                    workdir=work / "direct",
                    nodelay=nodelay,
                )
                _record(report, direct)
            _record(
                report, run_raw(fleet.broker.port, data, chunk_kib, window=window, nodelay=nodelay)
            )
    finally:
        agent.stop()
    _record(report, run_disk_only(report.settings["size_bytes"], chunk_kib, work / "disk"))
    report.summary.append(_summarize(report, chunk_kib))


KINDS = ("ours", "direct-durable", "direct-nosync", "disk-only", "raw")


def _record(report: Report, run: Run) -> None:
    report.runs.append({**asdict(run), "mb_per_s": round(run.mb_per_s, 3)})
    print(
        f"  {run.kind:14} {run.chunk_kib:4} KiB: {run.seconds:7.3f} s {run.mb_per_s:8.2f} MB/s",
        file=sys.stderr,
    )


def _summarize(report: Report, chunk_kib: int) -> dict[str, Any]:
    row: dict[str, Any] = {"chunk_kib": chunk_kib}
    for kind in KINDS:
        values = [
            r["mb_per_s"] for r in report.runs if r["kind"] == kind and r["chunk_kib"] == chunk_kib
        ]
        row[kind] = round(statistics.median(values), 2)
    row["ratio"] = round(row["ours"] / row["raw"], 3)
    row["nosync_ratio"] = round(row["direct-nosync"] / row["raw"], 3)
    return row


def _s(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.2f}"


def _print(report: Report) -> None:
    s = report.settings
    print(
        f"\nMQTT transfer of {s['size_bytes'] / 1e6:.1f} MB, window {s['window']}, "
        f"median of {s['repeats']} ({report.machine['cpus']} CPUs, {report.machine['mosquitto']})"
        + (", TCP_NODELAY (not on the agent daemon)" if s["tcp_nodelay"] else "")
        + f", load average {report.machine['loadavg_at_start'][0]} -> "
        f"{report.machine['loadavg_at_end'][0]}"
    )
    print(
        f"{'chunk':>7} | {'ours':>6} | {'raw':>6} | {'ours/raw':>8} | target | "
        f"{'direct':>6} | {'no-sync':>7} | {'no-sync/raw':>11} | {'disk-only':>9}   (MB/s)"
    )
    for row in report.summary:
        verdict = "ok" if row["ratio"] >= 0.8 else "below"
        print(
            f"{row['chunk_kib']:>3} KiB | {row['ours']:>6.2f} | {row['raw']:>6.2f} | "
            f"{row['ratio']:>8.3f} | {verdict:>6} | {row['direct-durable']:>6.2f} | "
            f"{row['direct-nosync']:>7.2f} | {row['nosync_ratio']:>11.3f} | "
            f"{row['disk-only']:>9.2f}"
        )
    print(
        "ours = agent daemon; direct = in-bench Download (same per-chunk fdatasync); "
        "no-sync = same protocol and window without per-chunk durability; disk-only = "
        "Download.accept without network"
    )
    if report.kills:
        window = report.kills[0]["window"]
        print(
            f"\nbroker SIGKILL mid-transfer, restarted 0.5 s later "
            f"({report.kills[0]['chunk_kib']} KiB chunks, window {window}; "
            "target: re-sent <= window)"
        )
        print(
            f"{'killed at':>11} | {'frames':>6} | {'re-sent':>7} | {'dup recv':>8} | "
            f"{'requests':>8} | {'agent up':>8} | {'resp. up':>8} | {'to done':>7} | verdict"
        )
        for k in report.kills:
            verdict = "ok" if k["resent_frames"] <= k["window"] else "ABOVE"
            print(
                f"{k['killed_at_chunk']:>4}/{k['chunks']:<6} | {k['frames_built']:>6} | "
                f"{k['resent_frames']:>7} | {k['duplicates_received']:>8} | {k['requests']:>8} | "
                f"{_s(k['agent_resumed_s']):>8} | {_s(k['responder_ready_s']):>8} | "
                f"{_s(k['kill_to_complete_s']):>7} | {verdict}"
            )


if __name__ == "__main__":
    sys.exit(main())
