"""The cloud database: engine from one URL, sessions, and Alembic upgrades.

Same conventions as :mod:`fleet.db` (whose engine helpers it reuses): SQLite by default,
PostgreSQL by URL. The cloud keeps its own Alembic history (``cloud/migrations``, revision ids
``c0001_...``) and version table (``cloud_alembic_version``), so fleet and cloud may share
one database. Optuna's study tables live there too (created by Optuna itself).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from cloud.errors import InvalidRequestError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "cloud_alembic_version"


def normalize_url(url: str) -> str:
    """``url`` with PostgreSQL pointed at psycopg 3.

    Raises:
        InvalidRequestError: the URL cannot be parsed or names another database.
    """
    from fleet import db as fleet_db
    from fleet.errors import InvalidRequestError as FleetInvalid

    try:
        return fleet_db.normalize_url(url)
    except FleetInvalid as err:
        raise InvalidRequestError(str(err)) from err


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` (SQLite: foreign keys, WAL, busy timeout; see :mod:`fleet.db`)."""
    from fleet import db as fleet_db

    return fleet_db.make_engine(normalize_url(url), **kwargs)


def session_factory(engine: Engine) -> Callable[[], Session]:
    """Sessions on ``engine`` whose objects stay readable after commit."""

    def new_session() -> Session:
        return Session(engine, expire_on_commit=False)

    return new_session


def alembic_config(url: str) -> Any:
    """The Alembic ``Config`` for ``url`` (script location: ``cloud/migrations``)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (default: the newest)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The database's cloud revision, or None when the cloud schema was never created."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            revision: str | None = context.get_current_revision()
            return revision
    finally:
        engine.dispose()
