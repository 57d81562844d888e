"""Organizations, API keys (hashed at rest, shown once), authentication and scopes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session, col

from fleet import credentials
from fleet.api.bootstrap import create_admin_key
from fleet.api.main import create_app
from fleet.api.settings import ApiSettings
from fleet.models import ApiKey, ApiKeyCreated, ApiKeyPublic

from .conftest import KeyFactory, Org, OrgFactory, auth


def _database_text(app: FastAPI) -> str:
    """Every row of every table, as text."""
    engine = app.state.engine
    out = []
    with engine.connect() as connection:
        for table in sa.inspect(engine).get_table_names():
            for row in connection.execute(sa.text(f"SELECT * FROM {table}")):
                out.append(repr(tuple(row)))
    return "\n".join(out)


def test_bootstrap_creates_org_and_admin_key(app: FastAPI, client: TestClient, org_a: Org) -> None:
    me = client.get("/organizations/current", headers=org_a.headers)
    assert me.status_code == 200
    assert me.json()["name"] == "org-a"
    keys = client.get("/api-keys", headers=org_a.headers).json()
    assert keys["count"] == 1
    assert keys["data"][0]["key_id"] == org_a.key_id
    assert keys["data"][0]["scopes"] == ["admin"]
    # A second bootstrap of the same organization adds a key, not an organization.
    with Session(app.state.engine) as session:
        again = create_admin_key(session, "org-a")
    assert not again.created_org and again.key_id != org_a.key_id
    assert client.get("/organizations/current", headers=auth(again.token)).json() == me.json()


def test_bootstrap_refuses_a_bad_org_name(app: FastAPI, client: TestClient) -> None:
    with Session(app.state.engine) as session, pytest.raises(ValueError, match="'bad name!'"):
        create_admin_key(session, "bad name!")


def test_secrets_are_hashed_at_rest_and_shown_once(
    app: FastAPI, client: TestClient, org_a: Org
) -> None:
    created = client.post(
        "/api-keys", headers=org_a.headers, json={"name": "ci", "scopes": ["deploy"]}
    )
    assert created.status_code == 201
    body = created.json()
    token = body["token"]
    parsed = credentials.parse_token(token)
    assert parsed is not None and parsed.key_id == body["key_id"]
    device = client.post(
        "/devices",
        headers=org_a.headers,
        json={"device_id": "dev-1", "profile": "generic/x86_64"},
    ).json()
    dumped = _database_text(app)
    for secret in (token, parsed.secret, org_a.token, device["mqtt"]["password"]):
        assert secret not in dumped
    with Session(app.state.engine) as session:
        row = session.exec(sa.select(ApiKey).where(ApiKey.key_id == parsed.key_id)).scalar_one()
        assert row.secret_hash.startswith("scrypt$")
        assert credentials.verify_secret(parsed.secret, row.secret_hash)
        assert not credentials.verify_secret(parsed.secret + "x", row.secret_hash)
    # Shown once: reading the key back never carries a secret.
    again = client.get(f"/api-keys/{parsed.key_id}", headers=org_a.headers).json()
    assert set(again) == set(ApiKeyPublic.model_fields)
    assert "token" in ApiKeyCreated.model_fields and "token" not in again
    listed = client.get("/api-keys", headers=org_a.headers).text
    assert parsed.secret not in listed and "secret_hash" not in listed


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        (None, "no API key"),
        ("Basic dXNlcjpwdw==", "no API key"),
        ("Bearer nonsense", "malformed API key"),
        ("Bearer elk_zzzzzzzzzzzz_" + "s" * 43, "malformed API key"),
        ("Bearer elk_0123456789ab_" + "s" * 43, "'0123456789ab' is unknown"),
    ],
)
def test_missing_or_bad_keys_are_401(
    client: TestClient, org_a: Org, header: str | None, needle: str
) -> None:
    headers = {} if header is None else {"Authorization": header}
    response = client.get("/devices", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert needle in response.json()["detail"]


def test_wrong_secret_and_revoked_keys_are_401(
    client: TestClient, org_a: Org, make_key: KeyFactory
) -> None:
    token = make_key(org_a, ["fleet:read"])
    parsed = credentials.parse_token(token)
    assert parsed is not None
    wrong = credentials.format_token(parsed.key_id, parsed.secret[::-1])
    assert client.get("/devices", headers=auth(wrong)).status_code == 401
    assert client.get("/devices", headers=auth(token)).status_code == 200
    revoked = client.delete(f"/api-keys/{parsed.key_id}", headers=org_a.headers)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    response = client.get("/devices", headers=auth(token))
    assert response.status_code == 401
    assert parsed.key_id in response.json()["detail"]


def test_last_admin_key_cannot_be_revoked(
    client: TestClient, org_a: Org, make_key: KeyFactory
) -> None:
    response = client.delete(f"/api-keys/{org_a.key_id}", headers=org_a.headers)
    assert response.status_code == 409
    assert org_a.key_id in response.json()["detail"]
    second = make_key(org_a, ["admin"])
    assert client.delete(f"/api-keys/{org_a.key_id}", headers=auth(second)).status_code == 200
    assert client.get("/devices", headers=org_a.headers).status_code == 401


@pytest.mark.parametrize(
    ("scopes", "method", "path", "status"),
    [
        (["fleet:read"], "GET", "/devices", 200),
        (["fleet:read"], "POST", "/groups", 403),
        (["fleet:write"], "GET", "/devices", 200),  # write implies read
        (["fleet:write"], "POST", "/groups", 201),
        (["fleet:write"], "GET", "/api-keys", 403),
        (["deploy"], "GET", "/devices", 403),  # deploy does not imply read
        (["deploy"], "POST", "/groups", 403),
        (["admin"], "GET", "/audit", 200),  # admin implies everything
        (["admin"], "POST", "/groups", 201),
        (["fleet:read", "fleet:write", "deploy"], "GET", "/audit", 403),
    ],
)
def test_scopes(
    client: TestClient,
    org_a: Org,
    make_key: KeyFactory,
    scopes: list[str],
    method: str,
    path: str,
    status: int,
) -> None:
    token = make_key(org_a, scopes)
    body = {"name": "g1"} if method == "POST" else None
    response = client.request(method, path, headers=auth(token), json=body)
    assert response.status_code == status, response.text
    if status == 403:
        detail = response.json()["detail"]
        needed = (
            "admin"
            if path in ("/api-keys", "/audit")
            else ("fleet:write" if method == "POST" else "fleet:read")
        )
        assert f"lacks scope '{needed}'" in detail
        assert "fleet:read, fleet:write, deploy, admin" in detail


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"name": "x", "scopes": ["root"]}, "'fleet:read', 'fleet:write', 'deploy' or 'admin'"),
        ({"name": "x", "scopes": []}, "at least one scope; choose from: fleet:read"),
        ({"name": " ", "scopes": ["admin"]}, "name is empty"),
    ],
)
def test_api_key_create_names_bad_values(
    client: TestClient, org_a: Org, body: dict[str, object], needle: str
) -> None:
    response = client.post("/api-keys", headers=org_a.headers, json=body)
    assert response.status_code == 422
    assert needle in response.text


def test_rename_key_and_organization(client: TestClient, org_a: Org, org_b: Org) -> None:
    renamed = client.patch(f"/api-keys/{org_a.key_id}", headers=org_a.headers, json={"name": "k"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "k"
    org_id = client.get("/organizations/current", headers=org_a.headers).json()["id"]
    taken = client.patch(f"/organizations/{org_id}", headers=org_a.headers, json={"name": "org-b"})
    assert taken.status_code == 409 and "'org-b' is taken" in taken.json()["detail"]
    bad = client.patch(f"/organizations/{org_id}", headers=org_a.headers, json={"name": "a b"})
    assert bad.status_code == 422 and "'a b'" in bad.text
    ok = client.patch(f"/organizations/{org_id}", headers=org_a.headers, json={"name": "org-c"})
    assert ok.status_code == 200 and ok.json()["name"] == "org-c"
    assert client.get(f"/organizations/{org_id}", headers=org_a.headers).json()["name"] == "org-c"


def test_two_organizations_do_not_share_keys(client: TestClient, make_org: OrgFactory) -> None:
    a, b = make_org("one"), make_org("two")
    a_keys = client.get("/api-keys", headers=a.headers).json()["data"]
    b_keys = client.get("/api-keys", headers=b.headers).json()["data"]
    assert [k["key_id"] for k in a_keys] == [a.key_id]
    assert [k["key_id"] for k in b_keys] == [b.key_id]


# ---------------------------------------------------------------- the verified-key cache


def _set_key(app: FastAPI, key_id: str, **values: object) -> None:
    """Change the key's row behind the API's back (as another API process would)."""
    with Session(app.state.engine) as session:
        session.execute(sa.update(ApiKey).where(col(ApiKey.key_id) == key_id).values(**values))
        session.commit()


def _key_id(token: str) -> str:
    parsed = credentials.parse_token(token)
    assert parsed is not None
    return parsed.key_id


def test_a_verified_key_skips_scrypt_on_the_next_request(
    app: FastAPI,
    client: TestClient,
    org_a: Org,
    make_key: KeyFactory,
    scrypt_calls: Callable[[], int],
) -> None:
    token = make_key(org_a, ["fleet:read"])
    scrypt_calls()
    assert client.get("/devices", headers=auth(token)).status_code == 200
    assert scrypt_calls() == 1 and _key_id(token) in app.state.key_cache
    for _ in range(3):
        assert client.get("/devices", headers=auth(token)).status_code == 200
    assert scrypt_calls() == 0
    # Unknown key ids still cost a full scrypt (against the dummy hash), every time.
    unknown = auth(credentials.format_token("0123456789ab", credentials.new_secret()))
    for _ in range(2):
        assert client.get("/devices", headers=unknown).status_code == 401
    assert scrypt_calls() == 2


def test_a_cached_key_is_refused_at_once_when_revoked_deleted_or_descoped(
    app: FastAPI,
    client: TestClient,
    org_a: Org,
    make_key: KeyFactory,
    scrypt_calls: Callable[[], int],
) -> None:
    revoked, deleted, descoped = (make_key(org_a, ["fleet:read"]) for _ in range(3))
    for token in (revoked, deleted, descoped):
        assert client.get("/devices", headers=auth(token)).status_code == 200
        assert _key_id(token) in app.state.key_cache
    assert client.delete(f"/api-keys/{_key_id(revoked)}", headers=org_a.headers).status_code == 200
    response = client.get("/devices", headers=auth(revoked))
    assert response.status_code == 401 and _key_id(revoked) in response.json()["detail"]
    with Session(app.state.engine) as session:
        session.execute(sa.delete(ApiKey).where(col(ApiKey.key_id) == _key_id(deleted)))
        session.commit()
    assert client.get("/devices", headers=auth(deleted)).status_code == 401
    _set_key(app, _key_id(descoped), scopes=["deploy"])
    response = client.get("/devices", headers=auth(descoped))
    assert response.status_code == 403 and "lacks scope 'fleet:read'" in response.json()["detail"]


def test_a_changed_secret_hash_invalidates_the_cached_key(
    app: FastAPI,
    client: TestClient,
    org_a: Org,
    make_key: KeyFactory,
    scrypt_calls: Callable[[], int],
) -> None:
    token = make_key(org_a, ["fleet:read"])
    key_id = _key_id(token)
    assert client.get("/devices", headers=auth(token)).status_code == 200
    new_secret = credentials.new_secret()
    _set_key(app, key_id, secret_hash=credentials.hash_secret(new_secret))  # rotated
    scrypt_calls()
    assert client.get("/devices", headers=auth(token)).status_code == 401
    assert scrypt_calls() == 1 and key_id not in app.state.key_cache
    rotated = credentials.format_token(key_id, new_secret)
    assert client.get("/devices", headers=auth(rotated)).status_code == 200
    assert client.get("/devices", headers=auth(rotated)).status_code == 200
    assert scrypt_calls() == 1
    # The same secret hashed anew (say, stronger parameters): checked in full once more.
    _set_key(app, key_id, secret_hash=credentials.hash_secret(new_secret))
    assert client.get("/devices", headers=auth(rotated)).status_code == 200
    assert client.get("/devices", headers=auth(rotated)).status_code == 200
    assert scrypt_calls() == 1


def test_a_wrong_secret_for_a_cached_key_is_refused_and_costs_scrypt(
    app: FastAPI,
    client: TestClient,
    org_a: Org,
    make_key: KeyFactory,
    scrypt_calls: Callable[[], int],
) -> None:
    token = make_key(org_a, ["fleet:read"])
    parsed = credentials.parse_token(token)
    assert parsed is not None
    assert client.get("/devices", headers=auth(token)).status_code == 200
    scrypt_calls()
    wrong = credentials.format_token(parsed.key_id, parsed.secret[::-1])
    response = client.get("/devices", headers=auth(wrong))
    assert response.status_code == 401 and parsed.key_id in response.json()["detail"]
    assert scrypt_calls() == 1 and parsed.key_id not in app.state.key_cache
    assert client.get("/devices", headers=auth(token)).status_code == 200
    assert scrypt_calls() == 1


def test_each_app_has_its_own_key_cache(
    app: FastAPI, client: TestClient, org_a: Org, settings: ApiSettings
) -> None:
    assert client.get("/devices", headers=org_a.headers).status_code == 200
    assert org_a.key_id in app.state.key_cache
    other = create_app(settings)
    assert other.state.key_cache is not app.state.key_cache
    assert len(other.state.key_cache) == 0
