"""``/datasets``: register a dataset version (content-hashed, copied into the blob dir), list."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from cloud import crud
from cloud.api.deps import SessionDep, SettingsDep
from cloud.errors import NotFoundError
from cloud.models import Dataset, DatasetCreate, DatasetPublic, DatasetsPublic
from cloud.settings import CloudSettings

router = APIRouter(prefix="/datasets", tags=["datasets"])


def store_copy(settings: CloudSettings, source: str, kind: str, digest: str) -> str:
    """The service's own copy of ``source`` (``<blob dir>/datasets/<digest>/<name>``).

    Built-in datasets are not copied: their source names them.
    """
    if kind == "builtin":
        return source
    path = Path(source)
    target_dir = settings.resolved_blob_dir() / "datasets" / digest
    target = target_dir / path.name
    if target.exists():
        return str(target)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target_dir.parent))
    try:
        if path.is_dir():
            shutil.copytree(path, staging / path.name)
        else:
            shutil.copy2(path, staging / path.name)
        try:
            staging.rename(target_dir)
        except OSError:  # another registration of the same content won the race
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def register(
    session: SessionDep, settings: CloudSettings, dataset_in: DatasetCreate
) -> tuple[Dataset, bool]:
    """Load and hash the source, copy it, and record a new version (or the same one)."""
    from cloud.datasets import dataset_digest, detect_kind, load_dataset

    kind = dataset_in.kind or detect_kind(dataset_in.source)
    data = load_dataset(dataset_in.source, kind)  # type: ignore[arg-type]
    digest = dataset_digest(dataset_in.source)
    latest = crud.find_dataset(session, name=dataset_in.name)
    if latest is not None and latest.digest == digest:
        return latest, False
    stored = store_copy(settings, dataset_in.source, kind, digest)
    return crud.register_dataset(
        session,
        name=dataset_in.name,
        kind=kind,
        source=dataset_in.source,
        digest=digest,
        stored_path=stored,
        input_shape=list(data.input_shape),
        classes=list(data.classes),
        n_samples=len(data),
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": DatasetPublic, "description": "Same content: the newest version"}},
)
def register_dataset(
    session: SessionDep, settings: SettingsDep, dataset_in: DatasetCreate, response: Response
) -> DatasetPublic:
    """Register a new dataset version (201); the same content returns the newest (200)."""
    dataset, created = register(session, settings, dataset_in)
    session.commit()
    if not created:
        response.status_code = status.HTTP_200_OK
    return DatasetPublic.model_validate(dataset)


@router.get("")
def list_datasets(
    session: SessionDep,
    name: Annotated[str | None, Query(max_length=64)] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DatasetsPublic:
    """Dataset versions by name and version."""
    rows, count = crud.list_datasets(session, name=name, offset=offset, limit=limit)
    return DatasetsPublic(data=[DatasetPublic.model_validate(r) for r in rows], count=count)


@router.get("/{name}")
def get_dataset(
    session: SessionDep, name: str, version: Annotated[int | None, Query(ge=1)] = None
) -> DatasetPublic:
    """A dataset's version (default: the newest)."""
    row = crud.find_dataset(session, name=name, version=version)
    if row is None:
        which = f"version {version} of dataset {name!r}" if version else f"dataset {name!r}"
        raise NotFoundError(f"no {which}; list them with GET /datasets")
    return DatasetPublic.model_validate(row)
