"""The cloud CLI against a live cloud API (uvicorn) on SQLite, with an in-process worker."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from cloud.api.client import CloudClient
from cloud.api.main import create_app
from cloud.cli import load_spec, watch_job
from cloud.errors import InvalidRequestError
from cloud.settings import CloudSettings
from cloud.worker import Worker
from edgeloop.cli import cli
from tests.fleet.api.test_api_cli import LiveServer

from .cloud_service import MLP, PROFILES, TOKEN, database, make_settings


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CloudSettings, str]]:
    root = tmp_path_factory.mktemp("cloud-cli")
    with database("sqlite", root) as url:
        settings = make_settings(root, url)
        with LiveServer(create_app(settings, profiles=PROFILES)) as server:
            yield settings, server.url


@pytest.fixture
def run(service: tuple[CloudSettings, str]) -> Any:
    _settings, url = service

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, [*args, "--url", url, "--token", TOKEN])

    return invoke


def test_load_spec_forms(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(MLP))
    (tmp_path / "s.json").write_text(json.dumps(MLP))
    assert load_spec(str(tmp_path / "s.yaml")) == MLP
    assert load_spec(str(tmp_path / "s.json")) == MLP
    assert load_spec(json.dumps(MLP)) == MLP
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        load_spec("{nope")
    with pytest.raises(InvalidRequestError, match="neither inline JSON nor a readable file"):
        load_spec(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(InvalidRequestError, match="must be a mapping"):
        load_spec(str(tmp_path / "list.yaml"))


def test_migrate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    result = CliRunner().invoke(cli, ["cloud", "migrate", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert "cloud database at revision c0" in result.output
    bad = CliRunner().invoke(cli, ["cloud", "migrate", "--database-url", "mysql://x/y"])
    assert bad.exit_code == 2
    assert "'mysql' (from URL 'mysql://x/y') is not supported" in bad.output


def test_client_needs_a_token() -> None:
    result = CliRunner().invoke(cli, ["jobs", "list"])
    assert result.exit_code == 2
    assert "no API token" in result.output
    wrong = CliRunner().invoke(cli, ["jobs", "list", "--url", "http://127.0.0.1:9", "--token", "t"])
    assert wrong.exit_code == 1
    assert "cannot reach the cloud API at http://127.0.0.1:9" in wrong.output


def test_register_train_watch_promote(
    run: Any, service: tuple[CloudSettings, str], tmp_path: Path
) -> None:
    import torch

    settings, _url = service
    registered = run("datasets", "register", "digits", "builtin:digits")
    assert registered.exit_code == 0, registered.output
    assert "digits v1: 1797 samples, shape (1, 8, 8), 10 classes" in registered.output
    listed = json.loads(run("datasets", "list", "--json").stdout)
    assert [d["name"] for d in listed["data"]] == ["digits"]

    bad = run(
        "train",
        json.dumps({**MLP, "architecture": "resnet"}),
        "--model",
        "m",
        "--dataset",
        "digits",
    )
    assert bad.exit_code == 2
    assert "resnet" in bad.output
    wrong_version = run("train", json.dumps(MLP), "--model", "m", "--dataset", "digits:x")
    assert wrong_version.exit_code == 2
    assert "must be a number" in wrong_version.output
    missing = run("train", json.dumps(MLP), "--model", "m", "--dataset", "digits:9")
    assert missing.exit_code == 2
    assert "no version 9 of dataset 'digits'" in missing.output
    space = {
        "base": MLP,
        "search_space": {"lr": {"type": "float", "low": 1, "high": 0}},
        "n_trials": 2,
    }
    assert run("tune", json.dumps(space), "--model", "m", "--dataset", "digits").exit_code == 2

    spec = tmp_path / "mlp.yaml"
    spec.write_text(yaml.safe_dump(MLP))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    worker = Worker(settings, poll_s=0.05)
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1})
    thread.start()
    try:
        trained = run(
            "train", str(spec), "--model", "digits-mlp", "--dataset", "digits:1", "--wait", "--json"
        )
    finally:
        worker.stop()
        thread.join(timeout=60)
        worker.close()
        torch.set_num_threads(threads)
    assert trained.exit_code == 0, trained.output
    job = json.loads(trained.stdout)
    assert job["state"] == "SUCCEEDED"
    assert job["result"]["metrics"]["test_accuracy"] >= 0.95
    assert "epoch 12/12" in trained.stderr
    watched = run("jobs", "watch", str(job["id"]))
    assert watched.exit_code == 0
    assert f"job {job['id']} (train) SUCCEEDED 100%" in watched.output

    with CloudClient(service[1], TOKEN) as client:  # the rich view a terminal gets
        assert watch_job(client, job["id"], live=True).state == "SUCCEEDED"
    shown = json.loads(run("jobs", "show", str(job["id"])).stdout)
    assert shown["result"]["version"] == 1
    assert "digits-mlp" in run("models", "list").output
    versions = run("models", "list", "digits-mlp")
    assert "test_accuracy" in versions.output and "mlp" in versions.output
    promoted = run("models", "promote", "digits-mlp", "1")
    assert promoted.exit_code == 0
    assert "digits-mlp v1: production" in promoted.output
    unknown = run("models", "compile", "digits-mlp", "1", "--profile", "rpi4")
    assert unknown.exit_code == 2
    assert "unknown hardware profile(s) 'rpi4'; choose from: generic/x86_64" in unknown.output
    assert run("models", "promote", "nope", "1").exit_code == 2


def test_cancel_and_watch_a_canceled_job(run: Any) -> None:
    run("datasets", "register", "digits", "builtin:digits")
    submitted = run("train", json.dumps(MLP), "--model", "c", "--dataset", "digits", "--json")
    assert submitted.exit_code == 0, submitted.output
    job_id = json.loads(submitted.stdout)["id"]
    canceled = run("jobs", "cancel", str(job_id))
    assert canceled.exit_code == 0
    assert "CANCELED" in canceled.output
    assert run("jobs", "cancel", str(job_id)).exit_code == 1  # 409: already over
    watched = run("jobs", "watch", str(job_id))
    assert watched.exit_code == 4
    assert f"job {job_id} was canceled" in watched.output
    listed = json.loads(run("jobs", "list", "--state", "CANCELED", "--json").stdout)
    assert job_id in [j["id"] for j in listed["data"]]
    assert run("jobs", "show", "424242").exit_code == 2


def test_lineage_errors(run: Any) -> None:
    bad = run("lineage", "xyz")
    assert bad.exit_code == 2
    assert "expected 64 lowercase hex digits" in bad.output
    missing = run("lineage", "b" * 64)
    assert missing.exit_code == 2
    assert "no compile job produced artifact" in missing.output
