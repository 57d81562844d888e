"""Errors of the fleet management API, each carrying its HTTP status and CLI exit code.

Tree::

    FleetError (500, exit 1): an unexpected failure inside the fleet service
    ├── AuthenticationError (401): no, malformed, unknown or revoked API key
    ├── PermissionDeniedError (403): the API key lacks the scope a route needs
    ├── NotFoundError (404, exit 2): no such object in the caller's organization
    ├── ConflictError (409): a duplicate id or name, or a state that forbids the change
    ├── PayloadTooLargeError (413, exit 2): an upload over the size limit
    ├── UnsupportedMediaTypeError (415, exit 2): an upload in a content type not taken
    ├── InvalidRequestError (422, exit 2): a value refused (unknown profile, reserved id, URL)
    │   └── InvalidArtifactError (422, exit 3): an upload that is not a verifiable transfer tar
    ├── BrokerSyncError (503): the broker's password file could not be updated or reloaded
    ├── fleet.store.StoreError (500, exit 1): a damaged store entry, an I/O failure
    │   ├── InvalidRequestError (400, exit 2): malformed artifact id, device id, chunk size
    │   │   └── ChunkRangeError (416, exit 2): chunk index outside the artifact
    │   ├── ArtifactNotFoundError (404, exit 2): no artifact with that id
    │   ├── ArtifactConflictError (409, exit 1): an entry with that id exists but is damaged
    │   └── InvalidArtifactError (422, exit 3): the bundle or tar fails verification
    └── fleet.rollout.RolloutError (400, exit 1): planner errors (tree in fleet.rollout)

Only ``fleet.api.main`` turns these into responses (``{"detail": message}``) and only
``fleet.api.cli`` into exit codes. Messages name the bad value and the allowed choices, and
never contain a secret.
"""

from __future__ import annotations

from typing import ClassVar


class FleetError(Exception):
    """Root of every error the fleet service raises on purpose."""

    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1
    headers: ClassVar[dict[str, str] | None] = None


class AuthenticationError(FleetError):
    """The request carries no valid API key."""

    http_status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class PermissionDeniedError(FleetError):
    """The API key is valid but lacks the scope the route needs."""

    http_status = 403


class NotFoundError(FleetError):
    """No object with that id in the caller's organization (other organizations' look alike)."""

    http_status = 404
    exit_code = 2


class ConflictError(FleetError):
    """The id or name is taken, or the object's state forbids the change."""

    http_status = 409


class PayloadTooLargeError(FleetError):
    """The request body exceeds the configured limit."""

    http_status = 413
    exit_code = 2


class UnsupportedMediaTypeError(FleetError):
    """The request body has a content type the route does not accept."""

    http_status = 415
    exit_code = 2


class InvalidRequestError(FleetError):
    """A well-formed request with a value the API refuses."""

    http_status = 422
    exit_code = 2


class InvalidArtifactError(InvalidRequestError):
    """An uploaded transfer tar that is damaged, not a tar, or fails verification."""

    exit_code = 3


class BrokerSyncError(FleetError):
    """The MQTT broker's credentials could not be brought in line with the database."""

    http_status = 503
