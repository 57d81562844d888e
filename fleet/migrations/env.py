"""Alembic environment: the fleet models' metadata, the URL from the caller or the settings.

``fleet.db.upgrade(url)`` passes the URL in the config; run without one (the ``alembic``
command with ``-x``-less config), the URL comes from ``ApiSettings`` (``EDGELOOP_FLEET_*``).
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import fleet.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from fleet.db import is_fleet_object, make_engine, normalize_url

target_metadata = SQLModel.metadata


def _url() -> str:
    url = context.config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from fleet.api.settings import ApiSettings

    return normalize_url(ApiSettings().resolved_database_url())


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        include_object=is_fleet_object,  # a shared database also holds the cloud's tables
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
