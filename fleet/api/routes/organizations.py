"""The caller's organization: read it, rename it (admin).

Organizations are created by an operator (``edgeloop fleet api bootstrap --org NAME``), not
through the API, and a key sees only its own: another organization's id answers 404.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from fleet import crud
from fleet.api.deps import OrgByIdDep, OrgDep, SessionDep, require_scope
from fleet.api.routing import AuditedRoute
from fleet.models import OrganizationPublic, OrganizationUpdate
from fleet.scopes import Scope

router = APIRouter(prefix="/organizations", tags=["organizations"], route_class=AuditedRoute)


@router.get("/current", dependencies=[Depends(require_scope(Scope.READ))])
def read_current_organization(org: OrgDep) -> OrganizationPublic:
    """The organization of the calling key."""
    return OrganizationPublic.model_validate(org)


@router.get("/{org_id}", dependencies=[Depends(require_scope(Scope.READ))])
def read_organization(org: OrgByIdDep) -> OrganizationPublic:
    """The organization ``org_id`` (only the caller's own)."""
    return OrganizationPublic.model_validate(org)


@router.patch("/{org_id}", dependencies=[Depends(require_scope(Scope.ADMIN))])
def update_organization(
    session: SessionDep, org: OrgByIdDep, org_in: OrganizationUpdate
) -> OrganizationPublic:
    """Rename the organization."""
    org = crud.update_organization(session, org=org, org_in=org_in)
    session.commit()
    return OrganizationPublic.model_validate(org)
