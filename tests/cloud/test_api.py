"""The cloud API on SQLite and PostgreSQL: auth, datasets, job submission and validation,
cancel, restart survival, the registry. Workers are not started here (see test_worker.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from cloud import crud, db
from cloud.errors import InvalidRequestError
from cloud.settings import CloudSettings

from .cloud_service import (
    MLP,
    PROFILES,
    TABLES,
    api_client,
    database,
    make_settings,
    postgres_database,
    truncate,
)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CloudSettings]:
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        truncate(url)
        yield make_settings(tmp_path, url)
        return
    with database("sqlite", tmp_path) as sqlite_url:
        yield make_settings(tmp_path, sqlite_url)


@pytest.fixture
def client(settings: CloudSettings) -> Iterator[TestClient]:
    with api_client(settings) as c:
        yield c


@pytest.fixture
def digits(client: TestClient) -> dict[str, Any]:
    response = client.post("/datasets", json={"name": "digits", "source": "builtin:digits"})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _train(client: TestClient, **overrides: Any) -> Any:
    body = {"model": "digits-mlp", "dataset": "digits", "training": MLP, **overrides}
    return client.post("/jobs/train", json=body)


def _jobs(client: TestClient) -> int:
    count: int = client.get("/jobs").json()["count"]
    return count


def test_token_required(client: TestClient) -> None:
    assert client.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok"}
    missing = client.get("/jobs", headers={"Authorization": ""})
    assert missing.status_code == 401
    assert "no API token" in missing.json()["detail"]
    wrong = client.get("/jobs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert client.get("/jobs").status_code == 200


def test_app_refuses_to_start_without_token(tmp_path: Path) -> None:
    settings = CloudSettings(state_dir=tmp_path)
    with pytest.raises(InvalidRequestError, match="EDGELOOP_CLOUD_API_TOKEN"):
        from cloud.api.main import create_app

        create_app(settings)


def test_datasets_are_versioned_by_content(
    client: TestClient, settings: CloudSettings, tmp_path: Path
) -> None:
    source = tmp_path / "blobs.npz"
    rng = np.random.default_rng(0)
    np.savez(source, x=rng.random((40, 6), dtype=np.float32), y=np.arange(40) % 2)
    first = client.post("/datasets", json={"name": "blobs", "source": str(source)})
    assert first.status_code == 201, first.text
    v1 = first.json()
    assert (v1["version"], v1["kind"], v1["input_shape"], v1["n_samples"]) == (1, "npz", [6], 40)
    assert v1["classes"] == ["0", "1"]
    again = client.post("/datasets", json={"name": "blobs", "source": str(source)})
    assert again.status_code == 200
    assert again.json()["id"] == v1["id"]
    # The service keeps its own copy: changing the source makes a new version, v1 stays.
    np.savez(source, x=rng.random((50, 6), dtype=np.float32), y=np.arange(50) % 2)
    v2 = client.post("/datasets", json={"name": "blobs", "source": str(source)}).json()
    assert (v2["version"], v2["n_samples"]) == (2, 50)
    assert v2["digest"] != v1["digest"]
    stored = settings.resolved_blob_dir() / "datasets" / v1["digest"] / "blobs.npz"
    assert np.load(stored)["x"].shape == (40, 6)
    listed = client.get("/datasets", params={"name": "blobs"}).json()
    assert [d["version"] for d in listed["data"]] == [1, 2]
    assert client.get("/datasets/blobs").json()["version"] == 2
    assert client.get("/datasets/blobs", params={"version": 1}).json()["n_samples"] == 40
    assert client.get("/datasets/nope").status_code == 404


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"name": "bad name", "source": "builtin:digits"}, "dataset name 'bad name' is invalid"),
        ({"name": "d", "source": "builtin:digits", "kind": "parquet"}, "'parquet' is unknown"),
        ({"name": "d", "source": "/nonexistent/data.csv"}, "/nonexistent/data.csv"),
        ({"name": "d", "source": "builtin:mnist"}, "mnist"),
    ],
)
def test_bad_datasets_are_refused(client: TestClient, body: dict[str, Any], expected: str) -> None:
    response = client.post("/datasets", json=body)
    assert response.status_code == 422, response.text
    assert expected in str(response.json()["detail"])
    assert client.get("/datasets").json()["count"] == 0


def test_train_job_is_queued_not_run(client: TestClient, digits: dict[str, Any]) -> None:
    response = _train(client, max_attempts=3)
    assert response.status_code == 201, response.text
    job = response.json()
    assert (job["kind"], job["state"], job["attempts"], job["max_attempts"]) == (
        "train",
        "QUEUED",
        0,
        3,
    )
    assert job["spec"]["dataset_id"] == digits["id"]
    assert job["spec"]["training"]["architecture"] == "mlp"
    assert client.get(f"/jobs/{job['id']}").json()["state"] == "QUEUED"
    assert client.get("/jobs", params={"state": "QUEUED", "kind": "train"}).json()["count"] == 1
    assert client.get("/jobs", params={"state": "RUNNING"}).json()["count"] == 0


@pytest.mark.parametrize(
    ("overrides", "status", "expected"),
    [
        ({"training": {**MLP, "architecture": "resnet"}}, 422, "resnet"),
        ({"training": {**MLP, "hparams": {"hiden": 3}}}, 422, "hiden"),
        ({"training": {**MLP, "epochs": 0}}, 422, "epochs"),
        ({"training": {**MLP, "optimizer": "lbfgs"}}, 422, "optimizer"),
        ({"dataset": "nope"}, 404, "no dataset 'nope'"),
        ({"dataset_version": 7}, 404, "no version 7 of dataset 'digits'"),
        ({"model": "bad/name"}, 422, "model name 'bad/name' is invalid"),
        ({"parent_version": 3}, 404, "no version 3 to retrain"),
    ],
)
def test_bad_train_jobs_are_refused(
    client: TestClient,
    digits: dict[str, Any],
    overrides: dict[str, Any],
    status: int,
    expected: str,
) -> None:
    response = _train(client, **overrides)
    assert response.status_code == status, response.text
    assert expected in str(response.json()["detail"])
    assert _jobs(client) == 0


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({}, "search_space"),
        ({"learning_rate": {"type": "float", "low": 1.0, "high": 0.1}}, "low < high"),
        ({"learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}}, "low > 0"),
        ({"width": {"type": "categorical", "choices": []}}, "choices"),
        ({"nonsense": {"type": "int", "low": 1, "high": 4}}, "nonsense"),
    ],
)
def test_bad_search_spaces_are_refused(
    client: TestClient, digits: dict[str, Any], space: dict[str, Any], expected: str
) -> None:
    hpo = {"base": MLP, "search_space": space, "n_trials": 4, "workers": 2}
    response = client.post(
        "/jobs/hpo", json={"model": "digits-mlp", "dataset": "digits", "hpo": hpo}
    )
    assert response.status_code == 422, response.text
    assert expected in str(response.json()["detail"])
    assert _jobs(client) == 0


def _version(settings: CloudSettings, dataset_id: int, model: str = "digits-mlp") -> int:
    engine = db.make_engine(settings.resolved_database_url())
    try:
        with Session(engine) as session:
            row = crud.register_version(
                session,
                model_name=model,
                metrics={"test_accuracy": 0.97},
                spec=MLP,
                dataset_id=dataset_id,
                training_job_id=None,
                code_version="edgeloop test",
                parent_version_id=None,
                weights_path="/w",
                onnx_path="/o",
                baseline_path="/b",
                input_shape=[1, 8, 8],
                classes=[str(i) for i in range(10)],
            )
            session.commit()
            return row.version
    finally:
        engine.dispose()


def test_compile_jobs_validate_profiles_and_versions(
    client: TestClient, settings: CloudSettings, digits: dict[str, Any]
) -> None:
    _version(settings, digits["id"])
    body = {"model": "digits-mlp", "version": 1, "profiles": ["generic/x86_64", "rpi4"]}
    response = client.post("/jobs/compile", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "'rpi4'" in detail and all(p in detail for p in PROFILES)
    response = client.post("/jobs/compile", json={**body, "profiles": ["generic/x86_64"] * 2})
    assert response.status_code == 422
    assert "more than once" in response.json()["detail"]
    response = client.post("/jobs/compile", json={**body, "version": 9, "profiles": PROFILES})
    assert response.status_code == 404
    assert "no version 9" in response.json()["detail"]
    assert client.post("/jobs/compile", json={**body, "profiles": []}).status_code == 422
    assert _jobs(client) == 0
    ok = client.post("/jobs/compile", json={**body, "profiles": PROFILES, "tuning_trials": 0})
    assert ok.status_code == 201
    assert ok.json()["spec"] == {"model_version_id": 1, "profiles": PROFILES, "tuning_trials": 0}


def test_cancel_queued_job_and_its_children(client: TestClient, digits: dict[str, Any]) -> None:
    job = _train(client).json()
    canceled = client.post(f"/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200
    assert canceled.json()["state"] == "CANCELED"
    assert canceled.json()["error"] == "canceled before it started"
    again = client.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert "already CANCELED" in again.json()["detail"]
    events = client.get(f"/jobs/{job['id']}/events").json()
    assert [e["message"] for e in events["data"]] == ["cancel requested"]
    assert client.post("/jobs/999/cancel").status_code == 404


def test_jobs_survive_api_restart(settings: CloudSettings, digits: dict[str, Any]) -> None:
    with api_client(settings) as first:
        job = _train(first).json()
    with api_client(settings) as second:
        again = second.get(f"/jobs/{job['id']}").json()
    assert (again["id"], again["state"], again["spec"]) == (job["id"], "QUEUED", job["spec"])


def test_registry_promote(
    client: TestClient, settings: CloudSettings, digits: dict[str, Any]
) -> None:
    assert _version(settings, digits["id"]) == 1
    assert _version(settings, digits["id"]) == 2
    models = client.get("/models").json()
    assert models["data"][0] | {"created_at": None} == {
        "name": "digits-mlp",
        "created_at": None,
        "versions": 2,
        "latest_version": 2,
        "production_version": None,
    }
    url = "/models/digits-mlp/versions"
    assert client.post(f"{url}/1/promote", json={"stage": "production"}).json()["stage"] == (
        "production"
    )
    assert client.post(f"{url}/2/promote", json={"stage": "production"}).status_code == 200
    stages = {v["version"]: v["stage"] for v in client.get(url).json()["data"]}
    assert stages == {1: "staging", 2: "production"}
    assert client.get("/models/digits-mlp").json()["production_version"] == 2
    bad = client.post(f"{url}/1/promote", json={"stage": "archived"})
    assert bad.status_code == 422
    assert client.post(f"{url}/7/promote", json={"stage": "staging"}).status_code == 404
    assert client.get("/models/nope").status_code == 404
    assert client.get(f"{url}/1/compiles").json() == {"data": [], "count": 0}


def test_lineage_errors(client: TestClient) -> None:
    bad = client.get("/lineage/xyz")
    assert bad.status_code == 422
    assert "64 lowercase hex digits" in bad.json()["detail"]
    missing = client.get("/lineage/" + "a" * 64)
    assert missing.status_code == 404


def test_migrations_match_models(settings: CloudSettings) -> None:
    """The service's tables as migrated equal cloud/models.py; the database is at head."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlmodel import SQLModel

    import cloud.models  # noqa: F401

    def ours(obj: Any, name: str | None, type_: str, *_: Any) -> bool:
        table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", "")
        return table in TABLES

    url = settings.resolved_database_url()
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "version_table": db.VERSION_TABLE,
                    "include_object": ours,
                },
            )
            diff = compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()
    assert diff == []
    head = ScriptDirectory.from_config(db.alembic_config(url)).get_current_head()
    assert db.current_revision(url) == head
