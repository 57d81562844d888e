"""``edgeloop fleet devices|artifacts|deployments ...``: the fleet API from the command line.

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
import re
import sys
import time
from collections.abc import Callable, Sequence
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
    import uuid

    from fleet.models import DeploymentPublic
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


@devices_group.command("register-bulk")
@click.argument("devices_file", type=click.File("r"))
@_api_options
@handle_api_errors
def devices_register_bulk(devices_file: Any, api_url: str | None, as_json: bool) -> None:
    """Register every device of DEVICES_FILE at once (all or none; '-' reads stdin) and
    print their MQTT credentials (shown only this once).

    DEVICES_FILE is JSON: a list of objects with "device_id" and "profile", optionally
    "group_id" and "tags" (or {"devices": [...]}, the API's body). At most 1000 per call.
    """
    name = getattr(devices_file, "name", "DEVICES_FILE")
    try:
        loaded = json.load(devices_file)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"{name} is not JSON: {err}", param_hint="DEVICES_FILE") from err
    devices = loaded.get("devices") if isinstance(loaded, dict) else loaded
    if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
        raise click.BadParameter(
            f'{name} must hold a JSON list of device objects (or {{"devices": [...]}})',
            param_hint="DEVICES_FILE",
        )
    with open_client(_settings(api_url)) as fleet:
        registered = fleet.register_devices(devices)
    if as_json:
        _emit_json(registered.model_dump(mode="json"))
        return
    err_console.print(
        f"registered {registered.count} devices; MQTT credentials (shown once), "
        "one 'username password' per line:"
    )
    for device in registered.data:
        click.echo(f"{device.mqtt.username} {device.mqtt.password}")


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


# ---------------------------------------------------------------- deployments

PHASES = (
    "PENDING",
    "CANARY",
    "ROLLING",
    "PAUSED",
    "SUCCEEDED",
    "ABORTED",
    "CANCELED",
    "ROLLING_BACK",
    "ROLLED_BACK",
)
#: Phases that end ``status --watch``: exit 0 for these ...
SUCCESS_PHASES = frozenset({"SUCCEEDED", "ROLLED_BACK"})
#: ... and exit 1 for these.
FAILURE_PHASES = frozenset({"ABORTED", "FAILED", "CANCELED"})
TERMINAL_PHASES = SUCCESS_PHASES | FAILURE_PHASES

_COUNT_RE = re.compile(r"^[1-9][0-9]*$")
_PERCENT_RE = re.compile(r"^[0-9]+(\.[0-9]+)?%$")
_POLICY_SUFFIXES = (".json", ".yaml", ".yml")


class WatchTimeout(Exception):
    """``status --watch`` ran out of time before the deployment reached a terminal phase."""

    exit_code = 1

    def __init__(self, deployment: DeploymentPublic, timeout: float) -> None:
        self.deployment = deployment
        self.timeout = timeout
        super().__init__(
            f"timed out after {timeout:g} s waiting for deployment {deployment.id}; its last "
            f"phase is {deployment.phase} (terminal: {', '.join(sorted(TERMINAL_PHASES))})"
        )


def parse_variants(items: Sequence[str]) -> dict[str, str]:
    """``PROFILE=ARTIFACT_ID`` items as the API's ``variants`` (one artifact per profile).

    Raises:
        click.BadParameter: an item without '=', an empty side, or a profile given twice.
    """
    variants: dict[str, str] = {}
    for item in items:
        profile, sep, artifact_id = item.partition("=")
        profile, artifact_id = profile.strip(), artifact_id.strip()
        if not sep or not profile or not artifact_id:
            raise click.BadParameter(
                f"{item!r} is not PROFILE=ARTIFACT_ID "
                "(e.g. generic/x86_64=<id from 'edgeloop fleet artifacts list'>)",
                param_hint="'--variant'",
            )
        if profile in variants:
            raise click.BadParameter(
                f"profile {profile!r} is given twice ({variants[profile]!r} and "
                f"{artifact_id!r}); give one artifact per profile",
                param_hint="'--variant'",
            )
        variants[profile] = artifact_id
    return variants


def parse_canary(value: str) -> int | str:
    """``--canary``: a device count (``1``) or a percent of the devices (``10%``).

    Raises:
        click.BadParameter: anything else.
    """
    text = value.strip()
    if _COUNT_RE.match(text):
        return int(text)
    if _PERCENT_RE.match(text):
        return text
    raise click.BadParameter(
        f"{value!r} is neither a device count (e.g. 1) nor a percent (e.g. 10%)",
        param_hint="'--canary'",
    )


def load_policy(path: Path) -> dict[str, Any]:
    """A rollout policy from a ``.json``, ``.yaml`` or ``.yml`` file (the API validates it).

    Raises:
        click.BadParameter: another suffix, a file that does not parse or is not a mapping.
    """
    suffix = path.suffix.lower()
    if suffix not in _POLICY_SUFFIXES:
        raise click.BadParameter(
            f"{str(path)!r} has suffix {suffix or '(none)'!r}; choose from: "
            f"{', '.join(_POLICY_SUFFIXES)}",
            param_hint="'--policy'",
        )
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise click.BadParameter(
            f"{str(path)!r} is not valid {suffix[1:].upper()}: {err}", param_hint="'--policy'"
        ) from err
    if not isinstance(data, dict):
        raise click.BadParameter(
            f"{str(path)!r} holds a {type(data).__name__}, not a mapping of policy fields "
            "(e.g. {canary: 1, waves: ['100%']})",
            param_hint="'--policy'",
        )
    return data


def build_policy(policy_file: Path | None, canary: str | None) -> dict[str, Any]:
    """The request's policy: the file's (default: the canary, then all the rest in one wave),
    with ``--canary`` replacing its canary size."""
    policy: dict[str, Any] = (
        load_policy(policy_file) if policy_file is not None else {"waves": ["100%"]}
    )
    if canary is not None:
        policy["canary"] = parse_canary(canary)
    return policy


def watch_deployment(
    fleet: FleetClient,
    deployment_id: uuid.UUID,
    *,
    interval: float,
    timeout: float | None,
    on_update: Callable[[DeploymentPublic], None],
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> DeploymentPublic:
    """Poll a deployment every ``interval`` s, calling ``on_update`` with each answer, until it
    reaches a terminal phase (returned) or ``timeout`` s pass (``None``: no limit).

    Raises:
        WatchTimeout: the time ran out first (it carries the last answer).
        FleetAPIError: a call failed.
    """
    deadline = None if timeout is None else clock() + timeout
    while True:
        deployment = fleet.get_deployment(deployment_id)
        on_update(deployment)
        if deployment.phase in TERMINAL_PHASES:
            return deployment
        wait = interval
        if deadline is not None:
            left = deadline - clock()
            if left <= 0:
                raise WatchTimeout(deployment, timeout or 0.0)
            wait = min(interval, left)
        sleep(wait)


def _wave_names(deployment: DeploymentPublic) -> dict[str, str]:
    names: dict[str, str] = {}
    for index, stage in enumerate(deployment.stages):
        for device_id in stage:
            names[device_id] = "canary" if index == 0 else f"wave {index}"
    return names


def _counts_text(counts: dict[str, int]) -> str:
    shown = [f"{state} {n}" for state, n in counts.items() if n]
    return ", ".join(shown) or "no devices"


def _stage_text(deployment: DeploymentPublic) -> str:
    waves = len(deployment.stages)
    if deployment.stage <= 0:
        where = "canary"
    else:
        where = f"wave {min(deployment.stage, waves - 1)}"
    return f"{where} of {max(waves - 1, 0)} wave(s) after the canary"


def _summary(deployment: DeploymentPublic) -> str:
    reason = f" ({deployment.reason})" if deployment.reason else ""
    return (
        f"{deployment.phase}{reason}; {_stage_text(deployment)}; {_counts_text(deployment.counts)}"
    )


def deployment_view(deployment: DeploymentPublic) -> Any:
    """A rich renderable of a deployment: phase, counts and each device's state by wave."""
    from rich.console import Group
    from rich.text import Text

    head = Text()
    head.append(f"deployment {deployment.id} ", style="bold")
    head.append(f"{deployment.name} (model {deployment.model_name})\n")
    head.append("phase: ")
    style = {"SUCCEEDED": "green", "ROLLED_BACK": "green"}.get(deployment.phase, "yellow")
    if deployment.phase in FAILURE_PHASES:
        style = "red"
    head.append(deployment.phase, style=f"bold {style}")
    if deployment.reason:
        head.append(f" ({deployment.reason})")
    head.append(f"\nstage: {_stage_text(deployment)}\ncounts: {_counts_text(deployment.counts)}")
    table = Table("wave", "device", "state", "attempts", "artifact", "rollback", "reason")
    waves = _wave_names(deployment)
    order = {d: i for i, d in enumerate(d for stage in deployment.stages for d in stage)}
    for device in sorted(deployment.devices, key=lambda d: order.get(d.device_id, len(order))):
        rollback = device.rollback_state or ""
        if device.rollback_reason:
            rollback += f" ({device.rollback_reason})"
        table.add_row(
            waves.get(device.device_id, ""),
            device.device_id,
            device.state,
            str(device.attempts),
            device.artifact_id[:16],
            rollback,
            device.reason or "",
        )
    parts: list[Any] = [head, table]
    if deployment.unmatched:
        listed = ", ".join(f"{u.device_id} ({u.profile})" for u in deployment.unmatched)
        parts.append(Text(f"unmatched (no variant for their profile): {listed}", style="yellow"))
    return Group(*parts)


def _change_key(deployment: DeploymentPublic) -> tuple[Any, ...]:
    states = tuple((d.device_id, d.state, d.rollback_state) for d in deployment.devices)
    return (deployment.phase, deployment.reason, deployment.stage, states)


@click.group("deployments")
def deployments_group() -> None:
    """Deployments (rollouts) of a model's artifacts to your devices on the fleet API."""


@deployments_group.command("create")
@click.option("--name", required=True, help="A label for the deployment.")
@click.option("--model", "model_name", required=True, help="The model every variant is of.")
@click.option(
    "--variant",
    "variants",
    multiple=True,
    required=True,
    metavar="PROFILE=ARTIFACT_ID",
    help="The artifact for devices of PROFILE (repeatable; one per profile).",
)
@click.option("--device", "device_ids", multiple=True, metavar="ID", help="A device (repeatable).")
@click.option("--group", "groups", multiple=True, metavar="NAME", help="A group (repeatable).")
@click.option(
    "--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Devices with every tag (repeatable)."
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Rollout policy, .json or .yaml (default: the canary, then the rest in one wave).",
)
@click.option("--canary", default=None, metavar="N|P%", help="Canary size: 1 or 10%.")
@click.option("--seed", type=int, default=None, help="Shuffle the start order reproducibly.")
@_api_options
@handle_api_errors
def deployments_create(
    name: str,
    model_name: str,
    variants: tuple[str, ...],
    device_ids: tuple[str, ...],
    groups: tuple[str, ...],
    tags: tuple[str, ...],
    policy_file: Path | None,
    canary: str | None,
    seed: int | None,
    api_url: str | None,
    as_json: bool,
) -> None:
    """Plan a rollout to the devices given by --device, --group and --tag (their union)."""
    by_profile = parse_variants(variants)
    labels = _parse_tags(tags)
    policy = build_policy(policy_file, canary)
    with open_client(_settings(api_url)) as fleet:
        deployment = fleet.create_deployment(
            name,
            model_name=model_name,
            variants=by_profile,
            device_ids=list(device_ids),
            groups=list(groups),
            tags=labels,
            policy=policy,
            seed=seed,
        )
    _report_unmatched(deployment)
    if as_json:
        _emit_json(deployment.model_dump(mode="json"))
        return
    click.echo(
        f"created deployment {deployment.id} ({deployment.name}): {len(deployment.devices)} "
        f"device(s) in {len(deployment.stages)} stage(s), phase {deployment.phase}"
    )


def _report_unmatched(deployment: DeploymentPublic) -> None:
    if not deployment.unmatched:
        return
    err_console.print(
        f"[bold yellow]warning:[/] {len(deployment.unmatched)} targeted device(s) have no "
        "variant for their profile and are not in the deployment:",
        highlight=False,
    )
    for unmatched in deployment.unmatched:
        err_console.print(
            f"  {escape(unmatched.device_id)} (profile {escape(unmatched.profile)})",
            highlight=False,
        )
    profiles = sorted({u.profile for u in deployment.unmatched})
    err_console.print(
        f"add --variant PROFILE=ARTIFACT_ID for: {escape(', '.join(profiles))}", highlight=False
    )


@deployments_group.command("list")
@click.option("--phase", type=click.Choice(PHASES), default=None, help="Only in this phase.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@_api_options
@handle_api_errors
def deployments_list(
    phase: str | None, limit: int, offset: int, api_url: str | None, as_json: bool
) -> None:
    """List deployments, newest first."""
    with open_client(_settings(api_url)) as fleet:
        page = fleet.list_deployments(phase=phase, offset=offset, limit=limit)
    if as_json:
        _emit_json(page.model_dump(mode="json"))
        return
    table = Table("name", "model", "phase", "devices", "counts", "created")
    table.add_column("deployment", no_wrap=True)
    for d in page.data:
        table.add_row(
            d.name,
            d.model_name,
            d.phase,
            str(len(d.devices)),
            _counts_text(d.counts),
            _when(d.created_at),
            str(d.id),
        )
    Console().print(table)
    if page.count > offset + len(page.data):
        err_console.print(f"{len(page.data)} of {page.count} shown; use --offset/--limit")


@deployments_group.command("status")
@click.argument("deployment_id", type=click.UUID)
@click.option("--watch", is_flag=True, help="Follow it until it ends (exit 0 ok, 1 not).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=2.0,
    show_default=True,
    help="Seconds between polls with --watch.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --watch: give up (exit 1) after this many seconds [default: no limit].",
)
@_api_options
@handle_api_errors
def deployments_status(
    deployment_id: uuid.UUID,
    watch: bool,
    interval: float,
    timeout: float | None,
    api_url: str | None,
    as_json: bool,
) -> None:
    """Show a deployment's phase, counts and each device's state.

    With --watch, refresh (a live view on a terminal's stderr, else one line per change) until
    it reaches SUCCEEDED or ROLLED_BACK (exit 0), ABORTED, FAILED or CANCELED (exit 1), or the
    --timeout passes (exit 1).
    """
    with open_client(_settings(api_url)) as fleet:
        if not watch:
            deployment = fleet.get_deployment(deployment_id)
        else:
            deployment = _watch(fleet, deployment_id, interval=interval, timeout=timeout)
    if as_json:
        _emit_json(deployment.model_dump(mode="json"))
    elif not (watch and err_console.is_terminal):
        Console().print(deployment_view(deployment))
    else:
        click.echo(f"deployment {deployment.id}: {_summary(deployment)}")
    if watch and deployment.phase in FAILURE_PHASES:
        reason = f": {deployment.reason}" if deployment.reason else ""
        err_console.print(
            f"[bold red]error:[/] deployment {deployment.id} ended {deployment.phase}"
            f"{escape(reason)}",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


def _watch(
    fleet: FleetClient, deployment_id: uuid.UUID, *, interval: float, timeout: float | None
) -> DeploymentPublic:
    try:
        if err_console.is_terminal:
            from rich.live import Live

            with Live(console=err_console, refresh_per_second=4, transient=False) as live:
                return watch_deployment(
                    fleet,
                    deployment_id,
                    interval=interval,
                    timeout=timeout,
                    on_update=lambda d: live.update(deployment_view(d)),
                )
        seen: list[tuple[Any, ...]] = []

        def line(deployment: DeploymentPublic) -> None:
            key = _change_key(deployment)
            if not seen or seen[-1] != key:
                seen.append(key)
                stamp = time.strftime("%H:%M:%S")
                err_console.print(f"{stamp} {escape(_summary(deployment))}", highlight=False)

        return watch_deployment(
            fleet, deployment_id, interval=interval, timeout=timeout, on_update=line
        )
    except WatchTimeout as err:
        err_console.print(
            f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True
        )
        sys.exit(err.exit_code)


def _operator_command(command: str, done: str, help_text: str) -> None:
    @deployments_group.command(command, help=help_text)
    @click.argument("deployment_id", type=click.UUID)
    @_api_options
    @handle_api_errors
    def run_command(deployment_id: uuid.UUID, api_url: str | None, as_json: bool) -> None:
        with open_client(_settings(api_url)) as fleet:
            deployment = getattr(fleet, f"{command}_deployment")(deployment_id)
        if as_json:
            _emit_json(deployment.model_dump(mode="json"))
            return
        click.echo(f"{done} deployment {deployment.id}: now {_summary(deployment)}")


_operator_command(
    "pause", "paused", "Start no new device jobs until resumed (PENDING, CANARY or ROLLING)."
)
_operator_command("resume", "resumed", "Continue a PAUSED deployment.")
_operator_command(
    "cancel", "canceled", "Stop the rollout; devices already updated keep their artifact."
)
_operator_command(
    "rollback", "rolled back", "Return the devices it updated to their previous artifact."
)


__all__ = [
    "ApiClientSettings",
    "WatchTimeout",
    "artifacts_group",
    "build_policy",
    "deployments_group",
    "devices_group",
    "open_client",
    "parse_variants",
    "watch_deployment",
]
