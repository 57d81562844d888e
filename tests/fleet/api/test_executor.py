"""The deployment executor with a fake publisher: every action type, job updates, heartbeats
and presence, on SQLite and PostgreSQL (the real broker is test_deployment_e2e's)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from agent import protocol
from agent.protocol import (
    HardwareFacts,
    Heartbeat,
    JobNotify,
    JobState,
    JobUpdate,
    LatencySummary,
    LoadedModel,
    Status,
)
from fleet.executor import Executor
from fleet.responder import BrokerError
from fleet.rollout import (
    Abort,
    CancelJob,
    CannotRollback,
    Complete,
    Pause,
    RollbackDevice,
    StartJob,
)
from fleet.store import ArtifactStore

from ..conftest import Keys
from .conftest import Org
from .deploying import AVX512, GENERIC, Fleet, make_fleet


@dataclass
class FakePublisher:
    """Records publishes; ``fail`` makes the next ones raise BrokerError."""

    sent: list[tuple[str, JobNotify]] = field(default_factory=list)
    fail: bool = False

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float
    ) -> None:
        if self.fail:
            raise BrokerError("broker gone")
        assert qos == 1 and retain
        self.sent.append((topic, protocol.decode(JobNotify, payload)))

    def take(self) -> list[tuple[str, JobNotify]]:
        sent, self.sent = self.sent, []
        return sent


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    client: TestClient
    lab: Fleet
    executor: Executor
    publisher: FakePublisher
    clock: Clock

    def create(self, version: str = "v1", **changes: object) -> str:
        response = self.client.post(
            "/deployments", headers=self.lab.org.headers, json=self.lab.body(version, **changes)
        )
        assert response.status_code == 201, response.text
        deployment_id: str = response.json()["id"]
        return deployment_id

    def read(self, deployment_id: str) -> dict[str, object]:
        data: dict[str, object] = self.client.get(
            f"/deployments/{deployment_id}", headers=self.lab.org.headers
        ).json()
        return data

    def command(self, deployment_id: str, name: str) -> dict[str, object]:
        response = self.client.post(
            f"/deployments/{deployment_id}/{name}", headers=self.lab.org.headers
        )
        assert response.status_code == 200, response.text
        data: dict[str, object] = response.json()
        return data

    def update(self, job: JobNotify, device_id: str, state: JobState, reason: str = "") -> None:
        message = JobUpdate(
            job_id=job.job_id,
            device_id=device_id,
            artifact_id=job.artifact_id,
            state=state,
            reason=reason or None,
        )
        self.executor.enqueue(protocol.jobs_update(device_id), message.to_bytes())

    def tick(self, seconds: float = 1.0) -> None:
        self.clock.now += seconds
        self.executor.tick()


@pytest.fixture()
def rig(
    app: FastAPI,
    client: TestClient,
    org_a: Org,
    keys: Keys,
    tmp_path: Path,
    artifact_store: ArtifactStore,
) -> Rig:
    lab = make_fleet(client, org_a, keys, tmp_path)
    publisher = FakePublisher()
    clock = Clock()
    executor = Executor(app.state.engine, store=artifact_store, publisher=publisher, clock=clock)
    return Rig(client, lab, executor, publisher, clock)


def _by_device(sent: list[tuple[str, JobNotify]]) -> dict[str, JobNotify]:
    return {protocol.parse_device_topic(topic)[0]: job for topic, job in sent}


def _succeed_all(rig: Rig, jobs: dict[str, JobNotify]) -> None:
    for device_id, job in jobs.items():
        rig.update(job, device_id, JobState.IN_PROGRESS)
        done = JobState.ROLLED_BACK if job.kind == "rollback" else JobState.SUCCEEDED
        rig.update(job, device_id, done)  # as the agent ends them


def test_canary_then_rest_each_with_its_variant(rig: Rig, artifact_store: ArtifactStore) -> None:
    deployment_id = rig.create()
    rig.tick()
    canary = _by_device(rig.publisher.take())
    assert list(canary) == ["avx-1"]
    job = canary["avx-1"]
    assert job.kind == "deploy" and job.role == "primary"
    assert job.artifact_id == rig.lab.v1[AVX512] and job.profile == AVX512
    assert job.job_id.startswith(deployment_id.replace("-", "") + ".avx-1.")
    assert artifact_store.is_entitled("avx-1", job.artifact_id)
    assert rig.read(deployment_id)["phase"] == "CANARY"
    rig.tick()
    assert rig.publisher.take() == []  # waits for the canary
    _succeed_all(rig, canary)
    rig.tick()
    rest = _by_device(rig.publisher.take())
    assert sorted(rest) == ["gen-1", "gen-2"]
    assert {j.artifact_id for j in rest.values()} == {rig.lab.v1[GENERIC]}
    _succeed_all(rig, rest)
    rig.tick()
    done = rig.read(deployment_id)
    assert done["phase"] == "SUCCEEDED"
    assert done["counts"]["SUCCEEDED"] == 3  # type: ignore[index]
    assert any(isinstance(a, Complete) for a in rig.executor.performed)
    state = rig.client.get("/devices/gen-1/state", headers=rig.lab.org.headers).json()
    assert state["desired_models"] == {"m": rig.lab.v1[GENERIC]}
    assert state["in_sync"] is False  # nothing reported yet


def test_heartbeats_and_status_update_reported_state(rig: Rig) -> None:
    beat = Heartbeat(
        device_id="gen-1",
        agent_version="0.1.0",
        uptime_s=5.0,
        models=[LoadedModel(name="m", version="1", artifact_id=rig.lab.v1[GENERIC], runtime="tvm")],
        hardware=HardwareFacts(arch="x86_64", profile=GENERIC, cpu_count=2),
    )
    rig.executor.enqueue(protocol.heartbeat("gen-1"), beat.to_bytes())
    rig.executor.enqueue(protocol.heartbeat("gen-2"), b"not json")  # dropped
    rig.executor.enqueue(protocol.heartbeat("ghost"), beat.to_bytes())  # lies about its id
    rig.tick()
    state = rig.client.get("/devices/gen-1/state", headers=rig.lab.org.headers).json()
    assert state["online"] is True and state["last_seen"] is not None
    assert state["diff"] == [
        {
            "model_name": "m",
            "desired_artifact_id": None,
            "reported_artifact_id": rig.lab.v1[GENERIC],
            "reported_version": "1",
            "in_sync": True,
        }
    ]
    offline = Status(device_id="gen-1", state="offline", agent_version="0.1.0")
    rig.executor.enqueue(protocol.status("gen-1"), offline.to_bytes())
    rig.tick()
    state = rig.client.get("/devices/gen-1/state", headers=rig.lab.org.headers).json()
    assert state["online"] is False
    gen2 = rig.client.get("/devices/gen-2/state", headers=rig.lab.org.headers).json()
    assert gen2["last_seen"] is None
    # Deleting a device deletes its report: a re-registration starts afresh.
    assert rig.client.delete("/devices/gen-1", headers=rig.lab.org.headers).status_code == 204
    again = {"device_id": "gen-1", "profile": GENERIC}
    assert rig.client.post("/devices", headers=rig.lab.org.headers, json=again).status_code == 201
    state = rig.client.get("/devices/gen-1/state", headers=rig.lab.org.headers).json()
    assert (state["last_seen"], state["reported_models"]) == (None, [])


def test_failed_canary_aborts_and_touches_no_other_device(rig: Rig) -> None:
    deployment_id = rig.create()
    rig.tick()
    canary = _by_device(rig.publisher.take())
    rig.update(canary["avx-1"], "avx-1", JobState.FAILED, "activation failed")
    rig.tick()
    for _ in range(3):
        rig.tick()
    assert rig.publisher.take() == []
    read = rig.read(deployment_id)
    assert read["phase"] == "ABORTED"
    assert [a for a in rig.executor.performed if isinstance(a, Abort)]
    devices = {d["device_id"]: d for d in read["devices"]}  # type: ignore[attr-defined]
    assert devices["avx-1"]["state"] == "FAILED"
    assert devices["avx-1"]["reason"] == "activation failed"
    assert devices["gen-1"]["state"] == devices["gen-2"]["state"] == "NOT_STARTED"


def test_cancel_marks_in_flight_jobs_and_publishes_nothing(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    deployment_id = rig.create()
    rig.tick()
    canary = _by_device(rig.publisher.take())
    rig.update(canary["avx-1"], "avx-1", JobState.IN_PROGRESS)
    rig.tick()
    assert rig.command(deployment_id, "cancel")["phase"] == "CANCELED"
    with caplog.at_level(logging.INFO, logger="fleet.executor"):
        rig.tick()
    assert rig.publisher.take() == []
    assert [a for a in rig.executor.performed if isinstance(a, CancelJob)]
    assert "cannot cancel a job mid-activation" in caplog.text
    # A late result of the canceled job is dropped, not an error.
    rig.update(canary["avx-1"], "avx-1", JobState.SUCCEEDED)
    rig.tick()
    assert rig.read(deployment_id)["counts"]["CANCELED"] == 1  # type: ignore[index]


def test_health_gate_pauses_from_heartbeats(rig: Rig) -> None:
    policy = {
        "canary": 1,
        "waves": ["100%"],
        "health_gates": {"max_p95_latency_ms": 10, "action": "pause", "min_samples": 5},
    }
    deployment_id = rig.create(policy=policy)
    rig.tick()
    canary = _by_device(rig.publisher.take())
    artifact = canary["avx-1"].artifact_id
    beat = Heartbeat(
        device_id="avx-1",
        agent_version="0.1.0",
        uptime_s=5.0,
        models=[LoadedModel(name="m", version="1", artifact_id=artifact, runtime="tvm")],
        hardware=HardwareFacts(arch="x86_64", profile=AVX512, cpu_count=2),
        inference={"m": LatencySummary(count=50, p50_ms=40.0, p95_ms=90.0, p99_ms=99.0)},
    )
    rig.executor.enqueue(protocol.heartbeat("avx-1"), beat.to_bytes())
    _succeed_all(rig, canary)
    rig.tick()
    read = rig.read(deployment_id)
    assert read["phase"] == "PAUSED" and "health gate" in str(read["reason"])
    assert [a for a in rig.executor.performed if isinstance(a, Pause)]
    assert rig.publisher.take() == []


def test_rollback_returns_devices_to_the_previous_version(rig: Rig) -> None:
    first = rig.create("v1", policy={"canary": 3, "waves": ["100%"]})
    rig.tick()
    _succeed_all(rig, _by_device(rig.publisher.take()))
    rig.tick()
    assert rig.read(first)["phase"] == "SUCCEEDED"
    second = rig.create("v2", policy={"canary": 3, "waves": ["100%"]})
    rig.tick()
    v2 = _by_device(rig.publisher.take())
    assert {d: j.artifact_id for d, j in v2.items()} == {
        "avx-1": rig.lab.v2[AVX512],
        "gen-1": rig.lab.v2[GENERIC],
        "gen-2": rig.lab.v2[GENERIC],
    }
    _succeed_all(rig, v2)
    rig.tick()
    assert rig.command(second, "rollback")["phase"] == "ROLLING_BACK"
    rig.tick()
    back = _by_device(rig.publisher.take())
    assert {d: (j.kind, j.artifact_id) for d, j in back.items()} == {
        "avx-1": ("rollback", rig.lab.v1[AVX512]),
        "gen-1": ("rollback", rig.lab.v1[GENERIC]),
        "gen-2": ("rollback", rig.lab.v1[GENERIC]),
    }
    assert len([a for a in rig.executor.performed if isinstance(a, RollbackDevice)]) == 3
    _succeed_all(rig, back)
    rig.tick()
    read = rig.read(second)
    assert read["phase"] == "ROLLED_BACK"
    assert read["reason"] == "rolled back 3 of 3 touched devices"
    assert {d["rollback_state"] for d in read["devices"]} == {"ROLLED_BACK"}  # type: ignore[attr-defined]
    state = rig.client.get("/devices/avx-1/state", headers=rig.lab.org.headers).json()
    assert state["desired_models"] == {"m": rig.lab.v1[AVX512]}
    # The first rollout had no previous version: rolling it back cannot reinstall anything.
    assert rig.command(first, "rollback")["phase"] == "ROLLED_BACK"
    rig.tick()
    assert len([a for a in rig.executor.performed if isinstance(a, CannotRollback)]) == 3
    assert rig.publisher.take() == []


def test_publish_failure_is_logged_and_the_loop_goes_on(rig: Rig) -> None:
    deployment_id = rig.create()
    rig.publisher.fail = True
    rig.tick()
    assert [a for a in rig.executor.performed if isinstance(a, StartJob)]
    assert rig.read(deployment_id)["phase"] == "CANARY"
    rig.publisher.fail = False
    rig.tick()  # nothing re-sent: the planner's job timeout judges the job
    assert rig.publisher.take() == []


def test_thread_runs_ticks(rig: Rig) -> None:
    rig.executor.interval = 0.05
    rig.create()
    rig.executor.start()
    try:
        for _ in range(100):
            if rig.publisher.sent:
                break
            time.sleep(0.05)
    finally:
        rig.executor.stop()
    assert len(rig.publisher.sent) == 1
    assert rig.executor.errors == 0
