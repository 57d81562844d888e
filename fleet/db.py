"""The fleet database: engine from one URL, sessions, and Alembic upgrades.

One setting picks the database (``EDGELOOP_FLEET_DATABASE_URL``): SQLite by default
(``sqlite:///<state dir>/fleet.db``), PostgreSQL by URL (``postgresql://...`` is driven by
psycopg 3). The schema is owned by the Alembic migrations in ``fleet/migrations``;
:func:`upgrade` runs them (on API start-up and from ``edgeloop fleet api migrate``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlmodel import Session

from fleet.errors import InvalidRequestError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_SUPPORTED = ("sqlite", "postgresql")
_PLAIN_POSTGRES = ("postgresql", "postgres", "postgresql+psycopg2")


def normalize_url(url: str) -> str:
    """``url`` with PostgreSQL pointed at psycopg 3 (``postgresql+psycopg://``).

    Raises:
        InvalidRequestError: the URL cannot be parsed or names another database.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise InvalidRequestError(
            f"database URL {url!r} cannot be parsed; use sqlite:///PATH or "
            "postgresql://USER@HOST/DB"
        ) from err
    backend = parsed.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    if backend not in _SUPPORTED:
        raise InvalidRequestError(
            f"database {backend!r} (from URL {parsed.render_as_string(hide_password=True)!r}) "
            f"is not supported; choose from: {', '.join(_SUPPORTED)}"
        )
    if backend == "postgresql" and parsed.drivername in _PLAIN_POSTGRES:
        # The dialect's default driver differs across SQLAlchemy versions; ship psycopg 3.
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys, a busy timeout and its directory.

    Args:
        url: SQLAlchemy URL (``sqlite:///...`` or ``postgresql://...``).
        **kwargs: passed to :func:`sqlalchemy.create_engine`.
    """
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, **kwargs)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    return engine


def session_factory(engine: Engine) -> Callable[[], Session]:
    """Sessions on ``engine`` whose objects stay readable after commit."""

    def new_session() -> Session:
        return Session(engine, expire_on_commit=False)

    return new_session


def is_fleet_object(
    obj: Any, name: str | None, type_: str, _reflected: bool, _compare_to: Any
) -> bool:
    """Alembic ``include_object``: the fleet's tables only.

    The cloud service may share the database; its tables are ``cloud_*`` and belong to its
    own migration chain, so the fleet's autogenerate must neither create nor drop them.
    """
    if type_ == "table":
        return not (name or "").startswith("cloud_")
    table = getattr(obj, "table", None)
    return table is None or not str(getattr(table, "name", "")).startswith("cloud_")


def alembic_config(url: str, migrations_dir: Path = MIGRATIONS_DIR) -> Any:
    """The Alembic ``Config`` for ``url`` (script location: ``fleet/migrations`` by default)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    # ConfigParser interpolates '%': a URL-encoded password must survive it.
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head", *, migrations_dir: Path = MIGRATIONS_DIR) -> None:
    """Bring the database at ``url`` to ``revision`` (default: the newest)."""
    from alembic import command

    command.upgrade(alembic_config(url, migrations_dir), revision)


def current_revision(url: str, version_table: str = "alembic_version") -> str | None:
    """The database's Alembic revision in ``version_table``, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": version_table})
            revision: str | None = context.get_current_revision()
            return revision
    finally:
        engine.dispose()
