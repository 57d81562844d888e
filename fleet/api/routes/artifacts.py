"""Artifacts of the caller's organization: upload a transfer tar (deploy scope), list, read.

``POST /artifacts`` takes the transfer tar as the raw body (``application/x-tar`` or
``application/octet-stream``) or as the ``file`` field of ``multipart/form-data``. The body
is streamed to a scratch file under the state directory, counting bytes against
``max_upload_bytes`` (413 past it), then :meth:`ArtifactStore.put_tar` unpacks, verifies
the signature and every hash, and publishes it by rename; only then is the database row
added. A refused upload therefore leaves neither the store nor the database changed. The
store is content-addressed and shared: uploading an artifact another organization already
stored adds only this organization's row.
"""

from __future__ import annotations

import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import Message

from fleet import crud
from fleet import store as store_mod
from fleet.api.deps import (
    ArtifactDep,
    AuditDep,
    OrgDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    require_scope,
)
from fleet.api.routing import AuditedRoute, Principal
from fleet.crud import MAX_OFFSET
from fleet.errors import (
    ConflictError,
    FleetError,
    InvalidArtifactError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from fleet.models import Artifact, ArtifactCreate, ArtifactPublic, ArtifactsPublic, Organization
from fleet.scopes import Scope

router = APIRouter(prefix="/artifacts", tags=["artifacts"], route_class=AuditedRoute)

RAW_TYPES = ("application/x-tar", "application/octet-stream")
MULTIPART = "multipart/form-data"
FILE_FIELD = "file"
_BLOCK = 1 << 20
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            **dict.fromkeys(RAW_TYPES, _BINARY),
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                    "required": [FILE_FIELD],
                }
            },
        },
    }
}


def _too_large(size: int | str, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"upload of {size} bytes exceeds the limit of {limit} bytes "
        "(EDGELOOP_FLEET_MAX_UPLOAD_BYTES)"
    )


def _limited(
    receive: Callable[[], Awaitable[Message]], limit: int
) -> Callable[[], Awaitable[Message]]:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(f"more than {limit}", limit)
        return message

    return wrapped


async def receive_upload(request: Request, dest: Path, *, limit: int) -> int:
    """Write the uploaded tar to ``dest``; return its size.

    Raises:
        PayloadTooLargeError: the body is over ``limit`` bytes.
        UnsupportedMediaTypeError: the content type is not a tar, octet stream or multipart.
        InvalidArtifactError: the body (or the multipart ``file`` field) is missing or empty.
    """
    kind = request.headers.get("content-type", RAW_TYPES[1]).split(";")[0].strip().lower()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    size = 0
    if kind in RAW_TYPES:
        with dest.open("wb") as fh:
            async for block in request.stream():
                size += len(block)
                if size > limit:
                    raise _too_large(f"more than {limit}", limit)
                await run_in_threadpool(fh.write, block)
    elif kind == MULTIPART:
        scope: MutableMapping[str, Any] = request.scope
        limited = Request(scope, receive=_limited(request.receive, limit))
        async with limited.form(max_files=1, max_fields=16) as form:
            upload = form.get(FILE_FIELD)
            if not isinstance(upload, UploadFile):
                raise InvalidArtifactError(
                    f"multipart upload has no file field {FILE_FIELD!r} "
                    f"(fields: {', '.join(form.keys()) or 'none'})"
                )
            with dest.open("wb") as fh:
                while block := await upload.read(_BLOCK):
                    size += len(block)
                    await run_in_threadpool(fh.write, block)
    else:
        raise UnsupportedMediaTypeError(
            f"content type {kind!r} is not accepted for an artifact upload; use one of: "
            f"{', '.join(RAW_TYPES)}, {MULTIPART} (field {FILE_FIELD!r})"
        )
    if size == 0:
        raise InvalidArtifactError(
            "the upload is empty; send a transfer tar (as written by 'edgeloop fleet store put')"
        )
    return size


def _store_and_record(
    session: Session,
    store: store_mod.ArtifactStore,
    tar: Path,
    *,
    org: Organization,
    principal: Principal,
) -> tuple[Artifact, bool]:
    try:
        stored = store.put_tar(tar)
    except store_mod.InvalidArtifactError as err:
        reason = str(err).removeprefix(f"{str(tar)!r} was refused: ")
        raise InvalidArtifactError(f"artifact upload refused: {reason}") from err
    except store_mod.ArtifactConflictError as err:
        raise ConflictError(str(err)) from err
    except store_mod.StoreError as err:
        raise FleetError(f"the artifact store failed: {err}") from err
    existing = crud.get_artifact(session, org_id=org.id, artifact_id=stored.artifact_id)
    if existing is not None:
        return existing, False
    artifact_in = ArtifactCreate(
        artifact_id=stored.artifact_id,
        model_name=stored.model.name,
        model_version=stored.model.version,
        profile=stored.profile,
        runtime=stored.manifest.runtime,
        size=stored.transfer.size,
        transfer_sha256=stored.transfer.sha256,
    )
    artifact = crud.create_artifact(
        session, org_id=org.id, artifact_in=artifact_in, uploaded_by=principal.key_id
    )
    session.commit()
    return artifact, True


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_scope(Scope.DEPLOY))],
    openapi_extra=_UPLOAD_BODY,
    responses={200: {"model": ArtifactPublic, "description": "Already uploaded."}},
)
async def upload_artifact(
    request: Request,
    response: Response,
    session: SessionDep,
    org: OrgDep,
    principal: PrincipalDep,
    store: StoreDep,
    settings: SettingsDep,
    audit: AuditDep,
) -> ArtifactPublic:
    """Upload a signed transfer tar; 201 when new, 200 if the organization already has it."""
    scratch_root = settings.state_dir / "uploads"
    scratch_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="upload-", dir=scratch_root) as scratch:
        tar = Path(scratch) / "upload.tar"
        await receive_upload(request, tar, limit=settings.max_upload_bytes)
        artifact, created = await run_in_threadpool(
            _store_and_record, session, store, tar, org=org, principal=principal
        )
    audit.target = f"artifact:{artifact.artifact_id}"
    if not created:
        response.status_code = status.HTTP_200_OK
    return ArtifactPublic.model_validate(artifact)


@router.get("", dependencies=[Depends(require_scope(Scope.READ))])
def list_artifacts(
    session: SessionDep,
    org: OrgDep,
    model_name: str | None = None,
    profile: str | None = None,
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    limit: int = Query(100, ge=1, le=1000),
) -> ArtifactsPublic:
    """The organization's artifacts, newest first, optionally of one model or profile."""
    rows, count = crud.list_artifacts(
        session, org_id=org.id, model_name=model_name, profile=profile, offset=offset, limit=limit
    )
    return ArtifactsPublic(data=[ArtifactPublic.model_validate(r) for r in rows], count=count)


@router.get("/{artifact_id}", dependencies=[Depends(require_scope(Scope.READ))])
def read_artifact(artifact: ArtifactDep) -> ArtifactPublic:
    """One artifact's record."""
    return ArtifactPublic.model_validate(artifact)
