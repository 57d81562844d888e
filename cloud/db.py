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
    from fleet import db as fleet_db

    return fleet_db.session_factory(engine)


def alembic_config(url: str) -> Any:
    """The Alembic ``Config`` for ``url`` (script location: ``cloud/migrations``)."""
    from fleet import db as fleet_db

    return fleet_db.alembic_config(normalize_url(url), MIGRATIONS_DIR)


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` of the cloud chain (default: the newest)."""
    from fleet import db as fleet_db

    fleet_db.upgrade(normalize_url(url), revision, migrations_dir=MIGRATIONS_DIR)


def current_revision(url: str) -> str | None:
    """The database's cloud revision, or None when the cloud schema was never created."""
    from fleet import db as fleet_db

    return fleet_db.current_revision(normalize_url(url), VERSION_TABLE)
