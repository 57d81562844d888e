"""Hyperparameter search with Optuna, its study stored in the service's database.

Several worker processes (on PostgreSQL, several machines) share one study:

* :func:`create_study` (once, by the parent job) creates the study and enqueues exactly
  ``n_trials`` trials in Optuna's WAITING state: first ``spec.enqueue``'s fixed parameter
  sets, then empty ones whose parameters the sampler picks when a worker starts them.
* :func:`run_hpo_worker` claims WAITING trials one at a time with a conditional
  ``UPDATE trials SET state='RUNNING' WHERE trial_id=? AND state='WAITING'`` (atomic on SQLite
  and PostgreSQL, unlike a read-then-write) and stops when none is left, so all workers
  together run exactly ``n_trials`` trials, which finish COMPLETE, PRUNED or FAIL. (Optuna's
  ``MaxTrialsCallback`` checks after a trial ends and overshoots with parallel workers.)
* Each trial trains into ``out_root/trial-<number>/`` and reports per-epoch test accuracy;
  the median pruner stops trials below the median of earlier ones at the same epoch.

Table placement: Optuna creates its own tables (``studies``, ``trials``, ...) and keeps its
schema revision in a table named ``alembic_version``. On PostgreSQL they live in the schema
``optuna`` of the service's database (created on first use), so they can share a database
with the fleet's and the cloud's tables. On SQLite there are no schemas: the study tables go
into the same file, which must therefore not be the fleet's database (whose Alembic also uses
``alembic_version``); the cloud's own default SQLite file is fine.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from cloud.datasets import ArrayDataset
from cloud.errors import (
    DatasetError,
    InvalidRequestError,
    JobCanceledError,
    NotFoundError,
    SpecError,
)
from cloud.training.models import build_model
from cloud.training.spec import HpoSpec, ParamSpec, apply_params, parse_hpo_spec
from cloud.training.trainer import EpochMetrics, train

#: PostgreSQL schema holding Optuna's tables.
OPTUNA_SCHEMA = "optuna"
#: A running trial records a heartbeat this often...
HEARTBEAT_INTERVAL_S = 10
#: ...and one silent for longer is failed (its worker died) and retried once.
GRACE_PERIOD_S = 60
_FINISHED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
)


def storage_url(database_url: str) -> str:
    """``database_url`` normalised for SQLAlchemy (PostgreSQL driven by psycopg 3).

    Raises:
        InvalidRequestError: a URL that cannot be parsed or names another database.
    """
    from fleet.db import normalize_url
    from fleet.errors import FleetError

    try:
        return normalize_url(database_url)
    except FleetError as err:
        raise InvalidRequestError(str(err)) from err


def make_storage(database_url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on ``database_url`` (see the module docstring for placement),
    with trial heartbeats: a RUNNING trial silent for ``GRACE_PERIOD_S`` is failed and
    enqueued again once (``RetryHeartbeatStaleTrialCallback``) by the next worker that looks."""
    url = storage_url(database_url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        _ensure_schema(url)
        engine_kwargs: dict[str, Any] = {
            "pool_pre_ping": True,
            "connect_args": {"options": f"-c search_path={OPTUNA_SCHEMA}"},
        }
    else:
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=GRACE_PERIOD_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=1
            ),
        )


def _ensure_schema(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{OPTUNA_SCHEMA}"'))
    except DBAPIError:
        # Two processes creating it at once: one wins, the other sees a duplicate.
        with engine.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM information_schema.schemata WHERE schema_name = :s"),
                {"s": OPTUNA_SCHEMA},
            ).first()
        if found is None:
            raise
    finally:
        engine.dispose()


def _pruner(spec: HpoSpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.pruner_startup_trials,
            n_warmup_steps=spec.pruner_warmup_epochs,
        )
    return optuna.pruners.NopPruner()


def _sampler(spec: HpoSpec) -> optuna.samplers.BaseSampler:
    # Seeded only for a single worker: parallel workers with one seed would propose the same
    # parameters, and their interleaving is not reproducible anyway.
    return optuna.samplers.TPESampler(seed=spec.base.seed if spec.workers == 1 else None)


def create_study(storage_url: str, study_name: str, spec: HpoSpec) -> None:
    """Create the study and enqueue its ``n_trials`` trials; a no-op if it already has trials.

    Raises:
        SpecError: an invalid spec or search space.
        InvalidRequestError: an unusable database URL.
    """
    spec = parse_hpo_spec(spec)
    storage = make_storage(storage_url)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction=spec.direction,
        sampler=_sampler(spec),
        pruner=_pruner(spec),
        load_if_exists=True,
    )
    if study.get_trials(deepcopy=False):
        return
    study.set_user_attr("n_trials", spec.n_trials)
    study.set_user_attr("spec", spec.model_dump(mode="json"))
    for i in range(spec.n_trials):
        study.enqueue_trial(dict(spec.enqueue[i]) if i < len(spec.enqueue) else {})


def _load_study(storage_url: str, study_name: str, spec: HpoSpec | None) -> optuna.Study:
    storage = make_storage(storage_url)
    try:
        if spec is None:
            return optuna.load_study(study_name=study_name, storage=storage)
        return optuna.load_study(
            study_name=study_name, storage=storage, sampler=_sampler(spec), pruner=_pruner(spec)
        )
    except KeyError as err:
        raise NotFoundError(f"no tuning study named {study_name!r}") from err


def _claim_waiting(study: optuna.Study) -> int | None:
    """Atomically move one WAITING trial of ``study`` to RUNNING; its trial id, or None."""
    storage = study._storage  # the study's cached wrapper; only reads go through it
    backend: Any = storage._backend if hasattr(storage, "_backend") else storage
    waiting = storage.get_all_trials(
        study._study_id, deepcopy=False, states=(optuna.trial.TrialState.WAITING,)
    )
    for frozen in sorted(waiting, key=lambda t: t.number):
        with backend.engine.begin() as conn:
            claimed = conn.execute(
                text(
                    "UPDATE trials SET state = 'RUNNING', datetime_start = :now "
                    "WHERE trial_id = :id AND state = 'WAITING'"
                ),
                {"now": dt.datetime.now(), "id": frozen._trial_id},
            ).rowcount
        if claimed == 1:
            return int(frozen._trial_id)
    return None


@contextmanager
def _heartbeat(study: optuna.Study, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every HEARTBEAT_INTERVAL_S from a thread while it runs."""
    done = threading.Event()
    storage: Any = study._storage

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a missed beat is retried; the database may be busy
                pass
            if done.wait(HEARTBEAT_INTERVAL_S):
                return

    thread = threading.Thread(target=beat, name=f"hpo-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=HEARTBEAT_INTERVAL_S + 5)


def _suggest(trial: optuna.Trial, name: str, p: ParamSpec) -> Any:
    if p.type == "categorical":
        choices: list[Any] = list(p.choices or [])
        return trial.suggest_categorical(name, choices)
    assert p.low is not None and p.high is not None
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)


def run_hpo_worker(
    storage_url: str,
    study_name: str,
    spec: HpoSpec,
    dataset: ArrayDataset,
    out_root: Path,
    *,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """Run the study's waiting trials until none is left; safe to run in many processes.

    Args:
        storage_url: the database URL the study was created on.
        study_name: as given to :func:`create_study`.
        spec: the study's spec (search space, pruner, base training spec).
        dataset: the data every trial trains on.
        out_root: trial ``k`` writes ``out_root/trial-k/``.
        should_stop: polled between batches; True stops the current trial (marked FAIL)
            with JobCanceledError.
        log: receives progress lines.

    Returns:
        The number of trials this worker ran (completed, pruned or failed).

    Raises:
        NotFoundError: no such study.
        SpecError: an invalid spec.
        DatasetError: the base model does not fit the dataset (checked before any trial).
        JobCanceledError: ``should_stop()`` returned True.
    """
    spec = parse_hpo_spec(spec)
    emit = log or (lambda _line: None)
    stop = should_stop or (lambda: False)
    build_model(
        spec.base.architecture,
        spec.base.hparams,
        input_shape=dataset.input_shape,
        num_classes=len(dataset.classes),
    )
    study = _load_study(storage_url, study_name, spec)
    ran = 0
    while True:
        if stop():
            raise JobCanceledError(f"tuning worker for study {study_name!r} canceled")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # trials of dead workers: FAIL + retry
        trial_id = _claim_waiting(study)
        if trial_id is None:
            break
        trial = optuna.trial.Trial(study, trial_id)
        ran += 1
        with _heartbeat(study, trial_id):
            _run_trial(study, trial, spec, dataset, Path(out_root), stop, emit)
    emit(f"study {study_name!r}: no waiting trial left; this worker ran {ran}")
    return ran


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    spec: HpoSpec,
    dataset: ArrayDataset,
    out_root: Path,
    stop: Callable[[], bool],
    emit: Callable[[str], None],
) -> None:
    out_dir = out_root / f"trial-{trial.number}"
    try:
        params = {name: _suggest(trial, name, p) for name, p in spec.search_space.items()}
        tspec = apply_params(spec.base, params)
    except SpecError as err:
        trial.set_user_attr("error", str(err))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        emit(f"trial {trial.number} failed: {err}")
        return
    emit(f"trial {trial.number}: {params}")

    def on_epoch(m: EpochMetrics) -> None:
        trial.report(m.test_accuracy, m.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"epoch {m.epoch}: test_accuracy {m.test_accuracy:.4f} is below the median"
            )

    try:
        result = train(
            tspec,
            dataset,
            out_dir,
            on_epoch=on_epoch,
            should_stop=stop,
            log=lambda line: emit(f"trial {trial.number}: {line}"),
        )
    except optuna.TrialPruned as err:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        emit(f"trial {trial.number} pruned: {err}")
        return
    except JobCanceledError:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    except (SpecError, DatasetError, RuntimeError, ValueError) as err:
        trial.set_user_attr("error", f"{type(err).__name__}: {err}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        emit(f"trial {trial.number} failed: {type(err).__name__}: {err}")
        return
    value = result.metrics[spec.metric]
    trial.set_user_attr("out_dir", str(result.out_dir))
    trial.set_user_attr("metrics", result.metrics)
    if not math.isfinite(value):
        trial.set_user_attr("error", f"{spec.metric} is {value}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    study.tell(trial, value)
    emit(f"trial {trial.number} finished: {spec.metric} {value:.4f}")


def best_trial_summary(storage_url: str, study_name: str) -> dict[str, Any]:
    """The best completed trial and the study's counts.

    Returns:
        ``{"number", "value", "params", "out_dir", "metrics", "n_trials" (finished),
        "n_complete", "n_pruned", "n_failed", "n_waiting", "n_running"}``.

    Raises:
        NotFoundError: no such study, or no trial completed (the counts are in the message).
    """
    study = _load_study(storage_url, study_name, None)
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in optuna.trial.TrialState}
    n_finished = sum(counts[s] for s in _FINISHED)
    summary: dict[str, Any] = {
        "n_trials": n_finished,
        "n_complete": counts[optuna.trial.TrialState.COMPLETE],
        "n_pruned": counts[optuna.trial.TrialState.PRUNED],
        "n_failed": counts[optuna.trial.TrialState.FAIL],
        "n_waiting": counts[optuna.trial.TrialState.WAITING],
        "n_running": counts[optuna.trial.TrialState.RUNNING],
    }
    if summary["n_complete"] == 0:
        raise NotFoundError(
            f"study {study_name!r} has no completed trial ({n_finished} finished: "
            f"{summary['n_pruned']} pruned, {summary['n_failed']} failed)"
        )
    best = study.best_trial
    summary.update(
        number=best.number,
        value=best.value,
        params=dict(best.params),
        out_dir=best.user_attrs.get("out_dir"),
        metrics=best.user_attrs.get("metrics", {}),
    )
    return summary
