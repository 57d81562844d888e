"""Tenant isolation over every route that names an object, and scope checks on each.

Organization A owns one object of every kind. For each object route (found by walking
``app.routes``, and checked against ``OBJECT_ROUTES`` so that a new route cannot be left
out), org B's admin key gets 404 exactly as for a missing id, and an org A key without the
route's scope gets 403 naming it; neither changes A's object.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fastapi.routing
import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlmodel import Session

from compiler import bundle
from compiler.signing import generate_keys, load_private_key, load_public_key
from fleet import scopes
from fleet.api.bootstrap import create_admin_key
from fleet.api.deps import ScopeRequirement
from fleet.api.main import create_app
from fleet.api.settings import ApiSettings
from fleet.broker_auth import MosquittoPasswordFile
from fleet.scopes import Scope
from fleet.store import ArtifactStore

from ..conftest import manifest_fields
from .conftest import PROFILE, Postgres, auth

# Every route with a path parameter, and the scope it needs. A new object route fails
# test_every_object_route_is_covered until it is added here (and so tested below).
OBJECT_ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/organizations/{org_id}"): "fleet:read",
    ("PATCH", "/organizations/{org_id}"): "admin",
    ("GET", "/api-keys/{key_id}"): "admin",
    ("PATCH", "/api-keys/{key_id}"): "admin",
    ("DELETE", "/api-keys/{key_id}"): "admin",
    ("GET", "/devices/{device_id}"): "fleet:read",
    ("PATCH", "/devices/{device_id}"): "fleet:write",
    ("DELETE", "/devices/{device_id}"): "fleet:write",
    ("POST", "/devices/{device_id}/revoke"): "fleet:write",
    ("GET", "/groups/{group_id}"): "fleet:read",
    ("PATCH", "/groups/{group_id}"): "fleet:write",
    ("DELETE", "/groups/{group_id}"): "fleet:write",
    ("GET", "/devices/{device_id}/state"): "fleet:read",
    ("POST", "/devices/{device_id}/drift"): "fleet:write",
    ("GET", "/artifacts/{artifact_id}"): "fleet:read",
    ("GET", "/models/{model_name}"): "fleet:read",
    ("GET", "/deployments/{deployment_id}"): "fleet:read",
    ("POST", "/deployments/{deployment_id}/pause"): "deploy",
    ("POST", "/deployments/{deployment_id}/resume"): "deploy",
    ("POST", "/deployments/{deployment_id}/cancel"): "deploy",
    ("POST", "/deployments/{deployment_id}/rollback"): "deploy",
}
# Routes that need no API key.
PUBLIC_ROUTES = {("GET", "/healthz"), ("GET", "/metrics")}


def api_routes(app: FastAPI) -> list[tuple[str, str, Dependant]]:
    """(method, path, dependant) of every API route of ``app``, as it serves them.

    FastAPI >= 0.165 keeps included routers as such in ``app.routes`` and resolves them
    through ``iter_route_contexts`` (prefixes and router dependencies applied); older
    versions copy each route into ``app.routes``.
    """
    iterate = getattr(fastapi.routing, "iter_route_contexts", None)
    routes: Iterable[Any] = iterate(app.routes) if iterate is not None else app.routes
    found = []
    for route in routes:
        if isinstance(getattr(route, "original_route", route), APIRoute):
            found.extend((method, route.path, route.dependant) for method in route.methods)
    return found


def object_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every API route with a path parameter."""
    return {(m, path) for m, path, _ in api_routes(app) if "{" in path}


def required_scopes(dependant: Dependant) -> set[str]:
    """Scopes demanded by ScopeRequirement dependencies anywhere under ``dependant``."""
    found = {dependant.call.scope.value} if isinstance(dependant.call, ScopeRequirement) else set()
    for sub in dependant.dependencies:
        found |= required_scopes(sub)
    return found


def lacking(scope: str) -> list[str]:
    """The largest set of scopes that does not allow ``scope``."""
    return [s.value for s in Scope if not scopes.allows([s], Scope(scope))]


@dataclass
class World:
    app: FastAPI
    client: TestClient
    a: dict[str, str]  # admin headers of org A
    b: dict[str, str]  # admin headers of org B
    params: dict[str, str]  # path parameter -> org A's object id
    restricted: dict[str, dict[str, str]]  # scope -> headers of an org A key lacking it
    snapshot: dict[str, Any]  # GET path -> org A's object as first read


def _fill(path: str, params: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: params[m.group(1)], path)


def _body(method: str, path: str, params: dict[str, str]) -> dict[str, Any] | None:
    """A body the route would accept from the owner, so that only isolation can refuse it."""
    if path.endswith("/drift"):
        return {
            "model_name": params["model_name"],
            "artifact_id": params["artifact_id"],
            "metric": "psi",
            "score": 0.5,
            "samples": 500,
            "window_start": "2026-11-26T00:00:00Z",
            "window_end": "2026-11-26T01:00:00Z",
        }
    return {} if method == "PATCH" else None


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    root = tmp_path_factory.mktemp("isolation")
    drop = None
    if request.param == "sqlite":
        url = f"sqlite:///{root / 'fleet.db'}"
    else:
        postgres: Postgres = request.getfixturevalue("postgres")
        url = postgres.create()
        drop = postgres
    paths = generate_keys(root / "keys")
    settings = ApiSettings(
        state_dir=root / "state",
        store=root / "store",
        public_key=paths.public,
        database_url=url,
        max_upload_bytes=1 << 20,
    )
    store = ArtifactStore(root / "store", load_public_key(paths.public))
    broker = MosquittoPasswordFile(root / "passwd", reload=lambda: None)
    app = create_app(settings, store=store, broker_auth=broker)
    try:
        with TestClient(app) as client:
            with Session(app.state.engine) as session:
                a = auth(create_admin_key(session, "org-a").token)
                b = auth(create_admin_key(session, "org-b").token)
            group = client.post("/groups", headers=a, json={"name": "lab"}).json()
            client.post(
                "/devices",
                headers=a,
                json={"device_id": "a-dev-1", "profile": PROFILE, "group_id": group["id"]},
            ).raise_for_status()
            key = client.post("/api-keys", headers=a, json={"name": "k", "scopes": ["admin"]})
            sealed = root / "bundle"
            with bundle.staging_dir(sealed) as staging:
                (staging / "model.so").write_bytes(os.urandom(1024))
                bundle.seal_bundle(
                    staging,
                    sealed,
                    manifest_fields=manifest_fields(),
                    private_key=load_private_key(paths.private),
                )
            tar = root / "a.tar"
            bundle.pack_bundle(sealed, tar)
            artifact = client.post(
                "/artifacts",
                headers={**a, "Content-Type": "application/x-tar"},
                content=tar.read_bytes(),
            ).json()
            deployment = client.post(
                "/deployments",
                headers=a,
                json={
                    "name": "d",
                    "model_name": "m",
                    "variants": {PROFILE: artifact["artifact_id"]},
                    "target": {"device_ids": ["a-dev-1"]},
                    "policy": {"canary": 1, "waves": ["100%"]},
                },
            )
            assert deployment.status_code == 201, deployment.text
            params = {
                "org_id": client.get("/organizations/current", headers=a).json()["id"],
                "device_id": "a-dev-1",
                "group_id": group["id"],
                "key_id": key.json()["key_id"],
                "artifact_id": artifact["artifact_id"],
                "model_name": artifact["model_name"],
                "deployment_id": deployment.json()["id"],
            }
            restricted = {}
            for scope in set(OBJECT_ROUTES.values()):
                made = client.post(
                    "/api-keys", headers=a, json={"name": "r", "scopes": lacking(scope)}
                )
                restricted[scope] = auth(made.json()["token"])
            snapshot = {}
            for method, path in OBJECT_ROUTES:
                if method == "GET":
                    filled = _fill(path, params)
                    snapshot[filled] = client.get(filled, headers=a).json()
            yield World(app, client, a, b, params, restricted, snapshot)
    finally:
        store.close()
        if drop is not None:
            drop.drop(url)


def _unchanged(world: World) -> None:
    for path, before in world.snapshot.items():
        response = world.client.get(path, headers=world.a)
        assert response.status_code == 200, f"{path}: {response.text}"
        assert response.json() == before, path


def test_every_object_route_is_covered(world: World) -> None:
    assert object_routes(world.app) == set(OBJECT_ROUTES)


def test_every_route_requires_the_scope_in_the_table(world: World) -> None:
    routes = api_routes(world.app)
    assert len(routes) > len(OBJECT_ROUTES)
    for method, path, dependant in routes:
        needed = required_scopes(dependant)
        if (method, path) in PUBLIC_ROUTES:
            assert needed == set(), path
            continue
        assert len(needed) == 1, f"{method} {path} requires {needed or 'no scope'}"
        if (method, path) in OBJECT_ROUTES:
            assert needed == {OBJECT_ROUTES[(method, path)]}, path


@pytest.mark.parametrize(("method", "path"), sorted(OBJECT_ROUTES))
def test_other_organization_gets_404(world: World, method: str, path: str) -> None:
    filled = _fill(path, world.params)
    body = _body(method, path, world.params)
    response = world.client.request(method, filled, headers=world.b, json=body)
    assert response.status_code == 404, response.text
    param = re.search(r"\{(\w+)\}", path)
    assert param is not None
    assert world.params[param.group(1)] in response.json()["detail"]
    _unchanged(world)


@pytest.mark.parametrize(("method", "path"), sorted(OBJECT_ROUTES))
def test_missing_scope_gets_403(world: World, method: str, path: str) -> None:
    scope = OBJECT_ROUTES[(method, path)]
    body = _body(method, path, world.params)
    response = world.client.request(
        method, _fill(path, world.params), headers=world.restricted[scope], json=body
    )
    assert response.status_code == 403, response.text
    assert f"lacks scope '{scope}'" in response.json()["detail"]
    _unchanged(world)


@pytest.mark.parametrize("path", sorted(p for m, p in OBJECT_ROUTES if m == "GET"))
def test_owner_reads_its_objects(world: World, path: str) -> None:
    """The control: the ids used above are real, so the 404s are isolation, not typos."""
    assert world.client.get(_fill(path, world.params), headers=world.a).status_code == 200


def test_lists_show_only_the_callers_objects(world: World) -> None:
    for path in ("/devices", "/groups", "/artifacts", "/api-keys", "/deployments"):
        a_count = world.client.get(path, headers=world.a).json()["count"]
        b_data = world.client.get(path, headers=world.b).json()
        assert a_count >= 1
        assert all(
            world.params.get(k) not in (v, None) or k not in world.params
            for item in b_data["data"]
            for k, v in item.items()
        ), path
    b_devices = world.client.get(
        f"/devices?group_id={world.params['group_id']}", headers=world.b
    ).json()
    assert b_devices == {"data": [], "count": 0}
    assert world.client.get("/devices", headers=world.b).json()["count"] == 0
    assert world.client.get("/groups", headers=world.b).json()["count"] == 0
    assert world.client.get("/artifacts", headers=world.b).json()["count"] == 0
    assert world.client.get("/deployments", headers=world.b).json()["count"] == 0
    # B's probes are in B's audit log, never in A's.
    b_key = world.client.get("/api-keys", headers=world.b).json()["data"][0]["key_id"]
    a_actors = {
        e["actor"] for e in world.client.get("/audit?limit=1000", headers=world.a).json()["data"]
    }
    assert b_key not in a_actors
