"""CLI of the cloud: ``edgeloop cloud serve|worker|migrate``, ``datasets``, ``train``, ``tune``,
``jobs``, ``models`` and ``lineage``.

Thin: server commands build :class:`CloudSettings` (``EDGELOOP_CLOUD_*``) and call one
library function; client commands talk to the API with :class:`cloud.api.client.CloudClient`
(``--url``/``EDGELOOP_CLOUD_API_URL``, ``--token``/``EDGELOOP_CLOUD_API_TOKEN``). FastAPI,
SQLModel, torch and Optuna are imported inside the commands, so ``edgeloop --help`` stays
fast. Exit codes come from :mod:`cloud.errors` (``exit_code``): 0 ok, 1 operational, 2 usage
or not found, 3 bad dataset, 4 the job failed, 5 missing dependency. ``--json`` prints
machine output on stdout; logs and progress go to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from cloud.errors import CloudError, InvalidRequestError, JobFailedError
from edgeloop.service_cli import db_options, migrate, require, serve

if TYPE_CHECKING:
    from cloud.api.client import CloudClient
    from cloud.models import JobPublic
    from cloud.settings import CloudSettings

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True)
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELED")


def handle_errors(func: F) -> F:
    """Turn cloud errors into their exit code and a message on stderr."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from compiler.errors import MissingDependencyError

        try:
            return func(*args, **kwargs)
        except CloudError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)
        except MissingDependencyError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)

    return wrapper  # type: ignore[return-value]


def _require(module: str) -> None:
    require(module, "cloud")


def _settings(**overrides: Any) -> CloudSettings:
    from pydantic import ValidationError

    from cloud.settings import CloudSettings

    try:
        return CloudSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        raise InvalidRequestError(f"invalid cloud settings: {err}") from err


_db_options = db_options("EDGELOOP_CLOUD_")


def _client_options(func: F) -> F:
    func = click.option("--token", default=None, help="API token [env EDGELOOP_CLOUD_API_TOKEN].")(
        func
    )
    return click.option("--url", default=None, help="Cloud API [env EDGELOOP_CLOUD_API_URL].")(func)


def _client(url: str | None, token: str | None) -> CloudClient:
    from cloud.api.client import CloudClient

    settings = _settings(api_url=url, api_token=token)
    if settings.api_token is None:
        raise InvalidRequestError("no API token; pass --token or set EDGELOOP_CLOUD_API_TOKEN")
    return CloudClient(settings.api_url, settings.api_token.get_secret_value())


def _emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def load_spec(value: str) -> dict[str, Any]:
    """A spec from inline JSON (``{...}``) or a .json/.yaml file.

    Raises:
        InvalidRequestError: unreadable file or malformed content.
    """
    import yaml

    if value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except ValueError as err:
            raise InvalidRequestError(f"inline spec is not valid JSON: {err}") from err
    else:
        path = Path(value)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise InvalidRequestError(
                f"spec {value!r} is neither inline JSON nor a readable file: {err.strerror}"
            ) from err
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as err:
            raise InvalidRequestError(f"spec file {value!r} cannot be parsed: {err}") from err
    if not isinstance(data, dict):
        raise InvalidRequestError(f"spec {value!r} must be a mapping, got {type(data).__name__}")
    return data


def _dataset_ref(value: str) -> tuple[str, int | None]:
    name, _, version = value.partition(":")
    if not version:
        return name, None
    if not version.isdigit():
        raise InvalidRequestError(
            f"dataset {value!r}: the version after ':' must be a number (NAME or NAME:VERSION)"
        )
    return name, int(version)


def _validated(model: Any, data: dict[str, Any], what: str) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as err:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:5]]
        raise InvalidRequestError(f"invalid {what}: " + "; ".join(parts)) from err


# ---------------------------------------------------------------- watching a job


def _job_line(job: JobPublic) -> str:
    text = f"job {job.id} ({job.kind}) {job.state} {job.progress:.0%}"
    if job.error:
        text += f": {job.error}"
    return text


def watch_job(
    client: CloudClient,
    job_id: int,
    *,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    live: bool | None = None,
    metrics: bool = False,
) -> JobPublic:
    """Follow a job's events (logs; metrics too with ``metrics``) until it ends; the final job.

    Raises:
        JobFailedError: the job FAILED (its reason) or was CANCELED.
        CloudError: ``timeout_s`` passed first.
    """
    live = err_console.is_terminal if live is None else live
    after = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def drain(printer: Callable[[str], None]) -> None:
        nonlocal after
        events = client.events(job_id, after=after)
        for event in events.data:
            after = event.seq
            if event.kind == "metric" and not metrics:
                continue
            printer(f"[{event.time:%H:%M:%S}] job {job_id}: {event.message}")

    def finished(job: JobPublic) -> JobPublic:
        if job.state == "SUCCEEDED":
            return job
        if job.state == "CANCELED":
            raise JobFailedError(f"job {job.id} was canceled: {job.error or 'on request'}")
        raise JobFailedError(f"job {job.id} failed: {job.error}")

    def timed_out() -> bool:
        return deadline is not None and time.monotonic() > deadline

    if live:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=err_console,
        ) as progress:
            task = progress.add_task(f"job {job_id}", total=1.0)
            while True:
                job = client.get_job(job_id)
                drain(lambda line: progress.console.print(line, highlight=False, markup=False))
                progress.update(
                    task, completed=job.progress, description=f"job {job_id} {job.state}"
                )
                if job.state in TERMINAL:
                    return finished(job)
                if timed_out():
                    raise CloudError(f"job {job_id} still {job.state} after {timeout_s}s")
                time.sleep(poll_s)
    last = ""
    while True:
        job = client.get_job(job_id)
        drain(lambda line: click.echo(line, err=True))
        line = _job_line(job)
        if line != last:
            click.echo(line, err=True)
            last = line
        if job.state in TERMINAL:
            return finished(job)
        if timed_out():
            raise CloudError(f"job {job_id} still {job.state} after {timeout_s}s")
        time.sleep(poll_s)


def _submitted(client: CloudClient, job: JobPublic, *, wait: bool, as_json: bool) -> None:
    if wait:
        job = watch_job(client, job.id)
    if as_json:
        _emit(job.model_dump(mode="json"))
    else:
        err_console.print(f"job {job.id} ({job.kind}) {job.state}", highlight=False)
        if job.result and job.state == "SUCCEEDED":
            click.echo(json.dumps(job.result, default=str))


# ---------------------------------------------------------------- edgeloop cloud


@click.group("cloud")
def cloud_group() -> None:
    """The cloud service: its API server, workers and database migrations."""


@cloud_group.command("migrate")
@_db_options
@handle_errors
def migrate_command(database_url: str | None, state_dir: Path | None) -> None:
    """Upgrade the database to the newest cloud schema (idempotent)."""
    url = _settings(database_url=database_url, state_dir=state_dir).resolved_database_url()
    err_console.print(migrate("cloud.db", url, label="cloud database", extra="cloud"))


@cloud_group.command("serve")
@click.option("--host", "bind", default="127.0.0.1", show_default=True, help="Listen address.")
@click.option("--port", "bind_port", type=int, default=8090, show_default=True, help="Port.")
@_db_options
@handle_errors
def serve_command(
    bind: str, bind_port: int, database_url: str | None, state_dir: Path | None
) -> None:
    """Serve the API with uvicorn until SIGTERM or Ctrl-C (jobs run in workers)."""
    settings = _settings(database_url=database_url, state_dir=state_dir)
    serve("cloud.api.main", settings, host=bind, port=bind_port, extra="cloud")


@cloud_group.command("worker")
@_db_options
@click.option("--worker-id", default=None, help="Name on claimed jobs (default host-pid-rand).")
@click.option("--max-jobs", type=click.IntRange(min=1), default=None, help="Stop after N jobs.")
@click.option("--exit-when-idle", is_flag=True, help="Stop when nothing is queued or waiting.")
@handle_errors
def worker_command(
    database_url: str | None,
    state_dir: Path | None,
    worker_id: str | None,
    max_jobs: int | None,
    exit_when_idle: bool,
) -> None:
    """Run jobs from the queue until SIGTERM (the running job goes back to the queue)."""
    _require("torch")
    _require("optuna")
    import logging

    from cloud.worker import run_worker

    logging.getLogger("cloud").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = _settings(database_url=database_url, state_dir=state_dir)
    ran = run_worker(
        settings,
        worker_id=worker_id,
        max_jobs=max_jobs,
        exit_when_idle=exit_when_idle,
        on_start=lambda w: err_console.print(f"worker {w.worker_id} ready", highlight=False),
    )
    err_console.print(f"worker ran {ran} job(s)", highlight=False)


# ---------------------------------------------------------------- edgeloop datasets


@click.group("datasets")
def datasets_group() -> None:
    """Register and list datasets (content-hashed, versioned)."""


@datasets_group.command("register")
@click.argument("name")
@click.argument("source")
@click.option(
    "--kind",
    type=click.Choice(["builtin", "images", "csv", "npz"]),
    default=None,
    help="Default: detected from SOURCE.",
)
@_client_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def datasets_register(
    name: str, source: str, kind: str | None, url: str | None, token: str | None, as_json: bool
) -> None:
    """Register SOURCE (builtin:digits, a directory of class folders, .csv, .npz) as NAME."""
    from cloud.models import DatasetCreate

    if kind is None and not source.startswith("builtin:"):
        source = str(Path(source).resolve())
    body = _validated(DatasetCreate, {"name": name, "source": source, "kind": kind}, "dataset")
    with _client(url, token) as client:
        dataset = client.register_dataset(body)
    if as_json:
        _emit(dataset.model_dump(mode="json"))
        return
    click.echo(
        f"{dataset.name} v{dataset.version}: {dataset.n_samples} samples, shape "
        f"{tuple(dataset.input_shape)}, {len(dataset.classes)} classes, "
        f"sha256 {dataset.digest[:12]}"
    )


@datasets_group.command("list")
@click.option("--name", default=None, help="Only this dataset's versions.")
@_client_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def datasets_list(name: str | None, url: str | None, token: str | None, as_json: bool) -> None:
    """List dataset versions."""
    with _client(url, token) as client:
        page = client.list_datasets(name=name)
    if as_json:
        _emit(page.model_dump(mode="json"))
        return
    table = Table("name", "version", "kind", "samples", "shape", "classes", "sha256")
    for d in page.data:
        table.add_row(
            d.name,
            str(d.version),
            d.kind,
            str(d.n_samples),
            str(tuple(d.input_shape)),
            str(len(d.classes)),
            d.digest[:12],
        )
    Console().print(table)


# ---------------------------------------------------------------- edgeloop train / tune


def _job_submit_options(func: F) -> F:
    for decorator in reversed(
        [
            click.option("--model", "model", required=True, help="Registered model name."),
            click.option("--dataset", required=True, help="NAME or NAME:VERSION."),
            click.option(
                "--max-attempts",
                type=click.IntRange(min=1),
                default=None,
                help="Tries if a worker is lost.",
            ),
            click.option("--wait", is_flag=True, help="Watch the job and exit with its result."),
            _client_options,
            click.option("--json", "as_json", is_flag=True, help="Machine output on stdout."),
        ]
    ):
        func = decorator(func)
    return func


@click.command("train")
@click.argument("spec")
@_job_submit_options
@click.option(
    "--parent-version",
    type=click.IntRange(min=1),
    default=None,
    help="The version of --model this run retrains (lineage).",
)
@handle_errors
def train_command(
    spec: str,
    model: str,
    dataset: str,
    max_attempts: int | None,
    wait: bool,
    url: str | None,
    token: str | None,
    as_json: bool,
    parent_version: int | None,
) -> None:
    """Submit a training job; SPEC is a TrainingSpec as inline JSON or a .json/.yaml file."""
    from cloud.models import TrainJobCreate

    name, version = _dataset_ref(dataset)
    body = _validated(
        TrainJobCreate,
        {
            "model": model,
            "dataset": name,
            "dataset_version": version,
            "training": load_spec(spec),
            "parent_version": parent_version,
            "max_attempts": max_attempts,
        },
        "training job",
    )
    with _client(url, token) as client:
        job = client.submit_train(body)
        err_console.print(f"submitted job {job.id}", highlight=False)
        _submitted(client, job, wait=wait, as_json=as_json)


@click.command("tune")
@click.argument("spec")
@_job_submit_options
@handle_errors
def tune_command(
    spec: str,
    model: str,
    dataset: str,
    max_attempts: int | None,
    wait: bool,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Submit an Optuna search; SPEC is an HpoSpec (base, search_space, n_trials, workers)."""
    from cloud.models import HpoJobCreate

    name, version = _dataset_ref(dataset)
    body = _validated(
        HpoJobCreate,
        {
            "model": model,
            "dataset": name,
            "dataset_version": version,
            "hpo": load_spec(spec),
            "max_attempts": max_attempts,
        },
        "tuning job",
    )
    with _client(url, token) as client:
        job = client.submit_hpo(body)
        err_console.print(f"submitted job {job.id}", highlight=False)
        _submitted(client, job, wait=wait, as_json=as_json)


# ---------------------------------------------------------------- edgeloop jobs


@click.group("jobs")
def jobs_group() -> None:
    """List, show, watch and cancel cloud jobs."""


@jobs_group.command("list")
@click.option(
    "--state", type=click.Choice(["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELED"])
)
@click.option("--kind", type=click.Choice(["train", "hpo", "hpo_worker", "compile"]))
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@_client_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def jobs_list(
    state: str | None,
    kind: str | None,
    limit: int,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Jobs, newest first."""
    with _client(url, token) as client:
        page = client.list_jobs(state=state, kind=kind, limit=limit)
    if as_json:
        _emit(page.model_dump(mode="json"))
        return
    table = Table("id", "kind", "state", "progress", "attempts", "parent", "created", "error")
    for j in page.data:
        table.add_row(
            str(j.id),
            str(j.kind),
            str(j.state),
            f"{j.progress:.0%}",
            f"{j.attempts}/{j.max_attempts}",
            str(j.parent_id or ""),
            f"{j.created_at:%Y-%m-%d %H:%M:%S}",
            (j.error or "")[:60],
        )
    Console().print(table)


@jobs_group.command("show")
@click.argument("job_id", type=int)
@_client_options
@handle_errors
def jobs_show(job_id: int, url: str | None, token: str | None) -> None:
    """One job as JSON (state, progress, error, result)."""
    with _client(url, token) as client:
        _emit(client.get_job(job_id).model_dump(mode="json"))


@jobs_group.command("watch")
@click.argument("job_id", type=int)
@click.option(
    "--poll",
    type=click.FloatRange(0.1, 60),
    default=1.0,
    show_default=True,
    help="Seconds between polls.",
)
@click.option("--timeout", type=click.FloatRange(min=1), default=None, help="Give up after N s.")
@_client_options
@click.option("--json", "as_json", is_flag=True, help="The final job as JSON on stdout.")
@handle_errors
def jobs_watch(
    job_id: int,
    poll: float,
    timeout: float | None,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Follow a job's logs and progress; exit 0 if it succeeds, 4 if it fails or is canceled."""
    with _client(url, token) as client:
        job = watch_job(client, job_id, poll_s=poll, timeout_s=timeout)
    if as_json:
        _emit(job.model_dump(mode="json"))
    else:
        click.echo(_job_line(job))


@jobs_group.command("cancel")
@click.argument("job_id", type=int)
@_client_options
@handle_errors
def jobs_cancel(job_id: int, url: str | None, token: str | None) -> None:
    """Cancel a job (and its children): queued ones at once, running ones at their next check."""
    with _client(url, token) as client:
        click.echo(_job_line(client.cancel(job_id)))


# ---------------------------------------------------------------- edgeloop models


@click.group("models")
def models_group() -> None:
    """The model registry: list, show versions, promote, compile for hardware profiles."""


@models_group.command("list")
@click.argument("name", required=False)
@_client_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def models_list(name: str | None, url: str | None, token: str | None, as_json: bool) -> None:
    """Registered models, or NAME's versions."""
    with _client(url, token) as client:
        if name is None:
            page: Any = client.list_models()
        else:
            page = client.list_versions(name)
    if as_json:
        _emit(page.model_dump(mode="json"))
        return
    if name is None:
        table = Table("name", "versions", "latest", "production")
        for m in page.data:
            table.add_row(
                m.name,
                str(m.versions),
                str(m.latest_version or ""),
                str(m.production_version or ""),
            )
    else:
        table = Table("version", "stage", "metrics", "architecture", "dataset", "job", "parent")
        for v in page.data:
            metrics = ", ".join(f"{k} {val:.4g}" for k, val in sorted(v.metrics.items()))
            table.add_row(
                str(v.version),
                str(v.stage),
                metrics,
                str(v.spec.get("architecture", "")),
                str(v.dataset_id),
                str(v.training_job_id or ""),
                str(v.parent_version_id or ""),
            )
    Console().print(table)


@models_group.command("promote")
@click.argument("name")
@click.argument("version", type=int)
@click.option(
    "--stage",
    type=click.Choice(["none", "staging", "production"]),
    default="production",
    show_default=True,
)
@_client_options
@handle_errors
def models_promote(name: str, version: int, stage: str, url: str | None, token: str | None) -> None:
    """Move NAME VERSION to a stage (a new production version moves the old to staging)."""
    from cloud.models import Stage

    with _client(url, token) as client:
        row = client.promote(name, version, Stage(stage))
    click.echo(f"{row.model} v{row.version}: {row.stage}")


@models_group.command("compile")
@click.argument("name")
@click.argument("version", type=int)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    required=True,
    help="Hardware profile (repeat for several).",
)
@click.option(
    "--trials",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="MetaSchedule tuning trials per profile.",
)
@click.option("--wait", is_flag=True, help="Watch the job and exit with its result.")
@_client_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def models_compile(
    name: str,
    version: int,
    profiles: tuple[str, ...],
    trials: int,
    wait: bool,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Submit a compile job: NAME VERSION for each --profile; artifacts go to the fleet."""
    from cloud.models import CompileJobCreate

    body = _validated(
        CompileJobCreate,
        {"model": name, "version": version, "profiles": list(profiles), "tuning_trials": trials},
        "compile job",
    )
    with _client(url, token) as client:
        job = client.submit_compile(body)
        err_console.print(f"submitted job {job.id}", highlight=False)
        _submitted(client, job, wait=wait, as_json=as_json)


# ---------------------------------------------------------------- edgeloop lineage


@click.command("lineage")
@click.argument("artifact_id")
@_client_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def lineage_command(artifact_id: str, url: str | None, token: str | None, as_json: bool) -> None:
    """How ARTIFACT_ID came to be: dataset → run → version → compile → artifact → devices."""
    from cloud.lineage import check_artifact_id, render_lineage

    check_artifact_id(artifact_id)
    with _client(url, token) as client:
        lineage = client.lineage(artifact_id)
    if as_json:
        _emit(lineage.model_dump(mode="json"))
        return
    Console(width=200 if not sys.stdout.isatty() else None).print(render_lineage(lineage))


def register(root: click.Group) -> None:
    """Mount the cloud's commands on the ``edgeloop`` group."""
    for command in (
        cloud_group,
        datasets_group,
        train_command,
        tune_command,
        jobs_group,
        models_group,
        lineage_command,
    ):
        root.add_command(command)
