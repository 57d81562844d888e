"""API keys of the caller's organization (admin only): create (token shown once), list,
read, rename, revoke. A revoked key stops authenticating at once; the last active admin key
cannot be revoked."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, status

from fleet import crud
from fleet.api.deps import ApiKeyDep, AuditDep, OrgDep, PrincipalDep, SessionDep, require_scope
from fleet.api.routing import AuditedRoute
from fleet.crud import MAX_OFFSET
from fleet.models import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, ApiKeysPublic, ApiKeyUpdate
from fleet.scopes import Scope

router = APIRouter(
    prefix="/api-keys",
    tags=["api-keys"],
    route_class=AuditedRoute,
    dependencies=[Depends(require_scope(Scope.ADMIN))],
)


@router.post("", status_code=status.HTTP_201_CREATED)
def create_api_key(
    session: SessionDep,
    org: OrgDep,
    principal: PrincipalDep,
    audit: AuditDep,
    key_in: ApiKeyCreate,
) -> ApiKeyCreated:
    """Create a key; the response carries its token, which is not stored and not shown again."""
    key, token = crud.create_api_key(
        session, org_id=org.id, key_in=key_in, created_by=principal.key_id
    )
    session.commit()
    audit.target = f"api-key:{key.key_id}"
    return ApiKeyCreated.model_validate(key, update={"token": token})


@router.get("")
def list_api_keys(
    session: SessionDep,
    org: OrgDep,
    include_revoked: bool = True,
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    limit: int = Query(100, ge=1, le=1000),
) -> ApiKeysPublic:
    """The organization's keys, oldest first (never their secrets)."""
    keys, count = crud.list_api_keys(
        session, org_id=org.id, include_revoked=include_revoked, offset=offset, limit=limit
    )
    return ApiKeysPublic(data=[ApiKeyPublic.model_validate(k) for k in keys], count=count)


@router.get("/{key_id}")
def read_api_key(key: ApiKeyDep) -> ApiKeyPublic:
    """One key."""
    return ApiKeyPublic.model_validate(key)


@router.patch("/{key_id}")
def update_api_key(session: SessionDep, key: ApiKeyDep, key_in: ApiKeyUpdate) -> ApiKeyPublic:
    """Rename a key (scopes are fixed: create a new key instead)."""
    key = crud.update_api_key(session, key=key, key_in=key_in)
    session.commit()
    return ApiKeyPublic.model_validate(key)


@router.delete("/{key_id}")
def revoke_api_key(session: SessionDep, key: ApiKeyDep) -> ApiKeyPublic:
    """Revoke a key (idempotent); it stays listed with ``revoked_at``."""
    key = crud.revoke_api_key(session, key=key)
    session.commit()
    return ApiKeyPublic.model_validate(key)
