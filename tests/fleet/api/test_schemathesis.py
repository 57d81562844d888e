"""schemathesis against the live OpenAPI schema: no 5xx, and responses match the schema.

The app runs under uvicorn on a free port (on SQLite and on PostgreSQL, like every API test);
schemathesis loads ``/openapi.json`` from it and sends a bounded, derandomized number of
generated requests per operation as an admin key, checking ``not_a_server_error`` and
``response_schema_conformance``. Every failing operation is collected and reported together
with the request that failed.

Every resource route documents its error answers (401, 403, 404, 409, and 422 as either the
API's own message or FastAPI's validation list), so ``status_code_conformance`` is checked
too. Once-found bugs are tested plainly below: huge list offsets and NUL characters (422).
"""

from __future__ import annotations

from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    response_schema_conformance,
    status_code_conformance,
)
from sqlmodel import Session  # noqa: E402

from fleet.api.bootstrap import create_admin_key  # noqa: E402

from .conftest import Org  # noqa: E402
from .test_api_cli import LiveServer  # noqa: E402

EXAMPLES_PER_OPERATION = 10
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
MAX_OFFSET = 2**63 - 1
LIST_ROUTES = ["/devices", "/groups", "/artifacts", "/api-keys", "/audit", "/deployments"]


def test_api_conforms_to_its_openapi_schema(app: FastAPI, database_url: str) -> None:
    with LiveServer(app) as server:
        with Session(app.state.engine) as session:
            token = create_admin_key(session, "org-fuzz").token
        headers = {"Authorization": f"Bearer {token}"}
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        failures: list[str] = []
        operations = 0
        for result in schema.get_all_operations():
            operation = result.ok()
            operations += 1

            @given(case=operation.as_strategy())
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                response = case.call(base_url=server.url, headers=headers)
                case.validate_response(response, checks=CHECKS)

            try:
                check()
            except (FailureGroup, Exception) as err:  # FailureGroup is a BaseExceptionGroup
                failures.append(f"{operation.label}:\n{err}")
        assert operations >= 20, f"only {operations} operations in the schema"
        assert not failures, "\n\n".join(failures)


# ---------------------------------------------------------------- the known bugs, pinned


@pytest.fixture()
def unraised(client: TestClient) -> TestClient:
    """The app's client, answering 500 instead of raising the server's exception."""
    return TestClient(client.app, raise_server_exceptions=False)


@pytest.mark.parametrize("path", LIST_ROUTES)
def test_huge_offset_is_refused_not_a_server_error(
    unraised: TestClient, org_a: Org, path: str
) -> None:
    response = unraised.get(path, params={"offset": str(MAX_OFFSET + 1)}, headers=org_a.headers)
    assert response.status_code == 422, (path, response.status_code, response.text)
    assert "offset" in response.text


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/artifacts?model_name=%00", None),
        ("GET", "/artifacts?profile=%00", None),
        ("GET", "/audit?actor=%00", None),
        ("GET", "/audit?action=%00", None),
        ("GET", "/devices/%00", None),
        ("GET", "/artifacts/%00", None),
        ("GET", "/api-keys/%00", None),
        ("POST", "/groups", {"name": "g", "description": "a\x00b"}),
        ("POST", "/api-keys", {"name": "a\x00b", "scopes": ["fleet:read"]}),
    ],
)
def test_nul_characters_are_refused_with_422(
    unraised: TestClient,
    org_a: Org,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    response = unraised.request(method, path, json=body, headers=org_a.headers)
    assert response.status_code == 422, (method, path, response.status_code, response.text)
    assert "NUL characters" in response.json()["detail"]


def test_own_422_matches_the_documented_schema(client: TestClient, org_a: Org) -> None:
    spec = client.get("/openapi.json").json()
    documented = spec["paths"]["/devices"]["post"]["responses"]["422"]
    schema = documented["content"]["application/json"]["schema"]
    response = client.post(
        "/devices", headers=org_a.headers, json={"device_id": "d1", "profile": "rpi4"}
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, list) or not schema.get("$ref", "").endswith(
        "/HTTPValidationError"
    ), f"422 body {response.json()} against documented {schema}"


def test_error_statuses_are_documented(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    missing = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            documented = set(operation.get("responses", {}))
            needed = {"401", "403"} if operation.get("security") else set()
            if "{" in path:
                needed.add("404")
            if needed - documented:
                missing.append(f"{method.upper()} {path}: {sorted(needed - documented)}")
    assert not missing, "\n".join(missing)
