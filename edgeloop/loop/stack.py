"""The running loop: broker, fleet API, cloud API + worker, ingest/drift monitor, agents.

Everything is real and private to one work directory, on embedded defaults: SQLite
databases, the fleet's local artifact store, a broker started on a free port with generated
users and the fleet's ACL: Mosquitto when installed, else the embedded amqtt broker (MQTT
3.1.1, so every client of the run speaks 3.1.1; ``choose_broker``). The fleet and cloud
APIs run under uvicorn in threads of this process; the cloud worker and each agent are
subprocesses in their own sessions (so a terminal's Ctrl-C reaches only this process, which
stops them in order). An agent listed in ``LoopConfig.emulated`` runs as an emulated aarch64
device: ``python -m agent`` under qemu-aarch64 in the cached sysroot (``agent/emulation.py``),
registered with the ARM profile.

``start_stack`` is a context manager: leaving it (normally, on an error or on
KeyboardInterrupt) stops every child process and thread it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edgeloop.live_server import LiveServer as _LiveServer
from edgeloop.loop.config import LoopConfig

if TYPE_CHECKING:
    from agent.config import MqttProtocol

REPO = Path(__file__).resolve().parents[2]
STATE_FILE = "demo-state.json"
MARKER = ".edgeloop-demo"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class DemoSetupError(RuntimeError):
    """The demo cannot start here (missing broker, a work directory it does not own)."""


def prepare_workdir(workdir: Path) -> Path:
    """Empty ``workdir`` for a clean run; refuse a non-empty directory the demo did not make.

    Raises:
        DemoSetupError: ``workdir`` is a file, or a non-empty directory without the marker.
    """
    if workdir.exists() and not workdir.is_dir():
        raise DemoSetupError(f"--workdir {workdir} is a file; give a directory")
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise DemoSetupError(
            f"--workdir {workdir} is not empty and was not made by `edgeloop demo` "
            f"(no {MARKER} file); give an empty or new directory"
        )
    if workdir.is_dir():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by `edgeloop demo`; emptied at the start of each run\n")
    return workdir


class StateFile:
    """``demo-state.json``: the pids and ports this run started (for tests and operators)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"pid": os.getpid(), "children": {}, "ports": {}}
        self._lock = threading.Lock()
        self._write()

    def child(self, name: str, pid: int) -> None:
        with self._lock:
            self.data["children"][name] = pid
            self._write()

    def port(self, name: str, port: int) -> None:
        with self._lock:
            self.data["ports"][name] = port
            self._write()

    def stage(self, name: str) -> None:
        with self._lock:
            self.data["stage"] = name
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


class LiveServer(_LiveServer):
    """:class:`edgeloop.live_server.LiveServer` failing with :class:`DemoSetupError`."""

    def __init__(self, app: Any) -> None:
        super().__init__(app, error=DemoSetupError)


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; the process is reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the process group of ``proc`` (started in its own session), then SIGKILL
    to the group after ``timeout``; the process is reaped either way."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in the group
    proc.wait(timeout=timeout)


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@dataclass
class Agent:
    """``python -m agent run`` for one device, as a separate process (in its own session).

    With ``sysroot`` set, the process is an emulated aarch64 device: the agent under
    qemu-aarch64 with that sysroot's python3.11 (``agent/emulation.py``).
    """

    device_id: str
    profile: str
    workdir: Path
    password: str
    broker_port: int
    trusted_key: Path
    sysroot: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    latencies_ms: list[float] = field(default_factory=list)
    mqtt_protocol: MqttProtocol = "5"

    @property
    def emulated(self) -> bool:
        return self.sysroot is not None

    @property
    def arch(self) -> str:
        """``aarch64 (qemu)`` for an emulated device, else the host's machine name."""
        import platform

        return "aarch64 (qemu)" if self.emulated else platform.machine()

    @property
    def state_dir(self) -> Path:
        return self.workdir / self.device_id / "state"

    @property
    def log_path(self) -> Path:
        return self.workdir / self.device_id / "agent.log"

    def start(self) -> int:
        """Write the config and start the process; returns its pid."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / self.device_id / "agent.toml"
        config.write_text(
            f'device_id = "{self.device_id}"\nprofile = "{self.profile}"\n'
            f'state_dir = "{self.state_dir}"\ntrusted_key = "{self.trusted_key}"\n'
            "heartbeat_interval_s = 1.0\n"
            f'[broker]\nhost = "127.0.0.1"\nport = {self.broker_port}\n'
            f'username = "{self.device_id}"\npassword = "{self.password}"\n'
            "keepalive_s = 2\nreconnect_min_s = 0.2\nreconnect_max_s = 2.0\n"
            f'protocol = "{self.mqtt_protocol}"\n'
            '[http]\nhost = "127.0.0.1"\nport = 0\n'
        )
        args = ["-v", "run", "--config", str(config)]
        if self.sysroot is not None:
            from agent.emulation import agent_command

            argv, env = agent_command(self.sysroot, args, base_env=_child_env())
        else:
            argv, env = [sys.executable, "-m", "agent", *args], _child_env()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=log, stderr=log, env=env, start_new_session=True
        )
        log.close()
        return self.proc.pid

    def wait_http(self, timeout: float | None = None) -> int:
        """Wait for the agent's OIP server; returns its port.

        ``timeout`` defaults to 90 s, or ``agent.emulation.START_TIMEOUT_S`` for an
        emulated device (every import runs under qemu).
        """
        if timeout is None:
            from agent.emulation import START_TIMEOUT_S as EMULATED_START_S

            timeout = EMULATED_START_S if self.emulated else 90.0
        deadline = time.monotonic() + timeout
        port_file = self.state_dir / "http.port"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise DemoSetupError(
                    f"agent {self.device_id} exited with {self.proc.returncode}:\n{self.log()}"
                )
            if port_file.exists() and port_file.read_text().strip():
                return int(port_file.read_text())
            time.sleep(0.05)
        raise DemoSetupError(f"agent {self.device_id} did not start in {timeout} s")

    @property
    def http_port(self) -> int:
        return int((self.state_dir / "http.port").read_text())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc)

    def infer(self, model: str, name: str, x: npt.NDArray[np.float32]) -> list[float]:
        """One OIP v2 request; returns the first output (and records the latency)."""
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": name,
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "data": x.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/v2/models/{model}/infer",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30) as response:
            result: dict[str, Any] = json.loads(response.read())
        self.latencies_ms.append((time.perf_counter() - started) * 1000.0)
        return [float(v) for v in result["outputs"][0]["data"]]


def _emulation_sysroot(config: LoopConfig) -> Path | None:
    """The aarch64 sysroot the emulated devices run in; ``None`` when there are none.

    Raises:
        DemoSetupError: ``config`` names emulated devices but they cannot run here.
    """
    if not config.emulated:
        return None
    from agent.emulation import find_agent_sysroot, unavailable_reason
    from compiler.settings import CompilerSettings

    cache_dir = CompilerSettings().cache_dir
    why = unavailable_reason(cache_dir)
    sysroot = find_agent_sysroot(cache_dir)
    if why is not None or sysroot is None:
        raise DemoSetupError(f"cannot emulate {', '.join(config.emulated)}: {why}")
    return sysroot


class WorkerProcess:
    """``edgeloop cloud worker`` as a subprocess (its output in ``log``)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeloop", "cloud", "worker"],
                env=_child_env(**env),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )

    def stop(self) -> None:
        _stop_process(self.proc, timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Stack:
    """What ``start_stack`` started: clients of both APIs, the agents, the worker."""

    cloud: Any  # httpx.Client
    fleet: Any  # httpx.Client
    agents: dict[str, Agent]
    worker: WorkerProcess
    fleet_url: str
    cloud_url: str
    fleet_token: str  # the demo organization's admin key (the dashboard's login)

    def logs(self) -> str:
        """The tails of the worker's and the agents' logs (for error messages)."""
        parts = [f"--- worker\n{self.worker.output()[-3000:]}"]
        parts += [f"--- {d}\n{a.log()[-2000:]}" for d, a in self.agents.items()]
        return "\n".join(parts)


BROKERS = ("auto", "mosquitto", "embedded")


def choose_broker(choice: str) -> str:
    """``mosquitto`` or ``embedded`` for ``--broker`` ``auto|mosquitto|embedded``: auto is
    Mosquitto when ``mosquitto`` is on PATH, else the embedded amqtt broker (MQTT 3.1.1).

    Raises:
        DemoSetupError: the broker asked for (or, for auto, either) is not installed.
        ValueError: an unknown choice.
    """
    import importlib.util

    if choice not in BROKERS:
        raise ValueError(f"broker must be one of {', '.join(BROKERS)}, got {choice!r}")
    mosquitto = shutil.which("mosquitto") is not None
    amqtt = importlib.util.find_spec("amqtt") is not None
    if choice == "mosquitto" and not mosquitto:
        raise DemoSetupError(
            "mosquitto is not installed (apt-get install mosquitto); --broker mosquitto asks "
            "for it (MQTT 5; --broker embedded runs amqtt, MQTT 3.1.1; docs/demo.md)"
        )
    if choice == "embedded" and not amqtt:
        raise DemoSetupError("amqtt is not installed (pip install 'edgeloop[demo]')")
    if choice == "auto" and not (mosquitto or amqtt):
        raise DemoSetupError(
            "mosquitto is not installed, nor is amqtt: apt-get install mosquitto, or pip "
            "install 'edgeloop[demo]' for the embedded MQTT 3.1.1 broker (docs/demo.md)"
        )
    if choice == "auto":
        return "mosquitto" if mosquitto else "embedded"
    return choice


@contextmanager
def start_stack(
    workdir: Path,
    config: LoopConfig,
    *,
    state: StateFile,
    say: Callable[[str], None],
    broker_choice: str = "auto",
) -> Iterator[Stack]:
    """Start broker, fleet, cloud, worker, ingestor and agents under ``workdir``.

    ``broker_choice``: ``auto`` (Mosquitto if installed, else the embedded amqtt broker),
    ``mosquitto`` or ``embedded``; with the embedded one every client speaks MQTT 3.1.1.

    Raises:
        DemoSetupError: the broker is missing, or a component does not start.
    """
    import httpx
    import torch
    from pydantic import SecretStr
    from sqlmodel import Session

    from cloud import db
    from cloud.api.main import create_app as create_cloud_app
    from cloud.dataloop.cli import make_monitor
    from cloud.dataloop.ingest import Ingestor, IngestStore
    from cloud.dataloop.policy import mqtt_publisher
    from cloud.dataloop.settings import DataloopSettings
    from cloud.settings import CloudSettings
    from compiler.signing import generate_keys, load_public_key
    from fleet.api.bootstrap import create_admin_key
    from fleet.api.main import create_app as create_fleet_app
    from fleet.api.settings import ApiSettings
    from fleet.broker import EmbeddedBrokerProcess, MosquittoProcess
    from fleet.broker_auth import MosquittoPasswordFile
    from fleet.dashboard.relabel import CloudRelabelSource
    from fleet.executor import Executor, mqtt_executor
    from fleet.responder import BrokerConfig, MqttSession, Responder
    from fleet.store import ArtifactStore

    kind = choose_broker(broker_choice)
    mqtt_protocol: MqttProtocol = "5" if kind == "mosquitto" else "3.1.1"
    users = {"fleet": secrets.token_hex(12), "responder": secrets.token_hex(12)}
    keys = generate_keys(workdir / "keys")
    with ExitStack() as stack:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        stack.callback(torch.set_num_threads, threads)

        broker: MosquittoProcess | EmbeddedBrokerProcess
        if kind == "mosquitto":
            say("broker: Mosquitto, MQTT 5 (generated users and ACL) on a free port")
            broker = MosquittoProcess(workdir / "broker", users=dict(users))
        else:
            say(
                "broker: embedded amqtt, MQTT 3.1.1 (Mosquitto not used: "
                + ("--broker embedded" if broker_choice == "embedded" else "not installed")
                + "); generated users and the fleet's ACL; every client speaks 3.1.1, "
                "one responder and one ingest consumer (no shared subscriptions)"
            )
            broker = EmbeddedBrokerProcess(workdir / "broker", users=dict(users))
        try:
            broker.start()
        except RuntimeError as err:
            raise DemoSetupError(f"the broker did not start: {err}") from err
        stack.callback(broker.stop)
        state.port("mqtt", broker.port)
        if broker.pid is not None:
            state.child(kind if kind == "mosquitto" else "amqtt", broker.pid)

        store = ArtifactStore(workdir / "fleet" / "store", load_public_key(keys.public))
        stack.callback(store.close)
        broker_config = BrokerConfig(
            "127.0.0.1", broker.port, "fleet", users["fleet"], protocol=mqtt_protocol
        )

        def make_executor(engine: Any, store: ArtifactStore) -> Executor:
            executor = mqtt_executor(broker_config, engine=engine, store=store)
            executor.interval = 1.0
            return executor

        say("starting the fleet API (SQLite, local artifact store) and the chunk responder")
        fleet_app = create_fleet_app(
            ApiSettings(
                state_dir=workdir / "fleet" / "state",
                store=workdir / "fleet" / "store",
                public_key=keys.public,
                database_url=f"sqlite:///{workdir / 'fleet' / 'fleet.db'}",
                max_upload_bytes=64 << 20,
            ),
            store=store,
            broker_auth=MosquittoPasswordFile(workdir / "broker" / "passwd", reload=broker.reload),
            executor=make_executor,
        )
        responder = Responder(
            store,
            store,
            host="127.0.0.1",
            port=broker.port,
            username="responder",
            password=users["responder"],
            mqtt_protocol=mqtt_protocol,
        )
        responder.start(timeout=10)
        stack.callback(responder.stop)
        fleet_server = stack.enter_context(LiveServer(fleet_app))
        state.port("fleet", fleet_server.port)
        with Session(fleet_app.state.engine) as session:
            fleet_token = create_admin_key(session, "demo").token
        fleet = stack.enter_context(
            httpx.Client(
                base_url=fleet_server.url,
                headers={"Authorization": f"Bearer {fleet_token}"},
                timeout=30,
            )
        )
        group = fleet.post("/groups", json={"name": config.group})
        if group.status_code != 201:
            raise DemoSetupError(f"creating group {config.group!r}: {group.text}")

        sysroot = _emulation_sysroot(config)
        agents: dict[str, Agent] = {}
        for device_id in config.devices:
            profile = config.profile_of(device_id)
            registered = fleet.post(
                "/devices",
                json={"device_id": device_id, "profile": profile, "group_id": group.json()["id"]},
            )
            if registered.status_code != 201:
                raise DemoSetupError(f"registering {device_id}: {registered.text}")
            agents[device_id] = Agent(
                device_id,
                profile,
                workdir / "devices",
                registered.json()["mqtt"]["password"],
                broker.port,
                keys.public,
                sysroot=sysroot if device_id in config.emulated else None,
                mqtt_protocol=mqtt_protocol,
            )
        say(f"starting {len(agents)} agents: {', '.join(agents)}")
        for agent in agents.values():
            if agent.emulated:
                say(
                    f"{agent.device_id} is an emulated {agent.profile} device: the agent "
                    "under qemu-aarch64 (start-up takes a while)"
                )
        for name, agent in agents.items():
            state.child(f"agent:{name}", agent.start())
            stack.callback(agent.stop)
        for agent in agents.values():
            state.port(f"agent:{agent.device_id}", agent.wait_http())

        say("starting the cloud API (SQLite), one worker process and the drift monitor")
        cloud_db = f"sqlite:///{workdir / 'cloud' / 'cloud.db'}"
        (workdir / "cloud").mkdir(parents=True, exist_ok=True)
        db.upgrade(cloud_db)
        token = secrets.token_hex(16)
        settings = CloudSettings(
            state_dir=workdir / "cloud" / "state",
            blob_dir=workdir / "cloud" / "blobs",
            database_url=cloud_db,
            api_token=SecretStr(token),
            lease_s=30.0,  # a TVM build holds the GIL for a while
            max_attempts=2,
            fleet_url=fleet_server.url,
            fleet_api_key=SecretStr(fleet_token),
            signing_key=keys.private,
            tuning_db=workdir / "cloud" / "tuning",
        )
        cloud_app = create_cloud_app(settings, profiles=list(config.profiles))
        if mqtt_protocol == "5":
            publisher = mqtt_publisher(
                DataloopSettings(broker_port=broker.port, broker_password=SecretStr(users["fleet"]))
            )
        else:  # DataloopSettings has no protocol setting: the same session, in 3.1.1
            publisher = MqttSession(broker_config, role="capture-policy")
            publisher.start(timeout=10)
        stack.callback(publisher.stop)
        cloud_app.state.capture_publisher = publisher
        cloud_server = stack.enter_context(LiveServer(cloud_app))
        state.port("cloud", cloud_server.port)
        # The dashboard's relabel page reads the queue from the cloud API started just now.
        fleet_app.state.relabel_source = CloudRelabelSource(cloud_server.url, token)
        cloud = stack.enter_context(
            httpx.Client(
                base_url=cloud_server.url,
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
            )
        )
        worker = WorkerProcess(
            {
                "EDGELOOP_CLOUD_DATABASE_URL": cloud_db,
                "EDGELOOP_CLOUD_STATE_DIR": str(settings.state_dir),
                "EDGELOOP_CLOUD_BLOB_DIR": str(settings.resolved_blob_dir()),
                "EDGELOOP_CLOUD_LEASE_S": str(settings.lease_s),
                "EDGELOOP_CLOUD_MAX_ATTEMPTS": str(settings.max_attempts),
                "EDGELOOP_CLOUD_FLEET_URL": fleet_server.url,
                "EDGELOOP_CLOUD_FLEET_API_KEY": fleet_token,
                "EDGELOOP_CLOUD_SIGNING_KEY": str(keys.private),
                "EDGELOOP_CLOUD_TUNING_DB": str(settings.tuning_db),
            },
            workdir / "cloud" / "worker.log",
        )
        stack.callback(worker.stop)
        state.child("worker", worker.proc.pid)

        monitor, monitor_client = make_monitor(
            DataloopSettings(fleet_url=fleet_server.url, fleet_api_key=SecretStr(fleet_token))
        )
        if monitor_client is not None:
            stack.callback(monitor_client.close)
        ingestor = Ingestor(
            IngestStore(db.make_engine(cloud_db), settings.resolved_blob_dir() / "samples"),
            broker=broker_config,
            group="demo",
            monitor=monitor,
            batch_size=100,
            batch_wait_s=0.2,
        )
        ingestor.start(timeout=10)
        stack.callback(ingestor.stop)
        yield Stack(cloud, fleet, agents, worker, fleet_server.url, cloud_server.url, fleet_token)
