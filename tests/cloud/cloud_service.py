"""Helpers for the cloud service's tests: settings, databases (SQLite and PostgreSQL), the API
under TestClient or uvicorn, and worker processes (in-process or real subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

warnings.filterwarnings("ignore", message=r".*httpx.*starlette\.testclient", category=Warning)

from fastapi.testclient import TestClient  # noqa: E402
from sqlmodel import Session  # noqa: E402

from cloud import crud, db  # noqa: E402
from cloud.api.main import create_app  # noqa: E402
from cloud.models import Job, JobState  # noqa: E402
from cloud.settings import CloudSettings  # noqa: E402
from cloud.worker import Worker, preload  # noqa: E402
from tests.fleet.api.conftest import POSTGRES_ADMIN_URL, Postgres, in_ci  # noqa: E402

TOKEN = "test-cloud-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROFILES = ["generic/x86_64", "raspberry-pi/4b-aarch64"]
REPO = Path(__file__).resolve().parents[2]

# A small MLP that reaches >= 95% on digits in a few seconds on one CPU core.
MLP: dict[str, Any] = {
    "architecture": "mlp",
    "hparams": {"hidden": 64, "layers": 1},
    "epochs": 12,
    "batch_size": 32,
    "learning_rate": 0.003,
    "seed": 0,
}


def make_settings(root: Path, database_url: str, **overrides: Any) -> CloudSettings:
    """Settings for a service under ``root`` on ``database_url``."""
    values: dict[str, Any] = {
        "state_dir": root / "state",
        "blob_dir": root / "blobs",
        "database_url": database_url,
        "api_token": TOKEN,
        "lease_s": 3.0,
        "max_attempts": 2,
    }
    values.update(overrides)
    return CloudSettings(**values)


def postgres_or_skip() -> Postgres:
    """The local PostgreSQL server; skip (fail under CI) when it is unreachable."""
    try:
        return Postgres(POSTGRES_ADMIN_URL)
    except Exception as err:  # psycopg.OperationalError, or psycopg missing
        message = f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable: {err}"
        if in_ci():
            pytest.fail(f"{message} (CI is set, so PostgreSQL tests must run)")
        pytest.skip(message)


@contextmanager
def database(kind: str, root: Path) -> Iterator[str]:
    """A fresh, migrated database: ``sqlite`` under ``root`` or a throwaway PostgreSQL one."""
    if kind == "sqlite":
        url = f"sqlite:///{root / 'cloud.db'}"
        db.upgrade(url)
        yield url
        return
    server = postgres_or_skip()
    url = server.create()
    try:
        db.upgrade(url)
        yield url
    finally:
        server.drop(url)
        server.close()


TABLES = (
    "cloud_compile_records",
    "cloud_model_versions",
    "cloud_models",
    "cloud_job_events",
    "cloud_jobs",
    "cloud_datasets",
)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A migrated throwaway PostgreSQL database, dropped at the end."""
    server = postgres_or_skip()
    url = server.create()
    try:
        db.upgrade(url)
        yield url
    finally:
        server.drop(url)
        server.close()


def truncate(url: str) -> None:
    """Empty the cloud's tables (ids restart at 1)."""
    from sqlalchemy import text

    engine = db.make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@contextmanager
def api_client(settings: CloudSettings) -> Iterator[TestClient]:
    """The cloud API under TestClient, authenticated."""
    app = create_app(settings, profiles=PROFILES)
    with TestClient(app, headers=AUTH) as client:
        yield client


def drain(settings: CloudSettings, *, timeout_s: float = 120.0) -> Worker:
    """Run an in-process worker until nothing is queued or waiting."""
    preload(("torch", "optuna", "cloud.training.trainer"))  # not under a short lease
    worker = Worker(settings, poll_s=0.05)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            worker.run(exit_when_idle=True)
            with Session(worker.engine) as session:
                busy, _ = crud.list_jobs(session, state=JobState.RUNNING)
                queued, _ = crud.list_jobs(session, state=JobState.QUEUED)
            if not busy and not queued:
                return worker
            time.sleep(0.1)
    finally:
        worker.close()
    raise TimeoutError(f"jobs still running after {timeout_s} s")


def job_row(settings: CloudSettings, job_id: int) -> Job:
    """The job as stored now."""
    engine = db.make_engine(settings.resolved_database_url())
    try:
        with Session(engine) as session:
            job = crud.get_job(session, job_id=job_id)
            assert job is not None
            return job
    finally:
        engine.dispose()


def wait_for(
    predicate: Callable[[], bool], *, timeout_s: float, what: str, poll_s: float = 0.2
) -> None:
    """Poll ``predicate`` until true or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def worker_env(settings: CloudSettings, **extra: str) -> dict[str, str]:
    """The environment of a worker subprocess for ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    env.update(
        EDGELOOP_CLOUD_DATABASE_URL=settings.resolved_database_url(),
        EDGELOOP_CLOUD_STATE_DIR=str(settings.state_dir),
        EDGELOOP_CLOUD_BLOB_DIR=str(settings.resolved_blob_dir()),
        EDGELOOP_CLOUD_LEASE_S=str(settings.lease_s),
        EDGELOOP_CLOUD_MAX_ATTEMPTS=str(settings.max_attempts),
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


class WorkerProcess:
    """``edgeloop cloud worker`` as a real subprocess (its output in ``log``)."""

    def __init__(self, settings: CloudSettings, log: Path, **env: str) -> None:
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from edgeloop.cli import main; main()", "cloud", "worker"],
            env=worker_env(settings, **env),
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def kill(self) -> None:
        """SIGKILL: no cleanup, the lease is left to expire."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()

    def output(self) -> str:
        """What the worker printed so far."""
        return self.log.read_text(errors="replace")
