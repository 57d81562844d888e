"""Workers: the queue (exclusive claims, leases, the reaper) on SQLite and PostgreSQL with
small runners of the tests' own, then real jobs: a dataset that does not fit the model,
cancel of a running training, HPO finishing in its parent, and a worker subprocess killed
with SIGKILL mid-job."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, update
from sqlmodel import Session, col

from cloud import crud, db
from cloud.errors import DatasetError
from cloud.jobs import JobContext, Outcome
from cloud.models import Job, JobKind, JobState
from cloud.settings import CloudSettings
from cloud.worker import Worker
from fleet.models import utcnow

from .cloud_service import (
    MLP,
    WorkerProcess,
    api_client,
    database,
    drain,
    make_settings,
    wait_for,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CloudSettings]:
    with database(request.param, tmp_path) as url:
        yield make_settings(tmp_path, url, lease_s=1.0)


@pytest.fixture
def engine(settings: CloudSettings) -> Iterator[Engine]:
    engine = db.make_engine(settings.resolved_database_url())
    yield engine
    engine.dispose()


def _enqueue(engine: Engine, n: int = 1, *, max_attempts: int = 1) -> list[int]:
    with Session(engine) as session:
        jobs = [
            crud.enqueue_job(session, kind=JobKind.TRAIN, spec={"n": i}, max_attempts=max_attempts)
            for i in range(n)
        ]
        session.commit()
        return [j.id or 0 for j in jobs]


def _job(engine: Engine, job_id: int) -> Job:
    with Session(engine) as session:
        job = crud.get_job(session, job_id=job_id)
        assert job is not None
        return job


def _messages(engine: Engine, job_id: int) -> list[str]:
    with Session(engine) as session:
        events, _ = crud.list_events(session, job_id=job_id)
        return [e.message for e in events]


def _expire(engine: Engine, job_id: int) -> None:
    with Session(engine) as session:
        session.execute(
            update(Job)
            .where(col(Job.id) == job_id)
            .values(lease_expires_at=utcnow().replace(year=2000))
        )
        session.commit()


# ---------------------------------------------------------------- the queue


def test_claims_are_exclusive(settings: CloudSettings, engine: Engine) -> None:
    ids = _enqueue(engine, 12)
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        worker = Worker(settings, worker_id=name, engine=engine)
        while (job := worker.claim()) is not None:
            with lock:
                claimed.append((name, job.id or 0))

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(job_id for _, job_id in claimed) == ids
    for name, job_id in claimed:
        job = _job(engine, job_id)
        assert (job.state, job.worker_id, job.attempts) == (JobState.RUNNING, name, 1)
        assert job.lease_expires_at is not None and job.lease_expires_at > utcnow()


def test_runner_results_failures_and_crashes(settings: CloudSettings, engine: Engine) -> None:
    ok, failing, crashing, bad_commit = _enqueue(engine, 4)

    def runner(ctx: JobContext) -> Outcome:
        n = ctx.job.spec["n"]
        ctx.log(f"job {n} running")
        ctx.progress(0.5)
        if n == 1:
            raise DatasetError("dataset shape [5] does not fit 'cnn'")
        if n == 2:
            raise RuntimeError("boom")

        def commit(session: Session) -> dict[str, Any]:
            if n == 3:
                raise ValueError("registry write failed")
            return {"registered": True}

        return Outcome(result={"n": n}, commit=commit)

    worker = Worker(settings, runners={JobKind.TRAIN: runner}, engine=engine)
    assert worker.run(exit_when_idle=True) == 4
    done = _job(engine, ok)
    assert (done.state, done.result, done.progress, done.error) == (
        JobState.SUCCEEDED,
        {"n": 0, "registered": True},
        1.0,
        None,
    )
    assert done.worker_id is None and done.lease_expires_at is None and done.finished_at
    assert _messages(engine, ok)[1:] == ["job 0 running", "SUCCEEDED"]
    assert _job(engine, failing).error == "dataset shape [5] does not fit 'cnn'"
    assert _job(engine, failing).state == JobState.FAILED
    assert _job(engine, crashing).error == "RuntimeError: boom"
    assert any("Traceback" in m for m in _messages(engine, crashing))
    failed_commit = _job(engine, bad_commit)
    assert failed_commit.state == JobState.FAILED
    assert failed_commit.error == "recording the result failed: ValueError: registry write failed"
    assert failed_commit.result is None


def test_expired_lease_is_requeued_then_failed(settings: CloudSettings, engine: Engine) -> None:
    (job_id,) = _enqueue(engine, max_attempts=2)
    ghost = Worker(settings, worker_id="ghost", engine=engine)
    reaper = Worker(settings, worker_id="reaper", engine=engine, runners={})
    assert ghost.claim() is not None
    reaper.maintain()
    assert _job(engine, job_id).state == JobState.RUNNING  # lease still valid
    _expire(engine, job_id)
    reaper.maintain()
    job = _job(engine, job_id)
    assert (job.state, job.worker_id, job.attempts, job.error) == (JobState.QUEUED, None, 1, None)
    assert "worker ghost lost (lease expired at" in _messages(engine, job_id)[-1]
    assert "re-queued (attempt 1 of 2 used)" in _messages(engine, job_id)[-1]
    assert ghost.claim() is not None
    _expire(engine, job_id)
    reaper.maintain()
    job = _job(engine, job_id)
    assert job.state == JobState.FAILED
    assert job.error is not None and job.error.startswith("worker ghost lost (lease expired at ")
    # The lost worker cannot overwrite what the reaper decided.
    with Session(engine) as session:
        assert not crud.finish_job(
            session, job_id=job_id, worker_id="ghost", state=JobState.SUCCEEDED
        )
        assert crud.renew_lease(session, job_id=job_id, worker_id="ghost", lease_s=5) is None


def _blocking_runner(started: threading.Event) -> Any:
    def runner(ctx: JobContext) -> Outcome:
        started.set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ctx.check_stop("while blocking")
            time.sleep(0.05)
        raise AssertionError("should_stop never turned true")

    return runner


def test_cancel_and_stop_a_running_job(settings: CloudSettings, engine: Engine) -> None:
    canceled, stopped = _enqueue(engine, 2)
    started = threading.Event()
    worker = Worker(
        settings, runners={JobKind.TRAIN: _blocking_runner(started)}, engine=engine, poll_s=0.05
    )
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1})
    thread.start()
    assert started.wait(30)
    with Session(engine) as session:
        job = crud.get_job(session, job_id=canceled)
        assert job is not None
        crud.request_cancel(session, job=job)
        session.commit()
    thread.join(timeout=30)
    job = _job(engine, canceled)
    assert job.state == JobState.CANCELED
    assert job.error == f"job {canceled} canceled while blocking"
    # A stopping worker (SIGTERM) gives its job back without using up the attempt.
    started.clear()
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert started.wait(30)
    worker.stop()
    thread.join(timeout=30)
    job = _job(engine, stopped)
    assert (job.state, job.attempts, job.worker_id) == (JobState.QUEUED, 0, None)
    assert "job re-queued" in _messages(engine, stopped)[-1]


# ---------------------------------------------------------------- real jobs


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Iterator[CloudSettings]:
    with database("sqlite", tmp_path) as url:
        yield make_settings(tmp_path, url)


def test_dataset_that_does_not_fit_fails_the_job(
    sqlite_settings: CloudSettings, tmp_path: Path
) -> None:
    source = tmp_path / "flat.npz"
    np.savez(source, x=np.random.default_rng(0).random((30, 5)), y=np.arange(30) % 3)
    with api_client(sqlite_settings) as client:
        assert client.post("/datasets", json={"name": "flat", "source": str(source)}).is_success
        body = {
            "model": "m",
            "dataset": "flat",
            "training": {**MLP, "architecture": "cnn", "hparams": {}},
        }
        job = client.post("/jobs/train", json=body).json()
        drain(sqlite_settings)
        done = client.get(f"/jobs/{job['id']}").json()
        assert client.get("/models").json()["count"] == 0
    assert done["state"] == "FAILED"
    assert "architecture 'cnn' needs image inputs" in done["error"]
    assert "input shape is [5]" in done["error"]


def test_cancel_running_training(sqlite_settings: CloudSettings) -> None:
    with api_client(sqlite_settings) as client:
        client.post("/datasets", json={"name": "digits", "source": "builtin:digits"})
        body = {"model": "m", "dataset": "digits", "training": {**MLP, "epochs": 500}}
        job_id = client.post("/jobs/train", json=body).json()["id"]
        worker = Worker(sqlite_settings, poll_s=0.05)
        thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1})
        thread.start()
        try:
            wait_for(
                lambda: client.get(f"/jobs/{job_id}").json()["progress"] > 0,
                timeout_s=120,
                what="the first epoch",
            )
            assert client.post(f"/jobs/{job_id}/cancel").json()["cancel_requested"]
            thread.join(timeout=60)
        finally:
            worker.stop()
            thread.join(timeout=60)
            worker.close()
        done = client.get(f"/jobs/{job_id}").json()
        assert client.get("/models").json()["count"] == 0
    assert done["state"] == "CANCELED", done
    assert "cancel" in done["error"]
    assert 0 < done["progress"] < 1


def test_hpo_parent_registers_the_best_trial(sqlite_settings: CloudSettings) -> None:
    hpo = {
        "base": {**MLP, "epochs": 3},
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}
        },
        "n_trials": 3,
        "workers": 2,
        "pruner": "none",
    }
    with api_client(sqlite_settings) as client:
        client.post("/datasets", json={"name": "digits", "source": "builtin:digits"})
        parent = client.post(
            "/jobs/hpo", json={"model": "tuned", "dataset": "digits", "hpo": hpo}
        ).json()
        drain(sqlite_settings, timeout_s=300)
        done = client.get(f"/jobs/{parent['id']}").json()
        kids = client.get("/jobs", params={"parent_id": parent["id"]}).json()["data"]
        version = client.get("/models/tuned/versions/1").json()
    assert done["state"] == "SUCCEEDED", done
    assert len(kids) == 2 and all(k["state"] == "SUCCEEDED" for k in kids)
    assert sum(k["result"]["trials_run"] for k in kids) == 3
    assert done["result"]["n_trials"] == 3
    assert version["training_job_id"] == parent["id"]
    assert version["metrics"]["test_accuracy"] == done["result"]["best_value"]
    assert version["spec"]["learning_rate"] == done["result"]["best_params"]["learning_rate"]
    assert Path(version["onnx_path"]).is_file()


@pytest.mark.slow
def test_sigkilled_worker_leaves_a_failed_job(
    sqlite_settings: CloudSettings, tmp_path: Path
) -> None:
    with api_client(sqlite_settings) as client:
        client.post("/datasets", json={"name": "digits", "source": "builtin:digits"})
        body = {
            "model": "m",
            "dataset": "digits",
            "training": {**MLP, "epochs": 500},
            "max_attempts": 1,
        }
        job_id = client.post("/jobs/train", json=body).json()["id"]
        proc = WorkerProcess(sqlite_settings, tmp_path / "worker.log")
        try:
            wait_for(
                lambda: client.get(f"/jobs/{job_id}").json()["progress"] > 0,
                timeout_s=120,
                what=f"the worker to start training (log: {proc.log})",
            )
            proc.kill()
        finally:
            proc.stop()
        killed = client.get(f"/jobs/{job_id}").json()
        assert killed["state"] == "RUNNING"
        worker_id = killed["worker_id"]
        reaper = Worker(sqlite_settings, runners={})
        try:
            wait_for(
                lambda: (
                    bool(reaper.maintain() is not None)
                    and client.get(f"/jobs/{job_id}").json()["state"] != "RUNNING"
                ),
                timeout_s=30,
                what="the reaper",
            )
        finally:
            reaper.close()
        done = client.get(f"/jobs/{job_id}").json()
    assert done["state"] == "FAILED"
    assert done["error"].startswith(f"worker {worker_id} lost (lease expired at ")
    assert done["worker_id"] is None


@pytest.mark.slow
def test_sigkilled_worker_job_is_retried(sqlite_settings: CloudSettings, tmp_path: Path) -> None:
    with api_client(sqlite_settings) as client:
        client.post("/datasets", json={"name": "digits", "source": "builtin:digits"})
        body = {"model": "m", "dataset": "digits", "training": MLP, "max_attempts": 2}
        job_id = client.post("/jobs/train", json=body).json()["id"]
        first = WorkerProcess(sqlite_settings, tmp_path / "first.log")
        try:
            wait_for(
                lambda: client.get(f"/jobs/{job_id}").json()["progress"] > 0,
                timeout_s=120,
                what="the first worker to start training",
            )
            first.kill()
        finally:
            first.stop()
        second = WorkerProcess(sqlite_settings, tmp_path / "second.log")
        try:
            wait_for(
                lambda: client.get(f"/jobs/{job_id}").json()["state"] == "SUCCEEDED",
                timeout_s=180,
                what=f"the retry on the second worker (log: {second.log})",
            )
        finally:
            second.stop()
        done = client.get(f"/jobs/{job_id}").json()
        events = [e["message"] for e in client.get(f"/jobs/{job_id}/events").json()["data"]]
        assert client.get("/models/m/versions/1").json()["training_job_id"] == job_id
    assert done["attempts"] == 2
    assert any("lost (lease expired at" in m and "re-queued" in m for m in events)
    assert done["result"]["out_dir"].endswith("attempt-2")
