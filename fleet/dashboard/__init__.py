"""The operator dashboard, served by the fleet API at ``/dashboard`` (docs/dashboard.md).

* :mod:`~fleet.dashboard.views`: what pages show, from plain values (pure; tested by tables)
* :mod:`~fleet.dashboard.session`: signed session cookies (pure, stdlib ``hmac``)
* :mod:`~fleet.dashboard.queries`: organization-scoped database reads (adapter)
* :mod:`~fleet.dashboard.relabel`: the relabel queue from the cloud API (adapter, injectable)
* :mod:`~fleet.dashboard.routes`: the pages, the login and the pages' live JSON views

:func:`install` wires it into an app made by :func:`fleet.api.main.create_app`.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from fleet.api.settings import ApiSettings
from fleet.dashboard.relabel import CloudRelabelSource, RelabelSource
from fleet.dashboard.routes import LoginRequired, handle_login_required, router

STATIC = Path(__file__).parent / "static"
MIN_SECRET_CHARS = 16


def install(app: FastAPI, settings: ApiSettings, *, relabel: RelabelSource | None = None) -> None:
    """Serve the dashboard from ``app``.

    Args:
        app: the fleet API app.
        settings: its settings (session secret and lifetime, the cloud URL and token).
        relabel: where the relabel queue comes from (default: the cloud API named by
            ``settings.cloud_url``; without one the page says the cloud is not configured).
    """
    secret = settings.dashboard_secret
    if secret is not None and len(secret.get_secret_value()) < MIN_SECRET_CHARS:
        raise ValueError(
            f"EDGELOOP_FLEET_DASHBOARD_SECRET has {len(secret.get_secret_value())} characters; "
            f"use at least {MIN_SECRET_CHARS} (e.g. python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'), or leave it unset for a random one per process"
        )
    app.state.dashboard_secret = (
        secret.get_secret_value().encode("utf-8") if secret is not None else secrets.token_bytes(32)
    )
    if relabel is None and settings.cloud_url:
        token = settings.cloud_token.get_secret_value() if settings.cloud_token else None
        relabel = CloudRelabelSource(settings.cloud_url, token)
    app.state.relabel_source = relabel
    # A sub-application sharing the API's state (engine, settings, ...): its pages stay out of
    # the API's routes, OpenAPI schema and route checks, and get their own error handler.
    pages = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    pages.state = app.state
    pages.add_exception_handler(LoginRequired, handle_login_required)
    pages.include_router(router)
    pages.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/dashboard", pages, name="dashboard")
