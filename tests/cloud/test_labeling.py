"""Relabeling through the cloud API: samples ingested as a device sends them become label
tasks; label, skip and their 4xx cases; the Label Studio round trip; the labeling page."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from agent import protocol
from cloud import crud, db
from cloud.datasets import ArrayDataset
from cloud.settings import CloudSettings

from .cloud_service import MLP, api_client, database, make_settings

MODEL = "digits-mlp"
DEVICE = "dev-0001"
CLASSES = [str(i) for i in range(10)]


def register_parent(settings: CloudSettings, client: TestClient) -> int:
    """Dataset ``digits`` (builtin) and version 1 of :data:`MODEL` trained on it (row id)."""
    response = client.post("/datasets", json={"name": "digits", "source": "builtin:digits"})
    assert response.status_code == 201, response.text
    engine = db.make_engine(settings.resolved_database_url())
    try:
        with Session(engine) as session:
            version = crud.register_version(
                session,
                model_name=MODEL,
                metrics={"test_accuracy": 0.9},
                spec=MLP,
                dataset_id=response.json()["id"],
                training_job_id=None,
                code_version="test",
                parent_version_id=None,
                weights_path="/nonexistent/model.pt",
                onnx_path="/nonexistent/model.onnx",
                baseline_path="/nonexistent/baseline.json",
                input_shape=[1, 8, 8],
                classes=CLASSES,
            )
            session.commit()
            return version.id or 0
    finally:
        engine.dispose()


def ingest(
    settings: CloudSettings,
    inputs: np.ndarray,
    *,
    device: str = DEVICE,
    version: str = "1",
    top1: list[int] | None = None,
    start: datetime | None = None,
) -> list[str]:
    """Store samples through the real ingestion path (a SampleBatch as a device sends it)."""
    from cloud.dataloop.ingest import IngestStore
    from cloud.dataloop.labeling import tensor_dir

    start = start or datetime.now(UTC) - timedelta(minutes=5)
    samples = []
    for i, x in enumerate(inputs):
        x = np.asarray(x, dtype=np.float32).reshape(1, 1, 8, 8)
        samples.append(
            protocol.CapturedSample(
                sample_id=uuid.uuid4().hex,
                device_id=device,
                model=MODEL,
                version=version,
                ts=start + timedelta(seconds=i),
                reason="low_confidence",
                top1=None if top1 is None else top1[i],
                confidence=0.31,
                inputs=[
                    protocol.Tensor(
                        name="input",
                        dtype="float32",
                        shape=list(x.shape),
                        data=base64.b64encode(x.astype("<f4").tobytes()).decode(),
                    )
                ],
                outputs=[],
            )
        )
    engine = db.make_engine(settings.resolved_database_url())
    try:
        store = IngestStore(engine, tensor_dir(settings))
        for k in range(0, len(samples), 10):
            batch = protocol.SampleBatch(device_id=device, samples=samples[k : k + 10])
            result = store.write(
                [(protocol.capture_samples(device), batch.model_dump_json().encode())]
            )
            assert result.samples_inserted == len(batch.samples)
    finally:
        engine.dispose()
    return [s.sample_id for s in samples]


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[CloudSettings]:
    with database("sqlite", tmp_path) as url:
        yield make_settings(tmp_path, url)


@pytest.fixture
def client(settings: CloudSettings) -> Iterator[TestClient]:
    with api_client(settings) as c:
        yield c


@pytest.fixture
def tasks(
    settings: CloudSettings, client: TestClient, digits: ArrayDataset
) -> list[dict[str, Any]]:
    register_parent(settings, client)
    ids = ingest(settings, digits.x[:6], top1=[int(v) for v in digits.y[:6]])
    response = client.post("/labeling/tasks", json={"sample_ids": ids})
    assert response.status_code == 201, response.text
    created: list[dict[str, Any]] = response.json()["created"]
    return created


def test_tasks_from_a_selection(tasks: list[dict[str, Any]], client: TestClient) -> None:
    assert len(tasks) == 6
    first = tasks[0]
    assert first["state"] == "open" and first["model"] == MODEL and first["version"] == 1
    assert first["classes"] == CLASSES
    assert first["reason"] == "low_confidence" and first["confidence"] == pytest.approx(0.31)
    assert first["prediction"] in CLASSES
    # the same samples again: nothing duplicated
    again = client.post("/labeling/tasks", json={"sample_ids": [t["sample_id"] for t in tasks]})
    assert again.status_code == 201 and again.json() == {"created": [], "existing": 6}
    page = client.get("/labeling/tasks", params={"limit": 4, "offset": 4}).json()
    assert page["count"] == 6 and [t["id"] for t in page["data"]] == [t["id"] for t in tasks[4:]]
    assert client.get("/labeling/tasks", params={"device_id": "nope"}).json()["count"] == 0


def test_create_rejects_unknown_and_ambiguous_input(
    tasks: list[dict[str, Any]], client: TestClient
) -> None:
    unknown = "f" * 32
    missing = client.post("/labeling/tasks", json={"sample_ids": [tasks[0]["sample_id"], unknown]})
    assert missing.status_code == 404 and unknown in missing.json()["detail"]
    both = client.post("/labeling/tasks", json={"sample_ids": [unknown], "alert_id": 1})
    assert both.status_code == 422 and "exactly one" in str(both.json()["detail"])
    bad_reason = client.post("/labeling/tasks", json={"sample_ids": [unknown], "reason": "x"})
    assert bad_reason.status_code == 422 and "drifted_window" in str(bad_reason.json()["detail"])
    no_alert = client.post("/labeling/tasks", json={"alert_id": 999})
    assert no_alert.status_code == 404 and "999" in no_alert.json()["detail"]
    assert client.get("/labeling/tasks").json()["count"] == 6


def test_sample_of_an_unknown_version_is_refused(
    settings: CloudSettings, client: TestClient, digits: ArrayDataset
) -> None:
    register_parent(settings, client)
    ids = ingest(settings, digits.x[:1], version="7")
    response = client.post("/labeling/tasks", json={"sample_ids": ids})
    assert response.status_code == 422
    assert "'7'" in response.json()["detail"] and ids[0] in response.json()["detail"]
    assert client.get("/labeling/tasks").json()["count"] == 0


def test_label_and_skip(tasks: list[dict[str, Any]], client: TestClient) -> None:
    task_id = tasks[0]["id"]
    done = client.post(f"/labeling/tasks/{task_id}/label", json={"label": "3", "labeled_by": "ann"})
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["state"] == "labeled" and body["label"] == "3" and body["labeled_by"] == "ann"
    assert body["labeled_at"] is not None
    wrong = client.post(f"/labeling/tasks/{task_id}/label", json={"label": "cat"})
    assert wrong.status_code == 422
    assert "'cat'" in wrong.json()["detail"] and "'0', '1'" in wrong.json()["detail"]
    assert client.get(f"/labeling/tasks/{task_id}").json()["label"] == "3"  # unchanged
    assert client.post(f"/labeling/tasks/{task_id}/label", json={"label": ""}).status_code == 422
    assert client.post("/labeling/tasks/9999/label", json={"label": "3"}).status_code == 404
    skipped = client.post(f"/labeling/tasks/{tasks[1]['id']}/skip", json={})
    assert skipped.status_code == 200 and skipped.json()["state"] == "skipped"
    counts = {
        state: client.get("/labeling/tasks", params={"state": state}).json()["count"]
        for state in ("open", "labeled", "skipped")
    }
    assert counts == {"open": 4, "labeled": 1, "skipped": 1}
    bad_state = client.get("/labeling/tasks", params={"state": "done"})
    assert bad_state.status_code == 422


def test_alert_samples_become_tasks(
    settings: CloudSettings, client: TestClient, digits: ArrayDataset
) -> None:
    from cloud.dataloop.models import DriftAlert, DriftScore, Sketch

    version_id = register_parent(settings, client)
    start = datetime.now(UTC) - timedelta(hours=1)
    inside = ingest(settings, digits.x[:3], start=start + timedelta(minutes=1))
    ingest(settings, digits.x[3:5], start=start + timedelta(minutes=30))  # after the window
    ingest(settings, digits.x[5:6], device="dev-0002", start=start + timedelta(minutes=1))
    engine = db.make_engine(settings.resolved_database_url())
    try:
        with Session(engine) as session:
            window = {"window_start": start, "window_end": start + timedelta(minutes=10)}
            sketch = Sketch(
                sketch_id=secrets.token_hex(16),
                device_id=DEVICE,
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
            score = DriftScore(
                sketch_id=sketch.id or 0,
                device_id=DEVICE,
                model=MODEL,
                model_version_id=version_id,
                n_samples=100,
                metric="psi",
                score=0.9,
                threshold=0.2,
                drifted=True,
                metrics={"psi": 0.9},
                drifted_features=[0],
                window_start=window["window_start"],
                window_end=window["window_end"],
            )
            session.add(score)
            session.flush()
            alert = DriftAlert(
                score_id=score.id or 0,
                device_id=DEVICE,
                model=MODEL,
                model_version_id=version_id,
                metric="psi",
                score=0.9,
                threshold=0.2,
                drifted_features=[0],
                window_start=window["window_start"],
                window_end=window["window_end"],
            )
            session.add(alert)
            session.commit()
            alert_id = alert.id
    finally:
        engine.dispose()
    response = client.post("/labeling/tasks", json={"alert_id": alert_id})
    assert response.status_code == 201, response.text
    created = response.json()["created"]
    assert sorted(t["sample_id"] for t in created) == sorted(inside)
    assert {t["reason"] for t in created} == {"drifted_window"}
    assert {t["source"] for t in created} == {f"alert {alert_id}"}


# ---------------------------------------------------------------- Label Studio


def _annotate(exported: list[dict[str, Any]], labels: dict[int, str | None]) -> list[Any]:
    """What Label Studio's JSON export holds after people annotated ``labels`` (None: cancel)."""
    out = []
    for n, task in enumerate(exported):
        task_id = task["data"]["edgeloop_task_id"]
        item: dict[str, Any] = {"id": 100 + n, "data": task["data"], "annotations": []}
        if task_id in labels:
            label = labels[task_id]
            item["annotations"].append(
                {
                    "id": 500 + n,
                    "completed_by": 7,
                    "was_cancelled": label is None,
                    "created_at": "2026-11-26T08:00:00Z",
                    "result": []
                    if label is None
                    else [
                        {
                            "from_name": "label",
                            "to_name": "image",
                            "type": "choices",
                            "value": {"choices": [label]},
                        }
                    ],
                }
            )
        out.append(item)
    return out


def test_labelstudio_round_trip(tasks: list[dict[str, Any]], client: TestClient) -> None:
    exported = client.get("/labeling/labelstudio/export", params={"model": MODEL})
    assert exported.status_code == 200, exported.text
    items = exported.json()
    assert len(items) == 6
    first = items[0]
    assert first["data"]["image"].startswith("data:image/png;base64,")
    assert first["data"]["edgeloop_task_id"] == tasks[0]["id"]
    prediction = first["predictions"][0]
    assert prediction["model_version"] == f"{MODEL} v1"
    assert prediction["result"][0]["type"] == "choices"
    assert prediction["result"][0]["value"]["choices"] == [tasks[0]["prediction"]]
    config = client.get("/labeling/labelstudio/config", params={"model": MODEL})
    assert config.status_code == 200 and '<Choice value="9"/>' in config.text

    ids = [t["id"] for t in tasks]
    wanted: dict[int, str | None] = {ids[0]: "4", ids[1]: "7", ids[2]: None}
    annotated = _annotate(items, wanted)
    first_import = client.post("/labeling/labelstudio/import", json=annotated)
    assert first_import.status_code == 200, first_import.text
    assert first_import.json() == {
        "labeled": 2,
        "unchanged": 0,
        "skipped": 1,
        "unannotated": 3,
        "models": [MODEL],
    }
    again = client.post("/labeling/labelstudio/import", json=annotated)
    assert again.json() == {
        "labeled": 0,
        "unchanged": 3,
        "skipped": 0,
        "unannotated": 3,
        "models": [],
    }
    got = {t["id"]: (t["state"], t["label"]) for t in client.get("/labeling/tasks").json()["data"]}
    assert got[ids[0]] == ("labeled", "4") and got[ids[1]] == ("labeled", "7")
    assert got[ids[2]] == ("skipped", None) and got[ids[3]] == ("open", None)
    assert client.get(f"/labeling/tasks/{ids[0]}").json()["labeled_by"] == "labelstudio:7"
    # only open tasks are exported by default
    assert len(client.get("/labeling/labelstudio/export").json()) == 3


MALFORMED: list[tuple[Any, str]] = [
    (lambda items: {"tasks": items}, "JSON list of tasks"),
    (lambda items: [*items[:1], {"data": {}}], "task #1: data.edgeloop_task_id"),
    (
        lambda items: [items[0], {**items[1], "annotations": [{"result": "x"}]}],
        "annotations[0].result: expected a list",
    ),
    (
        lambda items: [
            items[0],
            {
                **items[1],
                "annotations": [
                    {"result": [{"type": "choices", "value": {"choices": ["1", "2"]}}]}
                ],
            },
        ],
        "value.choices: expected exactly one class name",
    ),
    (
        lambda items: [
            items[0],
            {
                **items[1],
                "annotations": [{"result": [{"type": "choices", "value": {"choices": ["cat"]}}]}],
            },
        ],
        "label 'cat'",
    ),
    (
        lambda items: [
            items[0],
            {**items[1], "data": {**items[1]["data"], "edgeloop_task_id": 99999}},
        ],
        "edgeloop_task_id 99999): no such label task",
    ),
    (lambda items: [items[0], items[0]], "the same task as task #0"),
]


def test_labelstudio_malformed_import_changes_nothing(
    tasks: list[dict[str, Any]], client: TestClient
) -> None:
    items = client.get("/labeling/labelstudio/export").json()
    annotated = _annotate(items, {t["id"]: "5" for t in tasks})
    for mutate, needle in MALFORMED:  # one setup for every case: they change nothing
        response = client.post("/labeling/labelstudio/import", json=mutate(annotated))
        assert response.status_code == 422, (needle, response.text)
        assert needle in response.json()["detail"]
        assert "nothing applied" in response.json()["detail"] or needle == "JSON list of tasks"
        assert client.get("/labeling/tasks", params={"state": "open"}).json()["count"] == 6
    # the valid export still applies afterwards
    assert client.post("/labeling/labelstudio/import", json=annotated).json()["labeled"] == 6


# ---------------------------------------------------------------- the page


def test_labeling_page(tasks: list[dict[str, Any]], client: TestClient) -> None:
    from .cloud_service import TOKEN

    anonymous = TestClient(client.app)
    login = anonymous.get(f"/label/{tasks[0]['id']}")
    assert login.status_code == 401 and "<form id='login'>" in login.text
    assert "data:image/png" not in login.text
    client.cookies.set("edgeloop_cloud_token", TOKEN)
    page = client.get(f"/label/{tasks[0]['id']}", headers={"Authorization": ""})
    assert page.status_code == 200, page.text
    assert "data:image/png;base64," in page.text
    for cls in CLASSES:
        assert f"name='label' value='{cls}'" in page.text
    assert "cdn" not in page.text.lower() and "<script src" not in page.text
    png = base64.b64decode(page.text.split("data:image/png;base64,")[1].split("'")[0])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    posted = client.post(
        f"/label/{tasks[0]['id']}",
        content=b"label=8",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Authorization": ""},
        follow_redirects=False,
    )
    assert posted.status_code == 303 and posted.headers["location"].startswith("/label?after=")
    assert client.get(f"/labeling/tasks/{tasks[0]['id']}").json()["label"] == "8"
    following = client.get(posted.headers["location"], follow_redirects=False)
    assert following.headers["location"] == f"/label/{tasks[1]['id']}"
    refused = client.post(
        f"/label/{tasks[1]['id']}",
        content=b"label=dog",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert refused.status_code == 422 and "&#x27;dog&#x27;" in refused.text


def test_label_flow_on_postgres(tmp_path: Path, digits: ArrayDataset) -> None:
    """The same tables and queries on PostgreSQL: tasks, labels, Label Studio, the trigger."""
    with database("postgres", tmp_path) as url:
        settings = make_settings(tmp_path, url)
        with api_client(settings) as client:
            register_parent(settings, client)
            ids = ingest(settings, digits.x[:3], top1=[1, 2, 3])
            created = client.post("/labeling/tasks", json={"sample_ids": ids}).json()["created"]
            assert [t["prediction"] for t in created] == ["1", "2", "3"]
            policy = {"min_new_labels": 2}
            assert client.put(f"/retrain/policies/{MODEL}", json=policy).status_code == 200
            wrong = client.post(f"/labeling/tasks/{created[0]['id']}/label", json={"label": "x"})
            assert wrong.status_code == 422 and "'9'" in wrong.json()["detail"]
            items = client.get("/labeling/labelstudio/export").json()
            annotated = _annotate(items, {created[0]["id"]: "6", created[1]["id"]: "2"})
            result = client.post("/labeling/labelstudio/import", json=annotated).json()
            assert result["labeled"] == 2
            (run,) = client.get("/retrain/runs").json()["data"]
            assert run["state"] == "training" and run["n_labels"] == 2
            dataset = client.get("/datasets/digits-relabeled").json()
            assert dataset["id"] == run["dataset_id"]
            assert dataset["n_samples"] == len(digits) + 2
