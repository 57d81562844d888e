"""Dependencies of the cloud API, as ``Annotated`` aliases routes take as parameters.

* ``SessionDep``: the request's database session (closed after the response; routes commit).
* ``require_token``: the router-level dependency checking ``Authorization: Bearer <token>``
  against ``EDGELOOP_CLOUD_API_TOKEN`` (401 otherwise).
* ``SettingsDep``, ``ProfilesDep``: what :func:`cloud.api.main.create_app` put on ``app.state``.
* ``JobDep``, ``ModelDep``, ``VersionDep``: the object named by the path, or 404.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from cloud import crud
from cloud.errors import AuthenticationError, NotFoundError
from cloud.models import Job, ModelVersion, RegisteredModel
from cloud.settings import CloudSettings


def get_session(request: Request) -> Iterator[Session]:
    """A session on the app's engine for this request."""
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_settings(request: Request) -> CloudSettings:
    """The app's settings."""
    settings: CloudSettings = request.app.state.settings
    return settings


SettingsDep = Annotated[CloudSettings, Depends(get_settings)]


def get_profiles(request: Request) -> list[str]:
    """The hardware profiles compile jobs may name."""
    profiles: list[str] = request.app.state.profiles
    return profiles


ProfilesDep = Annotated[list[str], Depends(get_profiles)]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiToken",
    description="The cloud API token: 'Authorization: Bearer <EDGELOOP_CLOUD_API_TOKEN>'.",
)


def require_token(
    settings: SettingsDep,
    auth: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Let the request through only with the configured token."""
    if auth is None:
        raise AuthenticationError("no API token; send 'Authorization: Bearer <token>'")
    expected = settings.api_token.get_secret_value() if settings.api_token else ""
    if not expected or not secrets.compare_digest(auth.credentials.encode(), expected.encode()):
        raise AuthenticationError("wrong API token (see EDGELOOP_CLOUD_API_TOKEN)")


def get_job_or_404(session: SessionDep, job_id: int) -> Job:
    """The job ``job_id``."""
    job = crud.get_job(session, job_id=job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id}; list them with GET /jobs")
    return job


JobDep = Annotated[Job, Depends(get_job_or_404)]


def get_model_or_404(
    session: SessionDep, name: Annotated[str, Path(max_length=64)]
) -> RegisteredModel:
    """The registered model ``name``."""
    model = crud.get_model(session, name=name)
    if model is None:
        raise NotFoundError(f"no model {name!r}; list them with GET /models")
    return model


ModelDep = Annotated[RegisteredModel, Depends(get_model_or_404)]


def get_version_or_404(model: ModelDep, session: SessionDep, version: int) -> ModelVersion:
    """Version ``version`` of the model in the path."""
    row = crud.get_version(session, model_name=model.name, version=version)
    if row is None:
        raise NotFoundError(
            f"model {model.name!r} has no version {version}; list them with "
            f"GET /models/{model.name}/versions"
        )
    return row


VersionDep = Annotated[ModelVersion, Depends(get_version_or_404)]
