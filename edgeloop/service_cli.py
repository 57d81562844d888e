"""Pieces that the fleet and cloud server CLIs share: database options, the optional-extra check,
``migrate`` and ``serve``.

Both services are "settings object -> Alembic chain -> FastAPI app factory"; only the environment
prefix, the extra to install and the modules differ, so the command bodies live here once.
Heavy imports (Alembic, FastAPI, uvicorn) stay inside the functions so ``edgeloop --help`` is fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class _Migrations(Protocol):
    def upgrade(self, url: str) -> None: ...

    def current_revision(self, url: str) -> str | None: ...


def require(module: str, extra: str) -> None:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra to install."""
    from compiler.errors import MissingDependencyError

    try:
        importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(module, extra) from err


def db_options(env_prefix: str) -> Callable[[F], F]:
    """``--state-dir`` and ``--database-url``, documented with the service's env names."""

    def decorate(func: F) -> F:
        func = click.option(
            "--state-dir",
            type=click.Path(path_type=Path, file_okay=False),
            default=None,
            help=f"State directory [env {env_prefix}STATE_DIR].",
        )(func)
        return click.option(
            "--database-url",
            default=None,
            help=f"sqlite:///PATH or postgresql://USER@HOST/DB [env {env_prefix}DATABASE_URL].",
        )(func)

    return decorate


def migrate(db_module: str, url: str, *, label: str, extra: str) -> str:
    """Upgrade the database behind ``url`` with ``db_module``'s chain; a line to print."""
    require("alembic", extra)
    db: _Migrations = importlib.import_module(db_module)
    db.upgrade(url)
    return f"{label} at revision {db.current_revision(url)}"


def serve(app_module: str, settings: Any, *, host: str, port: int, extra: str) -> None:
    """Build the app with ``app_module.create_app(settings)`` and serve it with uvicorn."""
    require("uvicorn", extra)
    require("fastapi", extra)
    import uvicorn

    create_app = importlib.import_module(app_module).create_app
    uvicorn.run(create_app(settings), host=host, port=port)
