"""Liveness (``/healthz``: the database answers) and Prometheus ``/metrics``; no API key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, text
from sqlmodel import col, select

from fleet import drift
from fleet.api.deps import SessionDep
from fleet.api.routing import AuditedRoute
from fleet.models import Deployment, DeviceReport
from fleet.rollout import Phase

router = APIRouter(tags=["health"], route_class=AuditedRoute)


@router.get("/healthz")
def healthz(session: SessionDep) -> dict[str, str]:
    """``{"status": "ok"}`` when the database answers."""
    session.connection().execute(text("SELECT 1"))
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, session: SessionDep) -> Response:
    """Prometheus text exposition of this app's registry."""
    phases = {p.value: 0 for p in Phase}
    by_phase = select(Deployment.phase, func.count()).group_by(col(Deployment.phase))
    for phase, count in session.exec(by_phase):
        phases[phase] = count
    online = select(func.count()).select_from(DeviceReport).where(col(DeviceReport.online))
    request.app.state.metrics.set_fleet(phases=phases, online=session.exec(online).one())
    request.app.state.metrics.set_drift(drift.highest_latest(session))
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
