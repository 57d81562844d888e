"""API key scopes: parsing and implication (pure)."""

from __future__ import annotations

import pytest

from fleet.scopes import Scope, allows, effective, parse_scope


@pytest.mark.parametrize(
    ("granted", "needed", "allowed"),
    [
        (["fleet:read"], Scope.READ, True),
        (["fleet:read"], Scope.WRITE, False),
        (["fleet:write"], Scope.READ, True),
        (["fleet:write"], Scope.DEPLOY, False),
        (["deploy"], Scope.DEPLOY, True),
        (["deploy"], Scope.READ, False),
        (["admin"], Scope.READ, True),
        (["admin"], Scope.WRITE, True),
        (["admin"], Scope.DEPLOY, True),
        (["admin"], Scope.ADMIN, True),
        (["fleet:read", "fleet:write", "deploy"], Scope.ADMIN, False),
        ([], Scope.READ, False),
    ],
)
def test_allows(granted: list[str], needed: Scope, allowed: bool) -> None:
    assert allows(granted, needed) is allowed


def test_effective_expands_implications() -> None:
    assert effective([Scope.WRITE]) == {Scope.WRITE, Scope.READ}
    assert effective(["admin"]) == set(Scope)


@pytest.mark.parametrize("name", ["root", "Fleet:Read", ""])
def test_unknown_scope_names_the_value_and_choices(name: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_scope(name)
    assert str(info.value) == (
        f"unknown scope {name!r}; choose from: fleet:read, fleet:write, deploy, admin"
    )
