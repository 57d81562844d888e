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
  ``JobNotify`` with ``JobUpdate`` IN_PROGRESS then SUCCEEDED at once. The artifact is
  trivial: a real signed bundle is uploaded, but the simulated agents do NOT download,
  verify or activate it (no responder runs) and send no heartbeats.
* **rollout**: ``POST /deployments`` (policy: canary 1 %, then one wave of the rest) to the
  group of N devices; the time from just before that request until the executor saved phase
  SUCCEEDED with N devices SUCCEEDED (the deployment's ``updated_at``; a ``SELECT`` of the
  row's phase every 20 ms notices it, reported beside it, then ``GET /deployments/{id}``
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
        self.received: list[float] = []
        self.fanout_seen: dict[str, int] = {}
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
        self.received.append(time.time())
        notify = protocol.decode(protocol.JobNotify, message.payload)
        for state in (protocol.JobState.IN_PROGRESS, protocol.JobState.SUCCEEDED):
            update = protocol.JobUpdate(
                job_id=notify.job_id,
                device_id=device_id,
                artifact_id=notify.artifact_id,
                state=state,
            )
            client.publish(
                protocol.jobs_update(device_id), update.model_dump_json().encode(), qos=1
            )
        self.jobs_done += 1
        self.last_success = time.time()

    def _on_fanout(self, _client: mqtt.Client, _ud: Any, message: mqtt.MQTTMessage) -> None:
        tag = message.payload.decode()
        seen = self.fanout_seen.get(tag, 0) + 1
        self.fanout_seen[tag] = seen
        if seen == self.fanout_n:
            print(f"FANOUT {tag} {time.time():.6f}", flush=True)

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
    received = sorted(worker.received)
    print(f"DONE {worker.jobs_done} {worker.last_success:.6f} {json.dumps(received)}", flush=True)


# --- the bench -----------------------------------------------------------------------------


@dataclass
class Result:
    """One N."""

    n: int
    register_s: float
    worker_ready_s: float
    rollout_s: float
    agents_last_success_after_s: float
    fanout_s: float
    fanout_runs: list[float]
    ratio: float
    list_limit: int
    list_requests: int
    list_req_per_s: float
    stages: list[int]
    executor_interval_s: float
    first_job_received_s: float
    first_wave_job_received_s: float
    last_job_received_s: float
    executor_perform_s: float
    executor_publish_s: float
    executor_set_desired_s: float
    post_s: float
    executor_passes: int
    publish_failures: int


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
            uploaded = client.post(
                "/artifacts",
                headers={**headers, "Content-Type": "application/x-tar"},
                content=_trivial_bundle(workdir, keys.private),
            )
            assert uploaded.status_code in (200, 201), uploaded.text
            artifact_id = uploaded.json()["artifact_id"]

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

            body = {
                "name": f"bench-{n}",
                "model_name": "bench",
                "variants": {PROFILE: artifact_id},
                "target": {"groups": ["bench"]},
                "policy": {"canary": "1%", "waves": ["100%"], "job_timeout_s": 600},
            }
            if profiler is not None:
                profiler.clear()  # profile the rollout only, not the statuses before it
            t0 = time.time()
            created = client.post("/deployments", headers=headers, json=body)
            post_s = time.time() - t0
            assert created.status_code == 201, created.text
            deployment_id = created.json()["id"]
            deadline = time.monotonic() + 120 + n * 0.5
            # Watch the row's phase column (one small SELECT every 20 ms), then read the whole
            # deployment through the API once: polling GET /deployments/{id} itself (the
            # N-device view) in the executor's process would compete with it for the GIL.
            phase_of = select(Deployment.phase).where(Deployment.id == uuid.UUID(deployment_id))
            while True:
                with Session(app.state.engine) as session:
                    phase = session.exec(phase_of).first()
                if phase in ("SUCCEEDED", "ABORTED", "CANCELED") or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            shown_s = time.time() - t0
            read = client.get(f"/deployments/{deployment_id}", headers=headers).json()
            if read["phase"] != "SUCCEEDED" or read["counts"].get("SUCCEEDED") != n:
                raise RuntimeError(f"rollout did not succeed: {read['phase']} {read['counts']}")
            passes, publish_failures = made[0].passes, made[0].publish_failures
            # The poll only notices the end; the executor stamped the SUCCEEDED save.
            rollout_s = datetime.fromisoformat(read["updated_at"]).timestamp() - t0
            stages = [len(s) for s in read["stages"]]
            print(
                f"  N={n}: rollout {rollout_s:.3f} s (stages {stages}; the poll saw it "
                f"at {shown_s:.3f} s; executor passes: {made[0].passes})",
                flush=True,
            )
            timeline = [
                f"{start - t0:.2f}+{took:.2f}s/{queued}"
                for start, took, queued in pass_log
                if start >= t0
            ]
            print(f"  N={n}: executor passes (start+duration/messages): {' '.join(timeline)}")
            if profiler is not None and profile is not None:
                out = profile.with_name(f"{profile.stem}-{n}{profile.suffix}")
                profiler.dump_stats(out)
                stats = pstats.Stats(profiler, stream=sys.stdout)
                stats.sort_stats("cumulative").print_stats(30)

            publisher = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id="fanout-pub", protocol=mqtt.MQTTv5
            )
            publisher.username_pw_set("fleet", FLEET_PW)
            publisher.connect("127.0.0.1", broker.port)
            publisher.loop_start()
            fanout_runs = []
            for _ in range(fanout_repeats):
                tag = uuid.uuid4().hex
                start = time.time()
                publisher.publish(FANOUT_TOPIC, tag.encode(), qos=1)
                line = _read_line(worker, "FANOUT", timeout=60)
                _, got, ts = line.split()
                assert got == tag, line
                fanout_runs.append(float(ts) - start)
                time.sleep(0.2)
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
            last_success = float(done[2]) - t0
            received = [ts - t0 for ts in json.loads(done[3])]
            canary = stages[0]
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
        rollout_s=rollout_s,
        agents_last_success_after_s=last_success,
        fanout_s=fanout_s,
        fanout_runs=fanout_runs,
        ratio=rollout_s / fanout_s,
        list_limit=limit,
        list_requests=list_requests,
        list_req_per_s=list_rate,
        stages=stages,
        executor_interval_s=interval,
        first_job_received_s=received[0],
        first_wave_job_received_s=received[canary] if len(received) > canary else 0.0,
        last_job_received_s=received[-1],
        executor_perform_s=timers["perform"],
        executor_publish_s=timers["publish"],
        executor_set_desired_s=timers["set_desired"],
        post_s=post_s,
        executor_passes=passes,
        publish_failures=publish_failures,
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
    print(f"{'N':>6} {'rollout s':>10} {'fan-out ms':>11} {'ratio':>7} {'GET /devices req/s':>19}")
    for r in results:
        print(
            f"{r.n:>6} {r.rollout_s:>10.2f} {r.fanout_s * 1000:>11.1f} {r.ratio:>7.1f} "
            f"{r.list_req_per_s:>19.1f}  (limit={r.list_limit})"
        )
    print("ratio = rollout / raw fan-out; issue target <= 2")
    print()
    print("where the rollout's time goes (s after POST /deployments; executor totals):")
    for r in results:
        print(
            f"  N={r.n}: canary job received {r.first_job_received_s:.2f}, "
            f"first wave job {r.first_wave_job_received_s:.2f}, "
            f"last job {r.last_job_received_s:.2f}, last SUCCEEDED sent "
            f"{r.agents_last_success_after_s:.2f}, API shows all {r.rollout_s:.2f}; "
            f"executor starting jobs {r.executor_perform_s:.2f} (handing the notifies to "
            f"paho {r.executor_publish_s:.2f}, not waiting for PUBACKs; desired-state commits "
            f"{r.executor_set_desired_s:.2f}); POST /deployments took {r.post_s:.3f}"
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
