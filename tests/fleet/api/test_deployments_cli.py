"""``edgeloop fleet deployments ...`` against the API served by uvicorn on a free port.

No MQTT broker runs, so the executor does not either and a deployment stays in the phase the
API or an operator command leaves it in: enough for create, list, status (and ``--watch`` up
to its timeout or a terminal phase) and each operator command with its 409.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from fastapi import FastAPI
from rich.console import Console
from sqlmodel import Session

from edgeloop.cli import cli
from fleet import api_cli
from fleet.api.bootstrap import create_admin_key
from fleet.models import DeploymentPublic
from fleet.sdk import FleetClient

from .conftest import PROFILE, TarFactory
from .test_api_cli import LiveServer

PI = "raspberry-pi/4b-aarch64"


@dataclass(frozen=True)
class Lab:
    """Group ``lab``: gen-1, gen-2 (PROFILE, which has a variant) and pi-1 (which has none)."""

    url: str
    artifact_id: str


@pytest.fixture()
def lab(app: FastAPI, make_tar: TarFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    with LiveServer(app) as server:
        with Session(app.state.engine) as session:
            token = create_admin_key(session, "org-deploy-cli").token
        monkeypatch.setenv("EDGELOOP_FLEET_API_URL", server.url)
        monkeypatch.setenv("EDGELOOP_FLEET_API_TOKEN", token)
        with FleetClient(server.url, token) as fleet:
            group = fleet.create_group("lab")
            for device_id, profile in (("gen-1", PROFILE), ("gen-2", PROFILE), ("pi-1", PI)):
                fleet.register_device(device_id, profile=profile, group_id=group.id)
            artifact = fleet.upload_artifact(make_tar("v1"))
        yield Lab(url=server.url, artifact_id=artifact.artifact_id)


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["fleet", "deployments", *args], catch_exceptions=False)


def create(lab: Lab, *extra: str) -> dict[str, object]:
    result = run(
        "create", "--name", "r1", "--model", "m", "--variant", f"{PROFILE}={lab.artifact_id}",
        "--json", *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    created: dict[str, object] = json.loads(result.stdout)
    return created


def test_create_lists_unmatched_then_list_and_status(lab: Lab) -> None:
    variant = f"{PROFILE}={lab.artifact_id}"
    result = run("create", "--name", "r1", "--model", "m", "--variant", variant, "--group", "lab")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("created deployment ")
    assert "2 device(s) in 2 stage(s), phase PENDING" in result.stdout
    assert "pi-1 (profile raspberry-pi/4b-aarch64)" in result.stderr
    assert f"add --variant PROFILE=ARTIFACT_ID for: {PI}" in result.stderr

    created = create(lab, "--device", "gen-1", "--canary", "100%")
    assert created["phase"] == "PENDING" and created["unmatched"] == []
    policy = created["policy"]
    assert policy["canary"] == {"percent": 100.0}  # type: ignore[index]
    assert [d["device_id"] for d in created["devices"]] == ["gen-1"]  # type: ignore[attr-defined]

    listed = run("list", "--json")
    assert listed.exit_code == 0, listed.output
    page = json.loads(listed.stdout)
    assert page["count"] == 2 and page["data"][0]["id"] == created["id"]
    human = run("list")
    assert human.exit_code == 0 and str(created["id"]) in human.stdout
    assert run("list", "--phase", "PAUSED", "--json").stdout.startswith('{"data": [], "count": 0')

    status = run("status", str(created["id"]), "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout) == created
    table = run("status", str(created["id"]))
    assert table.exit_code == 0, table.output
    assert "phase: PENDING" in table.stdout and "gen-1" in table.stdout
    assert "canary" in table.stdout and "NOT_STARTED 1" in table.stdout


def test_create_with_a_yaml_policy(lab: Lab, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("canary: 1\nwaves: ['50%']\nmax_retries: 2\n")
    created = create(lab, "--group", "lab", "--policy", str(policy), "--seed", "7")
    stored = created["policy"]
    assert stored["waves"] == [{"percent": 50.0}]  # type: ignore[index]
    assert stored["max_retries"] == 2  # type: ignore[index]
    assert len(created["stages"]) == 2  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variant", "no-equals"], "'no-equals' is not PROFILE=ARTIFACT_ID"),
        (["--variant", "p=a", "--variant", "p=b"], "profile 'p' is given twice"),
        (["--variant", "p=a", "--canary", "lots"], "'lots' is neither a device count"),
        (["--variant", "p=a", "--tag", "site"], "'site' is not KEY=VALUE"),
    ],
)
def test_usage_errors_name_the_value(args: list[str], message: str) -> None:
    result = run("create", "--name", "r", "--model", "m", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("policy.txt", "canary: 1", "has suffix '.txt'; choose from: .json, .yaml, .yml"),
        ("policy.json", "{canary", "is not valid JSON"),
        ("policy.yaml", "- 1\n- 2\n", "holds a list, not a mapping"),
    ],
)
def test_unreadable_policy_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    result = run("create", "--name", "r", "--model", "m", "--variant", "p=a", "--policy", str(path))
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_refusals_of_the_api_exit_2_with_its_message(lab: Lab, tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"canary": 1, "waves": ["100%"], "succes_threshold": 1}))
    variant = f"{PROFILE}={lab.artifact_id}"
    base = ["create", "--name", "r", "--model", "m", "--variant", variant]
    result = run(*base, "--group", "lab", "--policy", str(policy))
    assert result.exit_code == 2, result.output
    assert "unknown field 'succes_threshold'; choose from:" in result.stderr
    result = run(*base, "--device", "nope")
    assert result.exit_code == 2 and "nope" in result.stderr
    missing = run("status", "00000000-0000-0000-0000-000000000000")
    assert missing.exit_code == 2, missing.output
    bad_id = run("status", "not-a-uuid")
    assert bad_id.exit_code == 2 and "'not-a-uuid' is not a valid UUID" in bad_id.output


def test_watch_times_out_naming_the_last_phase(lab: Lab) -> None:
    deployment_id = str(create(lab, "--group", "lab")["id"])
    result = run("status", deployment_id, "--watch", "--interval", "0.1", "--timeout", "0.4")
    assert result.exit_code == 1, result.output
    assert "timed out after 0.4 s" in result.stderr
    assert "its last phase is PENDING" in result.stderr
    changes = [line for line in result.stderr.splitlines() if "; canary of 1 wave(s)" in line]
    assert len(changes) == 1, result.stderr  # one line per change, not per poll


def test_operator_commands_and_conflicts(lab: Lab) -> None:
    deployment_id = str(create(lab, "--group", "lab")["id"])

    paused = run("pause", deployment_id, "--json")
    assert paused.exit_code == 0, paused.output
    assert json.loads(paused.stdout)["phase"] == "PAUSED"
    again = run("pause", deployment_id)
    assert again.exit_code == 1, again.output
    assert "cannot pause" in again.stderr and "in phase PAUSED" in again.stderr
    assert "allowed in: PENDING, CANARY, ROLLING" in again.stderr

    resumed = run("resume", deployment_id)
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.startswith(f"resumed deployment {deployment_id}: now PENDING")
    assert run("resume", deployment_id).exit_code == 1

    canceled = run("cancel", deployment_id)
    assert canceled.exit_code == 0 and "now CANCELED" in canceled.stdout
    watched = run("status", deployment_id, "--watch", "--timeout", "5")
    assert watched.exit_code == 1, watched.output
    assert f"deployment {deployment_id} ended CANCELED" in watched.stderr
    assert run("cancel", deployment_id).exit_code == 1

    rolled = run("rollback", deployment_id, "--json")
    assert rolled.exit_code == 0, rolled.output
    assert json.loads(rolled.stdout)["phase"] == "ROLLED_BACK"
    done = run("status", deployment_id, "--watch", "--timeout", "5", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["phase"] == "ROLLED_BACK"
    refused = run("rollback", deployment_id)
    assert refused.exit_code == 1 and "cannot roll back" in refused.stderr


def test_watch_on_a_terminal_shows_a_live_view(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    deployment_id = str(create(lab, "--group", "lab")["id"])
    assert run("cancel", deployment_id).exit_code == 0
    screen = io.StringIO()
    monkeypatch.setattr(
        api_cli, "err_console", Console(file=screen, force_terminal=True, width=160)
    )
    result = run("status", deployment_id, "--watch", "--timeout", "5")
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith(f"deployment {deployment_id}: CANCELED")
    shown = screen.getvalue()
    assert "phase: " in shown and "CANCELED" in shown and "canary" in shown
    assert "gen-1" in shown and "pi-1 (raspberry-pi/4b-aarch64)" in shown


class FakeFleet:
    """Answers ``get_deployment`` with one phase after another."""

    def __init__(self, template: DeploymentPublic, phases: list[str]) -> None:
        self.answers = [template.model_copy(update={"phase": p}) for p in phases]

    def get_deployment(self, deployment_id: uuid.UUID) -> DeploymentPublic:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_watch_deployment_polls_until_terminal_or_timeout(lab: Lab) -> None:
    template = DeploymentPublic.model_validate(create(lab, "--group", "lab"))
    seen: list[str] = []
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    def watch(phases: list[str], timeout: float | None) -> DeploymentPublic:
        fleet = FakeFleet(template, phases)
        return api_cli.watch_deployment(
            fleet,  # type: ignore[arg-type]
            template.id,
            interval=1.0,
            timeout=timeout,
            on_update=lambda d: seen.append(d.phase),
            sleep=sleep,
            clock=lambda: now[0],
        )

    assert watch(["PENDING", "CANARY", "ROLLING", "SUCCEEDED"], None).phase == "SUCCEEDED"
    assert seen == ["PENDING", "CANARY", "ROLLING", "SUCCEEDED"] and now[0] == 3.0
    with pytest.raises(api_cli.WatchTimeout, match="last phase is ROLLING") as raised:
        watch(["CANARY", "ROLLING"], 2.5)
    assert raised.value.deployment.phase == "ROLLING" and now[0] == 5.5
