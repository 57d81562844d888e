"""Cloud fixtures: the built-in digits dataset and a throwaway PostgreSQL database.

PostgreSQL comes from ``TEST_POSTGRES_URL`` (default the local server as ``postgres``); if it
is unreachable its tests are skipped, except under ``CI`` where they fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from cloud.datasets import ArrayDataset, load_dataset

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def digits() -> ArrayDataset:
    """scikit-learn's 8x8 digits (``builtin:digits``), loaded once."""
    return load_dataset("builtin:digits")


@pytest.fixture(scope="session")
def cloud_postgres_url() -> Iterator[str]:
    """An empty PostgreSQL database for this test session, dropped at the end."""
    from sqlalchemy.engine import make_url

    try:
        import psycopg

        admin = psycopg.connect(
            make_url(POSTGRES_ADMIN_URL)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False),
            autocommit=True,
            connect_timeout=3,
        )
    except Exception as err:  # psycopg.OperationalError, or psycopg missing
        message = f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable: {err}"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{message} (CI is set, so PostgreSQL tests must run)")
        pytest.skip(message)
    name = f"edgeloop_cloud_test_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
