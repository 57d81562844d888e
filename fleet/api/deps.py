"""Dependencies of the fleet API, as ``Annotated`` aliases routes take as parameters.

* ``SessionDep``: the request's database session (opened by :class:`AuditedRoute`).
* ``PrincipalDep``: the caller, from ``Authorization: Bearer elk_<key id>_<secret>``;
  401 if missing, malformed, unknown, revoked or wrong. The key's row is read on every
  request; its secret is checked through the app's :class:`~fleet.key_cache.VerifiedKeyCache`
  (``KeyCacheDep``), so a key that passed scrypt once skips it while its hash is unchanged.
* ``OrgDep``: the caller's organization. Every object dependency below looks up by the
  caller's organization, so another organization's id answers 404 exactly like a missing one.
* ``require_scope(scope)``: a dependency (put it in the route's ``dependencies``) that
  answers 403 naming the missing scope; route dependencies run before the object lookups,
  so a key without the scope learns nothing about which ids exist.
* ``DeviceDep``, ``GroupDep``, ``ApiKeyDep``, ``ArtifactDep``, ``DeploymentDep``,
  ``OrgByIdDep``: the object
  named by the path parameter, in the caller's organization, or 404.
* ``StoreDep``, ``BrokerAuthDep``, ``SettingsDep``, ``ProfilesDep``, ``KeyCacheDep``,
  ``AuditDep``: what :func:`fleet.api.main.create_app` put on ``app.state``, and the
  request's audit context.
"""

from __future__ import annotations

import functools
import uuid
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from fleet import credentials, crud, deployments, scopes
from fleet.api.routing import AuditContext, Principal
from fleet.api.settings import ApiSettings
from fleet.broker_auth import BrokerAuth
from fleet.errors import (
    AuthenticationError,
    BrokerSyncError,
    NotFoundError,
    PermissionDeniedError,
)
from fleet.key_cache import VerifiedKeyCache
from fleet.models import ApiKey, Artifact, Deployment, Device, Group, Organization
from fleet.scopes import Scope
from fleet.store import ArtifactStore


@functools.cache
def _dummy_hash() -> str:
    """A valid hash of a random secret: unknown key ids cost the same scrypt as wrong ones."""
    return credentials.hash_secret(credentials.new_secret())


def get_session(request: Request) -> Session:
    """The session :class:`~fleet.api.routing.AuditedRoute` opened for this request."""
    session: Session | None = getattr(request.state, "session", None)
    if session is None:
        raise RuntimeError(
            f"route {request.url.path} is not an AuditedRoute; build routers with "
            "APIRouter(route_class=AuditedRoute)"
        )
    return session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An EdgeLoop fleet API key: 'Authorization: Bearer elk_<key id>_<secret>'.",
)


def get_key_cache(request: Request) -> VerifiedKeyCache:
    """The app's cache of verified API key secrets."""
    cache: VerifiedKeyCache = request.app.state.key_cache
    return cache


KeyCacheDep = Annotated[VerifiedKeyCache, Depends(get_key_cache)]


def get_principal(
    request: Request,
    session: SessionDep,
    cache: KeyCacheDep,
    auth: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller's API key, verified against its salted hash (the row is read every time;
    scrypt is skipped only for a secret already verified against the row's current hash)."""
    if auth is None:
        raise AuthenticationError("no API key; send 'Authorization: Bearer elk_<key id>_<secret>'")
    parsed = credentials.parse_token(auth.credentials)
    if parsed is None:
        raise AuthenticationError(
            "malformed API key; expected 'elk_<12 hex digits>_<secret>' after 'Bearer '"
        )
    key = crud.find_api_key(session, key_id=parsed.key_id)
    if key is None:
        credentials.verify_secret(parsed.secret, _dummy_hash())  # as costly as a wrong secret
        valid = False
    else:
        valid = cache.verify(key.key_id, parsed.secret, key.secret_hash)
    if key is None or not valid or key.revoked_at is not None:
        raise AuthenticationError(
            f"API key {parsed.key_id!r} is unknown, revoked, or its secret is wrong"
        )
    principal = Principal(
        key_id=key.key_id, org_id=key.org_id, scopes=frozenset(str(s) for s in key.scopes)
    )
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_org(principal: PrincipalDep, session: SessionDep) -> Organization:
    """The caller's organization."""
    org = crud.get_organization(session, org_id=principal.org_id)
    if org is None:
        raise AuthenticationError(f"API key {principal.key_id!r} belongs to no organization")
    return org


OrgDep = Annotated[Organization, Depends(get_org)]


class ScopeRequirement:
    """A dependency that lets a request through only if its key allows ``scope``."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    def __repr__(self) -> str:
        return f"require_scope({self.scope.value!r})"

    def __call__(self, principal: PrincipalDep) -> Principal:
        if not scopes.allows(principal.scopes, self.scope):
            held = ", ".join(sorted(principal.scopes)) or "none"
            raise PermissionDeniedError(
                f"API key {principal.key_id!r} lacks scope {self.scope.value!r} "
                f"(it has: {held}); scopes: {scopes.choices()}"
            )
        return principal


def require_scope(scope: Scope | str) -> ScopeRequirement:
    """The dependency that requires ``scope`` (``admin`` satisfies every scope).

    Raises:
        ValueError: ``scope`` is not a known scope (at import of the router, not per request).
    """
    return ScopeRequirement(scopes.parse_scope(str(scope)))


# ---------------------------------------------------------------- objects in the caller's org


def get_org_by_id_or_404(org: OrgDep, org_id: uuid.UUID) -> Organization:
    """The organization ``org_id`` if it is the caller's."""
    if org_id != org.id:
        raise NotFoundError(
            f"no organization {str(org_id)!r} visible to this key; "
            "GET /organizations/current shows yours"
        )
    return org


OrgByIdDep = Annotated[Organization, Depends(get_org_by_id_or_404)]


def get_device_or_404(
    session: SessionDep, org: OrgDep, device_id: Annotated[str, Path(max_length=64)]
) -> Device:
    """The device ``device_id`` of the caller's organization."""
    device = crud.get_device(session, org_id=org.id, device_id=device_id)
    if device is None:
        raise NotFoundError(
            f"no device {device_id!r} in organization {org.name!r}; list them with GET /devices"
        )
    return device


DeviceDep = Annotated[Device, Depends(get_device_or_404)]


def get_group_or_404(session: SessionDep, org: OrgDep, group_id: uuid.UUID) -> Group:
    """The group ``group_id`` of the caller's organization."""
    group = crud.get_group(session, org_id=org.id, group_id=group_id)
    if group is None:
        raise NotFoundError(
            f"no group {str(group_id)!r} in organization {org.name!r}; list them with GET /groups"
        )
    return group


GroupDep = Annotated[Group, Depends(get_group_or_404)]


def get_api_key_or_404(
    session: SessionDep, org: OrgDep, key_id: Annotated[str, Path(max_length=12)]
) -> ApiKey:
    """The API key ``key_id`` of the caller's organization."""
    key = crud.get_api_key(session, org_id=org.id, key_id=key_id)
    if key is None:
        raise NotFoundError(
            f"no API key {key_id!r} in organization {org.name!r}; list them with GET /api-keys"
        )
    return key


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key_or_404)]


def get_artifact_or_404(
    session: SessionDep, org: OrgDep, artifact_id: Annotated[str, Path(max_length=64)]
) -> Artifact:
    """The artifact record ``artifact_id`` of the caller's organization."""
    artifact = crud.get_artifact(session, org_id=org.id, artifact_id=artifact_id)
    if artifact is None:
        raise NotFoundError(
            f"no artifact {artifact_id!r} in organization {org.name!r}; "
            "list them with GET /artifacts"
        )
    return artifact


ArtifactDep = Annotated[Artifact, Depends(get_artifact_or_404)]


def get_deployment_or_404(session: SessionDep, org: OrgDep, deployment_id: uuid.UUID) -> Deployment:
    """The deployment ``deployment_id`` of the caller's organization."""
    deployment = deployments.get_deployment(session, org_id=org.id, deployment_id=deployment_id)
    if deployment is None:
        raise NotFoundError(
            f"no deployment {str(deployment_id)!r} in organization {org.name!r}; "
            "list them with GET /deployments"
        )
    return deployment


DeploymentDep = Annotated[Deployment, Depends(get_deployment_or_404)]


# ---------------------------------------------------------------- application state


def get_settings(request: Request) -> ApiSettings:
    """The settings the app was created with."""
    settings: ApiSettings = request.app.state.settings
    return settings


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]


def get_store(request: Request) -> ArtifactStore:
    """The artifact store."""
    store: ArtifactStore = request.app.state.store
    return store


StoreDep = Annotated[ArtifactStore, Depends(get_store)]


def get_broker_auth(request: Request) -> BrokerAuth:
    """The broker's credential adapter; 503 if none is configured."""
    auth: BrokerAuth | None = request.app.state.broker_auth
    if auth is None:
        raise BrokerSyncError(
            "no MQTT broker is configured for device credentials; set "
            "EDGELOOP_FLEET_BROKER_PASSWORD_FILE and EDGELOOP_FLEET_BROKER_PID_FILE"
        )
    return auth


BrokerAuthDep = Annotated[BrokerAuth, Depends(get_broker_auth)]


def get_profiles(request: Request) -> list[str]:
    """Names of the hardware profiles devices may declare (empty: any name)."""
    names: list[str] = request.app.state.profiles
    return names


ProfilesDep = Annotated[list[str], Depends(get_profiles)]


def get_audit(request: Request) -> AuditContext:
    """The audit context of this request (set ``target`` to name what was changed)."""
    audit: AuditContext = request.state.audit
    return audit


AuditDep = Annotated[AuditContext, Depends(get_audit)]
