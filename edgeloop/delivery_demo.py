"""The delivery half of ``edgeloop demo``: broker, store, responder, agent, OIP request.

Everything is real and private to the demo: a Mosquitto started on a free port with
generated users and ACL, the fleet's content-addressed store and chunk responder, and an
``edgeloop-agent`` process for a simulated host device that pulls the artifact over MQTT,
verifies it, activates it and answers an Open Inference Protocol request.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEVICE = "demo-device-1"


@dataclass
class DeliveryResult:
    """What the delivery demo observed."""

    job_state: str
    job_reason: str | None
    seconds: float
    chunks: int
    model_version: str
    outputs: list[float]
    reference: list[float]


def run_delivery(
    *,
    workdir: Path,
    bundle: Path,
    public_key: Path,
    onnx_model: Path,
    say: Callable[[str], None],
) -> DeliveryResult:
    """Deliver ``bundle`` to a fresh agent over a private broker and query it."""
    from compiler.signing import load_public_key
    from fleet.broker import MosquittoProcess
    from fleet.jobs import JobWatcher, publish_job
    from fleet.responder import BrokerConfig, Responder
    from fleet.store import ArtifactStore

    passwords = {
        "fleet": secrets.token_hex(8),
        "responder": secrets.token_hex(8),
        DEVICE: secrets.token_hex(8),
    }
    broker = MosquittoProcess(workdir / "broker", users=dict(passwords))
    say("starting Mosquitto with per-device ACLs on a free port")
    broker.start()
    agent: subprocess.Popen[bytes] | None = None
    responder: Responder | None = None
    watcher: JobWatcher | None = None
    store = ArtifactStore(workdir / "store", load_public_key(public_key))
    try:
        stored = store.put_bundle(bundle)
        say(f"stored artifact {stored.artifact_id[:16]}... ({stored.transfer.size} bytes)")
        responder = Responder(
            store,
            store,
            host="127.0.0.1",
            port=broker.port,
            username="responder",
            password=passwords["responder"],
        )
        responder.start(timeout=10)
        config = BrokerConfig("127.0.0.1", broker.port, "fleet", passwords["fleet"])
        watcher = JobWatcher(config)
        watcher.start(timeout=10)
        state = workdir / "device" / "state"
        state.mkdir(parents=True)
        agent_config = workdir / "device" / "agent.toml"
        agent_config.write_text(
            f'device_id = "{DEVICE}"\nprofile = "{stored.profile}"\nstate_dir = "{state}"\n'
            f'trusted_key = "{public_key}"\nheartbeat_interval_s = 2\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "{DEVICE}"\n'
            f'password = "{passwords[DEVICE]}"\n[http]\nhost = "127.0.0.1"\nport = 0\n'
        )
        say(f"starting edgeloop-agent for {DEVICE}")
        log = (workdir / "device" / "agent.log").open("wb")
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(agent_config)],
            stdout=log,
            stderr=log,
        )
        port = _wait_port(state / "http.port", agent)
        started = time.monotonic()
        job = publish_job(config, store=store, device_id=DEVICE, artifact_id=stored.artifact_id)
        say(f"published job {job.job_id}; the agent pulls it in chunks over MQTT")
        update = watcher.wait_for(job.job_id, ("SUCCEEDED", "FAILED"), 120)
        seconds = time.monotonic() - started
        chunks = max((u.chunks_total or 0) for u in watcher.updates(job.job_id))
        x = np.random.default_rng(0).standard_normal(stored_input_shape(bundle)).astype(np.float32)
        answer = _infer(port, stored.model.name, x) if update.state == "SUCCEEDED" else {}
        reference = _reference(onnx_model, x)
        outputs = answer.get("outputs", [{}])[0].get("data", []) if answer else []
        return DeliveryResult(
            update.state,
            update.reason,
            seconds,
            chunks,
            str(answer.get("model_version", "-")),
            outputs,
            reference,
        )
    finally:
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
        if watcher is not None:
            watcher.stop()
        if responder is not None:
            responder.stop()
        store.close()
        broker.stop()


def stored_input_shape(bundle: Path) -> list[int]:
    """The first input's shape from a bundle's manifest."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    return list(manifest["inputs"][0]["shape"])


def _wait_port(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode}; see {path.parent.parent}")
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.05)
    raise RuntimeError(f"the agent did not start within {timeout} s")


def _infer(port: int, model: str, x: np.ndarray[Any, Any]) -> dict[str, Any]:
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{model}/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


def _reference(onnx_model: Path, x: np.ndarray[Any, Any]) -> list[float]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    return [float(v) for v in np.asarray(out).ravel()]
