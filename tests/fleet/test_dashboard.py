"""The operator dashboard (fleet/dashboard): pure helpers by tables, pages and auth under
TestClient, and every page in headless Chromium against the fleet service running under
uvicorn with real data (devices registered and heartbeating through the executor's message
path, artifacts uploaded, a rollout driven by job updates, drift scores posted, label tasks
in a real cloud service), with screenshots.

Screenshots go to a pytest temporary directory and, if ``EDGELOOP_SCREENSHOT_DIR`` is set,
there too. The browser is Debian's ``chromium`` driven by ``chromium-driver`` through
Selenium (scripts/bootstrap.sh installs both); without them the browser tests are skipped,
except under CI where they fail.
"""

from __future__ import annotations

import html
import os
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest

warnings.filterwarnings("ignore", message=r".*httpx.*starlette\.testclient", category=Warning)

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from pydantic import SecretStr  # noqa: E402
from sqlmodel import Session  # noqa: E402

from agent import protocol  # noqa: E402
from agent.protocol import (  # noqa: E402
    HardwareFacts,
    Heartbeat,
    JobNotify,
    JobState,
    JobUpdate,
    LatencySummary,
    LoadedModel,
    Status,
)
from compiler.signing import generate_keys, load_private_key, load_public_key  # noqa: E402
from edgeloop.live_server import LiveServer  # noqa: E402
from fleet.api.bootstrap import create_admin_key  # noqa: E402
from fleet.api.main import create_app  # noqa: E402
from fleet.api.settings import ApiSettings  # noqa: E402
from fleet.broker_auth import MosquittoPasswordFile  # noqa: E402
from fleet.dashboard import session as cookies  # noqa: E402
from fleet.dashboard import views  # noqa: E402
from fleet.dashboard.routes import COOKIE  # noqa: E402
from fleet.executor import Executor  # noqa: E402
from fleet.store import ArtifactStore  # noqa: E402

from .api.conftest import Org  # noqa: E402
from .api.deploying import GENERIC, PI, upload_variant  # noqa: E402
from .conftest import Keys  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 15.0
CLOUD_TOKEN = "dashboard-cloud-token"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# ---------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("change", "ok"),
    [
        (lambda v: v, True),
        (lambda v: v[:-1] + ("A" if v[-1] != "A" else "B"), False),  # signature changed
        (lambda v: "x" + v, False),  # payload changed
        (lambda v: v.replace(".", ""), False),
        (lambda v: v + ".x", False),
        (lambda v: "", False),
        (lambda v: "é." + v.split(".")[1], False),
    ],
)
def test_session_cookie_rejects_any_change(change: Callable[[str], str], ok: bool) -> None:
    value = cookies.sign(b"k" * 32, key_id="0123456789ab", now=1000.0, lifetime_s=60)
    data = cookies.verify(b"k" * 32, change(value), now=1001.0)
    assert (data is not None) == ok
    if data is not None:
        assert data.key_id == "0123456789ab" and data.expires_at == 1060


def test_session_cookie_expires_and_needs_our_secret() -> None:
    value = cookies.sign(b"k" * 32, key_id="0123456789ab", now=1000.0, lifetime_s=60)
    assert cookies.verify(b"k" * 32, value, now=1059.0) is not None
    assert cookies.verify(b"k" * 32, value, now=1060.0) is None
    assert cookies.verify(b"o" * 32, value, now=1001.0) is None
    assert cookies.verify(b"k" * 32, None, now=1001.0) is None
    with pytest.raises(ValueError, match="empty"):
        cookies.sign(b"", key_id="x", now=0)


@pytest.mark.parametrize(
    ("states", "current", "expected"),
    [
        ({}, 0, ["active", "waiting"]),
        ({"a": "IN_PROGRESS"}, 0, ["active", "waiting"]),
        ({"a": "SUCCEEDED"}, 0, ["done", "waiting"]),
        ({"a": "SUCCEEDED", "b": "QUEUED"}, 1, ["done", "active"]),
        ({"a": "SUCCEEDED", "b": "SUCCEEDED", "c": "SUCCEEDED"}, 1, ["done", "done"]),
        ({"a": "SUCCEEDED", "b": "FAILED", "c": "SUCCEEDED"}, 1, ["done", "failed"]),
    ],
)
def test_waves(states: dict[str, str], current: int, expected: list[str]) -> None:
    out = views.waves([["a"], ["b", "c"]], states, current=current, canary=True)
    assert [w.status for w in out] == expected
    assert [w.label for w in out] == ["canary", "wave 1"]
    finished = sum(1 for s in states.values() if s in views.TERMINAL_JOB_STATES)
    assert views.overall_percent(out) == round(100 * finished / 3)


def test_filter_devices_and_counts() -> None:
    seen = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        views.DeviceRow("a-1", GENERIC, None, False, True, seen),
        views.DeviceRow("a-2", GENERIC, None, False, False, seen),
        views.DeviceRow("b-1", PI, None, False, False, None),
        views.DeviceRow("b-2", PI, None, True, True, seen),
    ]
    assert [r.status for r in rows] == ["online", "offline", "never-seen", "revoked"]
    pick = views.filter_devices
    assert [r.device_id for r in pick(rows, status="offline", profile=None, query=None)] == ["a-2"]
    assert [r.device_id for r in pick(rows, status=None, profile=PI, query="B-")] == ["b-1", "b-2"]
    with pytest.raises(views.FilterError, match="'asleep' is unknown; choose from: online"):
        pick(rows, status="asleep", profile=None, query=None)
    assert views.device_counts(rows) == {
        "online": 1,
        "offline": 1,
        "never-seen": 1,
        "revoked": 1,
        "total": 4,
    }
    assert views.age(seen - timedelta(seconds=90), now=seen) == "1 min ago"
    assert views.age(None, now=seen) == "never"


def test_live_json_of_devices_and_drift() -> None:
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    seen = views.DeviceRow("a-1", GENERIC, "lab", False, True, now - timedelta(seconds=7),
                           ("m 2", "n 1"), in_sync=False)  # fmt: skip
    never = views.DeviceRow("b-1", PI, None, False, False, None)
    assert views.device_json(seen, now=now) == {
        "device_id": "a-1",
        "status": "online",
        "profile": GENERIC,
        "group": "lab",
        "models": ["m 2", "n 1"],
        "in_sync": False,
        "last_seen": "2026-01-01T11:59:53+00:00",
        "last_seen_age": "7 s ago",
    }
    assert views.device_json(never, now=now)["last_seen"] is None
    assert views.device_json(never, now=now)["last_seen_age"] == "never"

    def point(device: str, version: str, score: float, minute: int) -> views.DriftPoint:
        return views.DriftPoint(device, "m", version, "psi", score, 9, now.replace(minute=minute))

    # The latest score of each series counts, not its highest; highest first, then cut.
    points = [point("a", "1", 0.9, 1), point("a", "1", 0.1, 2), point("b", "1", 0.5, 1),
              point("b", "2", 0.3, 3), point("c", "1", 0.2, 4)]  # fmt: skip
    top = views.highest_latest(points, limit=3)
    assert [(p.device_id, p.model_version, p.score) for p in top] == [
        ("b", "1", 0.5),
        ("b", "2", 0.3),
        ("c", "1", 0.2),
    ]
    assert views.drift_point_json(top[0]) == {
        "device_id": "b",
        "model_name": "m",
        "model_version": "1",
        "metric": "psi",
        "score": 0.5,
        "samples": 9,
        "window_end": "2026-01-01T12:01:00+00:00",
    }


def test_line_chart_escapes_and_scales() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    points = [
        views.DriftPoint("<dev>", "m", "1", "psi", score, 10, t + timedelta(minutes=i))
        for i, score in enumerate((0.1, 0.4, 0.2))
    ]
    series = views.drift_series(reversed(points))
    assert [p.score for p in series[0].points] == [0.1, 0.4, 0.2]  # oldest first
    svg = views.line_chart(series, threshold=0.3)
    assert "<dev>" not in svg and "&lt;dev&gt;" in svg
    assert svg.count("<circle") == 3 and 'class="threshold"' in svg
    assert "no drift scores" in views.line_chart([])


@pytest.mark.parametrize(
    ("number", "count", "offset", "pages", "prev", "next_"),
    [
        (1, 0, 0, 1, False, False),
        (1, 50, 0, 1, False, False),
        (1, 51, 0, 2, False, True),
        (2, 51, 50, 2, True, False),
        (3, 151, 100, 4, True, True),
    ],
)
def test_page(number: int, count: int, offset: int, pages: int, prev: bool, next_: bool) -> None:
    page = views.Page(number=number, size=50, count=count)
    assert (page.offset, page.pages, page.has_previous, page.has_next) == (
        offset,
        pages,
        prev,
        next_,
    )


# ---------------------------------------------------------------- the stack


@dataclass
class Publisher:
    """The executor's publisher: records the jobs it would send to devices over MQTT."""

    sent: list[tuple[str, JobNotify]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float
    ) -> None:
        with self.lock:
            self.sent.append((topic, protocol.decode(JobNotify, payload)))

    def job_of(self, device_id: str) -> JobNotify | None:
        with self.lock:
            topic = protocol.jobs_notify(device_id)
            jobs = [j for t, j in self.sent if t == topic and not j.cancel]
        return jobs[-1] if jobs else None


@dataclass
class Stack:
    """The running fleet service (and cloud service) and what the tests put into it."""

    url: str
    cloud_url: str
    app: FastAPI
    publisher: Publisher
    org_a: Org
    org_b: Org
    read_a: str  # a fleet:read key of org A
    deployment_id: str
    canary: str
    v1: str  # org A's generic artifact of model m v1
    screenshots: list[Path]

    @property
    def executor(self) -> Executor:
        executor: Executor = self.app.state.executor
        return executor

    def api(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    def deployment(self) -> dict[str, Any]:
        with self.api(self.org_a.token) as api:
            data: dict[str, Any] = api.get(f"/deployments/{self.deployment_id}").json()
        return data

    def job_update(self, device_id: str, state: JobState) -> None:
        """What an agent sends on ``jobs/update``, into the executor's message path."""
        job = wait_for(lambda: self.publisher.job_of(device_id), f"a job sent to {device_id}")
        update = JobUpdate(
            job_id=job.job_id, device_id=device_id, artifact_id=job.artifact_id, state=state
        )
        self.executor.enqueue(protocol.jobs_update(device_id), update.to_bytes())


def wait_for(probe: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := probe()) is not None and value is not False:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def heartbeat(device_id: str, *, version: str, artifact_id: str) -> bytes:
    beat = Heartbeat(
        device_id=device_id,
        agent_version="0.1.0",
        uptime_s=321.0,
        models=[LoadedModel(name="m", version=version, artifact_id=artifact_id, runtime="tvm")],
        runtimes=["tvm"],
        hardware=HardwareFacts(arch="x86_64", profile=GENERIC, cpu_count=4),
        inference={"m": LatencySummary(count=40, p50_ms=1.5, p95_ms=2.5, p99_ms=3.0)},
    )
    return beat.to_bytes()


def client_of(api: httpx.Client) -> TestClient:
    """``api`` where a helper is typed for a TestClient (they share httpx's interface)."""
    return cast(TestClient, api)


def _bootstrap_org(app: FastAPI, name: str) -> Org:
    with Session(app.state.engine) as session:
        key = create_admin_key(session, name)
    return Org(name=name, key_id=key.key_id, token=key.token)


def _register(api: httpx.Client, device_id: str, profile: str, group_id: str | None) -> None:
    body = {"device_id": device_id, "profile": profile, "group_id": group_id}
    response = api.post("/devices", json=body)
    assert response.status_code == 201, response.text


def _drift(api: httpx.Client, device_id: str, artifact_id: str, scores: list[float]) -> None:
    end = datetime.now(UTC) - timedelta(minutes=10 * len(scores))
    for score in scores:
        body = {
            "model_name": "m",
            "artifact_id": artifact_id,
            "metric": "psi",
            "score": score,
            "samples": 200,
            "window_start": (end - timedelta(minutes=10)).isoformat(),
            "window_end": end.isoformat(),
        }
        response = api.post(f"/devices/{device_id}/drift", json=body)
        assert response.status_code == 201, response.text
        end += timedelta(minutes=10)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The cloud service under uvicorn with label tasks of devices gen-1 (org A) and b-dev-1
    (org B), created through its real ingestion path and API."""
    from cloud.api.main import create_app as create_cloud_app

    from ..cloud.cloud_service import database, make_settings
    from ..cloud.test_labeling import ingest, register_parent

    root = tmp_path_factory.mktemp("cloud")
    with database("sqlite", root) as url:
        settings = make_settings(root, url, api_token=CLOUD_TOKEN)
        app = create_cloud_app(settings, profiles=[GENERIC])
        with LiveServer(app) as server:
            auth = {"Authorization": f"Bearer {CLOUD_TOKEN}"}
            with httpx.Client(base_url=server.url, headers=auth, timeout=30) as api:
                with TestClient(app) as client:
                    client.headers.update(auth)
                    register_parent(settings, client)
                inputs = np.random.default_rng(0).random((5, 64), dtype=np.float32)
                ids = ingest(settings, inputs[:3], device="gen-1", top1=[1, 2, 3])
                ids += ingest(settings, inputs[3:], device="b-dev-1", top1=[4, 5])
                response = api.post("/labeling/tasks", json={"sample_ids": ids})
                assert response.status_code == 201, response.text
            yield server.url


@pytest.fixture(scope="module")
def screenshot_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    dirs = [tmp_path_factory.mktemp("screenshots")]
    if extra := os.environ.get("EDGELOOP_SCREENSHOT_DIR"):
        dirs.append(Path(extra))
        dirs[-1].mkdir(parents=True, exist_ok=True)
    return dirs


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, cloud: str, screenshot_dirs: list[Path]
) -> Iterator[Stack]:
    """The fleet service under uvicorn (SQLite, real store, executor fed like over MQTT)
    with two organizations' devices, artifacts, heartbeats, drift and a rollout underway."""
    root = tmp_path_factory.mktemp("fleet")
    paths = generate_keys(root / "keys")
    keys = Keys(load_private_key(paths.private), load_public_key(paths.public), paths.public)
    settings = ApiSettings(
        state_dir=root / "state",
        store=root / "store",
        public_key=paths.public,
        database_url=f"sqlite:///{root / 'fleet.db'}",
        cloud_url=cloud,
        cloud_token=SecretStr(CLOUD_TOKEN),
        dashboard_secret=SecretStr("s" * 32),
    )
    publisher = Publisher()
    store = ArtifactStore(root / "store", keys.public)
    auth = MosquittoPasswordFile(root / "passwd", reload=lambda: None)
    app = create_app(
        settings,
        store=store,
        broker_auth=auth,
        executor=lambda engine, st: Executor(engine, store=st, publisher=publisher, interval=0.2),
    )
    with LiveServer(app) as server:
        org_a, org_b = _bootstrap_org(app, "org-a"), _bootstrap_org(app, "org-b")
        with httpx.Client(base_url=server.url, headers=org_a.headers, timeout=30) as api:
            group = api.post("/groups", json={"name": "lab"}).json()["id"]
            for device_id, profile in (
                ("gen-1", GENERIC),
                ("gen-2", GENERIC),
                ("gen-3", GENERIC),
                ("pi-1", PI),
            ):
                _register(api, device_id, profile, group)
            v1 = upload_variant(
                client_of(api), org_a, keys, root / "a", profile=GENERIC, version="1"
            )
            v2 = upload_variant(
                client_of(api), org_a, keys, root / "a", profile=GENERIC, version="2"
            )
            read_a = api.post("/api-keys", json={"name": "ops", "scopes": ["fleet:read"]})
            executor: Executor = app.state.executor
            for device_id in ("gen-1", "gen-2"):
                executor.enqueue(
                    protocol.heartbeat(device_id),
                    heartbeat(device_id, version="1", artifact_id=v1),
                )
            offline = Status(device_id="gen-2", state="offline", agent_version="0.1.0")
            executor.enqueue(protocol.status("gen-2"), offline.to_bytes())
            _drift(api, "gen-1", v1, [0.05, 0.12, 0.31])
            _drift(api, "gen-2", v1, [0.02, 0.04])
            body = {
                "name": "rollout-v2",
                "model_name": "m",
                "variants": {GENERIC: v2},
                "target": {"groups": ["lab"]},
                "policy": {"canary": 1, "waves": ["100%"]},
                "seed": 1,
            }
            response = api.post("/deployments", json=body)
            assert response.status_code == 201, response.text
            deployment = response.json()
        with httpx.Client(base_url=server.url, headers=org_b.headers, timeout=30) as api_b:
            _register(api_b, "b-dev-1", GENERIC, None)
            vb = upload_variant(
                client_of(api_b), org_b, keys, root / "b", profile=GENERIC, version="7"
            )
            _drift(api_b, "b-dev-1", vb, [0.777])
        canary = deployment["stages"][0][0]
        result = Stack(
            url=server.url,
            cloud_url=cloud,
            app=app,
            publisher=publisher,
            org_a=org_a,
            org_b=org_b,
            read_a=read_a.json()["token"],
            deployment_id=deployment["id"],
            canary=canary,
            v1=v1,
            screenshots=screenshot_dirs,
        )
        result.job_update(canary, JobState.IN_PROGRESS)
        wait_for(
            lambda: (
                {d["device_id"]: d["state"] for d in result.deployment()["devices"]}[canary]
                == "IN_PROGRESS"
            ),
            "the canary's job IN_PROGRESS",
        )
        wait_for(lambda: _online(result, "gen-1"), "gen-1's heartbeat stored")
        yield result
    store.close()


def _online(stack: Stack, device_id: str) -> bool:
    with stack.api(stack.org_a.token) as api:
        return bool(api.get(f"/devices/{device_id}/state").json()["online"])


# ---------------------------------------------------------------- HTTP: pages and auth


@pytest.fixture()
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=10, follow_redirects=False) as client:
        yield client


def _login(client: httpx.Client, token: str, next_path: str = "/dashboard/") -> httpx.Response:
    return client.post("/dashboard/login", data={"api_key": token, "next": next_path})


def test_unauthenticated_pages_redirect_and_json_is_401(http: httpx.Client, stack: Stack) -> None:
    for path in (
        "/dashboard/",
        "/dashboard/devices",
        f"/dashboard/deployments/{stack.deployment_id}",
    ):
        response = http.get(path)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/dashboard/login?next=/dashboard")
    response = http.get(f"/dashboard/api/deployments/{stack.deployment_id}")
    assert response.status_code == 401 and "sign in" in response.json()["detail"]
    assert "/dashboard" not in http.get("/openapi.json").text  # not part of the API schema
    bare = http.get("/dashboard")
    assert bare.status_code == 307 and bare.headers["location"].endswith("/dashboard/")


def test_login_sets_a_strict_httponly_cookie_and_is_audited(
    http: httpx.Client, stack: Stack
) -> None:
    response = _login(http, stack.read_a, "/dashboard/devices")
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/devices"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert "Path=/dashboard" in cookie and stack.read_a not in cookie
    page = http.get("/dashboard/devices")
    assert page.status_code == 200 and "gen-1" in page.text and "b-dev-1" not in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    with stack.api(stack.org_a.token) as api:
        entries = api.get("/audit", params={"action": "dashboard.login"}).json()["data"]
    assert any(e["target"] == f"api-key:{stack.read_a.split('_')[1]}" for e in entries)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("nonsense", "malformed API key"),
        ("elk_0123456789ab_wrongsecretwrongsecret", "'0123456789ab' is unknown, revoked"),
        ("", "paste an API key"),
    ],
)
def test_login_refuses_bad_keys(http: httpx.Client, token: str, message: str) -> None:
    response = _login(http, token)
    assert response.status_code == 401 and message in html.unescape(response.text)
    assert COOKIE not in response.headers.get("set-cookie", "")


def test_login_needs_fleet_read_and_revocation_ends_the_session(
    http: httpx.Client, stack: Stack
) -> None:
    with stack.api(stack.org_a.token) as api:
        deploy_only = api.post("/api-keys", json={"name": "ci", "scopes": ["deploy"]}).json()
        response = _login(http, deploy_only["token"])
        assert response.status_code == 401
        assert "lacks scope 'fleet:read'" in html.unescape(response.text)
        temp = api.post("/api-keys", json={"name": "tmp", "scopes": ["fleet:read"]}).json()
        assert _login(http, temp["token"]).status_code == 303
        assert http.get("/dashboard/").status_code == 200
        assert api.delete(f"/api-keys/{temp['key_id']}").status_code == 200
    assert http.get("/dashboard/").status_code == 303  # the revoked key's session is over


def test_forged_or_foreign_cookies_and_open_redirects_are_refused(
    http: httpx.Client, stack: Stack
) -> None:
    key_id = stack.org_a.key_id
    forged = cookies.sign(b"x" * 32, key_id=key_id, now=time.time())
    http.cookies.set(COOKIE, forged, path="/dashboard")
    assert http.get("/dashboard/").status_code == 303
    response = _login(http, stack.read_a, "//evil.example/dashboard")
    assert response.headers["location"] == "/dashboard/"
    response = _login(http, stack.read_a, "https://evil.example/")
    assert response.headers["location"] == "/dashboard/"
    response = http.post(
        "/dashboard/login",
        data={"api_key": stack.read_a},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status_code == 403 and "https://evil.example" in response.text
    assert COOKIE not in response.headers.get("set-cookie", "")


def test_pages_show_the_organizations_data(http: httpx.Client, stack: Stack) -> None:
    assert _login(http, stack.org_a.token).status_code == 303
    overview = http.get("/dashboard/").text
    assert 'id="count-total">4<' in overview and 'id="count-online">1<' in overview
    assert 'id="count-offline">1<' in overview and 'id="count-never-seen">2<' in overview
    device = http.get("/dashboard/devices/gen-1").text
    assert stack.v1[:12] in device and "0.3100" in device
    assert "p95_ms=2.5" in device
    devices = http.get("/dashboard/devices", params={"status": "offline"}).text
    assert "gen-2" in devices and "gen-1</a>" not in devices
    bad = http.get("/dashboard/devices", params={"status": "asleep"})
    assert bad.status_code == 422 and "choose from: online, offline" in bad.text
    drift = http.get("/dashboard/drift").text
    assert "0.3100" in drift and "0.0400" in drift and "0.7770" not in drift
    assert "<polyline" in drift
    relabel = http.get("/dashboard/relabel").text
    assert relabel.count('href="/dashboard/devices/gen-1"') == 3 and "b-dev-1" not in relabel
    audit = http.get("/dashboard/audit").text
    assert "devices.register_device" in audit and "device:gen-1" in audit
    assert "device:b-dev-1" not in audit
    live = http.get(f"/dashboard/api/deployments/{stack.deployment_id}").json()
    assert [w["label"] for w in live["waves"]] == ["canary", "wave 1"]
    assert live["waves"][0]["devices"] == [stack.canary]


def test_audit_needs_admin_and_other_orgs_objects_are_404(http: httpx.Client, stack: Stack) -> None:
    assert _login(http, stack.read_a).status_code == 303
    response = http.get("/dashboard/audit")
    assert response.status_code == 403 and "needs scope 'admin'" in html.unescape(response.text)
    assert _login(http, stack.org_b.token).status_code == 303
    for path in (
        "/dashboard/devices/gen-1",
        f"/dashboard/deployments/{stack.deployment_id}",
        "/dashboard/deployments/not-a-uuid",
    ):
        response = http.get(path)
        assert response.status_code == 404 and "org-b" in response.text, path
    assert http.get(f"/dashboard/api/deployments/{stack.deployment_id}").status_code == 404
    assert "gen-1" not in http.get("/dashboard/drift").text


# ---------------------------------------------------------------- TestClient: live JSON views

LIVE_JSON = ("/dashboard/api/overview", "/dashboard/api/devices")


@pytest.fixture()
def client(stack: Stack) -> Iterator[TestClient]:
    """The running fleet app called in process (its lifespan already runs under uvicorn)."""
    with_client = TestClient(stack.app, follow_redirects=False)
    yield with_client
    with_client.close()


def _sign_in_client(client: TestClient, token: str) -> None:
    client.cookies.clear()
    response = client.post("/dashboard/login", data={"api_key": token})
    assert response.status_code == 303, response.text


def test_live_json_views_need_a_session(client: TestClient, stack: Stack) -> None:
    forged = cookies.sign(b"x" * 32, key_id=stack.org_a.key_id, now=time.time())
    for path in (*LIVE_JSON, "/dashboard/api/devices?status=online"):
        client.cookies.clear()
        response = client.get(path)
        assert response.status_code == 401, path
        assert "sign in" in response.json()["detail"] and "gen-1" not in response.text
        client.cookies.set(COOKIE, forged)
        assert client.get(path).status_code == 401, path
    with stack.api(stack.org_a.token) as api:
        temp = api.post("/api-keys", json={"name": "tmp", "scopes": ["fleet:read"]}).json()
        _sign_in_client(client, temp["token"])
        assert client.get(LIVE_JSON[0]).status_code == 200
        assert api.delete(f"/api-keys/{temp['key_id']}").status_code == 200
    for path in LIVE_JSON:  # the revoked key's session is over for the poller too
        assert client.get(path).status_code == 401, path


def test_overview_json_is_the_pages_data_of_the_organization(
    client: TestClient, stack: Stack
) -> None:
    _sign_in_client(client, stack.read_a)
    response = client.get("/dashboard/api/overview")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    view = response.json()
    assert view["counts"] == {"online": 1, "offline": 1, "never-seen": 2, "revoked": 0, "total": 4}
    deployment = stack.deployment()
    assert view["phases"] == {deployment["phase"]: 1}
    running = deployment["phase"] not in ("SUCCEEDED", "ABORTED", "CANCELED", "ROLLED_BACK")
    expected = {
        "id": stack.deployment_id,
        "name": "rollout-v2",
        "model_name": "m",
        "phase": deployment["phase"],
        "stage": deployment["stage"],
        "stages": 2,
        "devices": 3,
    }
    assert view["rollouts"] == ([expected] if running else [])
    top = [(p["device_id"], p["model_version"], p["metric"], p["score"]) for p in view["top_drift"]]
    assert top == [("gen-1", "1", "psi", 0.31), ("gen-2", "1", "psi", 0.04)]
    assert datetime.fromisoformat(view["top_drift"][0]["window_end"]) < datetime.now(UTC)
    with stack.api(stack.org_a.token) as api:
        pending = [
            device_id
            for device_id in ("gen-1", "gen-2", "gen-3", "pi-1")
            if not api.get(f"/devices/{device_id}/state").json()["in_sync"]
        ]
    assert view["out_of_sync"] == pending and pending  # the rollout's devices wait for v2
    page = client.get("/dashboard/").text
    assert 'id="count-never-seen">2<' in page and 'data-live-view="overview"' in page
    for device_id in pending:
        assert f'<li data-device="{device_id}">' in page
    assert 'data-live-url="/dashboard/api/overview"' in page

    _sign_in_client(client, stack.org_b.token)
    view = client.get("/dashboard/api/overview").json()
    assert view["counts"] == {"online": 0, "offline": 0, "never-seen": 1, "revoked": 0, "total": 1}
    assert view["phases"] == {} and view["rollouts"] == [] and view["out_of_sync"] == []
    assert [(p["device_id"], p["score"]) for p in view["top_drift"]] == [("b-dev-1", 0.777)]


def test_devices_json_follows_the_filters_and_the_organization(
    client: TestClient, stack: Stack
) -> None:
    _sign_in_client(client, stack.org_a.token)
    response = client.get("/dashboard/api/devices")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    view = response.json()
    rows = {r["device_id"]: r for r in view["rows"]}
    assert list(rows) == ["gen-1", "gen-2", "gen-3", "pi-1"]
    assert (view["shown"], view["more"], view["total"]) == (4, 0, 4)
    assert view["profiles"] == sorted({GENERIC, PI})
    gen1 = rows["gen-1"]
    assert (gen1["status"], gen1["models"], gen1["group"]) == ("online", ["m 1"], "lab")
    assert gen1["last_seen_age"].endswith("s ago") or gen1["last_seen_age"].endswith("min ago")
    assert datetime.fromisoformat(gen1["last_seen"]) <= datetime.now(UTC)
    assert rows["gen-2"]["status"] == "offline" and rows["gen-2"]["models"] == ["m 1"]
    gen3 = rows["gen-3"]
    assert (gen3["status"], gen3["last_seen"], gen3["last_seen_age"], gen3["models"]) == (
        "never-seen",
        None,
        "never",
        [],
    )
    assert rows["pi-1"]["profile"] == PI
    page = client.get("/dashboard/devices", params={"status": "offline", "q": "GEN"})
    assert 'data-live-url="/dashboard/api/devices?status=offline&amp;profile=&amp;q=GEN"' in (
        page.text
    )
    offline = client.get("/dashboard/api/devices?status=offline&profile=&q=GEN").json()
    assert [r["device_id"] for r in offline["rows"]] == ["gen-2"]
    assert (offline["shown"], offline["total"]) == (1, 4)
    by_profile = client.get("/dashboard/api/devices", params={"profile": PI}).json()
    assert [r["device_id"] for r in by_profile["rows"]] == ["pi-1"]
    bad = client.get("/dashboard/api/devices", params={"status": "asleep"})
    assert bad.status_code == 422 and "choose from: online, offline" in bad.json()["detail"]

    _sign_in_client(client, stack.org_b.token)
    view = client.get("/dashboard/api/devices").json()
    assert [r["device_id"] for r in view["rows"]] == ["b-dev-1"] and view["total"] == 1
    assert "gen-" not in client.get("/dashboard/api/devices", params={"q": "gen"}).text


def test_relabel_page_without_cloud(tmp_path: Path, keys: Keys) -> None:
    settings = ApiSettings(
        state_dir=tmp_path / "state",
        store=tmp_path / "store",
        public_key=keys.public_path,
        database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
    )
    app = create_app(settings, broker_auth=MosquittoPasswordFile(tmp_path / "pw", reload=print))
    with TestClient(app, follow_redirects=False) as client:
        org = _bootstrap_org(app, "solo")
        response = client.post("/dashboard/login", data={"api_key": org.token})
        assert response.status_code == 303
        page = client.get("/dashboard/relabel")
        assert page.status_code == 200 and "cloud service is not configured" in page.text
        assert client.get("/dashboard/deployments").status_code == 200
        assert "No deployments yet" in client.get("/dashboard/deployments").text
        assert client.get("/dashboard/static/dashboard.js").status_code == 200


def test_relabel_page_names_an_unreachable_cloud(tmp_path: Path, keys: Keys) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = ApiSettings(
        state_dir=tmp_path / "state",
        store=tmp_path / "store",
        public_key=keys.public_path,
        database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        cloud_url=dead,
    )
    app = create_app(settings, broker_auth=MosquittoPasswordFile(tmp_path / "pw", reload=print))
    with TestClient(app, follow_redirects=False) as client:
        org = _bootstrap_org(app, "solo")
        client.post("/dashboard/login", data={"api_key": org.token})
        page = client.get("/dashboard/relabel")
        assert page.status_code == 200 and f"cloud service {dead} is unreachable" in page.text


# ---------------------------------------------------------------- headless Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium, headless, through chromium-driver (no browser download)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        message = f"{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium chromium-driver)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1360,900",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations land there
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _shoot(driver: Any, stack: Stack, name: str) -> None:
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1360, max(900, min(int(height) + 40, 4000)))
    for directory in stack.screenshots:
        assert driver.save_screenshot(str(directory / f"{name}.png"))
    png = stack.screenshots[0] / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def _sign_in(driver: Any, stack: Stack, token: str, path: str = "/dashboard/") -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(stack.url + path)
    assert driver.current_url.startswith(stack.url + "/dashboard/login")
    driver.find_element(By.ID, "api_key").send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    _wait(driver, lambda d: d.current_url == stack.url + path)


def _wait(driver: Any, condition: Callable[[Any], Any]) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)


def _text(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    text: str = driver.find_element(By.CSS_SELECTOR, css).text
    return text


def _device_cell(driver: Any, device_id: str, name: str, attribute: str | None = None) -> str:
    """A field of a device's row on the devices page (its text, or an attribute)."""
    from selenium.webdriver.common.by import By

    cell = driver.find_element(
        By.CSS_SELECTOR, f'#devices tr[data-device="{device_id}"] [data-field="{name}"]'
    )
    value: str = cell.text if attribute is None else cell.get_attribute(attribute)
    return value


def _csp_violations(driver: Any) -> list[str]:
    return [
        str(e["message"])
        for e in driver.get_log("browser")
        if "Content Security Policy" in str(e["message"])
    ]


def _enqueue_heartbeat(stack: Stack, device_id: str) -> None:
    beat = heartbeat(device_id, version="1", artifact_id=stack.v1)
    stack.executor.enqueue(protocol.heartbeat(device_id), beat)


def _enqueue_offline(stack: Stack, device_id: str) -> None:
    offline = Status(device_id=device_id, state="offline", agent_version="0.1.0")
    stack.executor.enqueue(protocol.status(device_id), offline.to_bytes())


@pytest.mark.slow
def test_browser_login_overview_devices_drift_relabel_audit(browser: Any, stack: Stack) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(stack.url + "/dashboard/login")
    browser.find_element(By.ID, "api_key").send_keys("elk_0123456789ab_nopenopenopenopenope")
    browser.find_element(By.ID, "sign-in").click()
    assert "is unknown, revoked" in _wait(browser, lambda d: _text(d, "#login-error"))
    _shoot(browser, stack, "01-login-refused")

    _sign_in(browser, stack, stack.org_a.token)
    assert _text(browser, "#count-total") == "4" and _text(browser, "#count-online") == "1"
    assert "org-a" in _text(browser, "#org")
    assert "0.3100" in _text(browser, "#top-drift")
    _shoot(browser, stack, "02-overview")

    browser.get(stack.url + "/dashboard/devices")
    rows = {
        r.get_attribute("data-device"): r.text
        for r in browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr")
    }
    assert set(rows) == {"gen-1", "gen-2", "gen-3", "pi-1"}
    assert "online" in rows["gen-1"] and "m 1" in rows["gen-1"] and "s ago" in rows["gen-1"]
    assert "offline" in rows["gen-2"] and "never-seen" in rows["gen-3"]
    assert PI in rows["pi-1"] and "lab" in rows["pi-1"]
    _shoot(browser, stack, "03-devices")

    # Devices come online, go offline and heartbeat: the page follows without a reload.
    browser.execute_script("window.__notReloaded = true;")
    gen2_seen = _device_cell(browser, "gen-2", "last-seen", "title")
    _enqueue_heartbeat(stack, "gen-2")
    _enqueue_offline(stack, "gen-1")
    _wait(browser, lambda d: _device_cell(d, "gen-2", "status") == "online")
    _wait(browser, lambda d: _device_cell(d, "gen-1", "status") == "offline")
    assert _device_cell(browser, "gen-2", "last-seen", "title") > gen2_seen  # a newer heartbeat
    assert "offline" in _device_cell(browser, "gen-1", "status", "class")
    assert _device_cell(browser, "gen-2", "models") == "m 1"
    assert _device_cell(browser, "gen-3", "status") == "never-seen"
    assert browser.execute_script("return window.__notReloaded === true;")
    _shoot(browser, stack, "03b-devices-live")

    # So does the overview: gen-1 heartbeats again.
    browser.get(stack.url + "/dashboard/")
    assert (_text(browser, "#count-online"), _text(browser, "#count-offline")) == ("1", "1")
    browser.execute_script("window.__notReloaded = true;")
    _enqueue_heartbeat(stack, "gen-1")
    _wait(browser, lambda d: (_text(d, "#count-online"), _text(d, "#count-offline")) == ("2", "0"))
    assert browser.execute_script("return window.__notReloaded === true;")
    assert _text(browser, "#live-status") == "live" and not _csp_violations(browser)

    # A filtered list gains the row of a device that now matches (gen-2 offline again, as
    # the tests below expect) and drops its "No devices match." line.
    browser.get(stack.url + "/dashboard/devices?status=offline")
    assert _text(browser, "#devices tbody") == "No devices match."
    browser.execute_script("window.__notReloaded = true;")
    _enqueue_offline(stack, "gen-2")
    _wait(browser, lambda d: _device_cell(d, "gen-2", "status") == "offline")
    row = browser.find_element(By.CSS_SELECTOR, '#devices tr[data-device="gen-2"]')
    assert row.find_element(By.TAG_NAME, "a").get_attribute("href").endswith("/devices/gen-2")
    assert _device_cell(browser, "gen-2", "models") == "m 1" and "ago" in row.text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr")) == 1
    assert (_text(browser, "#shown"), _text(browser, "#total")) == ("1", "4")
    assert browser.execute_script("return window.__notReloaded === true;")

    browser.find_element(By.CSS_SELECTOR, 'select[name="status"] option[value="online"]').click()
    browser.find_element(By.CSS_SELECTOR, ".filters button").click()
    _wait(browser, lambda d: "status=online" in d.current_url)
    shown = browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr[data-device]")
    assert [r.get_attribute("data-device") for r in shown] == ["gen-1"]

    browser.get(stack.url + "/dashboard/devices/gen-1")
    state = _text(browser, "#state")
    assert "m" in state and stack.v1[:12] in state
    assert "0.3100" in _text(browser, "#drift")
    _shoot(browser, stack, "04-device")

    browser.get(stack.url + "/dashboard/drift")
    latest = _text(browser, "#drift-latest")
    assert "gen-1" in latest and "0.3100" in latest and "gen-2" in latest and "0.0400" in latest
    assert len(browser.find_elements(By.CSS_SELECTOR, "#drift-chart svg polyline")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#drift-chart svg circle")) == 5
    _shoot(browser, stack, "05-drift")

    browser.get(stack.url + "/dashboard/relabel")
    tasks = browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")
    assert len(tasks) == 3 and all("gen-1" in t.text and "digits-mlp" in t.text for t in tasks)
    assert "b-dev-1" not in browser.page_source
    _shoot(browser, stack, "06-relabel")

    browser.get(stack.url + "/dashboard/audit")
    audit = _text(browser, "#audit")
    assert "devices.register_device" in audit and "deployments.create_deployment" in audit
    assert "dashboard.login" in audit and "b-dev-1" not in audit
    _shoot(browser, stack, "07-audit")


@pytest.mark.slow
def test_browser_deployment_progress_updates_live(browser: Any, stack: Stack) -> None:
    from selenium.webdriver.common.by import By

    _sign_in(browser, stack, stack.org_a.token)
    browser.get(stack.url + "/dashboard/deployments")
    assert "rollout-v2" in _text(browser, "#deployments")
    _shoot(browser, stack, "08-deployments")

    browser.get(stack.url + f"/dashboard/deployments/{stack.deployment_id}")
    canary_row = f'#jobs tr[data-device="{stack.canary}"] [data-field="state"]'
    assert _text(browser, canary_row) == "IN_PROGRESS"
    assert _text(browser, '#waves tr[data-wave="0"] [data-field="status"]') == "active"
    assert _text(browser, '#waves tr[data-wave="1"] [data-field="status"]') == "waiting"
    waves = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#waves tbody tr")]
    assert waves[0].startswith("canary") and "0/1" in waves[0] and "0/2" in waves[1]
    _shoot(browser, stack, "09-deployment-canary")
    browser.execute_script("window.__notReloaded = true;")

    # The agent reports success; the executor starts the next wave; the page follows.
    stack.job_update(stack.canary, JobState.SUCCEEDED)
    _wait(browser, lambda d: _text(d, canary_row) == "SUCCEEDED")
    _wait(browser, lambda d: _text(d, '#waves tr[data-wave="0"] [data-field="status"]') == "done")
    _wait(browser, lambda d: _text(d, '#waves tr[data-wave="1"] [data-field="status"]') == "active")
    others = list(stack.deployment()["stages"][1])
    assert sorted(others) == sorted({"gen-1", "gen-2", "gen-3"} - {stack.canary})
    for device_id in others:
        stack.job_update(device_id, JobState.SUCCEEDED)
    _wait(browser, lambda d: _text(d, "#phase") == "SUCCEEDED")
    assert _text(browser, "#overall") == "100"
    assert _text(browser, '#waves tr[data-wave="1"] [data-field="progress"]') == "2/2"
    assert browser.execute_script("return window.__notReloaded === true;")
    _shoot(browser, stack, "10-deployment-done")


@pytest.mark.slow
def test_browser_tenant_isolation(browser: Any, stack: Stack) -> None:
    from selenium.webdriver.common.by import By

    _sign_in(browser, stack, stack.org_b.token, "/dashboard/devices")
    ids = [
        r.get_attribute("data-device")
        for r in browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr[data-device]")
    ]
    assert ids == ["b-dev-1"]
    assert "org-b" in _text(browser, "#org")
    _shoot(browser, stack, "11-org-b-devices")
    browser.get(stack.url + f"/dashboard/deployments/{stack.deployment_id}")
    assert "no deployment" in _text(browser, "#error")
    browser.get(stack.url + "/dashboard/drift")
    assert "0.7770" in _text(browser, "#drift-latest") and "gen-1" not in browser.page_source
    browser.get(stack.url + "/dashboard/relabel")
    rows = browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")
    assert len(rows) == 2 and all("b-dev-1" in r.text for r in rows)
    browser.find_element(By.CSS_SELECTOR, ".who button").click()
    _wait(browser, lambda d: "/dashboard/login" in d.current_url)
    browser.get(stack.url + "/dashboard/")
    assert "/dashboard/login" in browser.current_url


def test_short_session_secret_is_refused(tmp_path: Path, keys: Keys) -> None:
    settings = ApiSettings(
        state_dir=tmp_path / "state",
        store=tmp_path / "store",
        public_key=keys.public_path,
        dashboard_secret=SecretStr("short"),
    )
    with pytest.raises(ValueError, match="DASHBOARD_SECRET has 5 characters; use at least 16"):
        create_app(settings)


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (401, {"detail": "wrong token"}, "answered 401 to GET /labeling/tasks"),
        (200, {"rows": []}, "answered an unexpected body"),
    ],
)
def test_cloud_relabel_source_names_what_went_wrong(
    status: int, body: dict[str, Any], message: str
) -> None:
    from fleet.dashboard.relabel import CloudRelabelSource, RelabelError

    transport = httpx.MockTransport(lambda request: httpx.Response(status, json=body))
    source = CloudRelabelSource("http://cloud.test/", "t", transport=transport)
    with pytest.raises(RelabelError, match=f"cloud service http://cloud.test {message}"):
        source.tasks(state="open")
