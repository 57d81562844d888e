"""The data loop's must-show (issue 6), end to end with real processes.

A private Mosquitto; the fleet API with its MQTT executor and the real chunk responder (devices
registered through the API); two real agent processes; the cloud API under uvicorn with one
``edgeloop cloud worker`` subprocess; the ingest consumer with the drift monitor in this
process. The chain:

1. train a deliberately small MLP on ``builtin:digits`` (4 epochs), compile it for
   ``generic/x86_64`` (no tuning trials) into the fleet's store, roll it out through the
   fleet API to both devices;
2. measure its accuracy on held-out *inverted* digits (``1 - x``, a covariate shift) through
   ``cam-2``'s OIP endpoint, before any capture is on;
3. deliver a capture policy through the cloud API (retained desired state; low confidence
   or every 2nd inference, 2 s sketches), send clean digits to both devices, then clean
   digits to ``cam-1`` and inverted ones to ``cam-2``;
4. drift alerts fire for ``cam-2`` only; its flagged samples arrive; a test oracle (the true
   labels, looked up by the image's bytes) labels them through the labeling API;
5. the label-count retrain policy starts a run at once; ``POST /retrain/tick`` moves it
   through training and compiling (worker subprocess) to a canary deployment through the
   fleet API, which reaches SUCCEEDED with both agents serving the new artifact;
6. accuracy on the same held-out inverted digits through ``cam-2`` improves by at least
   ``MARGIN``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlmodel import Session

from tests.agent import harness
from tests.agent.harness import AgentProcess
from tests.cloud.cloud_service import TOKEN, WorkerProcess, database, make_settings
from tests.fleet.api.test_api_cli import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]

MODEL = "digits"
PROFILE = "generic/x86_64"
CLEAN, SHIFTED = "cam-1", "cam-2"
DEVICES = (CLEAN, SHIFTED)
T = TypeVar("T")
SERVICE_USERS = {"fleet": "fleet-pw", "responder": "responder-pw"}
# Small on purpose: good on clean digits, poor on inverted ones, quick to train on one core.
SMALL_MLP: dict[str, Any] = {
    "architecture": "mlp",
    "hparams": {"hidden": 32, "layers": 1},
    "epochs": 4,
    "batch_size": 32,
    "learning_rate": 0.003,
    "seed": 0,
}
RETRAIN_MLP: dict[str, Any] = {**SMALL_MLP, "hparams": {"hidden": 64, "layers": 1}, "epochs": 15}
MARGIN = 0.10  # accuracy on the shifted data must improve by at least 10 points
# Indices into the 1,797 digits: clean warm-up traffic, the shifted traffic whose captured
# samples get labeled, and a held-out shifted set that is only ever used to measure accuracy.
WARMUP = range(0, 150)
TRAFFIC = range(150, 550)
HELD_OUT = range(1200, 1500)
# KS (max over the 64 pixels): a window of n clean digits stays near 1.36 / sqrt(n) per pixel
# (0.19 at n = 50); inverted digits move most pixels' mass to the other end (KS near 1). PSI's
# maximum over 64 pixels of such small windows is too noisy for a "this device only" assertion.
DRIFT_METRIC, DRIFT_THRESHOLD, MIN_SAMPLES = "ks", 0.5, 50


def invert(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The covariate shift: inverted intensities (the inputs are scaled to 0..1)."""
    return np.asarray(1.0 - x, dtype=np.float32)


def wait_until(
    predicate: Callable[[], T | None], *, timeout_s: float, what: Callable[[], str]
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what()`` at the end."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s} s: {what()}")


@dataclass
class Loop:
    """Everything running: both APIs (HTTP clients), the agents, the fleet's engine."""

    cloud: httpx.Client
    fleet: httpx.Client
    agents: dict[str, AgentProcess]
    worker: WorkerProcess
    fleet_engine: Engine
    keys: dict[str, bytes] = field(default_factory=dict)

    def sample_key(self, sample_id: str) -> bytes:
        """The captured input's raw bytes (the oracle's key), read through the samples API."""
        if sample_id not in self.keys:
            sample = self.ok(self.cloud.get(f"/samples/{sample_id}"))
            raw = base64.b64decode(sample["inputs"][0]["data"])
            image = np.frombuffer(raw, dtype=np.float32).reshape(1, 8, 8)
            self.keys[sample_id] = image.tobytes()
        return self.keys[sample_id]

    def logs(self) -> str:
        parts = [f"--- worker\n{self.worker.output()[-3000:]}"]
        parts += [f"--- {d}\n{a.log()[-2000:]}" for d, a in self.agents.items()]
        return "\n".join(parts)

    def ok(self, response: httpx.Response, *codes: int) -> Any:
        assert response.status_code in (codes or (200,)), (response.status_code, response.text)
        return response.json()

    def wait_job(self, job_id: int, timeout_s: float) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job: dict[str, Any] = self.ok(self.cloud.get(f"/jobs/{job_id}"))
            return job if job["state"] in ("SUCCEEDED", "FAILED", "CANCELED") else None

        job = wait_until(done, timeout_s=timeout_s, what=lambda: f"job {job_id}\n{self.logs()}")
        assert job["state"] == "SUCCEEDED", (job, self.logs())
        return job

    def wait_deployment(self, deployment_id: str, timeout_s: float) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            read: dict[str, Any] = self.ok(self.fleet.get(f"/deployments/{deployment_id}"))
            return read if read["phase"] in ("SUCCEEDED", "ABORTED", "ROLLED_BACK") else None

        read = wait_until(done, timeout_s=timeout_s, what=lambda: f"deployment\n{self.logs()}")
        assert read["phase"] == "SUCCEEDED", (read, self.logs())
        return read

    def wait_serving(self, artifact_id: str, timeout_s: float = 60) -> None:
        """Every agent reports serving ``artifact_id`` for the model."""

        def serving() -> dict[str, list[str]]:
            out = {}
            for device_id in DEVICES:
                state = self.ok(self.fleet.get(f"/devices/{device_id}/state"))
                out[device_id] = [
                    m["artifact_id"] for m in state["reported_models"] if m["name"] == MODEL
                ]
            return out

        wait_until(
            lambda: all(v == [artifact_id] for v in serving().values()),
            timeout_s=timeout_s,
            what=lambda: f"agents serve {serving()}, wanted {artifact_id}",
        )

    def predict(self, device_id: str, images: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """Top-1 classes of ``images`` (one OIP request each) through the device's server."""
        agent = self.agents[device_id]

        def one(image: npt.NDArray[np.float32]) -> int:
            result = agent.infer(MODEL, {"input": image[None]})
            return int(np.argmax(result["outputs"][0]["data"]))

        with ThreadPoolExecutor(max_workers=4) as pool:
            return np.array(list(pool.map(one, images)), dtype=np.int64)


@pytest.fixture()
def loop(tmp_path: Path) -> Iterator[Loop]:
    import torch

    from cloud.api.main import create_app as create_cloud_app
    from cloud.dataloop.policy import mqtt_publisher
    from cloud.dataloop.settings import DataloopSettings
    from compiler.signing import generate_keys, load_public_key
    from fleet.api.bootstrap import create_admin_key
    from fleet.api.main import create_app as create_fleet_app
    from fleet.api.settings import ApiSettings
    from fleet.broker import MosquittoProcess
    from fleet.broker_auth import MosquittoPasswordFile
    from fleet.executor import Executor, mqtt_executor
    from fleet.responder import BrokerConfig, Responder
    from fleet.store import ArtifactStore

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    keys = generate_keys(tmp_path / "keys")
    broker = MosquittoProcess(tmp_path / "broker", users=dict(SERVICE_USERS))
    broker.start()
    store = ArtifactStore(tmp_path / "store", load_public_key(keys.public))
    config = BrokerConfig("127.0.0.1", broker.port, "fleet", SERVICE_USERS["fleet"])

    def make_executor(engine: Engine, store: ArtifactStore) -> Executor:
        executor = mqtt_executor(config, engine=engine, store=store)
        executor.interval = 1.0
        return executor

    fleet_app = create_fleet_app(
        ApiSettings(
            state_dir=tmp_path / "fleet-state",
            store=tmp_path / "store",
            public_key=keys.public,
            database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
            max_upload_bytes=64 << 20,
        ),
        store=store,
        broker_auth=MosquittoPasswordFile(tmp_path / "broker" / "passwd", reload=broker.reload),
        executor=make_executor,
    )
    responder = Responder(
        store,
        store,
        host="127.0.0.1",
        port=broker.port,
        username="responder",
        password=SERVICE_USERS["responder"],
    )
    agents: dict[str, AgentProcess] = {}
    with ExitStack() as stack:
        stack.callback(torch.set_num_threads, threads)
        stack.callback(broker.stop)
        stack.callback(store.close)
        responder.start(timeout=10)
        stack.callback(responder.stop)
        fleet_server = stack.enter_context(LiveServer(fleet_app))
        with Session(fleet_app.state.engine) as session:
            fleet_token = create_admin_key(session, "acme").token
        fleet = stack.enter_context(
            httpx.Client(
                base_url=fleet_server.url,
                headers={"Authorization": f"Bearer {fleet_token}"},
                timeout=30,
            )
        )
        group = fleet.post("/groups", json={"name": "lab"})
        assert group.status_code == 201, group.text
        passwords = dict(SERVICE_USERS)
        for device_id in DEVICES:
            registered = fleet.post(
                "/devices",
                json={"device_id": device_id, "profile": PROFILE, "group_id": group.json()["id"]},
            )
            assert registered.status_code == 201, registered.text
            passwords[device_id] = registered.json()["mqtt"]["password"]
        agent_fleet = harness.Fleet(tmp_path, keys.public, store, broker, passwords=passwords)
        for device_id in DEVICES:
            agent = AgentProcess(agent_fleet, device_id, tmp_path / "devices" / device_id / "state")
            agent.start(wait=False)
            stack.callback(agent.kill)
            agents[device_id] = agent
        for agent in agents.values():
            agent.wait_http()

        url = stack.enter_context(database("sqlite", tmp_path))
        settings = make_settings(
            tmp_path,
            url,
            fleet_url=fleet_server.url,
            fleet_api_key=fleet_token,
            signing_key=keys.private,
            tuning_db=tmp_path / "tuning",
            lease_s=30.0,  # a TVM build holds the GIL for a while
        )
        cloud_app = create_cloud_app(settings, profiles=[PROFILE])
        publisher = mqtt_publisher(
            DataloopSettings(
                broker_port=broker.port, broker_password=SecretStr(SERVICE_USERS["fleet"])
            )
        )
        stack.callback(publisher.stop)
        cloud_app.state.capture_publisher = publisher
        cloud_server = stack.enter_context(LiveServer(cloud_app))
        cloud = stack.enter_context(
            httpx.Client(
                base_url=cloud_server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
            )
        )
        worker = WorkerProcess(
            settings,
            tmp_path / "worker.log",
            EDGELOOP_CLOUD_FLEET_URL=fleet_server.url,
            EDGELOOP_CLOUD_FLEET_API_KEY=fleet_token,
            EDGELOOP_CLOUD_SIGNING_KEY=str(keys.private),
            EDGELOOP_CLOUD_TUNING_DB=str(tmp_path / "tuning"),
        )
        stack.callback(worker.stop)
        ingestor = _ingestor(
            url, settings.resolved_blob_dir(), broker.port, fleet_server.url, fleet_token
        )
        ingestor.start(timeout=10)
        stack.callback(ingestor.stop)
        yield Loop(cloud, fleet, agents, worker, fleet_app.state.engine)


def _ingestor(url: str, blob_dir: Path, port: int, fleet_url: str, fleet_token: str) -> Any:
    """The ingest consumer with the drift monitor posting to the fleet, as
    ``edgeloop dataloop ingest`` builds it."""
    from cloud import db
    from cloud.dataloop.cli import make_monitor
    from cloud.dataloop.ingest import Ingestor, IngestStore
    from cloud.dataloop.settings import DataloopSettings
    from fleet.responder import BrokerConfig

    monitor, _ = make_monitor(
        DataloopSettings(fleet_url=fleet_url, fleet_api_key=SecretStr(fleet_token))
    )
    return Ingestor(
        IngestStore(db.make_engine(url), blob_dir / "samples"),
        broker=BrokerConfig("127.0.0.1", port, "fleet", SERVICE_USERS["fleet"]),
        group="e2e",
        monitor=monitor,
        batch_size=100,
        batch_wait_s=0.2,
    )


def _digits() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    from cloud.datasets import load_dataset

    data = load_dataset("builtin:digits")
    return np.asarray(data.x, dtype=np.float32), np.asarray(data.y, dtype=np.int64)


def test_shift_alert_label_retrain_canary_improves_accuracy(loop: Loop) -> None:
    x, y = _digits()
    held_out = invert(x[list(HELD_OUT)])
    held_labels = y[list(HELD_OUT)]
    started = time.monotonic()

    # 1. train, compile, deploy
    loop.ok(loop.cloud.post("/datasets", json={"name": MODEL, "source": "builtin:digits"}), 201)
    train = loop.ok(
        loop.cloud.post(
            "/jobs/train", json={"model": MODEL, "dataset": MODEL, "training": SMALL_MLP}
        ),
        201,
    )
    trained = loop.wait_job(train["id"], timeout_s=120)
    assert trained["result"]["version"] == 1
    compile_job = loop.ok(
        loop.cloud.post(
            "/jobs/compile", json={"model": MODEL, "version": 1, "profiles": [PROFILE]}
        ),
        201,
    )
    compiled = loop.wait_job(compile_job["id"], timeout_s=240)
    (outcome,) = compiled["result"]["artifacts"]
    assert outcome["error"] is None and outcome["uploaded"], outcome
    v1 = outcome["artifact_id"]
    first = loop.ok(
        loop.fleet.post(
            "/deployments",
            json={
                "name": "digits-v1",
                "model_name": MODEL,
                "variants": {PROFILE: v1},
                "target": {"groups": ["lab"]},
                "policy": {"canary": 1, "waves": ["100%"], "job_timeout_s": 120},
            },
        ),
        201,
    )
    loop.wait_deployment(first["id"], timeout_s=120)
    loop.wait_serving(v1)

    # 2. accuracy on held-out shifted data before (no capture policy yet: nothing captured)
    before = float(np.mean(loop.predict(SHIFTED, held_out) == held_labels))
    clean_acc = float(np.mean(loop.predict(CLEAN, x[list(HELD_OUT)]) == held_labels))
    assert clean_acc >= 0.8, f"the small model should work on clean digits: {clean_acc:.3f}"
    assert before <= 1.0 - MARGIN - 0.1, f"already good on shifted data: {before:.3f}"

    # 3. capture policy and drift policy, then traffic
    policy = loop.ok(
        loop.cloud.put(
            f"/capture-policies/{MODEL}",
            json={
                "devices": list(DEVICES),
                "rules": {"low_confidence_below": 0.6, "every_nth": 2},
                "sketch_interval_s": 2.0,
                "batch_size": 50,
            },
        )
    )
    assert policy["model_version"] == 1, policy  # sketches on v1's training baseline
    assert {(d["device_id"], d["revision"], d["published"]) for d in policy["data"]} == {
        (device_id, 1, True) for device_id in DEVICES
    }, policy
    loop.ok(
        loop.cloud.put(
            f"/drift/policies/{MODEL}",
            json={"metric": DRIFT_METRIC, "threshold": DRIFT_THRESHOLD, "min_samples": MIN_SAMPLES},
        )
    )
    for agent in loop.agents.values():  # the retained desired state, applied
        applied = agent.state_dir / "capture" / "desired.json"
        wait_until(applied.exists, timeout_s=30, what=agent.log)
    warmup = x[list(WARMUP)]
    for device_id in DEVICES:
        loop.predict(device_id, warmup)
    # Longer than the sketch interval: the shifted traffic starts in a window of its own, so
    # no window mixes clean warm-up and shifted inputs (a mix would dilute its KS).
    time.sleep(3.0)
    traffic = x[list(TRAFFIC)]
    shifted_traffic = invert(traffic)
    oracle = {
        img.tobytes(): str(label)
        for img, label in zip(shifted_traffic, y[list(TRAFFIC)], strict=True)
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        clean_done = pool.submit(loop.predict, CLEAN, traffic)
        shifted_done = pool.submit(loop.predict, SHIFTED, shifted_traffic)
        clean_done.result(timeout=120)
        shifted_done.result(timeout=120)

    # 4. alert for cam-2 only; its samples arrive
    def alerts() -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = loop.ok(loop.cloud.get("/alerts"))["data"]
        return data

    wait_until(
        lambda: any(a["device_id"] == SHIFTED for a in alerts()),
        timeout_s=60,
        what=lambda: f"a drift alert for {SHIFTED}: {loop.cloud.get('/drift').text[:3000]}",
    )

    def scored(device_id: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = loop.ok(
            loop.cloud.get("/drift", params={"device": device_id, "model": MODEL})
        )["data"]
        return data

    # the clean device's windows of the same period were scored too, below the threshold
    wait_until(lambda: len(scored(CLEAN)) >= 2, timeout_s=30, what=lambda: str(scored(CLEAN)))
    time.sleep(3.0)  # the last windows of both devices
    print({d: [(s["n_samples"], round(s["score"], 3)) for s in scored(d)] for d in DEVICES})
    assert {a["device_id"] for a in alerts()} == {SHIFTED}, alerts()
    assert all(s["score"] < DRIFT_THRESHOLD for s in scored(CLEAN)), scored(CLEAN)
    assert max(s["score"] for s in scored(SHIFTED)) >= DRIFT_THRESHOLD
    # the scores reached the fleet too, where a rollout's max_drift gate reads them
    fleet_drift = {d: loop.ok(loop.fleet.get(f"/devices/{d}/state"))["drift"] for d in DEVICES}
    assert all(f["metric"] == DRIFT_METRIC and f["artifact_id"] == v1 for f in fleet_drift[SHIFTED])
    assert max(f["score"] for f in fleet_drift[SHIFTED]) >= DRIFT_THRESHOLD, fleet_drift
    assert fleet_drift[CLEAN] and max(f["score"] for f in fleet_drift[CLEAN]) < DRIFT_THRESHOLD

    def samples(device_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = loop.ok(
                loop.cloud.get(
                    "/samples",
                    params={"device": device_id, "model": MODEL, "offset": len(out), "limit": 500},
                )
            )
            out += page["data"]
            if not page["data"] or len(out) >= page["count"]:
                return out

    # The policy selects every 2nd inference (and low-confidence ones); the agent may drop
    # some under this burst (its capture queue), so wait for at least a quarter of the
    # shifted traffic and then for the count to settle.
    wanted = len(TRAFFIC) // 4
    wait_until(
        lambda: len(samples(SHIFTED)) >= wanted,
        timeout_s=60,
        what=lambda: f"{len(samples(SHIFTED))} of {wanted} samples from {SHIFTED}",
    )
    counts = [len(samples(SHIFTED))]

    def settled() -> bool:
        time.sleep(1.5)  # longer than the agent's drain and the consumer's batch wait
        counts.append(len(samples(SHIFTED)))
        return counts[-1] == counts[-2]

    wait_until(settled, timeout_s=30, what=lambda: f"samples still arriving: {counts}")

    # 5. tasks from the alerts and the shifted device's samples; the oracle labels them
    for alert in alerts():
        loop.ok(loop.cloud.post("/labeling/tasks", json={"alert_id": alert["id"]}), 200, 201)
    shifted_ids = [
        s["sample_id"]
        for s in samples(SHIFTED)
        if loop.sample_key(s["sample_id"]) in oracle  # the shifted traffic only
    ]
    loop.ok(loop.cloud.post("/labeling/tasks", json={"sample_ids": shifted_ids}), 200, 201)
    tasks = loop.ok(
        loop.cloud.get("/labeling/tasks", params={"model": MODEL, "state": "open", "limit": 1000})
    )["data"]
    assert {t["device_id"] for t in tasks} == {SHIFTED}, "only the drifted device's samples"
    # A warm-up (clean) capture inside an alert's window has no oracle label: skipped.
    answers = {t["id"]: oracle.get(loop.sample_key(t["sample_id"])) for t in tasks}
    n_labels = sum(label is not None for label in answers.values())
    assert n_labels >= wanted, (n_labels, len(tasks))
    # The run starts with the last label (the policy is evaluated after each one).
    loop.ok(
        loop.cloud.put(
            f"/retrain/policies/{MODEL}",
            json={"min_new_labels": n_labels, "training": RETRAIN_MLP},
        )
    )
    for task_id, label in answers.items():
        if label is None:
            loop.ok(loop.cloud.post(f"/labeling/tasks/{task_id}/skip"))
        else:
            body = {"label": label, "labeled_by": "oracle"}
            loop.ok(loop.cloud.post(f"/labeling/tasks/{task_id}/label", json=body))
    runs = loop.ok(loop.cloud.get("/retrain/runs", params={"model": MODEL}))["data"]
    assert len(runs) == 1 and runs[0]["state"] == "training", runs
    assert runs[0]["n_labels"] == n_labels and runs[0]["parent_version"] == 1, runs

    # 6. the run: training -> compiling -> deployed (ticks as a cron would send them)
    def run_state() -> dict[str, Any] | None:
        loop.ok(loop.cloud.post("/retrain/tick"))
        runs = loop.ok(loop.cloud.get("/retrain/runs", params={"model": MODEL}))["data"]
        if runs and runs[0]["state"] in ("deployed", "done", "failed", "rejected"):
            return dict(runs[0])
        return None

    run = wait_until(run_state, timeout_s=300, what=lambda: f"the retrain run\n{loop.logs()}")
    assert run["state"] == "deployed", run
    assert sorted(run["device_ids"]) == sorted(DEVICES), run
    assert run["version"] == 2 and run["profiles"] == [PROFILE], run
    retrained = loop.ok(loop.cloud.get(f"/jobs/{run['train_job_id']}"))
    assert retrained["state"] == "SUCCEEDED", retrained
    events = loop.ok(loop.cloud.get(f"/jobs/{run['train_job_id']}/events"))["data"]
    attempts = [e["message"] for e in events if e["message"].startswith("attempt ")]
    assert attempts, events  # leased and run by the worker subprocess
    dataset = loop.ok(loop.cloud.get("/datasets", params={"name": f"{MODEL}-relabeled"}))
    assert [d["n_samples"] for d in dataset["data"]] == [1797 + n_labels], dataset
    rolled = loop.wait_deployment(run["deployment_id"], timeout_s=120)
    assert [len(s) for s in rolled["stages"]] == [1, 1], rolled  # the canary, then the rest
    v2 = {d["artifact_id"] for d in rolled["devices"]}
    assert len(v2) == 1 and v1 not in v2, rolled
    loop.wait_serving(v2.pop())

    # 7. accuracy on the held-out shifted data through cam-2 improves
    after = float(np.mean(loop.predict(SHIFTED, held_out) == held_labels))
    assert after >= before + MARGIN, f"shifted accuracy {before:.3f} -> {after:.3f}"
    print(
        f"shifted accuracy {before:.3f} -> {after:.3f} (clean {clean_acc:.3f}); "
        f"{time.monotonic() - started:.0f} s"
    )
