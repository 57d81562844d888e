"""Worker processes: claim jobs from the database, run them under a lease, record the end.

``edgeloop cloud worker`` runs :meth:`Worker.run`. Scale out by starting more workers
against the same database (PostgreSQL for several machines); there is no scheduler beyond
the queue in :mod:`cloud.crud`. Each loop the worker

1. maintains: re-queues or fails jobs whose lease expired (their worker was lost), and
   finishes parents whose children are all over (an HPO study: :func:`cloud.jobs.finish_hpo`);
2. claims the oldest QUEUED job and runs its kind's runner (:data:`cloud.jobs.RUNNERS`).
   A heartbeat thread renews the lease every ``lease_s / 3`` and reads the job's cancel
   flag; the runner polls ``should_stop``, true when a cancel was requested, the lease was
   lost (the job is someone else's now) or the worker is stopping (SIGTERM: the job goes back
   to the queue without using up an attempt).

The end is written only while the job still names this worker (conditional updates), in
one transaction with the runner's registry rows.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from cloud import crud, db
from cloud.errors import CloudError, JobCanceledError
from cloud.jobs import FINISHERS, RUNNERS, JobContext, Outcome, Runner, hpo_progress
from cloud.models import Job, JobKind, JobState
from cloud.settings import CloudSettings

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000


def new_worker_id() -> str:
    """``<host>-<pid>-<random>``: unique per process."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class _Heartbeat(threading.Thread):
    """Renews one job's lease and watches its cancel flag until stopped."""

    def __init__(self, worker: Worker, job_id: int) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.worker = worker
        self.job_id = job_id
        self.done = threading.Event()
        self.cancel = threading.Event()
        self.lost = threading.Event()

    def beat(self) -> None:
        with self.worker.new_session() as session:
            flag = crud.renew_lease(
                session,
                job_id=self.job_id,
                worker_id=self.worker.worker_id,
                lease_s=self.worker.settings.lease_s,
            )
            session.commit()
        if flag is None:
            log.warning("job %s is no longer held by %s", self.job_id, self.worker.worker_id)
            self.lost.set()
        elif flag:
            self.cancel.set()

    def run(self) -> None:
        while not self.done.wait(self.worker.settings.heartbeat_s):
            try:
                self.beat()
            except Exception:  # a database hiccup: the next beat tries again
                log.exception("heartbeat of job %s failed", self.job_id)
            if self.lost.is_set():
                return


class Worker:
    """One worker process's loop over the job queue.

    Args:
        settings: database URL, blob directory, lease.
        worker_id: this worker's name on claimed jobs (default: host-pid-random).
        runners: runner per job kind (default :data:`cloud.jobs.RUNNERS`).
        finishers: how waiting parents finish (default :data:`cloud.jobs.FINISHERS`).
        engine: the database engine (default: made from ``settings``, disposed by :meth:`close`).
        poll_s: sleep between polls of an empty queue.
    """

    def __init__(
        self,
        settings: CloudSettings,
        *,
        worker_id: str | None = None,
        runners: Mapping[JobKind, Runner] | None = None,
        finishers: Mapping[JobKind, Runner] | None = None,
        engine: Engine | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id or new_worker_id()
        self.runners = dict(RUNNERS if runners is None else runners)
        self.finishers = dict(FINISHERS if finishers is None else finishers)
        self._own_engine = engine is None
        self.engine = engine or db.make_engine(settings.resolved_database_url())
        self.new_session = db.session_factory(self.engine)
        self.poll_s = poll_s
        self.stopping = threading.Event()
        self._event_lock = threading.Lock()
        self._progress_checked = 0.0

    def close(self) -> None:
        """Dispose of the engine if this worker made it."""
        if self._own_engine:
            self.engine.dispose()

    def stop(self) -> None:
        """Stop after the current job (which is asked to stop and goes back to the queue)."""
        self.stopping.set()

    # ------------------------------------------------------------ the loop

    def run(self, *, max_jobs: int | None = None, exit_when_idle: bool = False) -> int:
        """Claim and run jobs until stopped; the number of jobs run.

        Args:
            max_jobs: stop after this many jobs.
            exit_when_idle: stop when the queue is empty and no parent waits.
        """
        ran = 0
        log.info("worker %s started", self.worker_id)
        while not self.stopping.is_set():
            if max_jobs is not None and ran >= max_jobs:
                break
            try:
                waiting = self.maintain()
                job = self.claim()
            except OperationalError:
                log.exception("database unavailable; retrying")
                self.stopping.wait(self.poll_s * 4)
                continue
            if job is None:
                if exit_when_idle and not waiting:
                    break
                self.stopping.wait(self.poll_s)
                continue
            self.execute(job)
            ran += 1
        log.info("worker %s stopped after %d job(s)", self.worker_id, ran)
        return ran

    def claim(self, kinds: list[JobKind] | None = None) -> Job | None:
        """Claim the oldest queued job (of ``kinds``) for this worker, or None."""
        kinds = kinds or list(self.runners)
        with self.new_session() as session:
            job = crud.claim_job(
                session, worker_id=self.worker_id, lease_s=self.settings.lease_s, kinds=kinds
            )
            if job is not None:
                crud.add_event(
                    session,
                    job_id=job.id or 0,
                    kind="log",
                    message=f"attempt {job.attempts} of {job.max_attempts} on worker "
                    f"{self.worker_id}",
                )
            session.commit()
        return job

    def maintain(self) -> int:
        """Reap expired leases and finish parents whose children are over.

        Returns:
            How many parents still wait on children.
        """
        with self.new_session() as session:
            for job_id, what in crud.reap_expired(session):
                log.warning("job %s: %s", job_id, what)
            session.commit()
            waiting = crud.waiting_jobs(session)
            ready: list[int] = []
            for parent in waiting:
                kids = crud.children(session, job_id=parent.id or 0)
                if all(JobState(k.state).terminal for k in kids):
                    ready.append(parent.id or 0)
        if time.monotonic() - self._progress_checked > 5.0:
            self._progress_checked = time.monotonic()
            self._update_progress([p for p in waiting if p.id not in ready])
        for job_id in ready:
            with self.new_session() as session:
                taken = crud.take_waiting(
                    session, job_id=job_id, worker_id=self.worker_id, lease_s=self.settings.lease_s
                )
                session.commit()
                job = crud.get_job(session, job_id=job_id) if taken else None
            if job is not None:
                finisher = self.finishers.get(JobKind(job.kind))
                if finisher is None:
                    self._end(job.id or 0, JobState.FAILED, f"no finisher for {job.kind} jobs")
                else:
                    self.execute(job, runner=finisher)
        return len(waiting) - len(ready)

    def _update_progress(self, parents: list[Job]) -> None:
        for parent in parents:
            if parent.kind != JobKind.HPO:
                continue
            fraction = hpo_progress(self.settings, parent)
            if fraction is None:
                continue
            with self.new_session() as session:
                job = crud.get_job(session, job_id=parent.id or 0)
                if job is not None and job.state == JobState.RUNNING:
                    job.progress = fraction
                    session.add(job)
                    session.commit()

    # ------------------------------------------------------------ one job

    def event(self, job_id: int, kind: str, message: str, metrics: dict[str, float] | None) -> None:
        """Append a log line or metric to the job (its own short transaction)."""
        log.info("job %s: %s", job_id, message)
        with self._event_lock:
            for attempt in range(3):
                try:
                    with self.new_session() as session:
                        crud.add_event(
                            session, job_id=job_id, kind=kind, message=message, metrics=metrics
                        )
                        session.commit()
                    return
                except IntegrityError:  # another writer took the seq (the reaper); retry
                    if attempt == 2:
                        raise

    def _progress(self, job_id: int, fraction: float) -> None:
        with self.new_session() as session:
            crud.set_progress(session, job_id=job_id, worker_id=self.worker_id, progress=fraction)
            session.commit()

    def context(self, job: Job, heartbeat: _Heartbeat) -> JobContext:
        """The runner's view of ``job``."""
        job_id = job.id or 0

        def should_stop() -> bool:
            return heartbeat.cancel.is_set() or heartbeat.lost.is_set() or self.stopping.is_set()

        return JobContext(
            job=job,
            settings=self.settings,
            new_session=self.new_session,
            log=lambda message: self.event(job_id, "log", message, None),
            metric=lambda message, values: self.event(job_id, "metric", message, values),
            progress=lambda fraction: self._progress(job_id, fraction),
            should_stop=should_stop,
        )

    def execute(self, job: Job, *, runner: Runner | None = None) -> None:
        """Run ``job`` (claimed by this worker) to its end, or give it back."""
        job_id = job.id or 0
        runner = runner or self.runners.get(JobKind(job.kind))
        heartbeat = _Heartbeat(self, job_id)
        heartbeat.start()
        outcome: Outcome | None = None
        error: str | None = None
        state = JobState.FAILED
        try:
            if runner is None:
                error = f"this worker cannot run {job.kind} jobs; it runs: " + ", ".join(
                    sorted(self.runners)
                )
            else:
                if job.cancel_requested:
                    raise JobCanceledError(f"job {job_id} canceled before it started")
                outcome = runner(self.context(job, heartbeat))
                state = JobState.SUCCEEDED
        except JobCanceledError as err:
            state, error = JobState.CANCELED, str(err)
        except CloudError as err:
            error = str(err)
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            self.event(job_id, "log", "crashed:\n" + traceback.format_exc(), None)
        finally:
            heartbeat.done.set()
            heartbeat.join()
        if heartbeat.lost.is_set():
            log.warning("job %s: lease lost; leaving it to its new owner", job_id)
            return
        if state == JobState.CANCELED and self.stopping.is_set() and not heartbeat.cancel.is_set():
            self._give_back(job_id)
            return
        if outcome is not None and outcome.wait:
            with self.new_session() as session:
                crud.release_job(
                    session,
                    job_id=job_id,
                    worker_id=self.worker_id,
                    requeue=False,
                    result=outcome.result,
                )
                session.commit()
            return
        if outcome is not None:
            try:
                self._succeed(job_id, outcome)
                return
            except CloudError as err:
                error = str(err)
            except Exception as err:
                error = f"recording the result failed: {type(err).__name__}: {err}"
                log.exception("job %s: recording the result failed", job_id)
            state = JobState.FAILED
        self._end(job_id, state, error)

    def _succeed(self, job_id: int, outcome: Outcome) -> None:
        with self.new_session() as session:
            result = dict(outcome.result)
            if outcome.commit is not None:
                result.update(outcome.commit(session))
            ended = crud.finish_job(
                session,
                job_id=job_id,
                worker_id=self.worker_id,
                state=JobState.SUCCEEDED,
                result=_jsonable(result),
            )
            if not ended:
                session.rollback()
                log.warning("job %s: lease lost before its result was recorded", job_id)
                return
            session.commit()
        self.event(job_id, "log", "SUCCEEDED", None)

    def _end(self, job_id: int, state: JobState, error: str | None) -> None:
        message = (error or "")[:MAX_ERROR_CHARS] or None
        with self.new_session() as session:
            ended = crud.finish_job(
                session, job_id=job_id, worker_id=self.worker_id, state=state, error=message
            )
            session.commit()
        if ended:
            self.event(job_id, "log", f"{state}: {message}" if message else str(state), None)

    def _give_back(self, job_id: int) -> None:
        with self.new_session() as session:
            crud.release_job(
                session, job_id=job_id, worker_id=self.worker_id, requeue=True, result=None
            )
            session.commit()
        self.event(job_id, "log", f"worker {self.worker_id} stopped; job re-queued", None)


def _jsonable(value: Any) -> Any:
    """``value`` with paths and other objects turned into JSON types."""
    import json

    return json.loads(json.dumps(value, default=str))


PRELOAD = ("torch", "optuna", "onnx", "tvm", "cloud.training.trainer", "cloud.compile_jobs")


def preload(modules: tuple[str, ...] = PRELOAD) -> None:
    """Import the runners' heavy modules before the first claim.

    Importing TVM or torch holds the GIL for seconds; done under a lease, it can starve the
    heartbeat thread long enough for the lease to expire. A module that is not installed is
    skipped (its jobs then fail with the reason).
    """
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            log.warning("not preloading %s: %s", name, err)


def run_worker(
    settings: CloudSettings,
    *,
    worker_id: str | None = None,
    max_jobs: int | None = None,
    exit_when_idle: bool = False,
    install_signals: bool = True,
    on_start: Callable[[Worker], None] | None = None,
) -> int:
    """Run a worker until SIGTERM/SIGINT (or ``max_jobs``/idle); the number of jobs run."""
    import signal

    preload()
    worker = Worker(settings, worker_id=worker_id)
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _signum, _frame: worker.stop())
    try:
        if on_start is not None:
            on_start(worker)
        return worker.run(max_jobs=max_jobs, exit_when_idle=exit_when_idle)
    finally:
        worker.close()
