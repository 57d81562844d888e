"""``edgeloop fleet api migrate|bootstrap|serve``: thin commands over library calls.

Mount with ``fleet_group.add_command(api_group)`` (in ``fleet/cli.py``). FastAPI, SQLModel,
Alembic and uvicorn are imported inside the commands, so ``edgeloop --help`` stays fast and
works without the ``fleet`` extra (exit 5 with the install hint instead).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from edgeloop.service_cli import db_options, migrate, require, serve
from fleet.cli import err_console
from fleet.cli import handle_errors as _handle_store_and_compiler_errors
from fleet.errors import FleetError

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    """:func:`fleet.cli.handle_errors` plus :class:`FleetError` (its ``exit_code``)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FleetError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)

    return _handle_store_and_compiler_errors(wrapper)  # type: ignore[return-value]


def _settings(**overrides: Any) -> Any:
    from fleet.api.settings import ApiSettings

    return ApiSettings(**{k: v for k, v in overrides.items() if v is not None})


def _require(module: str) -> None:
    require(module, "fleet")


_db_options = db_options("EDGELOOP_FLEET_")


@click.group("api")
def api_group() -> None:
    """The fleet management API: database migrations, the first admin key, the server."""


@api_group.command("migrate")
@_db_options
@handle_errors
def migrate_command(database_url: str | None, state_dir: Path | None) -> None:
    """Upgrade the database to the newest schema (idempotent)."""
    url = _settings(database_url=database_url, state_dir=state_dir).resolved_database_url()
    err_console.print(migrate("fleet.db", url, label="database", extra="fleet"))


@api_group.command("bootstrap")
@click.option("--org", "org_name", required=True, help="Organization (created if missing).")
@_db_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def bootstrap_command(
    org_name: str, database_url: str | None, state_dir: Path | None, as_json: bool
) -> None:
    """Create an admin API key (and the organization); prints the token once."""
    _require("sqlmodel")
    from sqlmodel import Session

    from fleet import db
    from fleet.api.bootstrap import create_admin_key

    url = _settings(database_url=database_url, state_dir=state_dir).resolved_database_url()
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        with Session(engine) as session:
            try:
                key = create_admin_key(session, org_name)
            except ValueError as err:
                raise click.UsageError(str(err)) from err
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps({"org": key.org_name, "key_id": key.key_id, "token": key.token}))
        return
    made = "created organization" if key.created_org else "organization"
    err_console.print(f"{made} {key.org_name!r}; admin key {key.key_id} (shown once):")
    click.echo(key.token)


@api_group.command("serve")
@click.option("--host", "bind", default="127.0.0.1", show_default=True, help="Listen address.")
@click.option("--port", "bind_port", type=int, default=8080, show_default=True, help="Port.")
@_db_options
@handle_errors
def serve_command(
    bind: str, bind_port: int, database_url: str | None, state_dir: Path | None
) -> None:
    """Serve the API with uvicorn until SIGTERM or Ctrl-C."""
    settings = _settings(database_url=database_url, state_dir=state_dir)
    serve("fleet.api.main", settings, host=bind, port=bind_port, extra="fleet")
