"""Canceling jobs on a real agent over a real broker (the fleet's ``JobNotify`` with
``cancel``): a download stops, a finished job is reported as it ended, an unseen job is
never run, and the active version stays."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.jobs import cancel_job
from tests.agent.conftest import Artifacts
from tests.agent.harness import AgentProcess, Fleet, make_fleet

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]


@pytest.fixture()
def fleet(tmp_path: Path, artifacts: Artifacts) -> Iterator[Fleet]:
    f = make_fleet(tmp_path / "fleet", artifacts.public)
    f.start()
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture()
def agent(fleet: Fleet, tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(
        fleet, "dev-1", tmp_path / "devices" / "dev-1" / "state", chunk_size=64 * 1024
    )
    process.start()
    try:
        yield process
    finally:
        process.kill()


def _cancel(fleet: Fleet, artifact_id: str, job_id: str) -> None:
    cancel_job(
        fleet.config("fleet"),
        store=fleet.store,
        device_id="dev-1",
        artifact_id=artifact_id,
        job_id=job_id,
    )


def _states(fleet: Fleet, job_id: str) -> list[str]:
    assert fleet.watcher is not None
    return [u.state.value for u in fleet.watcher.updates(job_id)]


def _wait_downloading(fleet: Fleet, job_id: str, timeout: float = 60) -> None:
    assert fleet.watcher is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(u.chunks_done for u in fleet.watcher.updates(job_id)):
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reported download progress")


def test_cancel_stops_a_download_and_keeps_the_active_version(
    fleet: Fleet, agent: AgentProcess, artifacts: Artifacts
) -> None:
    v1 = fleet.store.put_bundle(artifacts.v1).artifact_id
    fleet.deploy("dev-1", v1, job_id="job-v1")
    assert fleet.wait("job-v1", ("SUCCEEDED", "FAILED")).state == "SUCCEEDED", agent.log()
    big = fleet.store.put_bundle(artifacts.big).artifact_id
    fleet.deploy("dev-1", big, job_id="job-big")
    _wait_downloading(fleet, "job-big")
    assert fleet.responder is not None
    fleet.responder.stop()  # the download stalls: the cancel surely lands mid-transfer
    _cancel(fleet, big, "job-big")
    done = fleet.wait("job-big", ("CANCELED", "SUCCEEDED", "FAILED"), timeout=30)
    assert done.state == "CANCELED", agent.log()
    assert done.reason == "canceled by the fleet"
    status: dict[str, Any] = agent.status()
    assert status["mlp"]["active"]["artifact_id"] == v1  # the model it served stays
    assert status.get("big", {}).get("active") is None  # nothing of the canceled one is active
    assert not list((agent.state_dir / "transfers").glob("*.part"))
    # The same job notified again (a stale retained copy, a replay) is not run again.
    fleet.start_responder()
    fleet.deploy("dev-1", big, job_id="job-big")
    time.sleep(1.0)
    assert _states(fleet, "job-big")[-1] == "CANCELED"
    assert "SUCCEEDED" not in _states(fleet, "job-big")


def test_cancel_of_a_finished_job_reports_it_as_it_ended(
    fleet: Fleet, agent: AgentProcess, artifacts: Artifacts
) -> None:
    v1 = fleet.store.put_bundle(artifacts.v1).artifact_id
    fleet.deploy("dev-1", v1, job_id="job-v1")
    assert fleet.wait("job-v1", ("SUCCEEDED", "FAILED")).state == "SUCCEEDED", agent.log()
    _cancel(fleet, v1, "job-v1")
    deadline = time.monotonic() + 30
    while _states(fleet, "job-v1").count("SUCCEEDED") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _states(fleet, "job-v1").count("SUCCEEDED") == 2  # activated: stays, said again
    assert "CANCELED" not in _states(fleet, "job-v1")


def test_a_job_canceled_before_the_agent_saw_it_never_runs(
    fleet: Fleet, agent: AgentProcess, artifacts: Artifacts
) -> None:
    v1 = fleet.store.put_bundle(artifacts.v1).artifact_id
    agent.stop()
    _cancel(fleet, v1, "job-never")  # retained: the agent reads it when it is back
    agent.start()
    assert fleet.wait("job-never", ("CANCELED", "SUCCEEDED", "FAILED")).state == "CANCELED"
    fleet.deploy("dev-1", v1, job_id="job-never")  # a late copy of the job itself
    time.sleep(1.0)
    assert set(_states(fleet, "job-never")) == {"CANCELED"}
    assert agent.status() == {}  # nothing was installed
