"""Models of the caller's organization: name -> versions -> artifact per profile.

A read-only view over the artifacts uploaded (``/artifacts``): a model exists once one of
its artifacts does. Deployments name a model and pick, per device profile, the variant.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from fleet import crud
from fleet.api.deps import OrgDep, SessionDep, require_scope
from fleet.api.routing import AuditedRoute
from fleet.errors import NotFoundError
from fleet.models import ModelPublic, ModelsPublic
from fleet.scopes import Scope

router = APIRouter(prefix="/models", tags=["models"], route_class=AuditedRoute)


@router.get("", dependencies=[Depends(require_scope(Scope.READ))])
def list_models(session: SessionDep, org: OrgDep) -> ModelsPublic:
    """Every model of the organization with its versions and per-profile artifacts."""
    views = crud.model_views(session, org_id=org.id)
    return ModelsPublic(data=views, count=len(views))


@router.get("/{model_name}", dependencies=[Depends(require_scope(Scope.READ))])
def read_model(session: SessionDep, org: OrgDep, model_name: str) -> ModelPublic:
    """One model's versions, newest first, each with its artifact per hardware profile."""
    views = crud.model_views(session, org_id=org.id, name=model_name)
    if not views:
        raise NotFoundError(f"model {model_name!r} has no artifacts in this organization")
    return views[0]
