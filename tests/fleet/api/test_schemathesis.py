"""schemathesis against the live OpenAPI schema: no 5xx, and responses match the schema.

The app runs under uvicorn on a free port (on SQLite and on PostgreSQL, like every API test);
schemathesis loads ``/openapi.json`` from it and sends a bounded, derandomized number of
generated requests per operation as an admin key, checking ``not_a_server_error`` and
``response_schema_conformance``. Every failing operation is collected and reported together
with the request that failed.

A known API gap, pinned by a strict xfail below so that its fix is noticed, is checked less
strictly so that the fuzz still guards everything else: the API's own 422s
(``InvalidRequestError``: unknown profile on ``POST /devices`` and
  ``PATCH /devices/{device_id}``, an invalid rollout policy on ``POST /deployments``) answer
  ``{"detail": "<message>"}`` where the schema documents 422 as FastAPI's
  ``HTTPValidationError`` (``detail``: an array of ``{loc, msg, type}``); such responses get
  ``not_a_server_error`` only (:func:`own_422`). Fixed and now tested plainly: huge list
offsets (422) and NUL characters in URLs and JSON bodies (422, fleet/api/nul_guard.py).

``status_code_conformance`` is not checked: no route documents its 401/403/404/409 answers
(only 200/201 and 422), so e.g. ``GET /organizations/{random uuid}`` -> 404 is "undocumented";
:func:`test_error_statuses_are_documented` pins that gap.
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
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402
from sqlmodel import Session  # noqa: E402

from fleet.api.bootstrap import create_admin_key  # noqa: E402

from .conftest import Org  # noqa: E402
from .test_api_cli import LiveServer  # noqa: E402

EXAMPLES_PER_OPERATION = 10
CHECKS = [not_a_server_error, response_schema_conformance]
MAX_OFFSET = 2**63 - 1
LIST_ROUTES = ["/devices", "/groups", "/artifacts", "/api-keys", "/audit", "/deployments"]
OWN_422_BUG = (
    "API bug: InvalidRequestError answers 422 {'detail': str} but every route documents 422 "
    "as HTTPValidationError (detail: array), so response_schema_conformance fails"
)


def own_422(response: Any) -> bool:
    """A 422 of the API's own ``InvalidRequestError`` (``detail`` a string; see the docstring)."""
    if response.status_code != 422:
        return False
    try:
        return isinstance(response.json().get("detail"), str)
    except ValueError:
        return False


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
                checks = [not_a_server_error] if own_422(response) else CHECKS
                case.validate_response(response, checks=checks)

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


@pytest.mark.xfail(strict=True, reason=OWN_422_BUG)
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


@pytest.mark.xfail(
    strict=True,
    reason="API gap: routes document only 200/201 and 422; 401, 403, 404 and 409 answers "
    "({'detail': str}) are not in the OpenAPI schema, so status_code_conformance fails",
)
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
