"""Drift monitoring end to end (device sketches over a real Mosquitto → scores → alerts →
webhook and fleet), the drift/alerts API, and capture-policy delivery to devices."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from agent import protocol
from cloud import db
from cloud.api.main import create_app
from cloud.dataloop.ingest import Ingestor, IngestStore
from cloud.dataloop.models import DriftAlert, DriftPolicyUpdate, DriftScore, Sketch
from cloud.dataloop.monitor import FleetDriftSink, Monitor, set_policy
from cloud.models import RegisteredModel
from fleet.responder import BrokerConfig, MqttSession
from fleet.sdk import FleetClient
from tests.cloud.cloud_service import AUTH, PROFILES, TestClient, database, make_settings
from tests.cloud.dataloop_helpers import (
    PASSWORDS,
    Device,
    mosquitto,
    register_model,
    sketch,
    training_inputs,
    wait_until,
)


class RecordingSink:
    """A DriftSink that keeps what it was given (or fails when told to)."""

    def __init__(self, fail: bool = False) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail

    def post_drift(self, device_id: str, body: dict[str, Any]) -> None:
        if self.fail:
            raise ConnectionError("fleet unreachable")
        self.posts.append((device_id, body))


@contextmanager
def webhook_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real HTTP server that records the JSON bodies POSTed to it."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


def shifted(n: int, seed: int) -> Any:
    x = training_inputs(n, seed=seed)
    x[:, 0] += 2.5
    x[:, 2] -= 2.0
    return x


@pytest.mark.mqtt
def test_shifted_window_alerts_unshifted_does_not(db_url: str, tmp_path: Path) -> None:
    baseline, version_id = register_model(db_url, tmp_path)
    engine = db.make_engine(db_url)
    sink = RecordingSink()
    with webhook_server() as (hook_url, hooks):
        with Session(engine) as session:
            model = session.exec(select(RegisteredModel)).one()
            set_policy(
                session,
                model=model,
                update=DriftPolicyUpdate(metric="psi", min_samples=50, webhook_url=hook_url),
            )
            session.commit()
        with mosquitto(tmp_path) as broker:
            ingestor = Ingestor(
                IngestStore(engine, tmp_path / "blobs"),
                broker=BrokerConfig(
                    host="127.0.0.1", port=broker.port, username="fleet", password="fleet-pw"
                ),
                monitor=Monitor(sink=sink),
                batch_wait_s=0.05,
            )
            ingestor.start(timeout=10)
            device = Device(broker.port, "dev-a")
            now = datetime.now(UTC)
            calm = sketch("dev-a", baseline, training_inputs(500, seed=21), end=now)
            drift = sketch("dev-a", baseline, shifted(500, 22), end=now + timedelta(minutes=1))
            try:
                device.send(calm)
                device.send(drift)
                device.send(sketch("dev-a", baseline, training_inputs(10, seed=23)))  # too few
                device.send(sketch("dev-a", baseline, training_inputs(80), sha="0" * 64))
                orphan = sketch("dev-a", baseline, training_inputs(80), artifact_id="cd" * 32)
                device.send(orphan.model_copy(update={"version": "9"}))
                wait_until(lambda: ingestor.stats["messages"] >= 5, "5 sketches consumed")
                device.send(drift)  # re-sent: stored and scored once
                wait_until(lambda: ingestor.stats["sketches_duplicate"] >= 1, "the duplicate")
            finally:
                device.close()
                ingestor.stop()
    stats = ingestor.stats
    assert stats["sketches_inserted"] == 5 and stats["scored"] == 2 and stats["alerts"] == 1
    with Session(engine) as session:
        scores = {s.window_end: s for s in session.exec(select(DriftScore)).all()}
        alerts = session.exec(select(DriftAlert)).all()
        sketches = {s.sketch_id: s for s in session.exec(select(Sketch)).all()}
    assert len(scores) == 2 and len(alerts) == 1
    calm_score = next(s for s in scores.values() if not s.drifted)
    drift_score = next(s for s in scores.values() if s.drifted)
    assert calm_score.score < 0.25 <= drift_score.score
    assert set(drift_score.drifted_features) == {0, 2}
    assert drift_score.model_version_id == version_id and drift_score.metric == "psi"
    assert alerts[0].score_id == drift_score.id and alerts[0].drifted_features[:2] in (
        [0, 2],
        [2, 0],
    )
    assert alerts[0].webhook_status == "HTTP 204"
    assert [h["id"] for h in hooks] == [alerts[0].id]
    assert hooks[0]["model"] == "toy" and hooks[0]["device_id"] == "dev-a"
    # the fleet got both scores, in its DriftScoreCreate shape
    assert sorted(b["score"] for _, b in sink.posts) == sorted(
        [calm_score.score, drift_score.score]
    )
    assert {d for d, _ in sink.posts} == {"dev-a"}
    assert {b["artifact_id"] for _, b in sink.posts} == {"ab" * 32}
    assert all(s.fleet_status == "posted" for s in scores.values())
    skipped = {s.status_reason for s in sketches.values() if s.status == "skipped"}
    assert len(skipped) == 3
    assert any("10 samples < min_samples 50" in r for r in skipped if r)
    assert any("sketched on spec 000000000000" in r for r in skipped if r)
    assert any("no model version for artifact 'cdcd" in r for r in skipped if r)

    # ------------------------------------------------------------ the API
    settings = make_settings(tmp_path, db_url, migrate_on_start=False)
    with TestClient(create_app(settings, profiles=PROFILES), headers=AUTH) as client:
        listed = client.get("/drift", params={"device": "dev-a"}).json()
        assert listed["count"] == 2 and listed["data"][0]["drifted"] is True  # newest first
        assert listed["data"][0]["model_version"] == 1
        assert client.get("/drift", params={"drifted": "false"}).json()["count"] == 1
        assert client.get("/drift", params={"model": "toy", "version": 2}).json()["count"] == 0
        assert client.get("/drift", params={"model": "toy", "version": 1}).json()["count"] == 2
        no_model = client.get("/drift", params={"version": 1})
        assert no_model.status_code == 422 and "add model=" in no_model.json()["detail"]
        since = (now + timedelta(seconds=30)).isoformat()
        assert client.get("/drift", params={"since": since}).json()["count"] == 1
        assert client.get("/drift", params={"device": "dev-b"}).json()["count"] == 0
        merged = client.get("/drift/aggregate", params={"model": "toy"}).json()
        assert merged["windows"] == 2 and merged["n_samples"] == 1000
        assert merged["devices"] == ["dev-a"] and merged["model_version"] == 1
        assert calm_score.score < merged["score"] < drift_score.score
        gone = client.get("/drift/aggregate", params={"model": "toy", "device": "dev-b"})
        assert gone.status_code == 404 and "dev-b" in gone.json()["detail"]
        assert client.get("/drift/aggregate", params={"model": "nope"}).status_code == 404

        alert_list = client.get("/alerts").json()
        assert alert_list["count"] == 1
        alert_id = alert_list["data"][0]["id"]
        acked = client.post(f"/alerts/{alert_id}/ack", json={"note": "retraining"}).json()
        assert acked["acknowledged_at"] is not None and acked["ack_note"] == "retraining"
        again = client.post(f"/alerts/{alert_id}/ack").json()
        assert again["acknowledged_at"] == acked["acknowledged_at"]
        assert client.get("/alerts", params={"acknowledged": "false"}).json()["count"] == 0
        assert client.get("/alerts", params={"acknowledged": "true"}).json()["count"] == 1
        missing = client.post("/alerts/999/ack")
        assert missing.status_code == 404 and "GET /alerts" in missing.json()["detail"]

        policy = client.get("/drift/policies/toy").json()
        assert policy["metric"] == "psi" and policy["min_samples"] == 50
        assert policy["default"] is False and policy["webhook_url"] == hook_url
        bad = client.put("/drift/policies/toy", json={"metric": "kl"})
        assert bad.status_code == 422
        assert "unknown drift metric 'kl'; choose from: psi, ks" in json.dumps(bad.json())
        bad_url = client.put("/drift/policies/toy", json={"webhook_url": "ftp://x"})
        assert bad_url.status_code == 422
        assert client.get("/drift/policies/toy").json()["metric"] == "psi"  # unchanged
        put = client.put("/drift/policies/toy", json={"metric": "ks", "threshold": 0.5}).json()
        assert put["metric"] == "ks" and put["threshold"] == 0.5 and put["webhook_url"] is None
        assert client.get("/drift/policies/nope").status_code == 404
    engine.dispose()


def test_fleet_and_webhook_failures_are_recorded_not_fatal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db.upgrade(url)
    baseline, _ = register_model(url, tmp_path)
    engine = db.make_engine(url)
    with Session(engine) as session:
        model = session.exec(select(RegisteredModel)).one()
        # a port nothing listens on: the POST fails fast
        set_policy(
            session,
            model=model,
            update=DriftPolicyUpdate(webhook_url="http://127.0.0.1:9/hook", threshold=0.1),
        )
        session.commit()
    store = IngestStore(engine, tmp_path / "blobs")
    window = sketch("dev-a", baseline, shifted(300, 31))
    store.write([(protocol.capture_sketch("dev-a"), window.to_bytes())])
    result = Monitor(sink=RecordingSink(fail=True)).score_pending(engine)
    assert (result.scored, result.alerts) == (1, 1)
    with Session(engine) as session:
        score = session.exec(select(DriftScore)).one()
        alert = session.exec(select(DriftAlert)).one()
    assert score.fleet_status == "error: fleet unreachable"
    assert alert.webhook_status is not None and alert.webhook_status.startswith("error: Connect")
    # nothing is pending any more: a second pass does nothing
    assert Monitor().score_pending(engine).scored == 0
    # without a fleet, the score says so
    store.write(
        [(protocol.capture_sketch("dev-a"), sketch("dev-a", baseline, shifted(300, 32)).to_bytes())]
    )
    Monitor().score_pending(engine)
    with Session(engine) as session:
        statuses = {s.fleet_status for s in session.exec(select(DriftScore)).all()}
    assert "no fleet configured" in statuses
    engine.dispose()


def test_fleet_sink_posts_to_the_real_fleet_api(tmp_path: Path) -> None:
    from compiler.signing import generate_keys
    from fleet.models import Artifact
    from fleet.sdk import FleetValidationError
    from tests.cloud.fleet_api import _org_id, running_fleet_api

    keys = generate_keys(tmp_path / "keys")
    with running_fleet_api(tmp_path / "fleet", keys.public) as fleet:
        with FleetClient(fleet.url, fleet.token) as client:
            client.register_device("dev-a", profile="generic/x86_64")
            with Session(fleet.app.state.engine) as session:  # as an upload would record it
                session.add(
                    Artifact(
                        org_id=_org_id(session),
                        artifact_id="ab" * 32,
                        model_name="toy",
                        model_version="1",
                        profile="generic/x86_64",
                        runtime="tvm",
                        size=1,
                        transfer_sha256="0" * 64,
                    )
                )
                session.commit()
            body = {
                "model_name": "toy",
                "artifact_id": "ab" * 32,
                "metric": "psi",
                "score": 0.4,
                "samples": 100,
                "window_start": "2026-01-01T00:00:00+00:00",
                "window_end": "2026-01-01T00:01:00+00:00",
            }
            FleetDriftSink(client).post_drift("dev-a", body)
            drift = client.get_device_state("dev-a").drift
            assert [(d.metric, d.score, d.samples) for d in drift] == [("psi", 0.4, 100)]
            with pytest.raises(FleetValidationError, match="not 'other'"):
                FleetDriftSink(client).post_drift("dev-a", {**body, "model_name": "other"})


# ---------------------------------------------------------------- capture policies


@pytest.mark.mqtt
def test_capture_policy_is_published_retained_with_rising_revisions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db.upgrade(url)
    baseline, _ = register_model(url, tmp_path)
    other, _ = register_model(url, tmp_path, name="other", artifact_id="cd" * 32)
    settings = make_settings(tmp_path, url, migrate_on_start=False)
    with mosquitto(tmp_path) as broker:
        publisher = MqttSession(
            BrokerConfig(
                host="127.0.0.1", port=broker.port, username="fleet", password=PASSWORDS["fleet"]
            ),
            role="test-policy",
        )
        publisher.start(timeout=10)
        app = create_app(settings, profiles=PROFILES)
        app.state.capture_publisher = publisher
        try:
            with TestClient(app, headers=AUTH) as client:
                first = client.put(
                    "/capture-policies/toy",
                    json={"devices": ["dev-a", "dev-b"], "sample_rate": 0.1},
                )
                assert first.status_code == 200, first.text
                body = first.json()
                assert body["model_version"] == 1
                assert [(d["device_id"], d["revision"], d["published"]) for d in body["data"]] == [
                    ("dev-a", 1, True),
                    ("dev-b", 1, True),
                ]
                second = client.put("/capture-policies/other", json={"devices": ["dev-a"]})
                assert second.json()["data"][0]["revision"] == 2
                off = client.put(
                    "/capture-policies/toy", json={"devices": ["dev-a"], "enabled": False}
                )
                assert off.json()["data"][0]["revision"] == 3
                stored = client.get("/capture-policies/devices/dev-a").json()
                assert stored["revision"] == 3
                assert stored["desired"]["capture"]["models"] == ["other"]

                # a publish the broker refuses is reported per device, the state kept
                denied_publisher = MqttSession(
                    BrokerConfig(
                        host="127.0.0.1",
                        port=broker.port,
                        username="dev-b",
                        password=PASSWORDS["dev-b"],
                    ),
                    role="test-denied",
                )
                denied_publisher.start(timeout=10)
                app.state.capture_publisher = denied_publisher
                try:
                    denied = client.put("/capture-policies/toy", json={"devices": ["dev-c"]})
                finally:
                    denied_publisher.stop()
                    app.state.capture_publisher = publisher
                row = denied.json()["data"][0]
                assert (row["device_id"], row["revision"], row["published"]) == ("dev-c", 1, False)
                assert "Not authorized" in row["error"]

                bad = client.put("/capture-policies/toy", json={"devices": ["../x"]})
                assert bad.status_code == 422 and "device id '../x' is invalid" in bad.text
                assert client.put("/capture-policies/toy", json={"devices": []}).status_code == 422
                nope = client.put("/capture-policies/nope", json={"devices": ["dev-a"]})
                assert nope.status_code == 404
                no_version = client.put(
                    "/capture-policies/toy", json={"devices": ["dev-a"], "version": 5}
                )
                assert no_version.status_code == 404 and "no version 5" in no_version.text
                assert client.get("/capture-policies/devices/dev-z").status_code == 404
                # refused requests changed nothing
                assert client.get("/capture-policies/devices/dev-a").json()["revision"] == 3

            # a device that connects now gets the newest desired state, retained
            device = Device(broker.port, "dev-a")
            device_b = Device(broker.port, "dev-b")
            try:
                device.subscribe(protocol.desired("dev-a"))
                device_b.subscribe(protocol.desired("dev-b"))
                wait_until(lambda: device.received and device_b.received, "the retained states")
            finally:
                device.close()
                device_b.close()
        finally:
            publisher.stop()
    topic, payload, retained = device.received[-1]
    assert topic == protocol.desired("dev-a") and retained
    desired = protocol.decode(
        protocol.DesiredState, payload, max_bytes=protocol.MAX_DESIRED_PAYLOAD
    )
    assert desired.revision == 3 and desired.capture is not None
    assert desired.capture.models == ["other"]
    assert desired.capture.sketches == {"other": other.sketch}
    desired_b = protocol.decode(
        protocol.DesiredState, device_b.received[-1][1], max_bytes=protocol.MAX_DESIRED_PAYLOAD
    )
    assert desired_b.revision == 1 and desired_b.capture is not None
    assert desired_b.capture.sketches == {"toy": baseline.sketch}
    assert desired_b.capture.sample_rate == 0.1


def test_capture_policy_without_a_broker_is_503(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db.upgrade(url)
    register_model(url, tmp_path)
    settings = make_settings(tmp_path, url, migrate_on_start=False)
    with TestClient(create_app(settings, profiles=PROFILES), headers=AUTH) as client:
        response = client.put("/capture-policies/toy", json={"devices": ["dev-a"]})
        assert response.status_code == 503
        assert "EDGELOOP_DATALOOP_BROKER_PASSWORD" in response.json()["detail"]
        assert client.get("/capture-policies/devices/dev-a").status_code == 404
