"""The app factory, its wiring from settings, errors, health, metrics, and the CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlmodel import Session

from fleet import db
from fleet import errors as fleet_errors
from fleet.api.bootstrap import create_admin_key
from fleet.api.cli import api_group
from fleet.api.main import create_app, handle_fleet_error
from fleet.api.settings import ApiSettings
from fleet.broker import MosquittoProcess

from .conftest import PROFILE, Org, auth
from .test_devices import connect_reason


def test_create_app_touches_nothing_until_started(tmp_path: Path, keys: object) -> None:
    state = tmp_path / "state"
    settings = ApiSettings(state_dir=state, store=tmp_path / "store")
    app = create_app(settings)
    assert not state.exists() and not (tmp_path / "store").exists()
    assert app.state.settings is settings
    assert settings.resolved_database_url() == f"sqlite:///{state / 'fleet.db'}"


def test_app_wired_from_settings_alone(tmp_path: Path, database_url: str, keys: object) -> None:
    """No injection: the store from settings, the broker by password file and pid file."""
    pytest.importorskip("paho.mqtt.client")
    broker = MosquittoProcess(tmp_path / "mosquitto", users={"fleet": "fleet-pw"})
    broker.start()
    try:
        assert broker._proc is not None
        pid_file = tmp_path / "mosquitto.pid"
        pid_file.write_text(f"{broker._proc.pid}\n")
        settings = ApiSettings(
            state_dir=tmp_path / "state",
            store=tmp_path / "store",
            public_key=keys.public_path,  # type: ignore[attr-defined]
            database_url=database_url,
            broker_password_file=broker.workdir / "passwd",
            broker_pid_file=pid_file,
        )
        app = create_app(settings)
        with TestClient(app) as client:
            with Session(app.state.engine) as session:
                headers = auth(create_admin_key(session, "org").token)
            response = client.post(
                "/devices", headers=headers, json={"device_id": "dev-1", "profile": PROFILE}
            )
            assert response.status_code == 201, response.text
            password = response.json()["mqtt"]["password"]
            assert connect_reason(broker.port, "dev-1", password) == "Success"
            assert (tmp_path / "store" / "tmp").is_dir()  # the store was opened
    finally:
        broker.stop()


def test_broker_settings_come_in_pairs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="or neither"):
        ApiSettings(broker_password_file=tmp_path / "passwd")


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGELOOP_FLEET_DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("EDGELOOP_FLEET_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("EDGELOOP_FLEET_STATE_DIR", str(tmp_path))
    settings = ApiSettings()
    assert settings.resolved_database_url() == "postgresql://u@h/db"
    assert settings.max_upload_bytes == 1234 and settings.state_dir == tmp_path


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:////tmp/fleet.db", "sqlite:////tmp/fleet.db"),
        ("postgresql://u:p%40ss@h:5433/db", "postgresql+psycopg://u:p%40ss@h:5433/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_normalize_url(url: str, expected: str) -> None:
    assert db.normalize_url(url) == expected


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        (
            "mysql://u@h/db",
            "database 'mysql' (from URL 'mysql://u@h/db') is not supported; "
            "choose from: sqlite, postgresql",
        ),
        ("not a url", "database URL 'not a url' cannot be parsed"),
    ],
)
def test_normalize_url_refuses(url: str, needle: str) -> None:
    with pytest.raises(fleet_errors.InvalidRequestError) as info:
        db.normalize_url(url)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (fleet_errors.FleetError, 500),
        (fleet_errors.AuthenticationError, 401),
        (fleet_errors.PermissionDeniedError, 403),
        (fleet_errors.NotFoundError, 404),
        (fleet_errors.ConflictError, 409),
        (fleet_errors.PayloadTooLargeError, 413),
        (fleet_errors.UnsupportedMediaTypeError, 415),
        (fleet_errors.InvalidRequestError, 422),
        (fleet_errors.InvalidArtifactError, 422),
        (fleet_errors.BrokerSyncError, 503),
    ],
)
def test_error_handler_maps_each_class(cls: type[fleet_errors.FleetError], status: int) -> None:
    import asyncio

    response = asyncio.run(handle_fleet_error(None, cls("bad value 'x'")))  # type: ignore[arg-type]
    assert response.status_code == status
    assert json.loads(bytes(response.body)) == {"detail": "bad value 'x'"}


def test_health_metrics_and_openapi(client: TestClient, org_a: Org) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    client.get("/devices", headers=org_a.headers)
    metrics = client.get("/metrics").text
    assert (
        'edgeloop_fleet_api_requests_total{method="GET",route="/devices",status="200"}' in metrics
    )
    schema = client.get("/openapi.json").json()
    assert "/devices/{device_id}/revoke" in schema["paths"]
    upload = schema["paths"]["/artifacts"]["post"]["requestBody"]["content"]
    assert set(upload) == {"application/x-tar", "application/octet-stream", "multipart/form-data"}
    assert "ApiKey" in schema["components"]["securitySchemes"]


# ---------------------------------------------------------------- CLI


def _cli() -> click.Group:
    root = click.Group("fleet")
    root.add_command(api_group)
    return root


def test_cli_migrate_and_bootstrap(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    migrated = runner.invoke(_cli(), ["api", "migrate", "--database-url", url])
    assert migrated.exit_code == 0, migrated.output
    assert db.current_revision(url) == "0003"
    made = runner.invoke(_cli(), ["api", "bootstrap", "--org", "acme", "--database-url", url])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    assert token.startswith("elk_") and token.count("\n") == 0
    as_json = runner.invoke(
        _cli(), ["api", "bootstrap", "--org", "acme", "--json", "--database-url", url]
    )
    assert as_json.exit_code == 0, as_json.output
    out = json.loads(as_json.stdout)
    assert out["org"] == "acme" and out["token"].startswith(f"elk_{out['key_id']}_")


def test_cli_state_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELOOP_FLEET_STATE_DIR", str(tmp_path / "st"))
    result = CliRunner().invoke(_cli(), ["api", "bootstrap", "--org", "acme"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "st" / "fleet.db").is_file()


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["bootstrap", "--org", "bad name"], 2, "organization name 'bad name' is invalid"),
        (["migrate", "--database-url", "mysql://u@h/db"], 2, "choose from: sqlite, postgresql"),
        (["bootstrap"], 2, "Missing option '--org'"),
    ],
)
def test_cli_errors(tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    if "--database-url" not in args:
        args = [*args, "--database-url", f"sqlite:///{tmp_path / 'cli.db'}"]
    result = CliRunner().invoke(_cli(), ["api", *args])
    assert result.exit_code == code, result.output
    assert needle in " ".join(result.output.split())


def test_require_scope_refuses_unknown_names_when_routers_are_built() -> None:
    from fleet.api.deps import require_scope

    assert repr(require_scope("deploy")) == "require_scope('deploy')"
    with pytest.raises(ValueError, match="unknown scope 'root'; choose from: fleet:read"):
        require_scope("root")
