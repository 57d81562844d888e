"""The organization's audit log (admin): every mutating call, newest first. Read-only."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from fleet import crud
from fleet.api.deps import OrgDep, SessionDep, require_scope
from fleet.api.routing import AuditedRoute
from fleet.crud import MAX_OFFSET
from fleet.models import AuditLogPublic, AuditLogsPublic
from fleet.scopes import Scope

router = APIRouter(
    prefix="/audit",
    tags=["audit"],
    route_class=AuditedRoute,
    dependencies=[Depends(require_scope(Scope.ADMIN))],
)


@router.get("")
def list_audit(
    session: SessionDep,
    org: OrgDep,
    actor: str | None = Query(None, description="Only this API key id's calls."),
    action: str | None = Query(None, description="Only this action, e.g. devices.register_device."),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    limit: int = Query(100, ge=1, le=1000),
) -> AuditLogsPublic:
    """Audit entries of the caller's organization."""
    rows, count = crud.list_audit(
        session, org_id=org.id, actor=actor, action=action, offset=offset, limit=limit
    )
    return AuditLogsPublic(data=[AuditLogPublic.model_validate(r) for r in rows], count=count)
