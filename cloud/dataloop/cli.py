"""CLI of the data loop's cloud side: ``edgeloop dataloop ingest`` and ``edgeloop dataloop
monitor``.

Thin: each command builds :class:`~cloud.settings.CloudSettings` (database, blob directory;
``EDGELOOP_CLOUD_*``) and :class:`~cloud.dataloop.settings.DataloopSettings` (broker, group,
fleet; ``EDGELOOP_DATALOOP_*``), options winning, and calls one library function. Exit codes
as in :mod:`cloud.cli`: 0 ok, 1 operational (the broker refused us), 2 usage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cloud.cli import _db_options, _require, _settings, err_console, handle_errors
from cloud.dataloop import BrokerUnavailableError
from cloud.errors import InvalidRequestError

if TYPE_CHECKING:
    from cloud.dataloop.monitor import Monitor
    from cloud.dataloop.settings import DataloopSettings
    from fleet.responder import BrokerConfig


def _dataloop_settings(**overrides: Any) -> DataloopSettings:
    from pydantic import ValidationError

    from cloud.dataloop.settings import DataloopSettings

    try:
        return DataloopSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        raise InvalidRequestError(f"invalid data loop settings: {err}") from err


def make_monitor(settings: DataloopSettings) -> tuple[Monitor, Any]:
    """A monitor posting to the fleet when ``fleet_url``/``fleet_api_key`` are set; returns
    it and the fleet client to close (or None)."""
    from cloud.dataloop.monitor import FleetDriftSink, Monitor, http_webhook

    client = None
    sink = None
    if settings.fleet_url and settings.fleet_api_key is not None:
        from fleet.sdk import FleetClient

        client = FleetClient(settings.fleet_url, settings.fleet_api_key.get_secret_value())
        sink = FleetDriftSink(client)
    return Monitor(sink=sink, webhook=http_webhook(settings.webhook_timeout_s)), client


@click.group("dataloop")
def dataloop_group() -> None:
    """The data loop's cloud side: ingest captured samples and sketches, score drift."""


@dataloop_group.command("ingest")
@_db_options
@click.option("--host", default=None, help="Broker host [env EDGELOOP_DATALOOP_BROKER_HOST].")
@click.option(
    "--port", type=int, default=None, help="Broker port [env EDGELOOP_DATALOOP_BROKER_PORT]."
)
@click.option(
    "--username", default=None, help="Broker user [env EDGELOOP_DATALOOP_BROKER_USERNAME]."
)
@click.option("--group", default=None, help="Shared-subscription group [env ..._GROUP].")
@click.option(
    "--client-id", default=None, help="Fixed client id: a persistent session [env ..._CLIENT_ID]."
)
@click.option("--no-monitor", is_flag=True, help="Store sketches only; do not score them.")
@handle_errors
def ingest_command(
    database_url: str | None,
    state_dir: Path | None,
    host: str | None,
    port: int | None,
    username: str | None,
    group: str | None,
    client_id: str | None,
    no_monitor: bool,
) -> None:
    """Consume every device's captured samples and drift sketches until SIGTERM or Ctrl-C.

    The broker password comes from EDGELOOP_DATALOOP_BROKER_PASSWORD. Run several with the
    same --group to share the load.
    """
    _require("paho.mqtt.client")
    import logging

    from fleet.responder import BrokerConfig

    logging.getLogger("cloud").setLevel(logging.INFO)
    cloud = _settings(database_url=database_url, state_dir=state_dir)
    loop = _dataloop_settings(
        broker_host=host,
        broker_port=port,
        broker_username=username,
        group=group,
        client_id=client_id,
    )
    if loop.broker_password is None:
        raise InvalidRequestError(
            "no broker password; set EDGELOOP_DATALOOP_BROKER_PASSWORD (the user must read "
            "edgeloop/v1/devices/+/capture/#, e.g. the broker's 'fleet' user)"
        )
    broker = BrokerConfig(
        host=loop.broker_host,
        port=loop.broker_port,
        username=loop.broker_username,
        password=loop.broker_password.get_secret_value(),
        client_id=loop.client_id,
        tls_ca=loop.broker_tls_ca,
    )
    stats = run_ingest(
        cloud_url=cloud.resolved_database_url(),
        blob_dir=cloud.resolved_blob_dir(),
        settings=loop,
        broker=broker,
        monitor=not no_monitor,
        on_ready=lambda: err_console.print("ingest consumer ready", highlight=False),
    )
    err_console.print(f"ingest stopped: {json.dumps(stats)}", highlight=False)


def run_ingest(
    *,
    cloud_url: str,
    blob_dir: Path,
    settings: DataloopSettings,
    broker: BrokerConfig,
    monitor: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, int]:
    """Run an :class:`~cloud.dataloop.ingest.Ingestor` until a signal; returns its counters.

    Raises:
        BrokerUnavailableError: the broker refused us or was unreachable.
    """
    from cloud import db
    from cloud.dataloop.ingest import Ingestor, IngestStore
    from fleet.responder import BrokerError

    db.upgrade(cloud_url)
    engine = db.make_engine(cloud_url)
    mon, client = make_monitor(settings) if monitor else (None, None)
    ingestor = Ingestor(
        IngestStore(engine, blob_dir / "samples"),
        broker=broker,
        group=settings.group,
        monitor=mon,
        batch_size=settings.batch_size,
        batch_wait_s=settings.batch_wait_s,
        queue_size=settings.queue_size,
        session_expiry_s=settings.session_expiry_s,
    )
    try:
        ingestor.serve_forever(on_ready=on_ready)
    except BrokerError as err:
        raise BrokerUnavailableError(str(err)) from err
    finally:
        if client is not None:
            client.close()
        engine.dispose()
    return ingestor.stats


@dataloop_group.command("monitor")
@_db_options
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON on stdout.")
@handle_errors
def monitor_command(database_url: str | None, state_dir: Path | None, as_json: bool) -> None:
    """Score every pending sketch window once (e.g. after registering a missing baseline)."""
    from cloud import db

    cloud = _settings(database_url=database_url, state_dir=state_dir)
    url = cloud.resolved_database_url()
    db.upgrade(url)
    engine = db.make_engine(url)
    mon, client = make_monitor(_dataloop_settings())
    try:
        result = mon.score_pending(engine)
    finally:
        if client is not None:
            client.close()
        engine.dispose()
    counts = {"scored": result.scored, "skipped": result.skipped, "alerts": result.alerts}
    if as_json:
        click.echo(json.dumps(counts))
    else:
        err_console.print(
            f"scored {result.scored}, skipped {result.skipped}, alerts {result.alerts}",
            highlight=False,
        )


@dataloop_group.command("retrain")
@_db_options
@click.option(
    "--every",
    "every_s",
    type=click.FloatRange(min=1.0),
    default=60.0,
    show_default=True,
    help="Seconds between policy checks.",
)
@click.option(
    "--once", is_flag=True, help="Check the policies and advance the runs once, then exit."
)
@handle_errors
def retrain_command(
    database_url: str | None, state_dir: Path | None, every_s: float, once: bool
) -> None:
    """Evaluate every retrain policy and advance every retrain run (train, compile, canary).

    Label-count policies also fire when a label is saved; drift-duration policies and the
    compile and deploy steps advance only here (or through ``POST /retrain/tick``).
    """
    import signal
    import threading

    from cloud import db
    from cloud.dataloop.retrain import run_loop

    cloud = _settings(database_url=database_url, state_dir=state_dir)
    db.upgrade(cloud.resolved_database_url())
    stop = threading.Event()
    if not once:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    ran = run_loop(cloud, every_s=every_s, stop=stop, iterations=1 if once else None)
    err_console.print(f"retrain: {ran} check(s) run", highlight=False)


def register(root: click.Group) -> None:
    """Mount ``dataloop`` on the ``edgeloop`` group."""
    root.add_command(dataloop_group)
