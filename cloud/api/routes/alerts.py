"""``/alerts``: drift alerts (a window at or over its model's threshold) and acknowledging."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud.api.deps import SessionDep
from cloud.dataloop import monitor
from cloud.dataloop.models import AlertAck, DriftAlertPublic, DriftAlertsPublic

router = APIRouter(prefix="/alerts", tags=["alerts"])


@router.get("")
def list_alerts(
    session: SessionDep,
    acknowledged: Annotated[bool | None, Query(description="Default: both.")] = None,
    device: Annotated[str | None, Query(max_length=64)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DriftAlertsPublic:
    """Drift alerts, newest first."""
    rows, count = monitor.list_alerts(
        session,
        acknowledged=acknowledged,
        device=device,
        model=model,
        offset=offset,
        limit=limit,
    )
    return DriftAlertsPublic(data=rows, count=count)


@router.post("/{alert_id}/ack")
def acknowledge_alert(
    session: SessionDep, alert_id: int, body: AlertAck | None = None
) -> DriftAlertPublic:
    """Acknowledge an alert (again: no change)."""
    result = monitor.acknowledge(session, alert_id=alert_id, note=body.note if body else None)
    session.commit()
    return result
