"""Alembic environment: the fleet models' metadata, the URL from the caller or the settings.

``fleet.db.upgrade(url)`` passes the URL in the config; run without one (the ``alembic``
command with ``-x``-less config), the URL comes from ``ApiSettings`` (``EDGELOOP_FLEET_*``).
"""

from __future__ import annotations

from sqlmodel import SQLModel

import fleet.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from edgeloop.alembic_env import run_migrations
from fleet.db import is_fleet_object, make_engine, normalize_url


def _default_url() -> str:
    from fleet.api.settings import ApiSettings

    return normalize_url(ApiSettings().resolved_database_url())


run_migrations(
    target_metadata=SQLModel.metadata,
    default_url=_default_url,
    make_engine=make_engine,
    include_object=is_fleet_object,
)
