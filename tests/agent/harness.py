"""End-to-end harness: a real Mosquitto, the fleet store and responder, agent processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import MqttProtocol
from fleet.broker import MosquittoProcess
from fleet.jobs import JobWatcher, publish_job
from fleet.responder import BrokerConfig, Responder
from fleet.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[2]
DEVICES = ("dev-1", "dev-2", "dev-3")


@dataclass
class Fleet:
    """Broker + store + responder + job watcher, all real."""

    workdir: Path
    public_key_path: Path
    store: ArtifactStore
    broker: MosquittoProcess
    responder: Responder | None = None
    watcher: JobWatcher | None = None
    passwords: dict[str, str] = field(default_factory=dict)
    mqtt_protocol: MqttProtocol = "5"  # "3.1.1" over the embedded broker

    def config(self, user: str) -> BrokerConfig:
        return BrokerConfig(
            "127.0.0.1", self.broker.port, user, self.passwords[user], protocol=self.mqtt_protocol
        )

    def start(self) -> None:
        self.broker.start()
        self.start_responder()
        self.watcher = JobWatcher(self.config("fleet"))
        self.watcher.start(timeout=10)

    def start_responder(self) -> None:
        self.responder = Responder(
            self.store,
            self.store,
            host="127.0.0.1",
            port=self.broker.port,
            username="responder",
            password=self.passwords["responder"],
            mqtt_protocol=self.mqtt_protocol,
        )
        self.responder.start(timeout=10)

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.responder is not None:
            self.responder.stop()
        self.broker.stop()

    def deploy(self, device: str, artifact_id: str, *, job_id: str, kind: str = "deploy") -> None:
        publish_job(
            self.config("fleet"),
            store=self.store,
            device_id=device,
            artifact_id=artifact_id,
            job_id=job_id,
            kind=kind,
        )

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float = 60.0) -> Any:
        assert self.watcher is not None
        return self.watcher.wait_for(job_id, states, timeout)


def make_fleet(
    workdir: Path, public_key_path: Path, *, max_packet_size: int | None = None
) -> Fleet:
    from compiler.signing import load_public_key

    passwords = {"fleet": "fleet-pw", "responder": "resp-pw"}
    passwords.update({d: f"{d}-pw" for d in DEVICES})
    broker = MosquittoProcess(
        workdir / "broker", users=dict(passwords), max_packet_size=max_packet_size
    )
    store = ArtifactStore(workdir / "store", load_public_key(public_key_path))
    return Fleet(workdir, public_key_path, store, broker, passwords=passwords)


@dataclass
class AgentProcess:
    """``python -m agent run`` for one device, as a real separate process."""

    fleet: Fleet
    device_id: str
    state_dir: Path
    profile: str = "generic/x86_64"
    keepalive_s: int = 2
    chunk_size: int = 128 * 1024
    window: int = 8
    chunk_timeout_s: float = 2.0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def write_config(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = self.state_dir.parent / f"{self.device_id}.toml"
        config.write_text(
            f'device_id = "{self.device_id}"\n'
            f'profile = "{self.profile}"\n'
            f'state_dir = "{self.state_dir}"\n'
            f'trusted_key = "{self.fleet.public_key_path}"\n'
            "heartbeat_interval_s = 1.0\n"
            "[broker]\n"
            f'host = "127.0.0.1"\nport = {self.fleet.broker.port}\n'
            f'username = "{self.device_id}"\npassword = "{self.fleet.passwords[self.device_id]}"\n'
            f"keepalive_s = {self.keepalive_s}\nreconnect_min_s = 0.2\nreconnect_max_s = 2.0\n"
            "[transfer]\n"
            f"chunk_size = {self.chunk_size}\nwindow = {self.window}\n"
            f"chunk_timeout_s = {self.chunk_timeout_s}\n"
            '[http]\nhost = "127.0.0.1"\nport = 0\n'
        )
        return config

    def start(self, *, wait: bool = True) -> None:
        config = self.write_config()
        (self.state_dir / "http.port").unlink(missing_ok=True)
        self.log_path = self.state_dir.parent / f"{self.device_id}.log"
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_AGENT_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "-v", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            env=env,
        )
        if wait:
            self.wait_http()

    def wait_http(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        port_file = self.state_dir / "http.port"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            if port_file.exists() and port_file.read_text().strip():
                return int(port_file.read_text())
            time.sleep(0.05)
        raise AssertionError(f"agent did not start within {timeout} s:\n{self.log()}")

    @property
    def http_port(self) -> int:
        return int((self.state_dir / "http.port").read_text())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def infer(self, model: str, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": n,
                        "shape": list(a.shape),
                        "datatype": "FP32",
                        "data": a.ravel().tolist(),
                    }
                    for n, a in inputs.items()
                ]
            }
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/v2/models/{model}/infer",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
        return result

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "status",
                "--config",
                str(self.state_dir.parent / f"{self.device_id}.toml"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        data: dict[str, Any] = json.loads(out)
        return data
