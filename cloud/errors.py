"""Errors of the cloud service (datasets, training, tuning, registry, compile jobs).

Each class carries its HTTP status (the cloud API) and CLI exit code. Tree::

    CloudError (500, exit 1): an unexpected failure inside the cloud service
    ├── AuthenticationError (401): no or wrong API token
    ├── NotFoundError (404, exit 2): no such dataset, job, model, version or artifact
    ├── ConflictError (409, exit 1): a duplicate name/version, or a state forbidding the change
    ├── InvalidRequestError (422, exit 2): a value refused, naming it and the allowed choices
    │   ├── SpecError (422, exit 2): unknown architecture, bad hyperparameter or search space
    │   └── DatasetError (422, exit 3): a dataset that cannot be read, or whose shape does
    │                                   not fit the model
    ├── JobCanceledError (409, exit 1): a running job stopped because cancel was requested
    └── JobFailedError (500, exit 4): a job that crashed; the message is the job's reason

Only ``cloud.api.main`` turns these into responses (``{"detail": message}``) and only the
CLI into exit codes. Messages name the bad value and the allowed choices, never a secret.
"""

from __future__ import annotations

from typing import ClassVar


class CloudError(Exception):
    """Root of every error the cloud service raises on purpose."""

    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1
    headers: ClassVar[dict[str, str] | None] = None


class AuthenticationError(CloudError):
    """The request carries no valid API token."""

    http_status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class NotFoundError(CloudError):
    """No such object."""

    http_status = 404
    exit_code = 2


class ConflictError(CloudError):
    """The name/version is taken, or the object's state forbids the change."""

    http_status = 409


class InvalidRequestError(CloudError):
    """A value refused; the message names it and what is allowed."""

    http_status = 422
    exit_code = 2


class SpecError(InvalidRequestError):
    """A training or tuning spec that cannot run (architecture, hyperparameters, space)."""


class DatasetError(InvalidRequestError):
    """A dataset that cannot be read, or whose shape does not fit the model."""

    exit_code = 3


class JobCanceledError(CloudError):
    """A running job stopped because its cancel was requested."""

    http_status = 409


class JobFailedError(CloudError):
    """A job that crashed; the message is the reason recorded on the job."""

    exit_code = 4
