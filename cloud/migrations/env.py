"""Alembic environment of the cloud: its tables only (``cloud_*``), its own version table.

``cloud.db.upgrade(url)`` passes the URL in the config; without one the URL comes from
``CloudSettings`` (``EDGELOOP_CLOUD_*``). Autogenerate compares only ``cloud_*`` tables, so
the fleet's tables and Optuna's in a shared database are left alone.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlmodel import SQLModel

import cloud.dataloop.labeling_models  # noqa: F401  (relabeling and retraining tables)
import cloud.dataloop.models  # noqa: F401  (the data loop's tables)
import cloud.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from cloud.db import VERSION_TABLE, make_engine, normalize_url

target_metadata = SQLModel.metadata


def _url() -> str:
    url = context.config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from cloud.settings import CloudSettings

    return normalize_url(CloudSettings().resolved_database_url())


def _ours(obj: Any, name: str | None, type_: str, _reflected: bool, _compare_to: Any) -> bool:
    if type_ == "table":
        return bool(name and name.startswith("cloud_"))
    table = getattr(obj, "table", None)
    return table is None or str(getattr(table, "name", "")).startswith("cloud_")


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_object=_ours,
        render_as_batch=True,
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
