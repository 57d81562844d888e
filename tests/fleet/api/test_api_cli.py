"""``edgeloop fleet devices|artifacts ...`` against the API served by uvicorn on a free port.

Each command and each error path: the exit code (STYLE rule 9) and a message that says what
to do. The app runs in :class:`edgeloop.live_server.LiveServer` (so do other API tests).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from fastapi import FastAPI
from sqlmodel import Session

from edgeloop.cli import cli
from edgeloop.live_server import LiveServer
from fleet.api.bootstrap import create_admin_key
from fleet.api_cli import ApiClientSettings

from ..conftest import BundleFactory
from .conftest import PROFILE, TarFactory


def free_url() -> str:
    """A URL on a port nothing listens on (bound and closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class Api:
    """The live API and an admin token of its organization."""

    url: str
    token: str
    app: FastAPI

    def key(self, scopes: list[str]) -> str:
        """A new key of the organization with ``scopes``."""
        from fleet.sdk import FleetClient

        with FleetClient(self.url, self.token) as fleet:
            return fleet.create_api_key("cli-test", list(scopes)).token


@pytest.fixture()
def live_api(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    """The app served on a free port; EDGELOOP_FLEET_API_URL/_TOKEN point at it as admin."""
    with LiveServer(app) as server:
        with Session(app.state.engine) as session:
            token = create_admin_key(session, "org-cli").token
        monkeypatch.setenv("EDGELOOP_FLEET_API_URL", server.url)
        monkeypatch.setenv("EDGELOOP_FLEET_API_TOKEN", token)
        yield Api(url=server.url, token=token, app=app)


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["fleet", *args], catch_exceptions=False)


# ---------------------------------------------------------------- settings


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELOOP_FLEET_API_URL", "http://fleet.example:9000")
    monkeypatch.setenv("EDGELOOP_FLEET_API_TOKEN", "elk_x_y")
    monkeypatch.setenv("EDGELOOP_FLEET_API_TIMEOUT", "2.5")
    settings = ApiClientSettings()
    assert settings.url == "http://fleet.example:9000" and settings.timeout == 2.5
    assert settings.token is not None and settings.token.get_secret_value() == "elk_x_y"
    assert "elk_x_y" not in repr(settings)


def test_defaults_without_environment() -> None:
    settings = ApiClientSettings()
    assert settings.url == "http://127.0.0.1:8080" and settings.token is None


# ---------------------------------------------------------------- devices


def test_register_prints_credentials_once_then_list_and_revoke(live_api: Api) -> None:
    result = run("devices", "register", "dev-1", "--profile", PROFILE, "--tag", "site=lab")
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["username"] == "dev-1" and len(lines["password"]) >= 16
    assert "shown once" in result.stderr

    listed = run("devices", "list", "--json")
    assert listed.exit_code == 0, listed.output
    page = json.loads(listed.stdout)
    assert page["count"] == 1
    assert page["data"][0]["device_id"] == "dev-1"
    assert page["data"][0]["tags"] == {"site": "lab"}
    assert "password" not in listed.stdout

    table = run("devices", "list")
    assert table.exit_code == 0 and "dev-1" in table.stdout and "site=lab" in table.stdout

    revoked = run("devices", "revoke", "dev-1")
    assert revoked.exit_code == 0, revoked.output
    assert revoked.stdout.startswith("revoked dev-1 at ")
    only_revoked = json.loads(run("devices", "list", "--revoked", "--json").stdout)
    only_active = json.loads(run("devices", "list", "--active", "--json").stdout)
    assert [d["device_id"] for d in only_revoked["data"]] == ["dev-1"]
    assert only_active == {"data": [], "count": 0}


def test_register_json_carries_the_credentials(live_api: Api) -> None:
    result = run("devices", "register", "dev-2", "--profile", PROFILE, "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["device_id"] == "dev-2" and body["mqtt"]["username"] == "dev-2"
    revoked = json.loads(run("devices", "revoke", "dev-2", "--json").stdout)
    assert revoked["revoked"] is True and revoked["revoked_at"]


def test_register_in_a_group(live_api: Api) -> None:
    from fleet.sdk import FleetClient

    with FleetClient(live_api.url, live_api.token) as fleet:
        group = fleet.create_group("lab")
    result = run("devices", "register", "dev-3", "--profile", PROFILE, "--group", str(group.id))
    assert result.exit_code == 0, result.output
    page = json.loads(run("devices", "list", "--group", str(group.id), "--json").stdout)
    assert [d["device_id"] for d in page["data"]] == ["dev-3"]


def test_devices_list_says_when_a_page_is_partial(live_api: Api) -> None:
    for n in range(3):
        assert run("devices", "register", f"dev-{n}", "--profile", PROFILE).exit_code == 0
    result = run("devices", "list", "--limit", "2")
    assert result.exit_code == 0
    assert "2 of 3 shown" in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--profile", "rpi4"], 2, "unknown hardware profile 'rpi4'; choose from:"),
        (["--profile", PROFILE, "--tag", "novalue"], 2, "'novalue' is not KEY=VALUE"),
        (["--profile", PROFILE, "--group", "not-a-uuid"], 2, "not-a-uuid"),
        ([], 2, "Missing option '--profile'"),
    ],
)
def test_register_refusals(live_api: Api, args: list[str], code: int, message: str) -> None:
    result = run("devices", "register", "dev-1", *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert json.loads(run("devices", "list", "--json").stdout)["count"] == 0


def test_register_bad_device_id_is_a_validation_error(live_api: Api) -> None:
    result = run("devices", "register", "fleet", "--profile", PROFILE)
    assert result.exit_code == 2
    assert "reserved" in result.stderr


def test_register_twice_is_a_conflict(live_api: Api) -> None:
    assert run("devices", "register", "dev-1", "--profile", PROFILE).exit_code == 0
    result = run("devices", "register", "dev-1", "--profile", PROFILE)
    assert result.exit_code == 1
    assert "dev-1" in result.stderr


def test_revoke_unknown_device(live_api: Api) -> None:
    result = run("devices", "revoke", "ghost")
    assert result.exit_code == 2
    assert "no device 'ghost'" in result.stderr


# ---------------------------------------------------------------- artifacts


def test_upload_bundle_dir_and_tar_then_list(
    live_api: Api, make_bundle: BundleFactory, make_tar: TarFactory
) -> None:
    bundle_dir = make_bundle("dir-form", size=4096)
    result = run("artifacts", "upload", str(bundle_dir), "--json")
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)
    assert (first["model_name"], first["profile"]) == ("m", PROFILE)

    again = run("artifacts", "upload", str(bundle_dir), "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["artifact_id"] == first["artifact_id"]

    tar = make_tar("tar-form", version="2")
    human = run("artifacts", "upload", str(tar))
    assert human.exit_code == 0, human.output
    assert human.stdout.startswith("uploaded ") and " m 2 for " in human.stdout

    page = json.loads(run("artifacts", "list", "--json").stdout)
    assert page["count"] == 2
    assert {a["model_version"] for a in page["data"]} == {"1", "2"}
    only = json.loads(run("artifacts", "list", "--model", "nope", "--json").stdout)
    assert only == {"data": [], "count": 0}
    table = run("artifacts", "list")
    assert table.exit_code == 0 and first["artifact_id"][:16] in table.stdout


def test_upload_invalid_artifact_exits_3(live_api: Api, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 64)
    result = run("artifacts", "upload", str(junk))
    assert result.exit_code == 3
    assert "artifact upload refused" in result.stderr


def test_upload_missing_path_is_usage(live_api: Api, tmp_path: Path) -> None:
    result = run("artifacts", "upload", str(tmp_path / "nowhere"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


# ---------------------------------------------------------------- auth and connection


def test_no_token_is_usage(live_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGELOOP_FLEET_API_TOKEN")
    result = run("devices", "list")
    assert result.exit_code == 2
    assert "EDGELOOP_FLEET_API_TOKEN" in result.stderr


def test_wrong_token_is_an_auth_error(live_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELOOP_FLEET_API_TOKEN", "elk_000000000000_wrong")
    result = run("artifacts", "list")
    assert result.exit_code == 1
    assert f"the fleet API at {live_api.url} refused the API key" in result.stderr
    assert "EDGELOOP_FLEET_API_TOKEN" in result.stderr


def test_missing_scope_is_an_auth_error(live_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELOOP_FLEET_API_TOKEN", live_api.key(["fleet:read"]))
    result = run("devices", "register", "dev-1", "--profile", PROFILE)
    assert result.exit_code == 1
    assert "lacks scope 'fleet:write'" in result.stderr
    assert run("devices", "list").exit_code == 0


@pytest.mark.parametrize(
    "args",
    [
        ["devices", "list"],
        ["devices", "register", "dev-1", "--profile", PROFILE],
        ["devices", "revoke", "dev-1"],
        ["artifacts", "list"],
    ],
)
def test_connection_refused_names_the_url(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    url = free_url()
    monkeypatch.setenv("EDGELOOP_FLEET_API_URL", url)
    monkeypatch.setenv("EDGELOOP_FLEET_API_TOKEN", "elk_000000000000_secret")
    result = run(*args)
    assert result.exit_code == 1
    assert f"cannot reach the fleet API at {url}" in result.stderr
    assert "EDGELOOP_FLEET_API_URL" in result.stderr


def test_api_url_option_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGELOOP_FLEET_API_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("EDGELOOP_FLEET_API_TOKEN", "elk_000000000000_secret")
    url = free_url()
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(b"x")
    result = run("artifacts", "upload", str(bundle), "--api-url", url)
    assert result.exit_code == 1
    assert f"cannot reach the fleet API at {url}" in result.stderr


def test_mqtt_deploy_command_is_still_there() -> None:
    result = run("deploy", "--help")
    assert result.exit_code == 0
    assert "--device" in result.stdout and "--wait" in result.stdout


def test_register_bulk_from_a_json_file(live_api: Api, tmp_path: Path) -> None:
    devices = [{"device_id": f"bulk-{i}", "profile": PROFILE} for i in range(3)]
    listing = tmp_path / "devices.json"
    listing.write_text(json.dumps(devices))
    result = run("devices", "register-bulk", str(listing))
    assert result.exit_code == 0, result.output
    logins = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert sorted(logins) == ["bulk-0", "bulk-1", "bulk-2"]
    assert all(len(p) >= 16 for p in logins.values())
    assert "registered 3 devices" in result.stderr
    page = json.loads(run("devices", "list", "--json").stdout)
    assert page["count"] == 3
    # Again, plus a new one: a conflict naming the taken ids, nothing registered.
    listing.write_text(json.dumps({"devices": [*devices, {"device_id": "n", "profile": PROFILE}]}))
    again = run("devices", "register-bulk", str(listing), "--json")
    assert again.exit_code == 1
    assert "'bulk-0', 'bulk-1', 'bulk-2'" in again.stderr
    assert json.loads(run("devices", "list", "--json").stdout)["count"] == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ('{"devices": 3}', "must hold a JSON list of device objects"),
        ('[{"device_id": "a", "profile": "rpi4"}]', "unknown hardware profile 'rpi4'"),
        ('[{"device_id": "a", "profile": "p"}, {"device_id": "a", "profile": "p"}]', "given twice"),
    ],
)
def test_register_bulk_refusals(live_api: Api, tmp_path: Path, content: str, message: str) -> None:
    listing = tmp_path / "devices.json"
    listing.write_text(content)
    result = run("devices", "register-bulk", str(listing))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert json.loads(run("devices", "list", "--json").stdout)["count"] == 0
