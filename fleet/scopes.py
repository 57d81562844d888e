"""API key scopes and what each implies (pure: no FastAPI, no database).

========== ============================================================
scope      allows
========== ============================================================
fleet:read read devices, groups, artifacts and the organization
fleet:write register, change, revoke and delete devices; manage groups
deploy     upload artifacts (and, later, create deployments)
admin      everything, including API keys and the audit log
========== ============================================================

``admin`` implies every scope and ``fleet:write`` implies ``fleet:read``; ``deploy`` does
not imply ``fleet:read`` (a CI key that uploads and reads gets both).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Scope(StrEnum):
    """A permission an API key carries."""

    READ = "fleet:read"
    WRITE = "fleet:write"
    DEPLOY = "deploy"
    ADMIN = "admin"


_IMPLIES: dict[Scope, frozenset[Scope]] = {
    Scope.READ: frozenset({Scope.READ}),
    Scope.WRITE: frozenset({Scope.WRITE, Scope.READ}),
    Scope.DEPLOY: frozenset({Scope.DEPLOY}),
    Scope.ADMIN: frozenset(Scope),
}


def choices() -> str:
    """The scope names, comma-separated, for error messages."""
    return ", ".join(s.value for s in Scope)


def parse_scope(name: str) -> Scope:
    """The Scope called ``name``.

    Raises:
        ValueError: naming the value and the valid scopes.
    """
    try:
        return Scope(name)
    except ValueError:
        raise ValueError(f"unknown scope {name!r}; choose from: {choices()}") from None


def effective(granted: Iterable[Scope | str]) -> frozenset[Scope]:
    """Every scope that ``granted`` allows, implications included."""
    out: set[Scope] = set()
    for scope in granted:
        out |= _IMPLIES[parse_scope(str(scope))]
    return frozenset(out)


def allows(granted: Iterable[Scope | str], needed: Scope) -> bool:
    """Whether keys with ``granted`` scopes may use a route that needs ``needed``."""
    return needed in effective(granted)
