"""The first admin key of an organization, for an operator with access to the database.

``create_admin_key`` is what ``edgeloop fleet api bootstrap --org NAME`` calls: it creates
the organization if it does not exist, adds an API key with the ``admin`` scope, commits,
and returns the token, which is printed once and never stored in clear.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session

from fleet import crud
from fleet.models import ApiKeyCreate, OrganizationCreate
from fleet.scopes import Scope


@dataclass(frozen=True)
class AdminKey:
    """A new admin key: its public id, its organization, and the token (shown once)."""

    org_name: str
    key_id: str
    token: str
    created_org: bool


def create_admin_key(session: Session, org_name: str, *, key_name: str = "bootstrap") -> AdminKey:
    """Create ``org_name`` if needed and an admin key in it; commits.

    Raises:
        ValueError: the organization name is invalid (the message names the rule).
    """
    org = crud.get_organization_by_name(session, name=org_name)
    created = org is None
    if org is None:
        org = crud.create_organization(session, org_in=OrganizationCreate(name=org_name))
    key, token = crud.create_api_key(
        session,
        org_id=org.id,
        key_in=ApiKeyCreate(name=key_name, scopes=[Scope.ADMIN]),
        created_by=None,
    )
    session.commit()
    return AdminKey(org_name=org.name, key_id=key.key_id, token=token, created_org=created)
