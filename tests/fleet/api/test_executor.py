"""The deployment executor with a fake publisher: every action type, job updates, heartbeats
and presence, on SQLite and PostgreSQL (the real broker is test_deployment_e2e's)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session

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
from fleet.models import Deployment
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

    def read_all(self) -> list[str]:
        data = self.client.get("/deployments", headers=self.lab.org.headers).json()
        return [d["id"] for d in data["data"]]

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


def test_one_batch_of_mixed_reports_keeps_desired_state(rig: Rig) -> None:
    """A pass writes heartbeats, statuses and both at once for devices with and without a
    report row (batched by the columns each sets); the desired state is left alone."""
    deployment_id = rig.create()
    rig.tick()
    _succeed_all(rig, _by_device(rig.publisher.take()))
    rig.tick()
    _succeed_all(rig, _by_device(rig.publisher.take()))
    rig.tick()
    assert rig.read(deployment_id)["phase"] == "SUCCEEDED"

    def beat(device_id: str) -> bytes:
        return Heartbeat(
            device_id=device_id,
            agent_version="0.1.0",
            uptime_s=1.0,
            models=[
                LoadedModel(name="m", version="1", artifact_id=rig.lab.v1[GENERIC], runtime="tvm")
            ],
            hardware=HardwareFacts(arch="x86_64", profile=GENERIC, cpu_count=2),
        ).to_bytes()

    def status(device_id: str, state: str) -> bytes:
        return Status(device_id=device_id, state=state, agent_version="0.1.0").to_bytes()  # type: ignore[arg-type]

    rig.executor.enqueue(protocol.heartbeat("gen-1"), beat("gen-1"))  # heartbeat only
    rig.executor.enqueue(protocol.heartbeat("gen-2"), beat("gen-2"))  # heartbeat, then
    rig.executor.enqueue(protocol.status("gen-2"), status("gen-2", "offline"))  # offline
    rig.executor.enqueue(protocol.status("pi-1"), status("pi-1", "online"))  # status only
    rig.executor.enqueue(protocol.status("nobody"), status("nobody", "online"))  # unregistered
    rig.tick()
    states = {
        d: rig.client.get(f"/devices/{d}/state", headers=rig.lab.org.headers).json()
        for d in ("gen-1", "gen-2", "pi-1")
    }
    assert states["gen-1"]["online"] is True and states["gen-1"]["in_sync"] is True
    assert states["gen-1"]["desired_models"] == {"m": rig.lab.v1[GENERIC]}
    assert states["gen-2"]["online"] is False  # the status came after the heartbeat
    assert states["gen-2"]["reported_models"][0]["artifact_id"] == rig.lab.v1[GENERIC]
    assert states["gen-2"]["desired_models"] == {"m": rig.lab.v1[GENERIC]}
    assert states["pi-1"]["online"] is True and states["pi-1"]["reported_models"] == []
    assert all(s["last_seen"] is not None for s in states.values())
    assert rig.client.get("/devices/nobody/state", headers=rig.lab.org.headers).status_code == 404


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


def test_cancel_publishes_a_retained_cancel_of_each_job_in_flight(
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
    sent = _by_device(rig.publisher.take())
    assert list(sent) == ["avx-1"]  # only the job in flight; untouched devices get nothing
    cancel = sent["avx-1"]
    assert cancel.cancel is True
    assert (cancel.job_id, cancel.artifact_id) == (
        canary["avx-1"].job_id,
        canary["avx-1"].artifact_id,
    )
    assert [a for a in rig.executor.performed if isinstance(a, CancelJob)]
    assert f"canceling job {cancel.job_id} of avx-1" in caplog.text
    # A late result of the canceled job is dropped, not an error.
    rig.update(canary["avx-1"], "avx-1", JobState.SUCCEEDED)
    rig.tick()
    assert rig.read(deployment_id)["counts"]["CANCELED"] == 1  # type: ignore[index]
    rig.tick()
    assert rig.publisher.take() == []  # sent once


def test_job_timeout_cancels_the_job_on_the_device(rig: Rig) -> None:
    deployment_id = rig.create(policy={"canary": 1, "waves": ["100%"], "job_timeout_s": 30})
    assert rig.executor.tick() == rig.clock.now + 30  # the canary's timeout is the next timer
    canary = _by_device(rig.publisher.take())
    rig.tick(31)
    sent = _by_device(rig.publisher.take())
    assert sent["avx-1"].cancel and sent["avx-1"].job_id == canary["avx-1"].job_id
    assert rig.read(deployment_id)["phase"] == "ABORTED"


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


def _wait_sent(rig: Rig, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(rig.publisher.sent) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_thread_steps_on_messages_not_on_a_tick(rig: Rig) -> None:
    rig.executor.interval = 60.0  # no polling within this test: only wakes move it
    rig.executor.clock = time.time
    rig.create()
    rig.executor.start()
    try:
        _wait_sent(rig, 1)  # the first pass runs at start
        canary = _by_device(rig.publisher.take())
        assert list(canary) == ["avx-1"]
        passes = rig.executor.passes
        time.sleep(0.3)
        assert rig.executor.passes == passes  # idle: the canary's timeout is far off
        started = time.monotonic()
        _succeed_all(rig, canary)  # the MQTT callback's enqueue wakes the loop
        _wait_sent(rig, 2)
        assert time.monotonic() - started < 5.0
        assert sorted(_by_device(rig.publisher.take())) == ["gen-1", "gen-2"]
        deployment_id = rig.read_all()[0]
        rig.executor.wake()  # what the API does after a command
        assert rig.read(deployment_id)["phase"] == "ROLLING"
    finally:
        rig.executor.stop()
    assert rig.executor.errors == 0


@dataclass
class Pending:
    """What ``publish_async`` returns: settles when the test says so."""

    topic: str
    failure: str | None = None
    acked: bool = False

    def settled(self) -> bool:
        return self.acked or self.failure is not None

    def wait(self, timeout: float) -> str | None:
        if not self.settled():
            return f"no PUBACK for {self.topic} in {timeout:g} s"
        return self.failure


@dataclass
class PipelinedPublisher(FakePublisher):
    """A publisher with ``publish_async``: never blocks; the test settles each publish."""

    pending: list[Pending] = field(default_factory=list)

    def publish_async(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> Pending:
        assert qos == 1 and retain
        self.sent.append((topic, protocol.decode(JobNotify, payload)))
        self.pending.append(Pending(topic))
        return self.pending[-1]

    def settle(self, refuse: frozenset[str] = frozenset()) -> None:
        for item in self.pending:
            if item.topic in refuse:
                item.failure = "refused"
            else:
                item.acked = True
        self.pending = []


def test_a_wave_is_published_without_waiting_and_failures_undone_later(
    rig: Rig, artifact_store: ArtifactStore
) -> None:
    publisher = PipelinedPublisher()
    rig.executor.publisher = publisher
    rig.publisher = publisher
    deployment_id = rig.create(policy={"canary": 1, "waves": ["100%"], "job_timeout_s": 60})
    rig.tick()
    canary = _by_device(publisher.take())
    publisher.settle()
    _succeed_all(rig, canary)
    due = rig.executor.tick()  # the wave: both jobs handed over, no PUBACK yet
    assert sorted(_by_device(publisher.take())) == ["gen-1", "gen-2"]
    assert due == rig.clock.now + rig.executor.publish_timeout  # when unacked ones expire
    generic = rig.lab.v1[GENERIC]
    grants = artifact_store.root / "grants" / "artifacts" / f"{generic}.json"
    assert json.loads(grants.read_text())["devices"] == ["gen-1", "gen-2"]  # one write
    for device_id in ("gen-1", "gen-2"):  # recorded while the acknowledgements come in
        state = rig.client.get(f"/devices/{device_id}/state", headers=rig.lab.org.headers)
        assert state.json()["desired_models"] == {"m": generic}
    publisher.settle(refuse=frozenset({protocol.jobs_notify("gen-2")}))
    rig.tick()  # the next pass judges them: gen-2's job never reached the broker
    assert rig.executor.publish_failures == 1
    assert json.loads(grants.read_text())["devices"] == ["gen-1"]  # its grant withdrawn
    assert artifact_store.is_entitled("gen-1", generic)
    assert not artifact_store.is_entitled("gen-2", generic)
    gen2 = rig.client.get("/devices/gen-2/state", headers=rig.lab.org.headers).json()
    assert gen2["desired_models"] == {}  # and its desired state undone
    assert rig.read(deployment_id)["phase"] == "ROLLING"


def test_an_unacknowledged_publish_fails_at_its_deadline(rig: Rig) -> None:
    publisher = PipelinedPublisher()
    rig.executor.publisher = publisher
    rig.create()
    rig.tick()
    assert rig.executor.publish_failures == 0
    rig.tick(rig.executor.publish_timeout - 1)
    assert rig.executor.publish_failures == 0  # still within its time
    rig.tick(2)
    assert rig.executor.publish_failures == 1
    state = rig.client.get("/devices/avx-1/state", headers=rig.lab.org.headers).json()
    assert state["desired_models"] == {}


def _drift(
    artifact_id: str, score: float, *, samples: int = 500, hour: int = 1
) -> dict[str, object]:
    return {
        "model_name": "m",
        "artifact_id": artifact_id,
        "metric": "psi",
        "score": score,
        "samples": samples,
        "window_start": f"2026-11-26T{hour - 1:02d}:00:00Z",
        "window_end": f"2026-11-26T{hour:02d}:00:00Z",
    }


@pytest.mark.parametrize(
    ("which", "score", "samples", "paused"),
    [
        ("new", 0.5, 500, True),  # the canary's new artifact drifts: the gate fires
        ("new", 0.1, 500, False),  # under max_drift
        ("new", 0.5, 50, False),  # too few samples behind the score
        ("old", 0.9, 500, False),  # a score of another artifact is not the new version's
    ],
)
def test_drift_gate_pauses_on_posted_scores(
    rig: Rig, which: str, score: float, samples: int, paused: bool
) -> None:
    policy = {
        "canary": 1,
        "waves": ["100%"],
        "health_gates": {"max_drift": 0.2, "action": "pause", "min_samples": 100},
    }
    deployment_id = rig.create("v2", policy=policy)
    rig.tick()
    canary = _by_device(rig.publisher.take())
    assert list(canary) == ["avx-1"]
    artifact = rig.lab.v2[AVX512] if which == "new" else rig.lab.v1[AVX512]
    posted = rig.client.post(
        "/devices/avx-1/drift",
        headers=rig.lab.org.headers,
        json=_drift(artifact, score, samples=samples),
    )
    assert posted.status_code == 201, posted.text
    rig.update(canary["avx-1"], "avx-1", JobState.IN_PROGRESS)
    rig.update(canary["avx-1"], "avx-1", JobState.SUCCEEDED)
    rig.tick()
    read = rig.read(deployment_id)
    if paused:
        assert read["phase"] == "PAUSED"
        assert "avx-1: drift 0.5 is above max_drift 0.2 (500 samples)" in str(read["reason"])
        assert rig.publisher.take() == []  # the wave did not start
    else:
        assert read["phase"] == "ROLLING"
        assert sorted(_by_device(rig.publisher.take())) == ["gen-1", "gen-2"]


def _version(rig: Rig, deployment_id: str) -> int:
    with Session(rig.executor.engine) as session:
        row = session.get(Deployment, uuid.UUID(deployment_id))
        assert row is not None
        return row.version


def test_idle_passes_keep_the_stored_state_and_commands_still_land(rig: Rig) -> None:
    deployment_id = rig.create()
    rig.tick()
    canary = _by_device(rig.publisher.take())
    rig.update(canary["avx-1"], "avx-1", JobState.IN_PROGRESS)
    rig.tick()
    saved = _version(rig, deployment_id)
    skipped = rig.executor.skipped_saves
    for _ in range(3):  # nothing new (e.g. heartbeats only): the state is not rewritten
        rig.executor.enqueue(protocol.status("gen-1"), b"")
        rig.executor.tick()
    assert _version(rig, deployment_id) == saved
    assert rig.executor.skipped_saves == skipped + 3
    # The API moves the row on (pause): the executor reads it whole instead of its copy.
    assert rig.command(deployment_id, "pause")["phase"] == "PAUSED"
    rig.update(canary["avx-1"], "avx-1", JobState.SUCCEEDED)
    rig.tick()
    read = rig.read(deployment_id)
    assert read["phase"] == "PAUSED" and read["counts"]["SUCCEEDED"] == 1  # type: ignore[index]
    assert rig.publisher.take() == []  # paused: the rest is not started
    assert rig.command(deployment_id, "resume")["phase"] in ("CANARY", "ROLLING")
    rig.tick()
    assert sorted(_by_device(rig.publisher.take())) == ["gen-1", "gen-2"]
