"""Benchmark: a fleet rollout to N simulated agents against the broker's raw fan-out.

For each N (100 and 1,000 by default), in one run, with a private Mosquitto
(``fleet.broker.MosquittoProcess``: password file, ACL, persistence, as in the tests):

* **API + executor**: ``fleet.api.main.create_app`` on SQLite (served in-process through
  Starlette's ``TestClient``) with the real broker adapter (``MosquittoPasswordFile``, so
  every device registered through ``POST /devices/bulk`` becomes a broker user) and the
  real MQTT
  deployment executor (``mqtt_executor``: event-driven, it steps when messages arrive).
* **Simulated agents**: one separate worker process (this script with ``--worker``) holds N
  paho MQTT 5 connections, each authenticated as its own registered device user (the ACL lets
  a device read only its own topics), all driven by one selector loop. Each publishes a
  retained ``online`` Status, subscribes to its ``jobs/notify`` and answers every
  ``JobNotify`` with ``JobUpdate`` IN_PROGRESS (QoS 0) then SUCCEEDED (QoS 1) at once. The
  artifact is trivial: a real signed bundle is uploaded, but the simulated agents do NOT download,
  verify or activate it (no responder runs) and send no heartbeats.
* **rollouts**: ``POST /deployments`` to the group of N devices, once per policy of
  ``POLICIES`` (a new artifact each time): ``canary`` (canary 1 %, then one wave of the
  rest) and ``all-at-once`` (one stage of every device); for each, the time from just
  before that request until the executor saved phase
  SUCCEEDED with N devices SUCCEEDED (the deployment's ``updated_at``; a ``SELECT`` of the
  row's phase every 100 ms notices it, reported beside it, then ``GET /deployments/{id}``
  checks the N SUCCEEDED devices).
* **raw fan-out**: N more paho connections in the same worker (as the ``fleet`` user: no
  device user may read a shared topic) subscribe to one topic; the time from publishing one
  QoS 1 message (``fleet`` user, this process) to its receipt by the last subscriber,
  median of ``--fanout-repeats``.

Ratio = rollout / raw fan-out (issue target <= 2). Then the sequential request rate of
``GET /devices?limit=min(N, 1000)`` with N devices (``--list-requests`` requests, in-process
``TestClient``, no network).

Diagnostics printed per N: the executor's passes during the rollout (start after ``POST
/deployments`` + duration / messages handled), its time starting jobs, handing notifies to
paho and writing desired state, and the executor passes during the device listing.

It prints numbers and asserts none: a benchmark, not a test. Usage::

    python3 bench/fleet_rollout.py                 # N = 100 and 1000
    python3 bench/fleet_rollout.py --quick         # N = 100 only
    python3 bench/fleet_rollout.py --n 100 --n 500 --json out.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import resource
import selectors
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

warnings.filterwarnings("ignore", message=r".*httpx.*starlette\.testclient", category=Warning)

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent import protocol  # noqa: E402

FLEET_PW = "fleet-pw"
PROFILE = "generic/x86_64"
FANOUT_TOPIC = f"{protocol.PREFIX}/bench/fanout"
# Rollout policies timed per N, in this order, each a new deployment of a new artifact to the
# same N devices: "canary" gates the fleet on one canary stage (1 %) before one wave of the
# rest; "all-at-once" starts every device in one stage (canary 100 %), the policy of a lab
# fleet or an urgent fix, and the one that compares the protocol itself with one broadcast.
POLICIES: dict[str, dict[str, Any]] = {
    "canary": {"canary": "1%", "waves": ["100%"], "job_timeout_s": 600},
    "all-at-once": {"canary": "100%", "waves": ["100%"], "job_timeout_s": 600},
}


def raise_fd_limit() -> int:
    """Raise the soft file-descriptor limit to the hard one (inherited by the broker)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- the worker: many simulated agents in one process ------------------------------------


class Worker:
    """N device connections and N fan-out subscribers, all in one selector loop."""

    def __init__(self, port: int, devices: dict[str, str], fanout: int) -> None:
        self.port = port
        self.sel = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []
        self.ready = 0
        self.expected = len(devices) + fanout
        self.jobs_done = 0
        self.last_success = 0.0
        # Per job notify: (wall clock, this process's CPU seconds) on receipt, and the CPU
        # seconds once both updates were handed to paho: the simulated agents' own cost.
        self.received: list[tuple[float, float]] = []
        self.replied_cpu: list[float] = []
        self.fanout_seen: dict[str, int] = {}
        self.fanout_cpu: dict[str, float] = {}
        self.fanout_n = fanout
        for device_id, password in devices.items():
            self._add(device_id, device_id, password, agent=True)
        for i in range(fanout):
            self._add(f"fanout-{i}", "fleet", FLEET_PW, agent=False)

    def _add(self, client_id: str, username: str, password: str, *, agent: bool) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        client.username_pw_set(username, password)
        client.user_data_set(client_id)
        client.on_connect = self._on_connect_agent if agent else self._on_connect_fanout
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_job if agent else self._on_fanout
        client.connect("127.0.0.1", self.port, keepalive=300)
        sock = client.socket()
        self.sel.register(sock, selectors.EVENT_READ, client)
        self.clients.append(client)
        self._pump(timeout=0)  # read CONNACKs as we go: keep the listen backlog short

    def _on_connect_agent(self, client: mqtt.Client, device_id: str, *_: Any) -> None:
        status = protocol.Status(device_id=device_id, state="online", agent_version="bench")
        client.publish(
            protocol.status(device_id), status.model_dump_json().encode(), qos=1, retain=True
        )
        client.subscribe(protocol.jobs_notify(device_id), qos=1)

    def _on_connect_fanout(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(FANOUT_TOPIC, qos=1)

    def _on_subscribe(self, *_: Any) -> None:
        self.ready += 1
        if self.ready == self.expected:
            print("READY", flush=True)

    def _on_job(self, client: mqtt.Client, device_id: str, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return
        self.received.append((time.time(), time.process_time()))
        notify = protocol.decode(protocol.JobNotify, message.payload)
        for state in (protocol.JobState.IN_PROGRESS, protocol.JobState.SUCCEEDED):
            update = protocol.JobUpdate(
                job_id=notify.job_id,
                device_id=device_id,
                artifact_id=notify.artifact_id,
                state=state,
            )
            # As the agent does (docs/protocol.md): progress at QoS 0, the end at QoS 1.
            client.publish(
                protocol.jobs_update(device_id),
                update.model_dump_json().encode(),
                qos=1 if state.terminal else 0,
            )
        self.jobs_done += 1
        self.last_success = time.time()
        self.replied_cpu.append(time.process_time())

    def _on_fanout(self, _client: mqtt.Client, _ud: Any, message: mqtt.MQTTMessage) -> None:
        tag = message.payload.decode()
        seen = self.fanout_seen.get(tag, 0) + 1
        self.fanout_seen[tag] = seen
        if seen == 1:
            self.fanout_cpu[tag] = time.process_time()
        if seen == self.fanout_n:
            cpu = time.process_time() - self.fanout_cpu[tag]
            print(f"FANOUT {tag} {time.time():.6f} {cpu:.6f}", flush=True)

    def _pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            key.data.loop_read()
        for client in self.clients:
            if client.want_write():
                client.loop_write()

    def run(self, stop: threading.Event) -> None:
        last_misc = time.monotonic()
        while not stop.is_set():
            self._pump(timeout=0.02)
            if time.monotonic() - last_misc > 1.0:
                last_misc = time.monotonic()
                for client in self.clients:
                    client.loop_misc()


def worker_main(spec_path: Path) -> None:
    """``--worker SPEC``: run until stdin closes, then print the job counters."""
    raise_fd_limit()
    spec = json.loads(spec_path.read_text())
    worker = Worker(spec["port"], spec["devices"], spec["fanout"])
    stop = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    worker.run(stop)
    replies = zip(worker.received, worker.replied_cpu, strict=True)
    jobs = [[t, cpu, end] for (t, cpu), end in replies]
    print(f"DONE {worker.jobs_done} {worker.last_success:.6f} {json.dumps(jobs)}", flush=True)


# --- the bench -----------------------------------------------------------------------------


@dataclass
class Rollout:
    """One deployment to the N devices under one policy."""

    policy: str
    rollout_s: float
    ratio: float
    stages: list[int]
    post_s: float
    executor_passes: int
    publish_failures: int
    first_job_received_s: float
    first_wave_job_received_s: float
    last_job_received_s: float
    executor_perform_s: float
    executor_publish_s: float
    executor_set_desired_s: float
    timeline: list[str]
    agents_cpu_s: float = 0.0
    fleet_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0


@dataclass
class Result:
    """One N."""

    n: int
    register_s: float
    worker_ready_s: float
    fanout_s: float
    fanout_runs: list[float]
    fanout_agents_cpu_s: float
    list_limit: int
    list_requests: int
    list_req_per_s: float
    executor_interval_s: float
    rollouts: list[Rollout]


def _trivial_bundle(workdir: Path, private_key: Path) -> bytes:
    from compiler import bundle
    from compiler.signing import load_private_key

    fields: dict[str, Any] = {
        "model": {"name": "bench", "version": "1"},
        "profile": PROFILE,
        "isa": "x86_64",
        "target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
        "runtime": "onnxruntime",
        "runtime_reason": "benchmark: trivial artifact, never downloaded",
        "entry": "model.onnx",
        "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}],
        "toolchain": {"edgeloop": "0.1.0"},
        "tuning": {},
        "source_model": {"format": "onnx", "filename": "m.onnx", "sha256": "0" * 64},
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    sealed = workdir / "bundle"
    with bundle.staging_dir(sealed) as staging:
        (staging / "model.onnx").write_bytes(os.urandom(1024))
        bundle.seal_bundle(
            staging, sealed, manifest_fields=fields, private_key=load_private_key(private_key)
        )
    tar = workdir / "bundle.tar"
    bundle.pack_bundle(sealed, tar)
    return tar.read_bytes()


def _cpu_of(pid: int | None) -> float:
    """CPU seconds (user + system) a process used so far, from /proc (0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    assert proc.stdout is not None
    box: list[str] = []

    def read() -> None:
        while True:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line or line.startswith(prefix):
                box.append(line)
                return

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout)
    if not box or not box[0]:
        raise RuntimeError(f"worker gave no {prefix!r} line within {timeout} s")
    return box[0].strip()


def run_n(
    n: int,
    workdir: Path,
    *,
    fanout_repeats: int,
    list_requests: int,
    interval: float,
    profile: Path | None = None,
) -> Result:
    """Register N devices, roll out to them, time fan-out and device listing."""
    from fastapi.testclient import TestClient
    from sqlalchemy import Engine
    from sqlmodel import Session, select

    from compiler.signing import generate_keys, load_public_key
    from fleet.api.bootstrap import create_admin_key
    from fleet.api.main import create_app
    from fleet.api.settings import ApiSettings
    from fleet.broker import MosquittoProcess
    from fleet.broker_auth import MosquittoPasswordFile
    from fleet.executor import Executor, mqtt_executor
    from fleet.models import Deployment
    from fleet.responder import BrokerConfig
    from fleet.store import ArtifactStore

    keys = generate_keys(workdir / "keys")
    broker = MosquittoProcess(workdir / "broker", users={"fleet": FLEET_PW})
    broker.start()
    store = ArtifactStore(workdir / "store", load_public_key(keys.public))
    settings = ApiSettings(
        state_dir=workdir / "state",
        store=workdir / "store",
        public_key=keys.public,
        database_url=f"sqlite:///{workdir / 'fleet.db'}",
    )
    config = BrokerConfig("127.0.0.1", broker.port, "fleet", FLEET_PW)

    timers: dict[str, float] = {"perform": 0.0, "publish": 0.0, "set_desired": 0.0}
    profiler = cProfile.Profile() if profile is not None else None
    made: list[Executor] = []
    pass_log: list[tuple[float, float, int]] = []

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[name] += time.perf_counter() - t

        return wrapper

    def make_executor(engine: Engine, store: ArtifactStore) -> Executor:
        executor = mqtt_executor(config, engine=engine, store=store)
        executor.interval = interval
        # Diagnostics only: where the executor's time goes while it starts jobs.
        executor._perform_all = timed("perform", executor._perform_all)  # type: ignore[method-assign]
        session = executor.publisher
        session.publish_async = timed("publish", session.publish_async)  # type: ignore[attr-defined]
        executor._set_desired = timed("set_desired", executor._set_desired)  # type: ignore[method-assign]
        # Diagnostics only: each pass's start (wall clock), duration and messages handled.
        plain_tick = executor.tick

        def timeline_tick() -> float | None:
            start, queued = time.time(), len(executor._inbox)
            try:
                return plain_tick()
            finally:
                pass_log.append((start, time.time() - start, queued))

        executor.tick = timeline_tick  # type: ignore[method-assign]
        if profiler is not None:
            tick = executor.tick

            def profiled_tick() -> float | None:
                profiler.enable()
                try:
                    return tick()
                finally:
                    profiler.disable()

            executor.tick = profiled_tick  # type: ignore[method-assign]
        made.append(executor)
        return executor

    app = create_app(
        settings,
        store=store,
        broker_auth=MosquittoPasswordFile(workdir / "broker" / "passwd", reload=broker.reload),
        executor=make_executor,
    )
    worker: subprocess.Popen[str] | None = None
    publisher: mqtt.Client | None = None
    try:
        with TestClient(app) as client:
            with Session(app.state.engine) as session:
                headers = {"Authorization": f"Bearer {create_admin_key(session, 'acme').token}"}
            group = client.post("/groups", headers=headers, json={"name": "bench"}).json()
            t = time.perf_counter()
            devices: dict[str, str] = {}
            ids = [f"sim-{i:05d}" for i in range(n)]
            for start in range(0, n, 1000):  # POST /devices/bulk takes up to 1,000
                response = client.post(
                    "/devices/bulk",
                    headers=headers,
                    json={
                        "devices": [
                            {"device_id": d, "profile": PROFILE, "group_id": group["id"]}
                            for d in ids[start : start + 1000]
                        ]
                    },
                )
                assert response.status_code == 201, response.text
                for device in response.json()["data"]:
                    devices[device["device_id"]] = device["mqtt"]["password"]
            register_s = time.perf_counter() - t
            print(f"  N={n}: registered in {register_s:.1f} s", flush=True)
            spec = workdir / "worker.json"
            spec.write_text(json.dumps({"port": broker.port, "devices": devices, "fanout": n}))
            t = time.perf_counter()
            worker = subprocess.Popen(
                [sys.executable, __file__, "--worker", str(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            _read_line(worker, "READY", timeout=120 + n * 0.2)
            worker_ready_s = time.perf_counter() - t
            print(f"  N={n}: {2 * n} connections ready in {worker_ready_s:.1f} s", flush=True)
            time.sleep(1.0)  # the executor records the online statuses

            publisher = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id="fanout-pub", protocol=mqtt.MQTTv5
            )
            publisher.username_pw_set("fleet", FLEET_PW)
            publisher.connect("127.0.0.1", broker.port)
            publisher.loop_start()

            fanout_cpu: list[float] = []

            def fanout() -> float:
                tag = uuid.uuid4().hex
                start = time.time()
                publisher.publish(FANOUT_TOPIC, tag.encode(), qos=1)
                line = _read_line(worker, "FANOUT", timeout=60)
                _, got, ts, cpu = line.split()
                assert got == tag, line
                fanout_cpu.append(float(cpu))
                time.sleep(0.2)
                return float(ts) - start

            # Fan-out runs before and after the rollouts, so box-load drift over the run
            # moves both sides of the ratio alike.
            fanout_runs = [fanout() for _ in range((fanout_repeats + 1) // 2)]
            rollouts = []
            for number, (name, policy) in enumerate(POLICIES.items()):
                uploaded = client.post(
                    "/artifacts",
                    headers={**headers, "Content-Type": "application/x-tar"},
                    content=_trivial_bundle(workdir / f"bundle-{number}", keys.private),
                )
                assert uploaded.status_code in (200, 201), uploaded.text
                artifact_id = uploaded.json()["artifact_id"]
                body = {
                    "name": f"bench-{n}-{name}",
                    "model_name": "bench",
                    "variants": {PROFILE: artifact_id},
                    "target": {"groups": ["bench"]},
                    "policy": policy,
                }
                for key in timers:
                    timers[key] = 0.0
                pass_log.clear()
                passes_before = made[0].passes
                failures_before = made[0].publish_failures
                if profiler is not None:
                    profiler.clear()  # profile the rollout only, not what came before it
                time.sleep(0.5)  # let the previous rollout's last messages settle
                cpu_before = time.process_time(), _cpu_of(broker.pid)
                t0 = time.time()
                created = client.post("/deployments", headers=headers, json=body)
                post_s = time.time() - t0
                assert created.status_code == 201, created.text
                deployment_id = created.json()["id"]
                deadline = time.monotonic() + 120 + n * 0.5
                # Watch the row's phase column (one small SELECT every 100 ms; the time measured
                # is the executor's own stamp, so a sparse poll only saves the GIL), then read
                # the whole deployment through the API once: polling GET /deployments/{id}
                # itself (the N-device view) in the executor's process would compete with it.
                phase_of = select(Deployment.phase).where(Deployment.id == uuid.UUID(deployment_id))
                while True:
                    with Session(app.state.engine) as session:
                        phase = session.exec(phase_of).first()
                    if phase in ("SUCCEEDED", "ABORTED", "CANCELED"):
                        break
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                shown_s = time.time() - t0
                fleet_cpu = time.process_time() - cpu_before[0]
                broker_cpu = _cpu_of(broker.pid) - cpu_before[1]
                read = client.get(f"/deployments/{deployment_id}", headers=headers).json()
                if read["phase"] != "SUCCEEDED" or read["counts"].get("SUCCEEDED") != n:
                    raise RuntimeError(
                        f"{name} rollout did not succeed: {read['phase']} {read['counts']}"
                    )
                # The poll only notices the end; the executor stamped the SUCCEEDED save.
                rollout_s = datetime.fromisoformat(read["updated_at"]).timestamp() - t0
                stages = [len(s) for s in read["stages"]]
                timeline = [
                    f"{start - t0:.2f}+{took:.2f}s/{queued}"
                    for start, took, queued in pass_log
                    if start >= t0
                ]
                print(
                    f"  N={n} {name}: rollout {rollout_s:.3f} s (stages {stages}; the poll saw "
                    f"it at {shown_s:.3f} s)\n"
                    f"    executor passes (start+duration/messages): {' '.join(timeline)}",
                    flush=True,
                )
                if profiler is not None and profile is not None:
                    out = profile.with_name(f"{profile.stem}-{n}-{name}{profile.suffix}")
                    profiler.dump_stats(out)
                    stats = pstats.Stats(profiler, stream=sys.stdout)
                    stats.sort_stats("cumulative").print_stats(30)
                rollouts.append(
                    Rollout(
                        policy=name,
                        rollout_s=rollout_s,
                        ratio=0.0,  # set once every fan-out run is in
                        stages=stages,
                        post_s=post_s,
                        executor_passes=made[0].passes - passes_before,
                        publish_failures=made[0].publish_failures - failures_before,
                        first_job_received_s=t0,  # absolute until the worker's log is read
                        first_wave_job_received_s=0.0,
                        last_job_received_s=0.0,
                        executor_perform_s=timers["perform"],
                        executor_publish_s=timers["publish"],
                        executor_set_desired_s=timers["set_desired"],
                        timeline=timeline,
                        fleet_cpu_s=fleet_cpu,
                        broker_cpu_s=broker_cpu,
                    )
                )
            fanout_runs += [fanout() for _ in range(fanout_repeats // 2)]
            fanout_s = statistics.median(fanout_runs)
            print(f"  N={n}: raw fan-out {fanout_s * 1000:.1f} ms", flush=True)

            limit = min(n, 1000)
            url = f"/devices?limit={limit}"
            assert client.get(url, headers=headers).json()["count"] == n
            passes_before_list = made[0].passes
            t = time.perf_counter()
            for _ in range(list_requests):
                response = client.get(url, headers=headers)
                assert response.status_code == 200
            list_rate = list_requests / (time.perf_counter() - t)
            print(
                f"  N={n}: GET {url}: {list_rate:.1f} req/s (executor passes meanwhile: "
                f"{made[0].passes - passes_before_list})",
                flush=True,
            )

            assert worker.stdin is not None
            worker.stdin.close()
            done = _read_line(worker, "DONE", timeout=30).split(maxsplit=3)
            jobs = json.loads(done[3])  # [wall clock, CPU on receipt, CPU once replied]
            # Job notifies per rollout: those received after its POST, before the next one's.
            starts = [r.first_job_received_s for r in rollouts] + [float("inf")]
            for k, r in enumerate(rollouts):
                t0 = starts[k]
                mine = [job for job in jobs if t0 <= job[0] < starts[k + 1]]
                times = [job[0] - t0 for job in mine]
                canary = r.stages[0]
                r.first_job_received_s = times[0] if times else 0.0
                r.first_wave_job_received_s = times[canary] if len(times) > canary else 0.0
                r.last_job_received_s = times[-1] if times else 0.0
                r.agents_cpu_s = mine[-1][2] - mine[0][1] if mine else 0.0
                r.ratio = r.rollout_s / fanout_s
    finally:
        if publisher is not None:
            publisher.loop_stop()
            publisher.disconnect()
        if worker is not None:
            if worker.poll() is None:
                worker.kill()
            worker.wait(timeout=10)
        broker.stop()
        store.close()
    return Result(
        n=n,
        register_s=register_s,
        worker_ready_s=worker_ready_s,
        fanout_s=fanout_s,
        fanout_runs=fanout_runs,
        fanout_agents_cpu_s=statistics.median(fanout_cpu),
        list_limit=limit,
        list_requests=list_requests,
        list_req_per_s=list_rate,
        executor_interval_s=interval,
        rollouts=rollouts,
    )


def main() -> None:
    """Parse arguments, run every N, print the table (and write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, action="append", help="fleet size (repeatable)")
    parser.add_argument("--quick", action="store_true", help="N = 100 only")
    parser.add_argument("--fanout-repeats", type=int, default=5)
    parser.add_argument("--list-requests", type=int, default=200)
    parser.add_argument(
        "--interval",
        type=float,
        default=5.0,
        help="the executor's longest idle sleep (s; it steps on messages, not on a tick)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--profile", type=Path, help="cProfile the executor's passes; stats to PROFILE-<N>"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker_main(args.worker)
        return
    sizes = args.n or ([100] if args.quick else [100, 1000])
    fds = raise_fd_limit()
    print(f"fleet rollout bench: N = {sizes}, {os.cpu_count()} CPUs, fd limit {fds}")
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="edgeloop-rollout-") as tmp:
            results.append(
                run_n(
                    n,
                    Path(tmp),
                    fanout_repeats=args.fanout_repeats,
                    list_requests=args.list_requests,
                    interval=args.interval,
                    profile=args.profile,
                )
            )
    print()
    print(
        f"{'N':>6} {'policy':>12} {'stages':>10} {'rollout s':>10} {'fan-out ms':>11} "
        f"{'ratio':>7} {'GET /devices req/s':>19}"
    )
    for r in results:
        for ro in r.rollouts:
            print(
                f"{r.n:>6} {ro.policy:>12} {'+'.join(map(str, ro.stages)):>10} "
                f"{ro.rollout_s:>10.3f} {r.fanout_s * 1000:>11.1f} {ro.ratio:>7.1f} "
                f"{r.list_req_per_s:>19.1f}  (limit={r.list_limit})"
            )
    print("ratio = rollout / raw fan-out; issue target <= 2")
    print()
    print(
        "the simulated agents' own CPU time (their worker process, one core; from the first "
        "job received to the last reply handed to paho) against the same process's CPU for "
        "one fan-out: the ratio cannot go below their quotient on one core"
    )
    for r in results:
        for ro in r.rollouts:
            print(
                f"  N={r.n} {ro.policy}: agents {ro.agents_cpu_s * 1000:.0f} ms CPU, fan-out "
                f"{r.fanout_agents_cpu_s * 1000:.0f} ms CPU: "
                f"{ro.agents_cpu_s / max(r.fanout_agents_cpu_s, 1e-9):.1f}x; meanwhile the fleet "
                f"process (API, executor, paho) {ro.fleet_cpu_s * 1000:.0f} ms and Mosquitto "
                f"{ro.broker_cpu_s * 1000:.0f} ms CPU (until the poll saw SUCCEEDED)"
            )
    print()
    print("where each rollout's time goes (s after POST /deployments; executor totals):")
    for r in results:
        for ro in r.rollouts:
            print(
                f"  N={r.n} {ro.policy}: POST /deployments {ro.post_s:.3f}, first job received "
                f"{ro.first_job_received_s:.3f}, first wave job "
                f"{ro.first_wave_job_received_s:.3f}, "
                f"last job {ro.last_job_received_s:.3f}, saved SUCCEEDED {ro.rollout_s:.3f}; "
                f"executor passes {ro.executor_passes}, starting jobs {ro.executor_perform_s:.3f} "
                f"(handing the notifies to paho {ro.executor_publish_s:.3f}, not waiting for "
                f"PUBACKs; desired-state commits {ro.executor_set_desired_s:.3f})"
            )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
