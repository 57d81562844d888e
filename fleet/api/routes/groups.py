"""Device groups of the caller's organization (what rollouts will target)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, status

from fleet import crud
from fleet.api.deps import AuditDep, GroupDep, OrgDep, SessionDep, require_scope
from fleet.api.routing import AuditedRoute
from fleet.crud import MAX_OFFSET
from fleet.models import GroupCreate, GroupPublic, GroupsPublic, GroupUpdate
from fleet.scopes import Scope

router = APIRouter(prefix="/groups", tags=["groups"], route_class=AuditedRoute)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_scope(Scope.WRITE))],
)
def create_group(
    session: SessionDep, org: OrgDep, audit: AuditDep, group_in: GroupCreate
) -> GroupPublic:
    """Create a group; its name is unique in the organization."""
    group = crud.create_group(session, org_id=org.id, group_in=group_in)
    session.commit()
    audit.target = f"group:{group.id}"
    return GroupPublic.model_validate(group)


@router.get("", dependencies=[Depends(require_scope(Scope.READ))])
def list_groups(
    session: SessionDep,
    org: OrgDep,
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    limit: int = Query(100, ge=1, le=1000),
) -> GroupsPublic:
    """The organization's groups by name."""
    groups, count = crud.list_groups(session, org_id=org.id, offset=offset, limit=limit)
    return GroupsPublic(data=[GroupPublic.model_validate(g) for g in groups], count=count)


@router.get("/{group_id}", dependencies=[Depends(require_scope(Scope.READ))])
def read_group(group: GroupDep) -> GroupPublic:
    """One group."""
    return GroupPublic.model_validate(group)


@router.patch("/{group_id}", dependencies=[Depends(require_scope(Scope.WRITE))])
def update_group(session: SessionDep, group: GroupDep, group_in: GroupUpdate) -> GroupPublic:
    """Rename or describe a group."""
    group = crud.update_group(session, group=group, group_in=group_in)
    session.commit()
    return GroupPublic.model_validate(group)


@router.delete(
    "/{group_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require_scope(Scope.WRITE))],
)
def delete_group(session: SessionDep, group: GroupDep) -> None:
    """Delete an empty group (409 while devices are in it)."""
    crud.delete_group(session, group=group)
    session.commit()
