"""A small typed client of the fleet API (``edgeloop fleet api serve``) over httpx.

Every method returns the API's own response model from :mod:`fleet.models`
(``DevicePublic``, ``DevicesPublic``, ...), so callers get validated objects, not dicts.
The transport is injectable (``httpx.MockTransport``, an app under test, a proxy), every
request has a timeout, and every failure is a :class:`FleetAPIError`::

    FleetAPIError (status, detail; exit 1): the API refused the call or could not be reached
    ├── FleetConnectionError (status None): connection refused, DNS, timeout, broken response
    ├── FleetAuthError (401): no, malformed, unknown or revoked API key
    ├── FleetPermissionError (403): the key lacks the scope the route needs
    ├── FleetNotFoundError (404, exit 2): no such object in the caller's organization
    ├── FleetConflictError (409): a duplicate id or name, or a state that forbids the change
    ├── FleetRequestError (413, 415, other 4xx; exit 2): a request the API does not take
    │                         (status None: refused before sending, e.g. an id with '/')
    └── FleetValidationError (422, exit 2): a value the API refused
        └── FleetInvalidArtifactError (exit 3): an upload that is not a verifiable bundle

``detail`` is the API's ``{"detail": ...}`` message (validation errors flattened to
``field: message`` parts). Use the client as a context manager so its connections close::

    with FleetClient("http://127.0.0.1:8080", token) as fleet:
        for device in fleet.list_devices(revoked=False).data:
            print(device.device_id)
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from fleet.models import (
    ApiKeyCreated,
    ApiKeyPublic,
    ApiKeysPublic,
    ArtifactPublic,
    ArtifactsPublic,
    AuditLogsPublic,
    DeploymentPublic,
    DeploymentsPublic,
    DevicePublic,
    DeviceRegistered,
    DevicesPublic,
    DevicesRegistered,
    DeviceStatePublic,
    GroupPublic,
    GroupsPublic,
    OrganizationPublic,
)
from fleet.scopes import Scope

M = TypeVar("M", bound=BaseModel)

TAR_TYPE = "application/x-tar"


class FleetAPIError(Exception):
    """The fleet API refused a call (``status``) or could not be reached (``status`` None)."""

    exit_code: ClassVar[int] = 1

    def __init__(self, status: int | None, detail: str, *, method: str = "", url: str = "") -> None:
        self.status = status
        self.detail = detail
        self.method = method
        self.url = url
        where = f"{method} {url}".strip()
        code = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{where}: {code}: {detail}" if where else f"{code}: {detail}")


class FleetConnectionError(FleetAPIError):
    """The API did not answer: refused, unresolvable, timed out, or not the fleet API."""


class FleetAuthError(FleetAPIError):
    """401: the API key is missing, malformed, unknown, revoked or wrong."""


class FleetPermissionError(FleetAPIError):
    """403: the API key lacks the scope the route needs."""


class FleetNotFoundError(FleetAPIError):
    """404: no such object in the caller's organization."""

    exit_code = 2


class FleetConflictError(FleetAPIError):
    """409: the id or name is taken, or the object's state forbids the change."""


class FleetRequestError(FleetAPIError):
    """Another 4xx: a body too large, a content type not taken, a bad method."""

    exit_code = 2


class FleetValidationError(FleetAPIError):
    """422: a value the API refused (the detail names it)."""

    exit_code = 2


class FleetInvalidArtifactError(FleetValidationError):
    """422 on upload: the tar is damaged or fails signature or hash verification."""

    exit_code = 3


_BY_STATUS: dict[int, type[FleetAPIError]] = {
    401: FleetAuthError,
    403: FleetPermissionError,
    404: FleetNotFoundError,
    409: FleetConflictError,
    422: FleetValidationError,
}


def _detail(response: httpx.Response) -> str:
    """The message of an error response: ``detail`` as text, else the body (shortened)."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # FastAPI's validation errors
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", ()))
                parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(body)[:500]


def error_for(response: httpx.Response, *, upload: bool = False) -> FleetAPIError:
    """The :class:`FleetAPIError` for an error ``response`` (``upload``: a 422 is an artifact's)."""
    status = response.status_code
    kind = _BY_STATUS.get(status)
    if kind is None:
        kind = FleetRequestError if 400 <= status < 500 else FleetAPIError
    if upload and kind is FleetValidationError:
        kind = FleetInvalidArtifactError
    request = response.request
    return kind(status, _detail(response), method=request.method, url=str(request.url))


class FleetClient:
    """A client of one fleet API as one API key.

    Args:
        base_url: the API's root, e.g. ``http://127.0.0.1:8080``.
        token: an API key, ``elk_<key id>_<secret>`` (sent as a bearer token).
        timeout: seconds for connecting and for each read or write (must be positive).
        transport: the httpx transport (default: HTTP over the network).

    Raises:
        ValueError: ``timeout`` is not positive or ``token`` is empty.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if not token:
            raise ValueError("no API token; pass an 'elk_<key id>_<secret>' API key")
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=httpx.Timeout(timeout),
            transport=transport,
        )

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    # ------------------------------------------------------------ plumbing

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        upload: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        if params is not None:
            params = {k: _param(v) for k, v in params.items() if v is not None}
        try:
            response = self._http.request(method, path, params=params, **kwargs)
        except httpx.TransportError as err:
            raise FleetConnectionError(
                None,
                f"cannot reach the fleet API at {self.base_url} ({type(err).__name__}: {err})",
                method=method,
                url=f"{self.base_url}{path}",
            ) from err
        if response.is_error:
            raise error_for(response, upload=upload)
        return response

    def _call(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        response = self._request(method, path, **kwargs)
        try:
            return model.model_validate(response.json())
        except (ValueError, ValidationError) as err:
            raise FleetConnectionError(
                response.status_code,
                f"the answer is not a {model.__name__} (is {self.base_url} the fleet API?): {err}",
                method=method,
                url=str(response.request.url),
            ) from err

    # ------------------------------------------------------------ organization

    def current_organization(self) -> OrganizationPublic:
        """The organization of this client's API key."""
        return self._call(OrganizationPublic, "GET", "/organizations/current")

    # ------------------------------------------------------------ devices

    def list_devices(
        self,
        *,
        group_id: uuid.UUID | None = None,
        revoked: bool | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> DevicesPublic:
        """One page of the organization's devices, by id, optionally filtered."""
        params = {"group_id": group_id, "revoked": revoked, "offset": offset, "limit": limit}
        return self._call(DevicesPublic, "GET", "/devices", params=params)

    def get_device(self, device_id: str) -> DevicePublic:
        """One device."""
        return self._call(DevicePublic, "GET", f"/devices/{_segment(device_id)}")

    def get_device_state(self, device_id: str) -> DeviceStatePublic:
        """What the fleet wants on a device vs what it last reported, per model."""
        return self._call(DeviceStatePublic, "GET", f"/devices/{_segment(device_id)}/state")

    def register_device(
        self,
        device_id: str,
        *,
        profile: str,
        group_id: uuid.UUID | None = None,
        tags: dict[str, str] | None = None,
    ) -> DeviceRegistered:
        """Register a device; the answer carries its MQTT password, which is shown only once.

        Raises:
            FleetValidationError: an invalid id, tags or an unknown profile (the API's message).
            FleetConflictError: the id is taken.
        """
        body = {"device_id": device_id, "profile": profile, "group_id": group_id, "tags": tags}
        return self._call(DeviceRegistered, "POST", "/devices", json=_body(body))

    def register_devices(self, devices: Sequence[Mapping[str, Any]]) -> DevicesRegistered:
        """Register several devices at once (``POST /devices/bulk``), all or none; each item
        has ``device_id`` and ``profile``, optionally ``group_id`` and ``tags``. The answer
        carries every device's MQTT password, shown only this once.

        Raises:
            FleetValidationError: more than the API's maximum (1000), a duplicate id, an
                invalid id, tags or an unknown profile (the API's message names the value).
            FleetConflictError: ids already registered (all named); nothing was registered.
        """
        body = {"devices": [_body(dict(device)) for device in devices]}
        return self._call(DevicesRegistered, "POST", "/devices/bulk", json=body)

    def update_device(
        self,
        device_id: str,
        *,
        profile: str | None = None,
        tags: dict[str, str] | None = None,
        group_id: uuid.UUID | None = None,
    ) -> DevicePublic:
        """Change a device's profile, tags (replaced whole) or group; ``None`` leaves a field."""
        body = {"profile": profile, "tags": tags, "group_id": group_id}
        return self._call(
            DevicePublic, "PATCH", f"/devices/{_segment(device_id)}", json=_body(body)
        )

    def revoke_device(self, device_id: str) -> DevicePublic:
        """Cut a device off the broker and mark it revoked (idempotent)."""
        return self._call(DevicePublic, "POST", f"/devices/{_segment(device_id)}/revoke")

    def delete_device(self, device_id: str) -> None:
        """Cut a device off the broker and delete it."""
        self._request("DELETE", f"/devices/{_segment(device_id)}")

    # ------------------------------------------------------------ groups

    def list_groups(self, *, offset: int = 0, limit: int = 100) -> GroupsPublic:
        """One page of the organization's groups, by name."""
        params = {"offset": offset, "limit": limit}
        return self._call(GroupsPublic, "GET", "/groups", params=params)

    def get_group(self, group_id: uuid.UUID) -> GroupPublic:
        """One group."""
        return self._call(GroupPublic, "GET", f"/groups/{group_id}")

    def create_group(self, name: str, *, description: str = "") -> GroupPublic:
        """Create a group (its name is unique in the organization)."""
        body = _body({"name": name, "description": description})
        return self._call(GroupPublic, "POST", "/groups", json=body)

    def update_group(
        self, group_id: uuid.UUID, *, name: str | None = None, description: str | None = None
    ) -> GroupPublic:
        """Rename or describe a group; ``None`` leaves a field."""
        body = _body({"name": name, "description": description})
        return self._call(GroupPublic, "PATCH", f"/groups/{group_id}", json=body)

    def delete_group(self, group_id: uuid.UUID) -> None:
        """Delete an empty group (409 while devices are in it)."""
        self._request("DELETE", f"/groups/{group_id}")

    # ------------------------------------------------------------ artifacts

    def upload_artifact(self, path: Path) -> ArtifactPublic:
        """Upload a sealed bundle directory (packed here) or a transfer tar; idempotent.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            FleetInvalidArtifactError: the API could not verify it (the message says why).
        """
        path = Path(path)
        if path.is_dir():
            from compiler.bundle import pack_bundle

            with tempfile.TemporaryDirectory(prefix="edgeloop-upload-") as scratch:
                tar = Path(scratch) / f"{path.name}.tar"
                pack_bundle(path, tar)
                return self._upload_tar(tar)
        if not path.is_file():
            raise FileNotFoundError(f"no bundle directory or transfer tar at {path}")
        return self._upload_tar(path)

    def _upload_tar(self, tar: Path) -> ArtifactPublic:
        with tar.open("rb") as fh:
            return self._call(
                ArtifactPublic,
                "POST",
                "/artifacts",
                content=fh,
                headers={"Content-Type": TAR_TYPE, "Content-Length": str(tar.stat().st_size)},
                upload=True,
            )

    def list_artifacts(
        self,
        *,
        model_name: str | None = None,
        profile: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> ArtifactsPublic:
        """One page of the organization's artifacts, newest first, optionally filtered."""
        params = {"model_name": model_name, "profile": profile, "offset": offset, "limit": limit}
        return self._call(ArtifactsPublic, "GET", "/artifacts", params=params)

    def get_artifact(self, artifact_id: str) -> ArtifactPublic:
        """One artifact's record."""
        return self._call(ArtifactPublic, "GET", f"/artifacts/{_segment(artifact_id)}")

    # ------------------------------------------------------------ deployments (rollouts)

    def create_deployment(
        self,
        name: str,
        *,
        model_name: str,
        variants: dict[str, str],
        device_ids: list[str] | None = None,
        groups: list[str] | None = None,
        tags: dict[str, str] | None = None,
        policy: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> DeploymentPublic:
        """Plan a rollout of ``variants`` (artifact id per profile) to the targeted devices.

        The target is the union of ``device_ids``, the devices of ``groups`` (names) and the
        devices carrying every pair of ``tags``; ``policy`` is a rollout policy (waves or rate).
        """
        target = {"device_ids": device_ids or [], "groups": groups or [], "tags": tags or {}}
        body = _body(
            {
                "name": name,
                "model_name": model_name,
                "variants": variants,
                "target": target,
                "policy": policy,
                "seed": seed,
            }
        )
        return self._call(DeploymentPublic, "POST", "/deployments", json=body)

    def list_deployments(
        self, *, phase: str | None = None, offset: int = 0, limit: int = 100
    ) -> DeploymentsPublic:
        """One page of the organization's deployments, newest first, optionally in one phase."""
        params = {"phase": phase, "offset": offset, "limit": limit}
        return self._call(DeploymentsPublic, "GET", "/deployments", params=params)

    def get_deployment(self, deployment_id: uuid.UUID) -> DeploymentPublic:
        """One deployment with its devices' states."""
        return self._call(DeploymentPublic, "GET", f"/deployments/{deployment_id}")

    def pause_deployment(self, deployment_id: uuid.UUID) -> DeploymentPublic:
        """Start no new device jobs until resumed."""
        return self._command(deployment_id, "pause")

    def resume_deployment(self, deployment_id: uuid.UUID) -> DeploymentPublic:
        """Continue a paused deployment."""
        return self._command(deployment_id, "resume")

    def cancel_deployment(self, deployment_id: uuid.UUID) -> DeploymentPublic:
        """Stop the rollout; devices already updated keep their artifact."""
        return self._command(deployment_id, "cancel")

    def rollback_deployment(self, deployment_id: uuid.UUID) -> DeploymentPublic:
        """Return updated devices to their previous artifact."""
        return self._command(deployment_id, "rollback")

    def _command(self, deployment_id: uuid.UUID, command: str) -> DeploymentPublic:
        return self._call(DeploymentPublic, "POST", f"/deployments/{deployment_id}/{command}")

    # ------------------------------------------------------------ API keys (admin)

    def create_api_key(self, name: str, scopes: list[Scope | str]) -> ApiKeyCreated:
        """Create an API key; the answer carries its token, which is shown only once."""
        body = _body({"name": name, "scopes": scopes})
        return self._call(ApiKeyCreated, "POST", "/api-keys", json=body)

    def list_api_keys(
        self, *, include_revoked: bool = True, offset: int = 0, limit: int = 100
    ) -> ApiKeysPublic:
        """One page of the organization's API keys, oldest first (never their secrets)."""
        params = {"include_revoked": include_revoked, "offset": offset, "limit": limit}
        return self._call(ApiKeysPublic, "GET", "/api-keys", params=params)

    def get_api_key(self, key_id: str) -> ApiKeyPublic:
        """One API key."""
        return self._call(ApiKeyPublic, "GET", f"/api-keys/{_segment(key_id)}")

    def revoke_api_key(self, key_id: str) -> ApiKeyPublic:
        """Revoke an API key (idempotent)."""
        return self._call(ApiKeyPublic, "DELETE", f"/api-keys/{_segment(key_id)}")

    # ------------------------------------------------------------ audit (admin)

    def list_audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> AuditLogsPublic:
        """One page of the organization's audit log, newest first."""
        params = {"actor": actor, "action": action, "offset": offset, "limit": limit}
        return self._call(AuditLogsPublic, "GET", "/audit", params=params)


def _param(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, uuid.UUID) else value


def _segment(value: str) -> str:
    """``value`` as one path segment.

    Raises:
        FleetRequestError: ``value`` is empty, ``.``/``..`` or holds ``/`` (servers decode
            ``%2F`` before routing, so it would address another route).
    """
    if not value or value in (".", "..") or "/" in value:
        raise FleetRequestError(
            None, f"id {value!r} cannot be one URL path segment (empty, '.', '..' or has '/')"
        )
    return quote(value, safe="")


def _body(fields: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of ``fields`` without the unset ones.

    Not validated here: the API's own message (its 422) is the one to show, and a client of an
    older or newer API never refuses what the server would take.
    """
    body = {k: v for k, v in fields.items() if v is not None}
    return {k: (str(v) if isinstance(v, uuid.UUID) else v) for k, v in body.items()}


__all__ = [
    "FleetAPIError",
    "FleetAuthError",
    "FleetClient",
    "FleetConflictError",
    "FleetConnectionError",
    "FleetInvalidArtifactError",
    "FleetNotFoundError",
    "FleetPermissionError",
    "FleetRequestError",
    "FleetValidationError",
    "error_for",
]
