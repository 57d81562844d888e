"""``/drift``: drift scores per device, group or model version, windows merged, and each
model's drift policy (metric, threshold, minimum samples, webhook)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from cloud.api.deps import ModelDep, SessionDep
from cloud.dataloop import monitor
from cloud.dataloop.models import (
    DriftAggregatePublic,
    DriftPolicyPublic,
    DriftPolicyUpdate,
    DriftScoresPublic,
)
from cloud.errors import InvalidRequestError, NotFoundError

router = APIRouter(prefix="/drift", tags=["drift"])


@router.get("")
def list_drift(
    session: SessionDep,
    device: Annotated[
        list[str] | None, Query(description="Device id; repeat for a group's devices.")
    ] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    version: Annotated[int | None, Query(ge=1, description="Needs model.")] = None,
    drifted: bool | None = None,
    since: Annotated[datetime | None, Query(description="Windows ending at or after.")] = None,
    until: Annotated[datetime | None, Query(description="Windows starting at or before.")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DriftScoresPublic:
    """Drift scores of sketch windows, newest window first."""
    if version is not None and model is None:
        raise InvalidRequestError(f"version={version} filters a model's versions; add model=")
    rows, count = monitor.list_scores(
        session,
        devices=device,
        model=model,
        version=version,
        drifted=drifted,
        since=since,
        until=until,
        offset=offset,
        limit=limit,
    )
    return DriftScoresPublic(data=rows, count=count)


@router.get("/aggregate")
def aggregate_drift(
    session: SessionDep,
    model: Annotated[str, Query(max_length=128)],
    version: Annotated[
        int | None, Query(ge=1, description="Default: production, else newest.")
    ] = None,
    device: Annotated[
        list[str] | None, Query(description="Only these devices (a group); default: all.")
    ] = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> DriftAggregatePublic:
    """The scored windows of a model version merged into one and scored under its policy."""
    from cloud import crud

    row = crud.get_model(session, name=model)
    if row is None:
        raise NotFoundError(f"no model {model!r}; list them with GET /models")
    return monitor.aggregate(
        session, model=row, version=version, devices=device, since=since, until=until
    )


@router.get("/policies/{name}")
def get_policy(session: SessionDep, model: ModelDep) -> DriftPolicyPublic:
    """The model's drift policy (the default when none was set)."""
    return monitor.policy_for(session, model=model)


@router.put("/policies/{name}")
def put_policy(
    session: SessionDep, model: ModelDep, policy: DriftPolicyUpdate
) -> DriftPolicyPublic:
    """Set the model's drift policy; it applies to windows scored from now on."""
    result = monitor.set_policy(session, model=model, update=policy)
    session.commit()
    return result
