"""``/models``: the registry's models and versions, promotion, and a version's compiles."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud import crud
from cloud.api.deps import ModelDep, SessionDep, VersionDep
from cloud.models import (
    CompileRecordPublic,
    CompileRecordsPublic,
    ModelVersionPublic,
    ModelVersionsPublic,
    PromoteRequest,
    RegisteredModelPublic,
    RegisteredModelsPublic,
)

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(
    session: SessionDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> RegisteredModelsPublic:
    """Registered models by name."""
    rows, count = crud.list_models(session, offset=offset, limit=limit)
    return RegisteredModelsPublic(data=rows, count=count)


@router.get("/{name}")
def get_model(session: SessionDep, model: ModelDep) -> RegisteredModelPublic:
    """One model: version count, newest and production versions."""
    return crud.model_public(session, model=model)


@router.get("/{name}/versions")
def list_versions(
    session: SessionDep,
    model: ModelDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ModelVersionsPublic:
    """A model's versions, newest first."""
    rows, count = crud.list_versions(session, model_name=model.name, offset=offset, limit=limit)
    return ModelVersionsPublic(
        data=[crud.version_public(session, version=r) for r in rows], count=count
    )


@router.get("/{name}/versions/{version}")
def get_version(session: SessionDep, row: VersionDep) -> ModelVersionPublic:
    """One version: metrics, spec, dataset, training job, code version, parent, files."""
    return crud.version_public(session, version=row)


@router.post("/{name}/versions/{version}/promote")
def promote_version(
    session: SessionDep, row: VersionDep, body: PromoteRequest
) -> ModelVersionPublic:
    """Move a version to a stage; promoting to production moves the old one to staging."""
    crud.promote(session, version=row, stage=body.stage)
    session.commit()
    return crud.version_public(session, version=row)


@router.get("/{name}/versions/{version}/compiles")
def list_compiles(session: SessionDep, row: VersionDep) -> CompileRecordsPublic:
    """The version's compiles, one per profile and compile job."""
    records = crud.list_compile_records(session, model_version_id=row.id)
    return CompileRecordsPublic(
        data=[CompileRecordPublic.model_validate(r) for r in records], count=len(records)
    )
