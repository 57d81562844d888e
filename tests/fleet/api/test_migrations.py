"""Alembic migrations: upgrade from an empty database, and a schema equal to the models'."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import fleet.models  # noqa: F401
from fleet import db

from .conftest import TABLES


def _head() -> str | None:
    return ScriptDirectory.from_config(db.alembic_config("sqlite://")).get_current_head()


def test_upgrade_from_empty_matches_models(empty_database: str) -> None:
    assert db.current_revision(empty_database) is None
    db.upgrade(empty_database)
    assert db.current_revision(empty_database) == _head() == "0003"
    engine = db.make_engine(empty_database)
    try:
        assert set(TABLES) <= set(sa.inspect(engine).get_table_names())
        with engine.connect() as connection:
            opts = {"compare_type": True, "include_object": db.is_fleet_object}
            context = MigrationContext.configure(connection, opts=opts)
            assert compare_metadata(context, SQLModel.metadata) == []
    finally:
        engine.dispose()
    db.upgrade(empty_database)  # idempotent
    assert db.current_revision(empty_database) == "0003"


def test_downgrade_to_base_and_up_again(empty_database: str) -> None:
    db.upgrade(empty_database)
    command.downgrade(db.alembic_config(empty_database), "base")
    engine = db.make_engine(empty_database)
    try:
        assert not set(TABLES) & set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    db.upgrade(empty_database)
    assert db.current_revision(empty_database) == "0003"
