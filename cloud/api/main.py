"""The cloud API application: :func:`create_app` wires routers, the error handler and state.

Nothing happens at import. ``create_app`` refuses settings without an API token; its
lifespan runs the Alembic upgrade (``migrate_on_start``), creates the engine and reads the
hardware profile names, and disposes of the engine at shutdown. The API only records and
enqueues: jobs run in worker processes (``edgeloop cloud worker``), so a job survives an API
restart. Serve it with ``edgeloop cloud serve`` (uvicorn).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from cloud import db
from cloud.api.deps import require_token
from cloud.api.routes import (
    alerts,
    capture,
    datasets,
    drift,
    health,
    jobs,
    labeling,
    lineage,
    models,
    samples,
)
from cloud.errors import CloudError, InvalidRequestError
from cloud.settings import CloudSettings

ROUTERS: tuple[APIRouter, ...] = (
    datasets.router,
    jobs.router,
    models.router,
    lineage.router,
    drift.router,
    alerts.router,
    samples.router,
    capture.router,
    labeling.router,
    labeling.retrain_router,
    health.router,
)


async def handle_cloud_error(_request: Request, err: Exception) -> JSONResponse:
    """Every :class:`CloudError` as ``{"detail": message}`` with its class's status."""
    status = err.http_status if isinstance(err, CloudError) else 500
    headers = err.headers if isinstance(err, CloudError) else None
    return JSONResponse({"detail": str(err)}, status_code=status, headers=headers)


def profile_names() -> list[str]:
    """The compiler's hardware profile names (shipped and the user's)."""
    from compiler.profiles import ProfileRegistry
    from compiler.settings import CompilerSettings

    return ProfileRegistry(CompilerSettings().profile_roots()).names()


def create_app(settings: CloudSettings, *, profiles: list[str] | None = None) -> FastAPI:
    """The cloud API for ``settings``.

    Args:
        settings: database URL, state and blob directories, the API token.
        profiles: hardware profile names compile jobs may use (default: the compiler's).

    Raises:
        InvalidRequestError: no API token is configured.
    """
    if settings.api_token is None or not settings.api_token.get_secret_value():
        raise InvalidRequestError(
            "the cloud API needs a token; set EDGELOOP_CLOUD_API_TOKEN (e.g. to the output of "
            "'python3 -c \"import secrets; print(secrets.token_urlsafe(32))\"')"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = settings.resolved_database_url()
        if settings.migrate_on_start:
            await run_in_threadpool(db.upgrade, url)
        app.state.engine = db.make_engine(url)
        app.state.profiles = profiles if profiles is not None else profile_names()
        try:
            yield
        finally:
            app.state.engine.dispose()

    app = FastAPI(
        title="EdgeLoop cloud API",
        version="1",
        description="Datasets, training and tuning jobs, the model registry, compile jobs "
        "and lineage. Jobs run in worker processes.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_exception_handler(CloudError, handle_cloud_error)
    for router in ROUTERS:
        if router is health.router:
            app.include_router(router)
        else:
            app.include_router(
                router, dependencies=[Depends(require_token)], responses=ERROR_RESPONSES
            )
    app.include_router(labeling.page_router)  # HTML: bearer or same-site cookie, see its doc
    return app


class ErrorMessage(BaseModel):
    """The body of every error the API raises itself."""

    detail: str


class ValidationErrorMessage(BaseModel):
    """422: the API's own validation (a message) or FastAPI's request validation (a list)."""

    detail: str | list[dict[str, Any]]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing or wrong API token"},
    404: {"model": ErrorMessage, "description": "No such dataset, job, model or artifact"},
    409: {"model": ErrorMessage, "description": "Conflicts with the object's current state"},
    422: {"model": ValidationErrorMessage, "description": "Invalid request; the reason"},
}
