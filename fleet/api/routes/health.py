"""Liveness (``/healthz``: the database answers) and Prometheus ``/metrics``; no API key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from fleet.api.deps import SessionDep
from fleet.api.routing import AuditedRoute

router = APIRouter(tags=["health"], route_class=AuditedRoute)


@router.get("/healthz")
def healthz(session: SessionDep) -> dict[str, str]:
    """``{"status": "ok"}`` when the database answers."""
    session.connection().execute(text("SELECT 1"))
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
