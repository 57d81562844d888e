"""Alembic environment of the cloud: its tables only (``cloud_*``), its own version table.

``cloud.db.upgrade(url)`` passes the URL in the config; without one the URL comes from
``CloudSettings`` (``EDGELOOP_CLOUD_*``). Autogenerate compares only ``cloud_*`` tables, so
the fleet's tables and Optuna's in a shared database are left alone.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import SQLModel

import cloud.dataloop.labeling_models  # noqa: F401  (relabeling and retraining tables)
import cloud.dataloop.models  # noqa: F401  (the data loop's tables)
import cloud.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from cloud.db import VERSION_TABLE, make_engine, normalize_url
from edgeloop.alembic_env import run_migrations


def _default_url() -> str:
    from cloud.settings import CloudSettings

    return normalize_url(CloudSettings().resolved_database_url())


def _ours(obj: Any, name: str | None, type_: str, _reflected: bool, _compare_to: Any) -> bool:
    if type_ == "table":
        return bool(name and name.startswith("cloud_"))
    table = getattr(obj, "table", None)
    return table is None or str(getattr(table, "name", "")).startswith("cloud_")


run_migrations(
    target_metadata=SQLModel.metadata,
    default_url=_default_url,
    make_engine=make_engine,
    include_object=_ours,
    version_table=VERSION_TABLE,
)
