"""The retrain trigger: the pure policy (tables), and runs through the API: labels fire a
train job on the original dataset plus the labels with the parent version linked, approval,
and the compile and canary-deployment steps."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from cloud import crud, db
from cloud.dataloop.retrain import (
    DriftPoint,
    PolicyInputs,
    PolicyRule,
    evaluate_policy,
    sustained_drift,
)
from cloud.datasets import ArrayDataset, load_dataset
from cloud.models import JobState
from cloud.settings import CloudSettings

from .cloud_service import api_client, database, drain, make_settings
from .test_labeling import MODEL, ingest, register_parent

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _series(name: str, scores: list[tuple[int, float]]) -> list[DriftPoint]:
    """Points ``minutes ago -> score``."""
    return [DriftPoint(name, NOW - timedelta(minutes=m), s) for m, s in scores]


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([], None),
        (_series("a", [(40, 0.5), (20, 0.5), (1, 0.5)]), ("a", 40)),
        (_series("a", [(20, 0.5), (1, 0.5)]), None),  # above, but only for 20 min
        (_series("a", [(40, 0.5), (20, 0.1), (1, 0.5)]), None),  # dipped below
        (_series("a", [(40, 0.5), (35, 0.5)]), None),  # stale: newest window 35 min old
        (_series("a", [(90, 0.5), (60, 0.5)]), None),  # stale: nothing recent
        (_series("a", [(40, 0.2), (1, 0.5)]), None),  # equal to the threshold is not above
        (_series("a", [(20, 0.5), (1, 0.5)]) + _series("b", [(45, 0.9), (2, 0.9)]), ("b", 45)),
    ],
)
def test_sustained_drift(points: list[DriftPoint], expected: tuple[str, int] | None) -> None:
    got = sustained_drift(points, threshold=0.2, minutes=30, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == (expected[0], NOW - timedelta(minutes=expected[1]))


@pytest.mark.parametrize(
    ("rule", "inputs", "fire", "approval", "reason"),
    [
        (PolicyRule(min_new_labels=10), PolicyInputs(NOW, new_labels=9), False, False, "9 of 10"),
        (PolicyRule(min_new_labels=10), PolicyInputs(NOW, new_labels=10), True, False, "10 new"),
        (
            PolicyRule(min_new_labels=10, require_approval=True),
            PolicyInputs(NOW, new_labels=12),
            True,
            True,
            "12 new label(s) >= 10",
        ),
        (
            PolicyRule(min_new_labels=10, enabled=False),
            PolicyInputs(NOW, new_labels=50),
            False,
            False,
            "disabled",
        ),
        (
            PolicyRule(min_new_labels=1),
            PolicyInputs(NOW, new_labels=5, active_run="retrain run 3 (training)"),
            False,
            False,
            "run 3 (training) is still in progress",
        ),
        (
            PolicyRule(drift_threshold=0.2, drift_minutes=30),
            PolicyInputs(NOW, drift=_series("dev-1", [(31, 0.4), (1, 0.5)])),
            True,
            False,
            "drift of dev-1 above 0.2 for 31 min",
        ),
        (
            PolicyRule(drift_threshold=0.2, drift_minutes=30),
            PolicyInputs(NOW, drift=_series("dev-1", [(29, 0.4), (1, 0.5)])),
            False,
            False,
            "no device above drift 0.2 for 30 min",
        ),
        (
            PolicyRule(min_new_labels=5, drift_threshold=0.2, drift_minutes=30),
            PolicyInputs(NOW, new_labels=5, drift=_series("d", [(60, 0.3), (0, 0.3)])),
            True,
            False,
            "5 new label(s) >= 5; drift of d",
        ),
        (PolicyRule(), PolicyInputs(NOW, new_labels=100), False, False, "no trigger set"),
    ],
)
def test_evaluate_policy(
    rule: PolicyRule, inputs: PolicyInputs, fire: bool, approval: bool, reason: str
) -> None:
    decision = evaluate_policy(rule, inputs)
    assert (decision.fire, decision.needs_approval) == (fire, approval)
    assert reason in decision.reason


# ---------------------------------------------------------------- through the API


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[CloudSettings]:
    with database("sqlite", tmp_path) as url:
        yield make_settings(tmp_path, url)


@pytest.fixture
def client(settings: CloudSettings) -> Iterator[TestClient]:
    with api_client(settings) as c:
        yield c


def _open_tasks(
    settings: CloudSettings, client: TestClient, digits: ArrayDataset, n: int
) -> tuple[int, list[dict[str, Any]]]:
    parent_id = register_parent(settings, client)
    ids = ingest(settings, digits.x[:n], top1=[0] * n)
    created = client.post("/labeling/tasks", json={"sample_ids": ids}).json()["created"]
    return parent_id, created


def test_policy_validation(settings: CloudSettings, client: TestClient) -> None:
    register_parent(settings, client)
    missing = client.get(f"/retrain/policies/{MODEL}")
    assert missing.status_code == 404 and "PUT /retrain/policies" in missing.json()["detail"]
    none = client.put(f"/retrain/policies/{MODEL}", json={"require_approval": True})
    assert none.status_code == 422 and "min_new_labels" in str(none.json()["detail"])
    bad_rollout = client.put(
        f"/retrain/policies/{MODEL}", json={"min_new_labels": 2, "rollout": {"canary": 1}}
    )
    assert bad_rollout.status_code == 422 and "waves" in bad_rollout.json()["detail"]
    bad_training = client.put(
        f"/retrain/policies/{MODEL}",
        json={"min_new_labels": 2, "training": {"architecture": "nope", "epochs": 1}},
    )
    assert bad_training.status_code == 422 and "'nope'" in bad_training.json()["detail"]
    assert client.put("/retrain/policies/other", json={"min_new_labels": 2}).status_code == 404
    ok = client.put(f"/retrain/policies/{MODEL}", json={"min_new_labels": 2})
    assert ok.status_code == 200 and ok.json()["model"] == MODEL
    assert client.get(f"/retrain/policies/{MODEL}").json()["min_new_labels"] == 2


def test_labels_trigger_a_retrain_on_the_concatenated_dataset(
    settings: CloudSettings, client: TestClient, digits: ArrayDataset
) -> None:
    parent_id, tasks = _open_tasks(settings, client, digits, 4)
    assert client.put(f"/retrain/policies/{MODEL}", json={"min_new_labels": 3}).status_code == 200
    labels = ["7", "1", "2"]
    for task, label in zip(tasks, labels, strict=False):
        assert client.get("/retrain/runs").json()["count"] == 0
        response = client.post(f"/labeling/tasks/{task['id']}/label", json={"label": label})
        assert response.status_code == 200, response.text
    runs = client.get("/retrain/runs", params={"model": MODEL}).json()
    assert runs["count"] == 1
    run = runs["data"][0]
    assert run["state"] == "training" and run["n_labels"] == 3
    assert run["parent_version_id"] == parent_id and run["parent_version"] == 1
    assert "3 new label(s) >= 3" in run["reason"]
    job = client.get(f"/jobs/{run['train_job_id']}").json()
    assert job["kind"] == "train" and job["spec"]["parent_version_id"] == parent_id
    assert job["spec"]["dataset_id"] == run["dataset_id"]
    datasets = client.get("/datasets", params={"name": "digits-relabeled"}).json()["data"]
    assert [d["id"] for d in datasets] == [run["dataset_id"]]
    assert datasets[0]["n_samples"] == len(digits) + 3
    combined = load_dataset(
        str(Path(settings.resolved_blob_dir()) / "datasets" / f"retrain-{run['id']}")
        + "/digits-relabeled.npz"
    )
    np.testing.assert_allclose(combined.x[: len(digits)], digits.x)
    np.testing.assert_allclose(combined.x[len(digits) :], digits.x[:3])
    assert [combined.classes[i] for i in combined.y[len(digits) :]] == labels
    # the labels are now used: they cannot change, and do not fire another run
    used = client.post(f"/labeling/tasks/{tasks[0]['id']}/label", json={"label": "9"})
    assert used.status_code == 409 and f"retrain run {run['id']}" in used.json()["detail"]
    assert (
        client.post(f"/labeling/tasks/{tasks[3]['id']}/label", json={"label": "5"}).status_code
        == 200
    )
    assert client.get("/retrain/runs").json()["count"] == 1

    # the worker trains; the new version's parent is the running version
    drain(settings, timeout_s=60)
    trained = client.get(f"/jobs/{run['train_job_id']}").json()
    assert trained["state"] == JobState.SUCCEEDED, trained["error"]
    version = client.get(f"/models/{MODEL}/versions/2").json()
    assert version["parent_version_id"] == parent_id
    assert version["dataset_id"] == run["dataset_id"]
    # the parent was never compiled: the run ends after training, saying so
    tick = client.post("/retrain/tick").json()
    assert tick["advanced"] == [run["id"]] and tick["errors"] == []
    done = client.get(f"/retrain/runs/{run['id']}").json()
    assert done["state"] == "done" and done["version"] == 2
    assert "never compiled" in done["note"]


def test_approval_required(
    settings: CloudSettings, client: TestClient, digits: ArrayDataset
) -> None:
    _, tasks = _open_tasks(settings, client, digits, 2)
    policy = {"min_new_labels": 1, "require_approval": True}
    assert client.put(f"/retrain/policies/{MODEL}", json=policy).status_code == 200
    client.post(f"/labeling/tasks/{tasks[0]['id']}/label", json={"label": "0"})
    run = client.get("/retrain/runs").json()["data"][0]
    assert run["state"] == "awaiting_approval" and run["train_job_id"] is None
    # a second label does not start a second run while one waits
    client.post(f"/labeling/tasks/{tasks[1]['id']}/label", json={"label": "1"})
    assert client.get("/retrain/runs").json()["count"] == 1
    # the database, too, holds one active run per model (two API processes racing)
    from sqlalchemy.exc import IntegrityError

    from cloud.dataloop.labeling_models import RetrainRun, RetrainRunState

    engine = db.make_engine(settings.resolved_database_url())
    try:
        with Session(engine) as session:
            model = crud.get_model(session, name=MODEL)
            assert model is not None
            session.add(
                RetrainRun(
                    model_id=model.id or 0,
                    active_model_id=model.id,
                    state=RetrainRunState.TRAINING,
                    reason="a racing trigger",
                    parent_version_id=run["parent_version_id"],
                )
            )
            with pytest.raises(IntegrityError):
                session.commit()
    finally:
        engine.dispose()
    url = f"/retrain/runs/{run['id']}/approval"
    assert client.post(url, json={"approve": True}).status_code == 422  # no 'by'
    approved = client.post(url, json={"approve": True, "by": "lead"})
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert body["state"] == "training" and body["approved_by"] == "lead"
    assert body["n_labels"] == 2 and body["train_job_id"] is not None
    again = client.post(url, json={"approve": False, "by": "lead"})
    assert again.status_code == 409 and "awaiting_approval" in again.json()["detail"]
    assert (
        client.post("/retrain/runs/999/approval", json={"approve": True, "by": "x"}).status_code
        == 404
    )


class FakeFleet:
    """A :class:`RetrainTarget` that records what it was asked (unit test of the steps)."""

    def __init__(self, devices: dict[str, str]) -> None:
        self.devices = devices
        self.asked: list[dict[str, str]] = []
        self.deployments: list[dict[str, Any]] = []

    def devices_running(self, model_name: str, artifacts: Any) -> dict[str, str]:
        self.asked.append(dict(artifacts))
        return dict(self.devices)

    def create_deployment(self, name: str, **kwargs: Any) -> str:
        self.deployments.append({"name": name, **kwargs})
        return "4f9b1c9e-0000-4000-8000-000000000001"


def test_compile_and_canary_steps(
    settings: CloudSettings, client: TestClient, digits: ArrayDataset
) -> None:
    from cloud.dataloop import retrain
    from cloud.dataloop.labeling_models import RetrainRunState

    parent_id, tasks = _open_tasks(settings, client, digits, 1)
    client.put(f"/retrain/policies/{MODEL}", json={"min_new_labels": 1, "drift_threshold": 0.3})
    client.post(f"/labeling/tasks/{tasks[0]['id']}/label", json={"label": "0"})
    run_id = client.get("/retrain/runs").json()["data"][0]["id"]
    engine = db.make_engine(settings.resolved_database_url())
    new_session = db.session_factory(engine)
    fleet = FakeFleet({"dev-0001": "generic/x86_64"})
    try:
        with new_session() as session:
            run = retrain.get_run(session, run_id=run_id)
            for profile, artifact in (
                ("generic/x86_64", "a" * 64),
                ("raspberry-pi/4b-aarch64", "b" * 64),
            ):
                crud.add_compile_record(
                    session,
                    model_version_id=parent_id,
                    job_id=run.train_job_id,
                    profile=profile,
                    artifact_id=artifact,
                    fleet_uploaded=True,
                )
            session.commit()
        # the train job is still queued: nothing moves
        assert retrain.tick(new_session, settings=settings, target=fleet).advanced == []
        drain(settings, timeout_s=60)
        report = retrain.tick(new_session, settings=settings, target=fleet)
        assert report.advanced == [run_id], report.errors
        with new_session() as session:
            run = retrain.get_run(session, run_id=run_id)
            assert run.state == RetrainRunState.COMPILING
            assert run.profiles == ["generic/x86_64"] and run.device_ids == ["dev-0001"]
            job = crud.get_job(session, job_id=run.compile_job_id or 0)
            assert job is not None and job.spec["profiles"] == ["generic/x86_64"]
            assert job.spec["model_version_id"] == run.model_version_id
            # play the compile worker: the job succeeded and uploaded one artifact
            crud.add_compile_record(
                session,
                model_version_id=run.model_version_id,
                job_id=job.id,
                profile="generic/x86_64",
                artifact_id="c" * 64,
                fleet_uploaded=True,
            )
            job.state = JobState.SUCCEEDED
            session.add(job)
            session.commit()
        assert fleet.asked == [{"generic/x86_64": "a" * 64, "raspberry-pi/4b-aarch64": "b" * 64}]
        assert retrain.tick(new_session, settings=settings, target=fleet).advanced == [run_id]
        (deployment,) = fleet.deployments
        assert deployment["variants"] == {"generic/x86_64": "c" * 64}
        assert deployment["device_ids"] == ["dev-0001"] and deployment["model_name"] == MODEL
        assert deployment["policy"]["canary"] == {"count": 1}
        assert deployment["policy"]["health_gates"]["max_drift"] == 0.3
        shown = client.get(f"/retrain/runs/{run_id}").json()
        assert shown["state"] == "deployed"
        assert shown["deployment_id"] == "4f9b1c9e-0000-4000-8000-000000000001"
        assert shown["compile_job_id"] is not None and shown["version"] == 2
        # every step is in the new artifact's lineage
        from cloud.crud import RegistryLineageSource
        from cloud.lineage import build_lineage

        with new_session() as session:
            lineage = build_lineage("c" * 64, RegistryLineageSource(session))
        assert lineage.model_version is not None and lineage.model_version.version == 2
        assert lineage.training_run is not None
        assert lineage.training_run.id == str(shown["train_job_id"])
        assert lineage.dataset is not None and lineage.dataset.name == "digits-relabeled"
        assert lineage.dataset.id == str(shown["dataset_id"])
        assert [p.model_version.id for p in lineage.parents] == [str(parent_id)]
    finally:
        engine.dispose()


def test_sustained_drift_fires_from_the_loop(
    settings: CloudSettings, client: TestClient, digits: ArrayDataset
) -> None:
    """Drift scores as the monitor stores them, above the threshold for longer than T: the
    loop's tick starts a run on the original dataset (no labels yet); a short streak does not."""
    import secrets

    from cloud.dataloop.models import DriftScore, Sketch
    from cloud.dataloop.retrain import run_loop

    parent_id = register_parent(settings, client)
    policy = {"drift_threshold": 0.2, "drift_minutes": 30}
    assert client.put(f"/retrain/policies/{MODEL}", json=policy).status_code == 200
    now = datetime.now(UTC)
    engine = db.make_engine(settings.resolved_database_url())

    def store(device: str, minutes_ago: list[int], score: float) -> None:
        with Session(engine) as session:
            for minutes in minutes_ago:
                end = now - timedelta(minutes=minutes)
                window = {"window_start": end - timedelta(minutes=5), "window_end": end}
                sketch = Sketch(
                    sketch_id=secrets.token_hex(16),
                    device_id=device,
                    model=MODEL,
                    version="1",
                    spec_key=MODEL,
                    spec_sha256="0" * 64,
                    n_samples=100,
                    counts={},
                    dropped={},
                    window_start=window["window_start"],
                    window_end=window["window_end"],
                )
                session.add(sketch)
                session.flush()
                session.add(
                    DriftScore(
                        sketch_id=sketch.id or 0,
                        device_id=device,
                        model=MODEL,
                        model_version_id=parent_id,
                        n_samples=100,
                        metric="psi",
                        score=score,
                        threshold=0.2,
                        drifted=score > 0.2,
                        metrics={"psi": score},
                        drifted_features=[],
                        window_start=window["window_start"],
                        window_end=window["window_end"],
                    )
                )
            session.commit()

    try:
        store("dev-0001", [20, 10, 1], 0.6)  # drifted, but only for 20 minutes
        store("dev-0002", [50, 40, 1], 0.05)  # long, but below the threshold
        assert run_loop(settings, iterations=1, every_s=0.01) == 1
        assert client.get("/retrain/runs").json()["count"] == 0
        store("dev-0001", [45, 35], 0.7)  # now above it for 45 minutes
        from click.testing import CliRunner

        from edgeloop.cli import cli

        args = ["dataloop", "retrain", "--once", "--database-url"]
        args += [settings.resolved_database_url(), "--state-dir", str(settings.state_dir)]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        (run,) = client.get("/retrain/runs").json()["data"]
        assert run["state"] == "training" and "drift of dev-0001 above 0.2" in run["reason"]
        assert run["n_labels"] == 0 and run["parent_version_id"] == parent_id
        job = client.get(f"/jobs/{run['train_job_id']}").json()
        original = client.get("/datasets/digits").json()
        assert job["spec"]["dataset_id"] == original["id"] == run["dataset_id"]
        run_loop(settings, iterations=1, every_s=0.01)  # a run is active: no second one
        assert client.get("/retrain/runs").json()["count"] == 1
    finally:
        engine.dispose()


def _bundle(root: Path, key_path: Path, *, version: str, profile: str) -> Path:
    """A sealed bundle of :data:`MODEL` with a fake model.so (no TVM), as the fleet stores it."""
    import os

    from compiler import bundle
    from compiler.signing import load_private_key
    from tests.fleet.conftest import manifest_fields

    fields = manifest_fields(version)
    fields.update(model={"name": MODEL, "version": version}, profile=profile)
    with bundle.staging_dir(root) as staging:
        (staging / "model.so").write_bytes(os.urandom(4096))
        (staging / "report.json").write_text("{}")
        bundle.seal_bundle(
            staging, root, manifest_fields=fields, private_key=load_private_key(key_path)
        )
    return root


def test_fleet_target_against_the_fleet_api(tmp_path: Path) -> None:
    """The production RetrainTarget on a real fleet API: which devices run the parent, and a
    canary deployment with the default rollout (which the fleet's policy parser accepts)."""
    import uuid

    from cloud.dataloop.retrain import FleetRetrainTarget, default_rollout
    from compiler.signing import generate_keys
    from fleet.sdk import FleetClient

    from .fleet_api import running_fleet_api

    profile = "generic/x86_64"
    keys = generate_keys(tmp_path / "keys")
    with running_fleet_api(tmp_path / "fleet", keys.public) as api:
        client = FleetClient(api.url, api.token)
        parent = client.upload_artifact(
            _bundle(tmp_path / "b1", keys.private, version="1", profile=profile)
        )
        new = client.upload_artifact(
            _bundle(tmp_path / "b2", keys.private, version="2", profile=profile)
        )
        for device_id in ("x86-a", "x86-b", "x86-idle"):
            client.register_device(device_id, profile=profile)
        running = [{"name": MODEL, "version": "1", "artifact_id": parent.artifact_id}]
        api.report("x86-a", reported=running)
        api.report("x86-b", reported=running)
        target = FleetRetrainTarget(client)
        try:
            devices = target.devices_running(MODEL, {profile: parent.artifact_id})
            assert devices == {"x86-a": profile, "x86-b": profile}
            deployment_id = target.create_deployment(
                "retrain-1-v2",
                model_name=MODEL,
                variants={profile: new.artifact_id},
                device_ids=sorted(devices),
                policy=default_rollout(0.3),
            )
            deployment = client.get_deployment(uuid.UUID(deployment_id))
            assert deployment.variants == {profile: new.artifact_id}
            # as the fleet parsed it: stage 0 is a canary of one device, then the rest
            assert [len(stage) for stage in deployment.stages] == [1, 1]
            assert deployment.policy["health_gates"]["max_drift"] == 0.3
            assert deployment.policy["abort_failures"] == 1
            assert sorted(d.device_id for d in deployment.devices) == ["x86-a", "x86-b"]
        finally:
            target.close()
