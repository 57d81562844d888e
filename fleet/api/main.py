"""The fleet API application: :func:`create_app` wires routers, the error handler and state.

Nothing happens at import. ``create_app`` builds the app without touching the database; its
lifespan, at start-up, runs the Alembic upgrade (``migrate_on_start``), creates the engine,
opens the artifact store and the broker adapter unless they were injected, starts the
deployment executor (injected, or over MQTT when a broker password is set), and closes what
it opened at shutdown. Serve it with ``edgeloop fleet api serve`` (uvicorn).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from fleet import dashboard, db
from fleet.api.metrics import ApiMetrics
from fleet.api.nul_guard import RejectNul
from fleet.api.routes import (
    api_keys,
    artifacts,
    audit,
    deployments,
    devices,
    groups,
    health,
    models,
    organizations,
)
from fleet.api.routing import AuditedRoute
from fleet.api.settings import ApiSettings
from fleet.broker import FLEET_USER
from fleet.broker_auth import BrokerAuth, MosquittoPasswordFile, signal_reload
from fleet.errors import FleetError
from fleet.key_cache import VerifiedKeyCache
from fleet.store import ArtifactStore

if TYPE_CHECKING:
    from fleet.executor import Executor

# Builds the deployment executor (fleet/executor.py, which imports paho) from engine and store.
ExecutorFactory = Callable[[Engine, ArtifactStore], "Executor"]

ROUTERS: tuple[APIRouter, ...] = (
    organizations.router,
    api_keys.router,
    devices.router,
    groups.router,
    artifacts.router,
    models.router,
    deployments.router,
    audit.router,
    health.router,
)


async def handle_fleet_error(_request: Request, err: Exception) -> JSONResponse:
    """Every :class:`FleetError` as ``{"detail": message}`` with its class's status."""
    status = err.http_status if isinstance(err, FleetError) else 500
    headers = err.headers if isinstance(err, FleetError) else None
    return JSONResponse({"detail": str(err)}, status_code=status, headers=headers)


def _open_store(settings: ApiSettings) -> ArtifactStore:
    from compiler.settings import CompilerSettings
    from compiler.signing import KeyPaths, load_public_key

    key_path = settings.public_key or KeyPaths.in_dir(CompilerSettings().keys_dir).public
    return ArtifactStore(settings.store, load_public_key(key_path))


def _broker_auth(settings: ApiSettings) -> BrokerAuth | None:
    if settings.broker_password_file is None or settings.broker_pid_file is None:
        return None
    return MosquittoPasswordFile(
        settings.broker_password_file, reload=signal_reload(settings.broker_pid_file)
    )


def _mqtt_executor(settings: ApiSettings) -> ExecutorFactory | None:
    if settings.password is None:
        return None
    from fleet.executor import mqtt_executor
    from fleet.responder import BrokerConfig

    config = BrokerConfig(
        host=settings.host,
        port=settings.port,
        username=settings.username or FLEET_USER,
        password=settings.password.get_secret_value(),
        tls_ca=settings.tls_ca,
    )
    return lambda engine, store: mqtt_executor(config, engine=engine, store=store)


def _profile_names() -> list[str]:
    from compiler.profiles import ProfileRegistry
    from compiler.settings import CompilerSettings

    return ProfileRegistry(CompilerSettings().profile_roots()).names()


def create_app(
    settings: ApiSettings,
    *,
    store: ArtifactStore | None = None,
    broker_auth: BrokerAuth | None = None,
    executor: ExecutorFactory | None = None,
) -> FastAPI:
    """The fleet API for ``settings``.

    Args:
        settings: database URL, state directory, upload limit, broker files.
        store: the artifact store (default: opened from ``settings`` at start-up).
        broker_auth: device credentials on the broker (default: from the broker settings;
            without them, device registration answers 503).
        executor: builds the deployment executor from the engine and the store (default:
            over MQTT as the ``fleet`` user when ``EDGELOOP_FLEET_PASSWORD`` is set; without
            one, deployments are planned and stored but nothing drives them).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = settings.resolved_database_url()
        if settings.migrate_on_start:
            await run_in_threadpool(db.upgrade, url)
        app.state.engine = db.make_engine(url)
        own_store = store is None
        app.state.store = store if store is not None else _open_store(settings)
        app.state.broker_auth = broker_auth if broker_auth is not None else _broker_auth(settings)
        app.state.profiles = _profile_names()
        make_executor = executor if executor is not None else _mqtt_executor(settings)
        app.state.executor = None
        if make_executor is not None:
            app.state.executor = make_executor(app.state.engine, app.state.store)
            app.state.executor.metrics = app.state.metrics
            app.state.executor.start()
        try:
            yield
        finally:
            if app.state.executor is not None:
                app.state.executor.stop()
            if own_store:
                app.state.store.close()
            app.state.engine.dispose()

    app = FastAPI(
        title="EdgeLoop fleet API",
        version="1",
        description="Organizations, API keys, devices, groups, artifacts and the audit log.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ApiMetrics()
    app.state.key_cache = VerifiedKeyCache()  # per app: verified API key secrets (salted HMACs)
    app.add_exception_handler(FleetError, handle_fleet_error)
    app.add_middleware(RejectNul)
    for router in ROUTERS:
        _check_routes(router)
        app.include_router(router, responses={} if router is health.router else ERROR_RESPONSES)
    dashboard.install(app, settings)  # /dashboard: server-rendered pages (docs/dashboard.md)
    return app


class ErrorMessage(BaseModel):
    """The body of every error the API raises itself."""

    detail: str


class ValidationErrorMessage(BaseModel):
    """422: the API's own validation (a message) or FastAPI's request validation (a list)."""

    detail: str | list[dict[str, Any]]


# Documented on every resource route, so clients and schemathesis know the error answers.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing or invalid API key"},
    403: {"model": ErrorMessage, "description": "The API key lacks the scope this needs"},
    404: {"model": ErrorMessage, "description": "No such object in the caller's organization"},
    409: {"model": ErrorMessage, "description": "Conflicts with the object's current state"},
    422: {"model": ValidationErrorMessage, "description": "Invalid request; the reason"},
}


def _check_routes(router: APIRouter) -> None:
    for route in router.routes:
        if isinstance(route, APIRoute) and not isinstance(route, AuditedRoute):
            raise TypeError(
                f"route {route.path} of router {router.prefix!r} is not an AuditedRoute; "
                "build the router with APIRouter(route_class=AuditedRoute)"
            )
