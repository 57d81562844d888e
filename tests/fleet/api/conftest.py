"""Fleet API fixtures: the app on SQLite and on PostgreSQL, organizations, keys and bundles.

Every test that takes ``database_url`` (directly or through ``client``) runs twice: on a
fresh SQLite file and on a PostgreSQL database created for this test session
(``edgeloop_test_<random>``, migrated once, truncated before each test, dropped at the end).
PostgreSQL comes from ``TEST_POSTGRES_URL`` (default the local server as ``postgres``); if it
is unreachable its tests are skipped, except under ``CI`` where they fail.
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Starlette >= 1.x prefers the httpx2 package for its TestClient; httpx works the same.
warnings.filterwarnings("ignore", message=r".*httpx.*starlette\.testclient", category=Warning)

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlmodel import Session  # noqa: E402

from compiler import bundle  # noqa: E402
from fleet import db  # noqa: E402
from fleet.api.bootstrap import create_admin_key  # noqa: E402
from fleet.api.main import create_app  # noqa: E402
from fleet.api.settings import ApiSettings  # noqa: E402
from fleet.broker_auth import MosquittoPasswordFile  # noqa: E402
from fleet.store import ArtifactStore  # noqa: E402

from ..conftest import BundleFactory, Keys  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TABLES = (
    "drift_scores",
    "device_reports",
    "deployments",
    "audit_log",
    "artifacts",
    "devices",
    "groups",
    "api_keys",
    "organizations",
)
BUNDLE_BYTES = 4096
PROFILE = "generic/x86_64"


def in_ci() -> bool:
    """Whether the CI variable is set to something truthy."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


class Postgres:
    """A PostgreSQL server the tests may create databases on."""

    def __init__(self, admin_url: str) -> None:
        import psycopg

        self.admin_url = admin_url
        self._conn = psycopg.connect(
            make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False),
            autocommit=True,
            connect_timeout=3,
        )

    def create(self) -> str:
        """A new empty database; its URL."""
        name = f"edgeloop_test_{secrets.token_hex(4)}"
        self._conn.execute(f'CREATE DATABASE "{name}"')
        return _with_database(self.admin_url, name)

    def drop(self, url: str) -> None:
        """Drop the database of ``url`` (closing what still uses it)."""
        name = make_url(url).database
        self._conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        self._conn.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """The PostgreSQL server (skipped if unreachable, unless under CI)."""
    try:
        server = Postgres(POSTGRES_ADMIN_URL)
    except Exception as err:  # psycopg.OperationalError, or psycopg missing
        message = f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable: {err}"
        if in_ci():
            pytest.fail(f"{message} (CI is set, so PostgreSQL tests must run)")
        pytest.skip(message)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres_url(postgres: Postgres) -> Iterator[str]:
    """A migrated database for this test session, dropped at the end."""
    url = postgres.create()
    try:
        db.upgrade(url)
        yield url
    finally:
        postgres.drop(url)


def _truncate(url: str) -> None:
    import psycopg

    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that tests copy (upgrading from empty is test_migrations')."""
    path = tmp_path_factory.mktemp("sqlite-template") / "fleet.db"
    db.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database with no rows: a copy of the SQLite template, or the truncated
    session database on PostgreSQL."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "state" / "fleet.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    _truncate(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database that has never been migrated (PostgreSQL: a new one, dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty' / 'fleet.db'}"
        return
    postgres: Postgres = request.getfixturevalue("postgres")
    url = postgres.create()
    try:
        yield url
    finally:
        postgres.drop(url)


# ---------------------------------------------------------------- the app


@dataclass
class Reloads:
    """A broker reload callback that counts calls (and can be made to fail)."""

    count: int = 0
    fail_with: Exception | None = None

    def __call__(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.count += 1


@pytest.fixture()
def settings(tmp_path: Path, keys: Keys, database_url: str) -> ApiSettings:
    return ApiSettings(
        state_dir=tmp_path / "state",
        store=tmp_path / "store",
        public_key=keys.public_path,
        database_url=database_url,
        max_upload_bytes=1 << 20,
    )


@pytest.fixture()
def artifact_store(tmp_path: Path, keys: Keys) -> Iterator[ArtifactStore]:
    with ArtifactStore(tmp_path / "store", keys.public) as store:
        yield store


@pytest.fixture()
def reloads() -> Reloads:
    return Reloads()


@pytest.fixture()
def broker_auth(tmp_path: Path, reloads: Reloads) -> MosquittoPasswordFile:
    """A real password file (hashed by mosquitto_passwd) with no broker behind it."""
    return MosquittoPasswordFile(tmp_path / "broker" / "passwd", reload=reloads)


@pytest.fixture()
def app(
    settings: ApiSettings, artifact_store: ArtifactStore, broker_auth: MosquittoPasswordFile
) -> FastAPI:
    return create_app(settings, store=artifact_store, broker_auth=broker_auth)


@pytest.fixture()
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


# ---------------------------------------------------------------- organizations and keys


@dataclass
class Org:
    """An organization and its bootstrap admin key."""

    name: str
    key_id: str
    token: str
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return auth(self.token)


def auth(token: str) -> dict[str, str]:
    """The Authorization header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


OrgFactory = Callable[[str], Org]
KeyFactory = Callable[[Org, list[str]], str]


@pytest.fixture()
def make_org(app: FastAPI, client: TestClient) -> OrgFactory:
    """Bootstrap an organization with an admin key, as the CLI does."""

    def make(name: str) -> Org:
        with Session(app.state.engine) as session:
            key = create_admin_key(session, name)
        return Org(name=name, key_id=key.key_id, token=key.token)

    return make


@pytest.fixture()
def make_key(client: TestClient) -> KeyFactory:
    """A key with ``scopes`` in ``org``, created through the API; returns its token."""

    def make(org: Org, scopes: list[str]) -> str:
        response = client.post(
            "/api-keys", headers=org.headers, json={"name": "test", "scopes": scopes}
        )
        assert response.status_code == 201, response.text
        token: str = response.json()["token"]
        return token

    return make


@pytest.fixture()
def org_a(make_org: OrgFactory) -> Org:
    return make_org("org-a")


@pytest.fixture()
def org_b(make_org: OrgFactory) -> Org:
    return make_org("org-b")


# ---------------------------------------------------------------- transfer tars

TarFactory = Callable[..., Path]


@pytest.fixture()
def make_tar(make_bundle: BundleFactory, tmp_path: Path) -> TarFactory:
    """A transfer tar of a small sealed bundle (``pack_bundle``)."""

    def make(name: str = "bundle", **kwargs: object) -> Path:
        kwargs.setdefault("size", BUNDLE_BYTES)
        root = make_bundle(name, **kwargs)
        out = tmp_path / "tars" / f"{name}.tar"
        out.parent.mkdir(parents=True, exist_ok=True)
        bundle.pack_bundle(root, out)
        return out

    return make


@dataclass
class BrokeredApi:
    """The API on a real Mosquitto whose password file it edits (SIGHUP on change)."""

    broker: Any  # fleet.broker.MosquittoProcess
    client: TestClient
    headers: dict[str, str]


@pytest.fixture()
def brokered_api(
    tmp_path: Path, settings: ApiSettings, artifact_store: ArtifactStore
) -> Iterator[BrokeredApi]:
    """A real broker with the service user ``fleet``, and an admin of ``mqtt-org``."""
    from fleet.broker import MosquittoProcess

    broker = MosquittoProcess(tmp_path / "mosquitto", users={"fleet": "fleet-pw"})
    broker.start()
    try:
        adapter = MosquittoPasswordFile(broker.workdir / "passwd", reload=broker.reload)
        app = create_app(settings, store=artifact_store, broker_auth=adapter)
        with TestClient(app) as client:
            with Session(app.state.engine) as session:
                headers = auth(create_admin_key(session, "mqtt-org").token)
            yield BrokeredApi(broker, client, headers)
    finally:
        broker.stop()
