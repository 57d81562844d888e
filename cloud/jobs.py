"""The job kinds' runners: what a worker does for a train, hpo, hpo_worker or compile job.

A runner takes a :class:`JobContext` (the job, settings, sessions, and callbacks for logs,
metrics, progress and cancellation) and returns an :class:`Outcome`: the job's result, an
optional ``commit`` that writes registry rows in the same transaction that marks the job
SUCCEEDED (so a model version exists exactly when its job succeeded), or ``wait`` for a
parent that finishes when its children do (the ``hpo`` job: :func:`finish_hpo`).

Runners raise :class:`~cloud.errors.CloudError` subclasses for expected failures (a bad
spec, a dataset that does not fit the model, every profile failing to compile) and
:class:`~cloud.errors.JobCanceledError` when ``should_stop`` turns true; the worker records
either on the job. Heavy libraries (torch, Optuna, TVM) are imported inside the runners.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlmodel import Session

from cloud import crud
from cloud.db import normalize_url
from cloud.errors import CloudError, JobCanceledError, JobFailedError, NotFoundError
from cloud.models import (
    CompileJobSpec,
    Dataset,
    HpoJobSpec,
    HpoWorkerJobSpec,
    Job,
    JobKind,
    JobState,
    TrainJobSpec,
)
from cloud.settings import CloudSettings

if TYPE_CHECKING:
    from cloud.compile_jobs import ArtifactUploader
    from cloud.datasets import ArrayDataset

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """What a runner gets: the job as claimed and the worker's callbacks."""

    job: Job
    settings: CloudSettings
    new_session: Callable[[], Session]
    log: Callable[[str], None]
    metric: Callable[[str, dict[str, float]], None]
    progress: Callable[[float], None]
    should_stop: Callable[[], bool]

    @property
    def job_id(self) -> int:
        """The job's id."""
        assert self.job.id is not None
        return self.job.id

    @property
    def out_dir(self) -> Path:
        """This attempt's output directory (``<blob dir>/jobs/<id>/attempt-<n>``)."""
        return (
            self.settings.resolved_blob_dir()
            / "jobs"
            / str(self.job_id)
            / f"attempt-{self.job.attempts}"
        )

    @property
    def storage_url(self) -> str:
        """The database URL Optuna's RDBStorage uses (the service's own database)."""
        return normalize_url(self.settings.resolved_database_url())

    def check_stop(self, what: str) -> None:
        """Raise JobCanceledError if the job should stop."""
        if self.should_stop():
            raise JobCanceledError(f"job {self.job_id} canceled {what}")


@dataclass
class Outcome:
    """What a runner produced."""

    result: dict[str, Any] = field(default_factory=dict)
    commit: Callable[[Session], dict[str, Any]] | None = None
    wait: bool = False


Runner = Callable[[JobContext], Outcome]


@functools.cache
def code_version() -> str:
    """``edgeloop <version>``, plus ``+g<commit>`` (and ``.dirty``) in a git checkout."""
    import edgeloop

    version = f"edgeloop {edgeloop.__version__}"
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    if not commit:
        return version
    return f"{version}+g{commit}{'.dirty' if dirty else ''}"


def _dataset(ctx: JobContext, dataset_id: int) -> tuple[Dataset, ArrayDataset]:
    from cloud.datasets import load_dataset

    with ctx.new_session() as session:
        row = crud.get_dataset(session, dataset_id=dataset_id)
    if row is None:
        raise NotFoundError(f"dataset id {dataset_id} of job {ctx.job_id} no longer exists")
    ctx.log(f"loading dataset {row.name} v{row.version} ({row.n_samples} samples)")
    return row, load_dataset(row.stored_path, row.kind)  # type: ignore[arg-type]


# ---------------------------------------------------------------- train


def run_train(ctx: JobContext) -> Outcome:
    """Train the spec on the dataset; register the model version on success."""
    from cloud.training import EpochMetrics, train

    spec = TrainJobSpec.model_validate(ctx.job.spec)
    row, data = _dataset(ctx, spec.dataset_id)
    epochs = spec.training.epochs

    def on_epoch(m: EpochMetrics) -> None:
        values = {k: float(v) for k, v in asdict(m).items() if isinstance(v, int | float)}
        ctx.metric(
            f"epoch {m.epoch}/{epochs}: train_loss {m.train_loss:.4f} "
            f"test_loss {m.test_loss:.4f} test_accuracy {m.test_accuracy:.4f} "
            f"({m.samples_per_s:.0f} samples/s)",
            values,
        )
        ctx.progress(m.epoch / epochs)

    ctx.log(f"training {spec.training.architecture} for {epochs} epoch(s) into {ctx.out_dir}")
    result = train(
        spec.training,
        data,
        ctx.out_dir,
        on_epoch=on_epoch,
        should_stop=ctx.should_stop,
        log=ctx.log,
    )
    metrics = {k: float(v) for k, v in result.metrics.items()}

    def commit(session: Session) -> dict[str, Any]:
        version = crud.register_version(
            session,
            model_name=spec.model,
            metrics=metrics,
            spec=spec.training.model_dump(mode="json"),
            dataset_id=spec.dataset_id,
            training_job_id=ctx.job_id,
            code_version=code_version(),
            parent_version_id=spec.parent_version_id,
            weights_path=str(result.weights),
            onnx_path=str(result.onnx),
            baseline_path=str(result.baseline),
            input_shape=list(result.input_shape),
            classes=list(result.classes),
        )
        return {"model": spec.model, "version": version.version, "model_version_id": version.id}

    return Outcome(
        result={"metrics": metrics, "out_dir": str(result.out_dir), "dataset": row.name},
        commit=commit,
    )


# ---------------------------------------------------------------- hpo


def study_name(job_id: int) -> str:
    """The Optuna study of HPO job ``job_id``."""
    return f"edgeloop-hpo-{job_id}"


def trials_dir(settings: CloudSettings, job_id: int) -> Path:
    """Where the trials of HPO job ``job_id`` train (``<blob dir>/jobs/<id>/trials``)."""
    return settings.resolved_blob_dir() / "jobs" / str(job_id) / "trials"


def run_hpo(ctx: JobContext) -> Outcome:
    """Create the study and enqueue ``workers`` hpo_worker children; wait for them."""
    from cloud.training.hpo import create_study

    spec = HpoJobSpec.model_validate(ctx.job.spec)
    name = study_name(ctx.job_id)
    create_study(ctx.storage_url, name, spec.hpo)
    with ctx.new_session() as session:
        existing = crud.children(session, job_id=ctx.job_id)
        if not existing:
            child_spec = HpoWorkerJobSpec(
                model=spec.model, dataset_id=spec.dataset_id, hpo=spec.hpo, study_name=name
            ).model_dump(mode="json")
            for _ in range(spec.hpo.workers):
                crud.enqueue_job(
                    session,
                    kind=JobKind.HPO_WORKER,
                    spec=child_spec,
                    max_attempts=ctx.job.max_attempts,
                    parent_id=ctx.job_id,
                )
            session.commit()
    ctx.log(
        f"study {name}: {spec.hpo.n_trials} trial(s) over {spec.hpo.workers} worker job(s); "
        "this job finishes when they do"
    )
    return Outcome(result={"study": name, "n_trials": spec.hpo.n_trials}, wait=True)


def run_hpo_worker(ctx: JobContext) -> Outcome:
    """Run trials of the parent's study until it has ``n_trials`` finished trials."""
    from cloud.training.hpo import run_hpo_worker as run_trials

    spec = HpoWorkerJobSpec.model_validate(ctx.job.spec)
    _row, data = _dataset(ctx, spec.dataset_id)
    parent = ctx.job.parent_id if ctx.job.parent_id is not None else ctx.job_id
    count = run_trials(
        ctx.storage_url,
        spec.study_name,
        spec.hpo,
        data,
        trials_dir(ctx.settings, parent),
        should_stop=ctx.should_stop,
        log=ctx.log,
    )
    return Outcome(result={"study": spec.study_name, "trials_run": count})


@functools.lru_cache(maxsize=4)
def _optuna_storage(database_url: str) -> Any:
    """One Optuna storage (and engine) per database for a worker's progress polls."""
    from cloud.training.hpo import make_storage

    return make_storage(database_url)


def hpo_progress(settings: CloudSettings, job: Job) -> float | None:
    """Finished trials / n_trials of an HPO job's study (None if it cannot be read)."""
    try:
        import optuna

        spec = HpoJobSpec.model_validate(job.spec)
        study = optuna.load_study(
            study_name=study_name(job.id or 0),
            storage=_optuna_storage(settings.resolved_database_url()),
        )
        finished = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())
    except Exception:  # progress is best effort; the study may not exist yet
        return None
    return min(finished / spec.hpo.n_trials, 1.0)


def finish_hpo(ctx: JobContext) -> Outcome:
    """The parent's end, once every child is over: register the best trial as a version.

    Raises:
        JobCanceledError: the job was canceled.
        JobFailedError: no trial completed (the children's reasons are named).
    """
    from cloud.training.hpo import best_trial_summary
    from cloud.training.spec import apply_params

    spec = HpoJobSpec.model_validate(ctx.job.spec)
    with ctx.new_session() as session:
        kids = crud.children(session, job_id=ctx.job_id)
        dataset = crud.get_dataset(session, dataset_id=spec.dataset_id)
    failed = [f"job {k.id}: {k.error}" for k in kids if k.state == JobState.FAILED]
    if ctx.job.cancel_requested:
        raise JobCanceledError(f"HPO job {ctx.job_id} canceled")
    try:
        best = best_trial_summary(ctx.storage_url, study_name(ctx.job_id))
    except CloudError as err:
        reasons = "; ".join(failed) or "no worker job reported an error"
        raise JobFailedError(
            f"no trial of HPO job {ctx.job_id} completed ({err}); {reasons}"
        ) from err
    if dataset is None:
        raise NotFoundError(f"dataset id {spec.dataset_id} of job {ctx.job_id} no longer exists")
    out_dir = Path(str(best["out_dir"]))
    params = dict(best.get("params") or {})
    training = apply_params(spec.hpo.base, params)
    metrics = {k: float(v) for k, v in (best.get("metrics") or {}).items()}
    metrics.setdefault(spec.hpo.metric, float(best["value"]))
    ctx.log(
        f"best trial {best['number']} of {best.get('n_trials')}: test_accuracy "
        f"{float(best['value']):.4f} with {params}"
    )

    def commit(session: Session) -> dict[str, Any]:
        version = crud.register_version(
            session,
            model_name=spec.model,
            metrics=metrics,
            spec=training.model_dump(mode="json"),
            dataset_id=spec.dataset_id,
            training_job_id=ctx.job_id,
            code_version=code_version(),
            parent_version_id=None,
            weights_path=str(out_dir / "model.pt"),
            onnx_path=str(out_dir / "model.onnx"),
            baseline_path=str(out_dir / "baseline.json"),
            input_shape=list(dataset.input_shape),
            classes=list(dataset.classes),
        )
        return {"model": spec.model, "version": version.version, "model_version_id": version.id}

    result = {
        "study": study_name(ctx.job_id),
        "best_trial": best["number"],
        "best_value": float(best["value"]),
        "best_params": params,
        "n_trials": best.get("n_trials"),
        "failed_workers": failed,
    }
    return Outcome(result=result, commit=commit)


# ---------------------------------------------------------------- compile


def make_uploader(settings: CloudSettings, signing_key: Path) -> ArtifactUploader:
    """The fleet API (``fleet_url`` + ``fleet_api_key``), else the local ``fleet_store``.

    Raises:
        InvalidRequestError: neither is configured.
    """
    from cloud.compile_jobs import FleetApiUploader, LocalStoreUploader
    from cloud.errors import InvalidRequestError

    if settings.fleet_url:
        key = settings.fleet_api_key.get_secret_value() if settings.fleet_api_key else ""
        return FleetApiUploader.connect(settings.fleet_url, key)
    if settings.fleet_store is not None:
        return LocalStoreUploader.open(settings.fleet_store, _public_key(signing_key))
    raise InvalidRequestError(
        "compile jobs need a fleet artifact store: set EDGELOOP_CLOUD_FLEET_URL and "
        "EDGELOOP_CLOUD_FLEET_API_KEY (a running fleet API), or EDGELOOP_CLOUD_FLEET_STORE "
        "(a local store directory)"
    )


def _public_key(signing_key: Path) -> Path:
    from compiler.signing import PUBLIC_KEY_FILE

    beside = signing_key.with_name(PUBLIC_KEY_FILE)
    return beside if beside.is_file() else signing_key.with_suffix(".pub")


def signing_key_path(settings: CloudSettings) -> Path:
    """``signing_key``, or the compiler's default key."""
    if settings.signing_key is not None:
        return settings.signing_key
    from compiler.settings import CompilerSettings
    from compiler.signing import KeyPaths

    return KeyPaths.in_dir(CompilerSettings().keys_dir).private


def run_compile(ctx: JobContext) -> Outcome:
    """Compile a model version for each profile and hand the artifacts to the fleet."""
    from cloud.compile_jobs import CompileInput
    from cloud.compile_jobs import run_compile as compile_version
    from compiler.settings import CompilerSettings

    spec = CompileJobSpec.model_validate(ctx.job.spec)
    with ctx.new_session() as session:
        version = crud.get_version_by_id(session, version_id=spec.model_version_id)
        model = crud.version_public(session, version=version) if version is not None else None
    if model is None:
        raise NotFoundError(
            f"model version id {spec.model_version_id} of job {ctx.job_id} no longer exists"
        )
    compiler_settings = CompilerSettings()
    key = signing_key_path(ctx.settings)
    tuning_db = ctx.settings.tuning_db or compiler_settings.tuning_db_dir
    uploader = make_uploader(ctx.settings, key)
    ctx.log(
        f"compiling {model.model} v{model.version} for {', '.join(spec.profiles)} "
        f"({spec.tuning_trials} tuning trial(s)); artifacts go to {uploader.destination}"
    )

    def on_progress(fraction: float, message: str) -> None:
        ctx.progress(fraction)
        ctx.log(message)

    try:
        outcomes = compile_version(
            CompileInput(
                model_name=model.model,
                model_version=str(model.version),
                onnx=Path(model.onnx_path),
                profiles=spec.profiles,
                trials=spec.tuning_trials,
            ),
            settings=compiler_settings,
            tuning_db=tuning_db,
            signing_key=key,
            out_dir=ctx.out_dir,
            uploader=uploader,
            on_progress=on_progress,
            should_stop=ctx.should_stop,
        )
    finally:
        close = getattr(uploader, "close", None)
        if close is not None:
            close()

    def commit(session: Session) -> dict[str, Any]:
        for outcome in outcomes:
            crud.add_compile_record(
                session,
                model_version_id=spec.model_version_id,
                job_id=ctx.job_id,
                profile=outcome.profile,
                tuning_db_digest=outcome.tuning_db_digest,
                artifact_id=outcome.artifact_id,
                bundle_path=str(outcome.bundle) if outcome.bundle is not None else None,
                fleet_uploaded=outcome.uploaded,
                report=outcome.report or None,
                error=outcome.error,
            )
        return {}

    result = {
        "model": model.model,
        "version": model.version,
        "artifacts": [o.model_dump(mode="json", exclude={"report"}) for o in outcomes],
    }
    return Outcome(result=result, commit=commit)


RUNNERS: dict[JobKind, Runner] = {
    JobKind.TRAIN: run_train,
    JobKind.HPO: run_hpo,
    JobKind.HPO_WORKER: run_hpo_worker,
    JobKind.COMPILE: run_compile,
}

# A job that waits on its children, and how it finishes when they are over.
FINISHERS: dict[JobKind, Runner] = {JobKind.HPO: finish_hpo}
