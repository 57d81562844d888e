"""CLI commands of the fleet: ``fleet store put|list``, ``fleet responder``, ``fleet deploy``.

Thin: each command unpacks options into :class:`FleetSettings` (``EDGELOOP_FLEET_*``,
created in the command, never at import) and calls one library function. paho-mqtt is
imported only by the commands that talk to the broker. Exit codes come from the exception
classes (``exit_code``), translated in :func:`handle_errors`: 0 ok, 1 operational (broker
unreachable, job failed), 2 usage (unknown artifact id, bad value), 3 invalid artifact or
key, 5 missing dependency.
"""

from __future__ import annotations

import functools
import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import platformdirs
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.table import Table

from compiler.errors import CompilerError, MissingDependencyError, UsageError
from fleet.broker import FLEET_USER, RESPONDER_USER
from fleet.store import ArtifactStore, StoreError, describe

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True)


class FleetSettings(BaseSettings):
    """Fleet settings from ``EDGELOOP_FLEET_*`` (options given on the command line win).

    * ``EDGELOOP_FLEET_STORE``: artifact store directory (default ``<user data>/fleet-store``)
    * ``EDGELOOP_FLEET_HOST`` / ``_PORT``: the MQTT broker (default 127.0.0.1:1883)
    * ``EDGELOOP_FLEET_USERNAME`` / ``_PASSWORD``: broker credentials (user default per
      command: ``responder`` or ``fleet``; no default password)
    * ``EDGELOOP_FLEET_PUBLIC_KEY``: the signing key's public half (default: the compiler's
      default key, ``<config>/keys/signing-key.pub``)
    * ``EDGELOOP_FLEET_TLS_CA``: CA bundle; enables TLS to the broker
    """

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_FLEET_", extra="ignore")

    store: Path = Field(
        default_factory=lambda: platformdirs.user_data_path("edgeloop") / "fleet-store"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    public_key: Path | None = None
    tls_ca: Path | None = None


def _settings(**overrides: Any) -> FleetSettings:
    return FleetSettings(**{k: v for k, v in overrides.items() if v is not None})


def _is_fleet_error(err: Exception) -> bool:
    """StoreError, or an error type of an MQTT module that was imported (else it cannot occur)."""
    if isinstance(err, StoreError):
        return True
    responder = sys.modules.get("fleet.responder")
    jobs = sys.modules.get("fleet.jobs")
    return (responder is not None and isinstance(err, responder.BrokerError)) or (
        jobs is not None and isinstance(err, jobs.JobTimeoutError)
    )


def handle_errors(func: F) -> F:
    """Turn fleet and compiler errors into their exit code and a message on stderr."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as err:
            if not (isinstance(err, CompilerError) or _is_fleet_error(err)):
                raise
            err_console.print(
                f"[bold red]error:[/] {err}", highlight=False, markup=True, soft_wrap=True
            )
            sys.exit(int(getattr(err, "exit_code", 1)))

    return wrapper  # type: ignore[return-value]


def _open_store(settings: FleetSettings) -> ArtifactStore:
    from compiler.settings import CompilerSettings
    from compiler.signing import KeyPaths, load_public_key

    key_path = settings.public_key or KeyPaths.in_dir(CompilerSettings().keys_dir).public
    return ArtifactStore(settings.store, load_public_key(key_path))


def _broker(settings: FleetSettings, *, default_user: str) -> Any:
    """The BrokerConfig for ``settings`` (imports paho)."""
    try:
        from fleet.responder import BrokerConfig
    except ImportError as err:
        raise MissingDependencyError("paho-mqtt", "agent") from err
    username = settings.username or default_user
    if settings.password is None:
        raise UsageError(
            f"no broker password for user {username!r}; pass --password or set "
            "EDGELOOP_FLEET_PASSWORD"
        )
    return BrokerConfig(
        host=settings.host,
        port=settings.port,
        username=username,
        password=settings.password.get_secret_value(),
        tls_ca=settings.tls_ca,
    )


def _store_option(func: F) -> F:
    func = click.option(
        "--public-key",
        type=click.Path(path_type=Path),
        default=None,
        help="The fleet's ed25519 public key (default: the default signing key's).",
    )(func)
    return click.option(
        "--store",
        "store_dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        help="Artifact store directory [env EDGELOOP_FLEET_STORE].",
    )(func)


def _broker_options(func: F) -> F:
    for decorator in reversed(
        [
            click.option("--host", default=None, help="Broker host [env EDGELOOP_FLEET_HOST]."),
            click.option(
                "--port", type=int, default=None, help="Broker port [env EDGELOOP_FLEET_PORT]."
            ),
            click.option("--username", default=None, help="Broker user [env ..._USERNAME]."),
            click.option("--password", default=None, help="Broker password [env ..._PASSWORD]."),
            click.option(
                "--tls-ca",
                type=click.Path(path_type=Path, dir_okay=False),
                default=None,
                help="CA bundle; enables TLS [env EDGELOOP_FLEET_TLS_CA].",
            ),
        ]
    ):
        func = decorator(func)
    return func


@click.group("fleet")
def fleet_group() -> None:
    """Artifact store, chunk responder and deployment jobs."""


@fleet_group.group("store")
def store_group() -> None:
    """Put and list verified artifacts."""


@store_group.command("put")
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def store_put(path: Path, store_dir: Path | None, public_key: Path | None, as_json: bool) -> None:
    """Verify and store a bundle directory (or a transfer .tar); idempotent."""
    with _open_store(_settings(store=store_dir, public_key=public_key)) as store:
        stored = store.put_tar(path) if path.is_file() else store.put_bundle(path)
    if as_json:
        click.echo(json.dumps(describe(stored)))
    else:
        click.echo(
            f"stored {stored.artifact_id}: {stored.model.name} {stored.model.version} "
            f"for {stored.profile} ({stored.transfer.size} bytes)"
        )


@store_group.command("list")
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def store_list(store_dir: Path | None, public_key: Path | None, as_json: bool) -> None:
    """List stored artifacts, oldest first."""
    with _open_store(_settings(store=store_dir, public_key=public_key)) as store:
        artifacts = store.list()
    if as_json:
        click.echo(json.dumps([describe(a) for a in artifacts]))
        return
    table = Table("model", "version", "profile", "bytes", "stored")
    table.add_column("artifact", no_wrap=True)
    for a in artifacts:
        table.add_row(
            a.model.name,
            a.model.version,
            a.profile,
            str(a.transfer.size),
            a.stored_at.strftime("%Y-%m-%d %H:%M"),
            a.artifact_id[:16],
        )
    Console().print(table)


@fleet_group.command("responder")
@_store_option
@_broker_options
@click.option(
    "--max-chunks", type=click.IntRange(min=1), default=64, help="Chunks answered per request."
)
@click.option(
    "--client-id",
    default=None,
    help="MQTT client id of this responder's persistent session (default: "
    "edgeloop-responder-<hostname>); give each responder on one host its own.",
)
@handle_errors
def responder_command(
    store_dir: Path | None,
    public_key: Path | None,
    host: str | None,
    port: int | None,
    username: str | None,
    password: str | None,
    tls_ca: Path | None,
    max_chunks: int,
    client_id: str | None,
) -> None:
    """Serve artifact chunks to entitled devices until SIGTERM or Ctrl-C.

    The session is persistent: chunk requests sent while the responder restarts are queued
    by the broker and answered when it is back.
    """
    settings = _settings(
        store=store_dir,
        public_key=public_key,
        host=host,
        port=port,
        username=username,
        password=password,
        tls_ca=tls_ca,
    )
    broker = _broker(settings, default_user=RESPONDER_USER)
    from fleet.responder import Responder

    with _open_store(settings) as store:
        responder = Responder(
            store,
            store.entitlements,
            host=broker.host,
            port=broker.port,
            username=broker.username,
            password=broker.password,
            tls_ca=broker.tls_ca,
            max_chunks_per_request=max_chunks,
            client_id=client_id or f"edgeloop-responder-{socket.gethostname()}",
        )
        err_console.print(f"responder serving {settings.store} via {broker.host}:{broker.port}")
        responder.serve_forever()
    err_console.print(f"responder stopped: {responder.stats}")


@fleet_group.command("deploy")
@click.argument("artifact_id")
@click.option("--device", "device_id", required=True, help="Target device id.")
@click.option("--job-id", default=None, help="Job id (default: random).")
@click.option(
    "--kind",
    type=click.Choice(["deploy", "rollback", "retire"]),
    default="deploy",
    show_default=True,
)
@click.option(
    "--role",
    type=click.Choice(["primary", "candidate", "shadow"]),
    default="primary",
    show_default=True,
    help="Serve as the primary, as an A/B candidate, or as a shadow beside the primary.",
)
@click.option(
    "--fraction",
    "traffic_fraction",
    type=click.FloatRange(0.0, 1.0),
    default=0.1,
    show_default=True,
    help="Share of requests a candidate answers.",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=None,
    help="Wait up to this many seconds for the job to finish on the device.",
)
@_store_option
@_broker_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def deploy_command(
    artifact_id: str,
    device_id: str,
    job_id: str | None,
    kind: str,
    role: str,
    traffic_fraction: float,
    wait_s: float | None,
    store_dir: Path | None,
    public_key: Path | None,
    host: str | None,
    port: int | None,
    username: str | None,
    password: str | None,
    tls_ca: Path | None,
    as_json: bool,
) -> None:
    """Grant DEVICE the artifact and publish a deployment job to it."""
    settings = _settings(
        store=store_dir,
        public_key=public_key,
        host=host,
        port=port,
        username=username,
        password=password,
        tls_ca=tls_ca,
    )
    broker = _broker(settings, default_user=FLEET_USER)
    from agent.protocol import JobState
    from fleet.jobs import JobWatcher, publish_job

    terminal = [s for s in JobState if s.terminal]
    with _open_store(settings) as store:
        if wait_s is None:
            job = publish_job(
                broker,
                store=store,
                device_id=device_id,
                artifact_id=artifact_id,
                job_id=job_id,
                kind=kind,
                role=role,
                traffic_fraction=traffic_fraction,
            )
            final = None
        else:
            with JobWatcher(broker) as watcher:
                job = publish_job(
                    watcher.session,
                    store=store,
                    device_id=device_id,
                    artifact_id=artifact_id,
                    job_id=job_id,
                    kind=kind,
                    role=role,
                    traffic_fraction=traffic_fraction,
                )
                final = watcher.wait_for(job.job_id, terminal, wait_s, device_id=device_id)
    if as_json:
        out: dict[str, Any] = {"job": json.loads(job.to_bytes())}
        if final is not None:
            out["final"] = json.loads(final.to_bytes())
        click.echo(json.dumps(out))
    else:
        click.echo(f"published {job.kind} job {job.job_id} of {artifact_id} to {device_id}")
        if final is not None:
            reason = f": {final.reason}" if final.reason else ""
            click.echo(f"job {job.job_id} on {device_id}: {final.state.value}{reason}")
    if final is not None and final.state is not JobState.SUCCEEDED:
        sys.exit(1)


def register(group: click.Group) -> None:
    """Add the ``fleet`` command group to the root CLI."""
    from fleet.api.cli import api_group
    from fleet.api_cli import artifacts_group, deployments_group, devices_group

    fleet_group.add_command(api_group)
    fleet_group.add_command(devices_group)
    fleet_group.add_command(artifacts_group)
    fleet_group.add_command(deployments_group)
    group.add_command(fleet_group)


__all__ = ["FleetSettings", "handle_errors", "register"]
