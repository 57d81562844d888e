"""``edgeloop fleet devices|artifacts ...``: the fleet API from the command line.

Thin commands over :class:`fleet.sdk.FleetClient`, configured by :class:`ApiClientSettings`
(``EDGELOOP_FLEET_API_URL``, ``EDGELOOP_FLEET_API_TOKEN``; ``--api-url`` wins), created in
the command. Human output is a rich table; ``--json`` writes the API's own JSON on stdout.
httpx is imported inside the commands (exit 5 with the install hint without the ``fleet``
extra). Exit codes come from the error classes (``exit_code``), translated in
:func:`handle_api_errors`: 0 ok; 1 the API is unreachable (the message names the URL), the
key is refused (401/403) or the call conflicts (409); 2 an unknown id or a value the API
refused (404, 422, other 4xx) or no token; 3 an artifact the API could not verify.

(``edgeloop fleet deploy`` is the MQTT-level command of :mod:`fleet.cli`, not this API.)
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compiler.errors import MissingDependencyError, UsageError
from fleet.cli import err_console, handle_errors

if TYPE_CHECKING:
    from fleet.sdk import FleetClient

F = TypeVar("F", bound=Callable[..., Any])

TOKEN_ENV = "EDGELOOP_FLEET_API_TOKEN"
URL_ENV = "EDGELOOP_FLEET_API_URL"


class ApiClientSettings(BaseSettings):
    """Where the fleet API is and which key to use (``EDGELOOP_FLEET_API_*``).

    * ``EDGELOOP_FLEET_API_URL``: the API's root (default ``http://127.0.0.1:8080``, where
      ``edgeloop fleet api serve`` listens)
    * ``EDGELOOP_FLEET_API_TOKEN``: an API key (``edgeloop fleet api bootstrap`` prints one)
    * ``EDGELOOP_FLEET_API_TIMEOUT``: seconds per connect, read or write (default 30)
    """

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_FLEET_API_", extra="ignore")

    url: str = "http://127.0.0.1:8080"
    token: SecretStr | None = None
    timeout: float = 30.0


def open_client(settings: ApiClientSettings) -> FleetClient:
    """A :class:`FleetClient` for ``settings``.

    Raises:
        UsageError: no token is set.
        MissingDependencyError: httpx is not installed.
    """
    try:
        from fleet.sdk import FleetClient
    except ImportError as err:
        raise MissingDependencyError("httpx", "fleet") from err
    if settings.token is None or not settings.token.get_secret_value():
        raise UsageError(
            f"no fleet API key; set {TOKEN_ENV} (create one with "
            "'edgeloop fleet api bootstrap --org NAME')"
        )
    return FleetClient(settings.url, settings.token.get_secret_value(), timeout=settings.timeout)


def _message(err: Any) -> str:
    """What to tell the user about a :class:`fleet.sdk.FleetAPIError`."""
    from fleet import sdk

    if isinstance(err, sdk.FleetConnectionError):
        return f"{err.detail}; is the API running there? (set {URL_ENV} or --api-url)"
    if isinstance(err, sdk.FleetAuthError):
        where = _root(err.url)
        return f"the fleet API at {where} refused the API key: {err.detail} (check {TOKEN_ENV})"
    if isinstance(err, sdk.FleetPermissionError):
        return f"the API key may not do this: {err.detail}"
    return str(err.detail)


def _root(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url


def handle_api_errors(func: F) -> F:
    """:func:`fleet.cli.handle_errors` plus :class:`fleet.sdk.FleetAPIError` (``exit_code``)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as err:
            sdk = sys.modules.get("fleet.sdk")
            if sdk is None or not isinstance(err, sdk.FleetAPIError):
                raise
            message = escape(_message(err))
            err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)

    return handle_errors(wrapper)  # type: ignore[return-value]


def _api_options(func: F) -> F:
    func = click.option(
        "--json", "as_json", is_flag=True, help="Machine-readable output on stdout."
    )(func)
    return click.option(
        "--api-url", default=None, help=f"The fleet API's root URL [env {URL_ENV}]."
    )(func)


def _settings(api_url: str | None) -> ApiClientSettings:
    return ApiClientSettings(url=api_url) if api_url else ApiClientSettings()


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=None, sort_keys=False))


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else ""


def _parse_tags(tags: tuple[str, ...]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for item in tags:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="'--tag'")
        parsed[key] = value
    return parsed


# ---------------------------------------------------------------- devices


@click.group("devices")
def devices_group() -> None:
    """Devices of your organization on the fleet API."""


@devices_group.command("list")
@click.option("--group", "group_id", type=click.UUID, default=None, help="Only this group's.")
@click.option(
    "--revoked/--active", default=None, help="Only revoked or only active devices (default all)."
)
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@_api_options
@handle_api_errors
def devices_list(
    group_id: Any, revoked: bool | None, limit: int, offset: int, api_url: str | None, as_json: bool
) -> None:
    """List devices by id."""
    with open_client(_settings(api_url)) as fleet:
        page = fleet.list_devices(group_id=group_id, revoked=revoked, offset=offset, limit=limit)
    if as_json:
        _emit_json(page.model_dump(mode="json"))
        return
    table = Table("device", "profile", "group", "tags", "state", "registered")
    for d in page.data:
        tags = ", ".join(f"{k}={v}" for k, v in sorted(d.tags.items()))
        state = f"revoked {_when(d.revoked_at)}" if d.revoked else "active"
        table.add_row(
            d.device_id, d.profile, str(d.group_id or ""), tags, state, _when(d.created_at)
        )
    Console().print(table)
    if page.count > offset + len(page.data):
        err_console.print(f"{len(page.data)} of {page.count} shown; use --offset/--limit")


@devices_group.command("register")
@click.argument("device_id")
@click.option("--profile", required=True, help="Hardware profile, e.g. raspberry-pi/4b-aarch64.")
@click.option("--group", "group_id", type=click.UUID, default=None, help="Group id.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="A label (repeatable).")
@_api_options
@handle_api_errors
def devices_register(
    device_id: str,
    profile: str,
    group_id: Any,
    tags: tuple[str, ...],
    api_url: str | None,
    as_json: bool,
) -> None:
    """Register DEVICE_ID and print its MQTT credentials (shown only this once)."""
    labels = _parse_tags(tags)
    with open_client(_settings(api_url)) as fleet:
        device = fleet.register_device(device_id, profile=profile, group_id=group_id, tags=labels)
    if as_json:
        _emit_json(device.model_dump(mode="json"))
        return
    err_console.print(
        f"registered {device.device_id} ({device.profile}); MQTT credentials (shown once):"
    )
    click.echo(f"username: {device.mqtt.username}")
    click.echo(f"password: {device.mqtt.password}")


@devices_group.command("revoke")
@click.argument("device_id")
@_api_options
@handle_api_errors
def devices_revoke(device_id: str, api_url: str | None, as_json: bool) -> None:
    """Cut DEVICE_ID off the broker and mark it revoked (idempotent)."""
    with open_client(_settings(api_url)) as fleet:
        device = fleet.revoke_device(device_id)
    if as_json:
        _emit_json(device.model_dump(mode="json"))
        return
    click.echo(f"revoked {device.device_id} at {_when(device.revoked_at)}")


# ---------------------------------------------------------------- artifacts


@click.group("artifacts")
def artifacts_group() -> None:
    """Artifacts of your organization on the fleet API."""


@artifacts_group.command("upload")
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@_api_options
@handle_api_errors
def artifacts_upload(path: Path, api_url: str | None, as_json: bool) -> None:
    """Upload a sealed bundle directory (packed on the fly) or a transfer .tar; idempotent."""
    with open_client(_settings(api_url)) as fleet:
        artifact = fleet.upload_artifact(path)
    if as_json:
        _emit_json(artifact.model_dump(mode="json"))
        return
    click.echo(
        f"uploaded {artifact.artifact_id}: {artifact.model_name} {artifact.model_version} "
        f"for {artifact.profile} ({artifact.size} bytes)"
    )


@artifacts_group.command("list")
@click.option("--model", "model_name", default=None, help="Only this model's.")
@click.option("--profile", default=None, help="Only this hardware profile's.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@_api_options
@handle_api_errors
def artifacts_list(
    model_name: str | None,
    profile: str | None,
    limit: int,
    offset: int,
    api_url: str | None,
    as_json: bool,
) -> None:
    """List artifacts, newest first."""
    with open_client(_settings(api_url)) as fleet:
        page = fleet.list_artifacts(
            model_name=model_name, profile=profile, offset=offset, limit=limit
        )
    if as_json:
        _emit_json(page.model_dump(mode="json"))
        return
    table = Table("model", "version", "profile", "runtime", "bytes", "uploaded")
    table.add_column("artifact", no_wrap=True)
    for a in page.data:
        table.add_row(
            a.model_name,
            a.model_version,
            a.profile,
            a.runtime,
            str(a.size),
            _when(a.uploaded_at),
            a.artifact_id[:16],
        )
    Console().print(table)
    if page.count > offset + len(page.data):
        err_console.print(f"{len(page.data)} of {page.count} shown; use --offset/--limit")


__all__ = ["ApiClientSettings", "artifacts_group", "devices_group", "open_client"]
