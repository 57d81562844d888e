"""The must-show of issue 5, end to end with real processes.

The cloud API under uvicorn and two ``edgeloop cloud worker`` subprocesses on one SQLite
database: register ``builtin:digits``, train to >= 95% test accuracy, tune with Optuna over
8 trials on both workers, compile the best version for ``generic/x86_64`` and
``raspberry-pi/4b-aarch64`` (no tuning trials) into a running fleet API's artifact store,
and print the lineage with ``edgeloop lineage``. Then the same study on PostgreSQL driven by
two worker processes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cloud.api.client import CloudClient
from cloud.api.main import create_app
from cloud.cli import watch_job
from cloud.models import CompileJobCreate, DatasetCreate, HpoJobCreate, TrainJobCreate
from cloud.settings import CloudSettings
from compiler.signing import generate_keys
from edgeloop.cli import cli
from fleet.sdk import FleetClient
from tests.fleet.api.test_api_cli import LiveServer

from .cloud_service import MLP, TOKEN, WorkerProcess, database, make_settings
from .fleet_api import running_fleet_api

pytestmark = pytest.mark.slow

PROFILES = ["generic/x86_64", "raspberry-pi/4b-aarch64"]
HPO: dict[str, Any] = {
    "base": {**MLP, "epochs": 6},
    "search_space": {
        "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "hidden": {"type": "categorical", "choices": [32, 64, 96]},
    },
    "n_trials": 8,
    "workers": 2,
    "pruner": "median",
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _workers(settings: CloudSettings, root: Path, n: int, **env: str) -> ExitStack:
    stack = ExitStack()
    for i in range(n):
        proc = WorkerProcess(settings, root / f"worker-{i}.log", **env)
        stack.callback(proc.stop)
    return stack


def _worker_of(client: CloudClient, job_id: int) -> str:
    for event in client.events(job_id).data:
        if event.message.startswith("attempt "):
            return event.message.rsplit(" ", 1)[-1]
    raise AssertionError(f"job {job_id} has no attempt event")


def _check_hpo(client: CloudClient, parent_id: int) -> None:
    parent = watch_job(client, parent_id, poll_s=0.5, timeout_s=240, live=False)
    kids = client.list_jobs(parent_id=parent_id).data
    assert len(kids) == 2 and all(k.state == "SUCCEEDED" for k in kids), kids
    assert sum(int((k.result or {})["trials_run"]) for k in kids) == 8
    assert len({_worker_of(client, k.id) for k in kids}) == 2, "both workers must run trials"
    assert parent.result is not None and parent.result["n_trials"] == 8


def test_digits_train_tune_compile_lineage(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys")
    with ExitStack() as stack:
        fleet = stack.enter_context(running_fleet_api(tmp_path / "fleet", keys.public))
        url = stack.enter_context(database("sqlite", tmp_path))
        settings = make_settings(
            tmp_path,
            url,
            fleet_url=fleet.url,
            fleet_api_key=fleet.token,
            signing_key=keys.private,
            tuning_db=tmp_path / "tuning",
            # Long enough for a TVM build holding the GIL; the kill test is test_worker's.
            lease_s=20.0,
        )
        server = stack.enter_context(LiveServer(create_app(settings)))
        client = stack.enter_context(CloudClient(server.url, TOKEN))
        stack.enter_context(
            _workers(
                settings,
                tmp_path,
                2,
                EDGELOOP_CLOUD_FLEET_URL=fleet.url,
                EDGELOOP_CLOUD_FLEET_API_KEY=fleet.token,
                EDGELOOP_CLOUD_SIGNING_KEY=str(keys.private),
                EDGELOOP_CLOUD_TUNING_DB=str(tmp_path / "tuning"),
            )
        )

        dataset = client.register_dataset(DatasetCreate(name="digits", source="builtin:digits"))
        assert (dataset.version, dataset.n_samples) == (1, 1797)

        train = client.submit_train(
            TrainJobCreate.model_validate({"model": "digits", "dataset": "digits", "training": MLP})
        )
        trained = watch_job(client, train.id, poll_s=0.5, timeout_s=180, live=False)
        assert trained.result is not None
        assert trained.result["metrics"]["test_accuracy"] >= 0.95, trained.result
        assert trained.result["version"] == 1

        tune = client.submit_hpo(
            HpoJobCreate.model_validate({"model": "digits", "dataset": "digits", "hpo": HPO})
        )
        _check_hpo(client, tune.id)

        versions = client.list_versions("digits").data
        assert sorted(v.version for v in versions) == [1, 2]
        best = max(versions, key=lambda v: v.metrics["test_accuracy"])
        assert best.metrics["test_accuracy"] >= 0.95
        client.promote("digits", best.version, stage=best.stage.__class__("production"))

        compile_job = client.submit_compile(
            CompileJobCreate(model="digits", version=best.version, profiles=PROFILES)
        )
        compiled = watch_job(client, compile_job.id, poll_s=1.0, timeout_s=400, live=False)
        assert compiled.result is not None
        outcomes = {a["profile"]: a for a in compiled.result["artifacts"]}
        assert set(outcomes) == set(PROFILES)
        assert all(o["error"] is None and o["uploaded"] for o in outcomes.values()), outcomes
        records = client.compiles("digits", best.version).data
        assert {r.profile for r in records} == set(PROFILES)

        with FleetClient(fleet.url, fleet.token) as fleet_client:
            stored = {a.artifact_id: a for a in fleet_client.list_artifacts().data}
        for outcome in outcomes.values():
            artifact = stored[outcome["artifact_id"]]
            assert (artifact.model_name, artifact.model_version) == ("digits", str(best.version))

        artifact_id = outcomes["raspberry-pi/4b-aarch64"]["artifact_id"]
        runner = CliRunner()
        args = ["lineage", artifact_id, "--url", server.url, "--token", TOKEN]
        shown = runner.invoke(cli, args)
        assert shown.exit_code == 0, shown.output
        text = " ".join(shown.output.split())
        for part in (
            "digits v1",  # the dataset
            f"digits v{best.version}",  # the model version
            "raspberry-pi/4b-aarch64",
            artifact_id[:12],
            str(tune.id if best.version == 2 else train.id),
        ):
            assert part in text, (part, shown.output)
        as_json = runner.invoke(cli, [*args, "--json"])
        assert as_json.exit_code == 0, as_json.output
        lineage = json.loads(as_json.stdout)
        assert lineage["dataset"]["digest"] == dataset.digest
        assert lineage["model_version"]["version"] == best.version
        assert lineage["compile"]["profile"] == "raspberry-pi/4b-aarch64"
        assert lineage["training_run"]["state"] == "SUCCEEDED"


def test_hpo_study_on_postgres_with_two_workers(tmp_path: Path) -> None:
    with ExitStack() as stack:
        url = stack.enter_context(database("postgres", tmp_path))
        settings = make_settings(tmp_path, url)
        server = stack.enter_context(LiveServer(create_app(settings, profiles=PROFILES)))
        client = stack.enter_context(CloudClient(server.url, TOKEN))
        stack.enter_context(_workers(settings, tmp_path, 2))
        client.register_dataset(DatasetCreate(name="digits", source="builtin:digits"))
        tune = client.submit_hpo(
            HpoJobCreate.model_validate({"model": "digits", "dataset": "digits", "hpo": HPO})
        )
        _check_hpo(client, tune.id)
        version = client.get_version("digits", 1)
        assert version.training_job_id == tune.id
        assert Path(version.onnx_path).is_file()
