"""The body both Alembic environments (fleet and cloud) share: offline or online, one engine.

Each service's ``migrations/env.py`` names its metadata, how to find the URL without one in the
config, its engine factory, which tables are its own and its version table; the rest is here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, MetaData


def run_migrations(
    *,
    target_metadata: MetaData,
    default_url: Callable[[], str],
    make_engine: Callable[[str], Engine],
    include_object: Callable[..., bool],
    version_table: str = "alembic_version",
) -> None:
    """Run the migrations Alembic asked for (must be called from an ``env.py``)."""
    from alembic import context

    def url() -> str:
        return context.config.get_main_option("sqlalchemy.url") or default_url()

    def configure(**kwargs: Any) -> None:
        context.configure(
            target_metadata=target_metadata,
            version_table=version_table,
            include_object=include_object,  # a shared database holds the other service's too
            render_as_batch=True,  # SQLite alters tables by copying them
            compare_type=True,
            **kwargs,
        )

    if context.is_offline_mode():
        configure(url=url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url())
    try:
        with engine.connect() as connection:
            configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
