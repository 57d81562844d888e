"""``/samples``: captured samples (metadata, filters, paging) and one sample with its tensors."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from sqlmodel import col, func, select

from cloud.api.deps import SessionDep, SettingsDep
from cloud.dataloop.ingest import BlobStore
from cloud.dataloop.models import (
    Sample,
    SampleDetailPublic,
    SamplePublic,
    SamplesPublic,
    TensorData,
    TensorRef,
)
from cloud.errors import CloudError, NotFoundError

router = APIRouter(prefix="/samples", tags=["samples"])


@router.get("")
def list_samples(
    session: SessionDep,
    device: Annotated[str | None, Query(max_length=64)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    version: Annotated[str | None, Query(max_length=64)] = None,
    artifact_id: Annotated[str | None, Query(max_length=64)] = None,
    reason: Annotated[
        Literal["low_confidence", "high_entropy", "shadow_disagreement", "every_nth", "random"]
        | None,
        Query(),
    ] = None,
    since: Annotated[datetime | None, Query(description="Captured at or after.")] = None,
    until: Annotated[datetime | None, Query(description="Captured before.")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> SamplesPublic:
    """Captured samples, newest first (tensors by reference; GET /samples/{id} has them)."""
    query = select(Sample)
    for column, value in (
        (Sample.device_id, device),
        (Sample.model, model),
        (Sample.version, version),
        (Sample.artifact_id, artifact_id),
        (Sample.reason, reason),
    ):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(Sample.ts >= since)
    if until is not None:
        query = query.where(Sample.ts < until)
    count = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(
        query.order_by(col(Sample.ts).desc(), col(Sample.id).desc()).offset(offset).limit(limit)
    ).all()
    return SamplesPublic(data=[SamplePublic.model_validate(r) for r in rows], count=int(count))


@router.get("/{sample_id}")
def get_sample(
    session: SessionDep,
    settings: SettingsDep,
    sample_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
) -> SampleDetailPublic:
    """One sample with its tensors (base64 of the raw little-endian bytes)."""
    row = session.exec(select(Sample).where(Sample.sample_id == sample_id)).first()
    if row is None:
        raise NotFoundError(f"no sample {sample_id!r}; list them with GET /samples")
    blobs = BlobStore(settings.resolved_blob_dir() / "samples")

    def load(refs: list[dict[str, object]]) -> list[TensorData]:
        out = []
        for item in refs:
            ref = TensorRef.model_validate(item)
            try:
                data = blobs.tensor(ref)  # either layout, sha256 checked
            except FileNotFoundError as err:
                raise CloudError(
                    f"sample {sample_id}: tensor {ref.name!r} blob {ref.pack or ref.sha256} is "
                    f"missing from {blobs.root}"
                ) from err
            except ValueError as err:  # truncated, or not the bytes the sha256 names
                raise CloudError(f"sample {sample_id}: {err} (in {blobs.root})") from err
            out.append(TensorData(**ref.model_dump(), data=base64.b64encode(data).decode()))
        return out

    return SampleDetailPublic.model_validate(
        row, update={"inputs": load(row.inputs), "outputs": load(row.outputs)}
    )
