"""A deployment end to end: the fleet API and its executor, the real responder, a private
Mosquitto whose device users come from registration through the API, and three real agent
processes on two hardware profiles, both native here: generic x86-64 plus AVX-512 on Intel
hosts or Zen 2 on AMD hosts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session

from compiler import bundle
from compiler.signing import load_public_key
from fleet.api.bootstrap import create_admin_key
from fleet.api.main import create_app
from fleet.api.settings import ApiSettings
from fleet.broker import MosquittoProcess
from fleet.broker_auth import MosquittoPasswordFile
from fleet.executor import Executor, mqtt_executor
from fleet.responder import BrokerConfig, Responder
from fleet.store import ArtifactStore
from tests.agent import harness
from tests.agent.harness import AgentProcess

from .conftest import auth
from .deploying import AVX512, GENERIC, TAR

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]

ZEN2 = "amd/epyc-zen2"


def _host_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def _second_profile() -> str | None:
    """A second x86 profile this host runs natively: AVX-512 on Intel, Zen 2 on AMD."""
    flags = _host_flags()
    if "avx512f" in flags:
        return AVX512
    if {"clzero", "sha_ni", "avx2"} <= flags:
        return ZEN2
    return None


SECOND = _second_profile() or AVX512
DEVICES = {"gen-1": GENERIC, "gen-2": GENERIC, "avx-1": SECOND}
SERVICE_USERS = {"fleet": "fleet-pw", "responder": "responder-pw"}


@dataclass(frozen=True)
class Variants:
    public: Path
    tars: dict[tuple[str, str], Path]  # (profile, version) -> transfer tar; ("...", "bad")


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> Variants:
    """The test MLP compiled with TVM for both profiles, versions 1 and 2, as transfer tars."""
    if _second_profile() is None:
        pytest.skip("this host runs neither intel/x86_64-avx512 nor amd/epyc-zen2 natively")
    from compiler.pipeline import CompileRequest, compile_model
    from compiler.settings import CompilerSettings
    from compiler.signing import generate_keys
    from tests.agent.bundles import make_bundle
    from tests.compiler import models

    d = tmp_path_factory.mktemp("variants")
    keys = generate_keys(d / "keys")
    settings = CompilerSettings(config_dir=d / "cfg", cache_dir=d / "cache")
    onnx = models.export_onnx("mlp", d / "mlp.onnx")
    tars = {}
    for profile in (GENERIC, SECOND):
        for version in ("1", "2"):
            name = f"{profile.replace('/', '_')}-{version}"
            out = compile_model(
                CompileRequest(
                    model=onnx,
                    profile=profile,
                    output=d / name,
                    model_name="mlp",
                    model_version=version,
                    runtime="tvm",
                    trials=0,
                    signing_key=keys.private,
                    samples=2,
                ),
                settings=settings,
            ).output
            tars[(profile, version)] = d / f"{name}.tar"
            bundle.pack_bundle(out, tars[(profile, version)])
    # Signed and verifiable, but its "library" is random bytes: activation fails on the agent.
    broken = make_bundle(d / "broken", keys.private, name="mlp", version="3", profile=SECOND)
    tars[(SECOND, "bad")] = d / "broken.tar"
    bundle.pack_bundle(broken, tars[(SECOND, "bad")])
    return Variants(public=keys.public, tars=tars)


@dataclass
class World:
    client: TestClient
    headers: dict[str, str]
    agents: dict[str, AgentProcess]
    responder: Responder
    artifacts: dict[tuple[str, str], str] = field(default_factory=dict)

    def deploy(self, version: str, variants: dict[str, str] | None = None) -> str:
        body = {
            "name": f"mlp-v{version}",
            "model_name": "mlp",
            "variants": variants or {p: self.artifacts[(p, version)] for p in (GENERIC, SECOND)},
            "target": {"groups": ["lab"]},
            "policy": {"canary": 1, "waves": ["100%"], "job_timeout_s": 120},
        }
        response = self.client.post("/deployments", headers=self.headers, json=body)
        assert response.status_code == 201, response.text
        assert response.json()["unmatched"] == []
        deployment_id: str = response.json()["id"]
        return deployment_id

    def wait_phase(self, deployment_id: str, phases: set[str], timeout: float = 90) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            read = self.client.get(f"/deployments/{deployment_id}", headers=self.headers).json()
            if read["phase"] in phases:
                return read
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {d}\n{a.log()}" for d, a in self.agents.items())
                raise AssertionError(f"deployment stuck: {read}\n{logs}")
            time.sleep(0.2)

    def wait_reported(self, version: str, timeout: float = 30) -> None:
        """Every device reports serving its own profile's artifact of ``version``."""
        deadline = time.monotonic() + timeout
        while True:
            serving = {}
            for device_id in DEVICES:
                state = self.client.get(f"/devices/{device_id}/state", headers=self.headers)
                models = state.json()["reported_models"]
                serving[device_id] = [m["artifact_id"] for m in models if m["name"] == "mlp"]
            wanted = {d: [self.artifacts[(p, version)]] for d, p in DEVICES.items()}
            if serving == wanted:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"devices serve {serving}, wanted {wanted}")
            time.sleep(0.2)


@pytest.fixture()
def world(tmp_path: Path, variants: Variants) -> Iterator[World]:
    broker = MosquittoProcess(tmp_path / "broker", users=dict(SERVICE_USERS))
    broker.start()
    store = ArtifactStore(tmp_path / "store", load_public_key(variants.public))
    settings = ApiSettings(
        state_dir=tmp_path / "state",
        store=tmp_path / "store",
        public_key=variants.public,
        database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        max_upload_bytes=64 << 20,
    )
    config = BrokerConfig("127.0.0.1", broker.port, "fleet", SERVICE_USERS["fleet"])

    def make_executor(engine: Engine, store: ArtifactStore) -> Executor:
        executor = mqtt_executor(config, engine=engine, store=store)
        executor.interval = 30.0  # no polling: only messages, API wakes and timers move it
        return executor

    app = create_app(
        settings,
        store=store,
        broker_auth=MosquittoPasswordFile(tmp_path / "broker" / "passwd", reload=broker.reload),
        executor=make_executor,
    )
    responder = Responder(
        store,
        store,
        host="127.0.0.1",
        port=broker.port,
        username="responder",
        password=SERVICE_USERS["responder"],
    )
    agents: dict[str, AgentProcess] = {}
    try:
        responder.start(timeout=10)
        with TestClient(app) as client:
            with Session(app.state.engine) as session:
                headers = auth(create_admin_key(session, "acme").token)
            group = client.post("/groups", headers=headers, json={"name": "lab"}).json()
            passwords = dict(SERVICE_USERS)
            for device_id, profile in DEVICES.items():
                registered = client.post(
                    "/devices",
                    headers=headers,
                    json={"device_id": device_id, "profile": profile, "group_id": group["id"]},
                )
                assert registered.status_code == 201, registered.text
                passwords[device_id] = registered.json()["mqtt"]["password"]
            fleet = harness.Fleet(tmp_path, variants.public, store, broker, passwords=passwords)
            for device_id, profile in DEVICES.items():
                agents[device_id] = AgentProcess(
                    fleet, device_id, tmp_path / "devices" / device_id / "state", profile=profile
                )
                agents[device_id].start(wait=False)
            for agent in agents.values():
                agent.wait_http()
            world = World(client, headers, agents, responder)
            for (profile, version), tar in sorted(variants.tars.items()):
                uploaded = client.post(
                    "/artifacts", headers={**headers, **TAR}, content=tar.read_bytes()
                )
                assert uploaded.status_code in (200, 201), uploaded.text
                assert uploaded.json()["profile"] == profile
                world.artifacts[(profile, version)] = uploaded.json()["artifact_id"]
            yield world
    finally:
        for agent in agents.values():
            agent.kill()
        responder.stop()
        broker.stop()
        store.close()


def test_canary_then_rest_per_profile_variants_then_rollback(world: World) -> None:
    first = world.deploy("1")
    done = world.wait_phase(first, {"SUCCEEDED", "ABORTED"})
    assert done["phase"] == "SUCCEEDED", done
    assert [len(s) for s in done["stages"]] == [1, 2]
    assert done["counts"]["SUCCEEDED"] == 3
    for device in done["devices"]:
        assert device["artifact_id"] == world.artifacts[(DEVICES[device["device_id"]], "1")]
    world.wait_reported("1")

    second = world.deploy("2")
    done = world.wait_phase(second, {"SUCCEEDED", "ABORTED"})
    assert done["phase"] == "SUCCEEDED", done
    for device in done["devices"]:
        profile = DEVICES[device["device_id"]]
        assert device["artifact_id"] == world.artifacts[(profile, "2")]
        assert device["previous_artifact_id"] == world.artifacts[(profile, "1")]
    world.wait_reported("2")

    rolled = world.client.post(f"/deployments/{second}/rollback", headers=world.headers)
    assert rolled.status_code == 200, rolled.text
    done = world.wait_phase(second, {"ROLLED_BACK"})
    assert {d["rollback_state"] for d in done["devices"]} == {"ROLLED_BACK"}, done
    assert done["reason"] == "rolled back 3 of 3 touched devices"
    world.wait_reported("1")
    for device_id in DEVICES:
        state = world.client.get(f"/devices/{device_id}/state", headers=world.headers).json()
        assert state["in_sync"] and state["online"], state


def test_failing_canary_aborts_and_no_other_device_gets_a_job(world: World) -> None:
    bad = {GENERIC: world.artifacts[(GENERIC, "1")], SECOND: world.artifacts[(SECOND, "bad")]}
    deployment_id = world.deploy("bad", variants=bad)
    done = world.wait_phase(deployment_id, {"ABORTED", "SUCCEEDED"})
    assert done["phase"] == "ABORTED", done
    assert done["stages"][0] == ["avx-1"]  # the canary: online devices by id
    devices = {d["device_id"]: d for d in done["devices"]}
    assert devices["avx-1"]["state"] == "FAILED" and devices["avx-1"]["reason"]
    time.sleep(1.0)  # several executor ticks: still nothing for the others
    done = world.client.get(f"/deployments/{deployment_id}", headers=world.headers).json()
    for device_id in ("gen-1", "gen-2"):
        device = next(d for d in done["devices"] if d["device_id"] == device_id)
        assert (device["state"], device["attempts"], device["job_id"]) == ("NOT_STARTED", 0, None)
        state = world.client.get(f"/devices/{device_id}/state", headers=world.headers).json()
        assert state["desired_models"] == {} and state["reported_models"] == [], state
        jobs = world.agents[device_id].state_dir / "jobs"
        assert [p for p in jobs.rglob("*") if p.is_file()] == [], device_id  # no job recorded


def test_cancel_while_the_canary_downloads_stops_the_agent_and_keeps_its_model(
    world: World,
) -> None:
    first = world.deploy("1")
    assert world.wait_phase(first, {"SUCCEEDED", "ABORTED"})["phase"] == "SUCCEEDED"
    world.wait_reported("1")
    # No responder: the canary's download of version 2 asks for chunks nobody sends, so the
    # job stays IN_PROGRESS (downloading) until the cancel reaches the agent.
    world.responder.stop()
    second = world.deploy("2")
    canary = world.agents["avx-1"]
    current = canary.state_dir / "jobs" / "current.json"
    deadline = time.monotonic() + 30
    while True:
        read = world.client.get(f"/deployments/{second}", headers=world.headers).json()
        devices = {d["device_id"]: d for d in read["devices"]}
        if devices["avx-1"]["state"] == "IN_PROGRESS" and current.exists():
            break
        assert time.monotonic() < deadline, f"canary never started downloading: {read}"
        time.sleep(0.1)
    job_id = devices["avx-1"]["job_id"]
    assert json.loads(current.read_text())["job"]["job_id"] == job_id

    canceled = world.client.post(f"/deployments/{second}/cancel", headers=world.headers)
    assert canceled.status_code == 200, canceled.text
    done = world.wait_phase(second, {"CANCELED"}, timeout=10)
    devices = {d["device_id"]: d for d in done["devices"]}
    assert devices["avx-1"]["state"] == "CANCELED", done
    for device_id in ("gen-1", "gen-2"):  # never started
        assert devices[device_id]["state"] == "NOT_STARTED", done

    # The agent stopped the job: recorded CANCELED (from the fleet's cancel, not a download
    # timeout), no current job, the partial download gone.
    record = canary.state_dir / "jobs" / "done" / f"{job_id}.json"
    deadline = time.monotonic() + 10
    while not record.exists():
        assert time.monotonic() < deadline, f"agent did not end the job:\n{canary.log()}"
        time.sleep(0.1)
    result = json.loads(record.read_text())
    assert (result["state"], result["reason"]) == ("CANCELED", "canceled by the fleet"), result
    assert not current.exists()
    transfers = canary.state_dir / "transfers"
    assert not transfers.exists() or not [p for p in transfers.rglob("*") if p.is_file()]
    # It keeps serving version 1, as its next heartbeats report; the others were not touched.
    seen = world.client.get("/devices/avx-1/state", headers=world.headers).json()["last_seen"]
    deadline = time.monotonic() + 10
    while True:
        state = world.client.get("/devices/avx-1/state", headers=world.headers).json()
        if state["last_seen"] != seen:
            break
        assert time.monotonic() < deadline, "no heartbeat after the cancel"
        time.sleep(0.2)
    world.wait_reported("1")
    for device_id in ("gen-1", "gen-2"):
        jobs = world.agents[device_id].state_dir / "jobs" / "done"
        assert not any(job_id.split(".")[0] in p.name for p in jobs.glob("*.json")), device_id
