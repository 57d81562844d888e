"""fleet.sdk against the real app (through the TestClient, and once over a real socket), and
its error mapping as a pure table over httpx.MockTransport."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session

from fleet.api.bootstrap import create_admin_key
from fleet.models import (
    ApiKeyCreated,
    ArtifactPublic,
    DevicePublic,
    DeviceRegistered,
    DevicesPublic,
)
from fleet.sdk import (
    FleetAPIError,
    FleetAuthError,
    FleetClient,
    FleetConflictError,
    FleetConnectionError,
    FleetInvalidArtifactError,
    FleetNotFoundError,
    FleetPermissionError,
    FleetRequestError,
    FleetValidationError,
    error_for,
)

from ..conftest import BundleFactory
from .conftest import PROFILE, KeyFactory, Org, TarFactory
from .test_api_cli import LiveServer, free_url

BASE = "http://testserver"


class AppTransport(httpx.BaseTransport):
    """Requests of a :class:`FleetClient` sent through the app's started TestClient."""

    def __init__(self, client: TestClient) -> None:
        self._client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        response = self._client.send(request)
        return httpx.Response(
            response.status_code, headers=response.headers, content=response.content
        )


FleetFactory = Any  # Callable[[str], FleetClient]


@pytest.fixture()
def fleet_as(client: TestClient) -> Iterator[FleetFactory]:
    """A FleetClient over the app for a token; all closed afterwards."""
    opened: list[FleetClient] = []

    def make(token: str) -> FleetClient:
        fleet = FleetClient(BASE, token, transport=AppTransport(client))
        opened.append(fleet)
        return fleet

    yield make
    for fleet in opened:
        fleet.close()


@pytest.fixture()
def fleet(fleet_as: FleetFactory, org_a: Org) -> FleetClient:
    client: FleetClient = fleet_as(org_a.token)
    return client


# ---------------------------------------------------------------- devices and groups


def test_register_list_get_update_revoke_delete(fleet: FleetClient) -> None:
    group = fleet.create_group("lab", description="bench")
    assert fleet.get_group(group.id) == group

    device = fleet.register_device("dev-1", profile=PROFILE, group_id=group.id, tags={"a": "1"})
    assert isinstance(device, DeviceRegistered)
    assert device.mqtt.username == "dev-1" and device.mqtt.password
    fleet.register_device("dev-2", profile=PROFILE)

    page = fleet.list_devices()
    assert isinstance(page, DevicesPublic) and page.count == 2
    assert [d.device_id for d in page.data] == ["dev-1", "dev-2"]
    assert not hasattr(page.data[0], "mqtt")
    assert [d.device_id for d in fleet.list_devices(group_id=group.id).data] == ["dev-1"]
    assert fleet.list_devices(limit=1, offset=1).data[0].device_id == "dev-2"

    got = fleet.get_device("dev-1")
    assert isinstance(got, DevicePublic) and got.tags == {"a": "1"} and got.group_id == group.id
    changed = fleet.update_device("dev-1", tags={"b": "2"})
    assert changed.tags == {"b": "2"} and changed.group_id == group.id

    revoked = fleet.revoke_device("dev-1")
    assert revoked.revoked and revoked.revoked_at is not None
    assert fleet.revoke_device("dev-1").revoked_at == revoked.revoked_at  # idempotent
    assert [d.device_id for d in fleet.list_devices(revoked=True).data] == ["dev-1"]
    assert [d.device_id for d in fleet.list_devices(revoked=False).data] == ["dev-2"]

    with pytest.raises(FleetConflictError) as conflict:
        fleet.delete_group(group.id)
    assert conflict.value.status == 409
    fleet.delete_device("dev-1")
    fleet.delete_group(group.id)
    assert fleet.list_groups().count == 0
    with pytest.raises(FleetNotFoundError):
        fleet.get_device("dev-1")


def test_group_update_and_organization(fleet: FleetClient, org_a: Org) -> None:
    group = fleet.create_group("g1")
    renamed = fleet.update_group(group.id, name="g2")
    assert renamed.name == "g2" and renamed.description == ""
    assert [g.name for g in fleet.list_groups().data] == ["g2"]
    assert fleet.current_organization().name == org_a.name


@pytest.mark.parametrize("device_id", ["dev-1/revoke", "", ".", ".."])
def test_ids_that_are_not_one_path_segment_are_refused_before_sending(
    fleet: FleetClient, device_id: str
) -> None:
    fleet.register_device("dev-1", profile=PROFILE)
    with pytest.raises(FleetRequestError) as refused:
        fleet.revoke_device(device_id)
    assert refused.value.status is None and refused.value.exit_code == 2
    assert repr(device_id) in refused.value.detail
    assert not fleet.get_device("dev-1").revoked


def test_ids_are_escaped(fleet: FleetClient) -> None:
    with pytest.raises(FleetNotFoundError) as missing:
        fleet.get_device("dev 1?x=1")
    assert "no device 'dev 1?x=1'" in missing.value.detail


# ---------------------------------------------------------------- artifacts


def test_upload_bundle_dir_and_tar(
    fleet: FleetClient, make_bundle: BundleFactory, make_tar: TarFactory, org_a: Org
) -> None:
    bundle_dir = make_bundle("signed", size=4096)
    uploaded = fleet.upload_artifact(bundle_dir)
    assert isinstance(uploaded, ArtifactPublic)
    assert (uploaded.model_name, uploaded.profile) == ("m", PROFILE)
    assert uploaded.uploaded_by == org_a.key_id
    assert fleet.upload_artifact(bundle_dir).artifact_id == uploaded.artifact_id  # idempotent

    tar = make_tar("other", version="2")
    second = fleet.upload_artifact(tar)
    assert second.model_version == "2"
    assert fleet.get_artifact(second.artifact_id) == second
    assert fleet.list_artifacts().count == 2
    assert [a.model_version for a in fleet.list_artifacts(model_name="m").data] == ["2", "1"]
    assert fleet.list_artifacts(profile="nvidia/h100").count == 0


def test_upload_refusals(fleet: FleetClient, tmp_path: Path, make_bundle: BundleFactory) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00" * 2048)
    with pytest.raises(FleetInvalidArtifactError) as refused:
        fleet.upload_artifact(junk)
    assert refused.value.status == 422 and refused.value.exit_code == 3
    assert "artifact upload refused" in refused.value.detail

    tampered = make_bundle("tampered", size=4096)
    (tampered / "report.json").write_text('{"ok": false}')
    with pytest.raises(FleetInvalidArtifactError):
        fleet.upload_artifact(tampered)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        fleet.upload_artifact(tmp_path / "nowhere")
    assert fleet.list_artifacts().count == 0


def test_upload_over_the_limit_is_a_request_error(
    fleet: FleetClient, app: FastAPI, tmp_path: Path
) -> None:
    big = tmp_path / "big.tar"
    big.write_bytes(b"\x00" * (app.state.settings.max_upload_bytes + 1))
    with pytest.raises(FleetRequestError) as refused:
        fleet.upload_artifact(big)
    assert refused.value.status == 413 and refused.value.exit_code == 2
    assert "exceeds the limit" in refused.value.detail


# ---------------------------------------------------------------- API keys and audit


def test_api_keys_create_list_revoke(fleet_as: FleetFactory, fleet: FleetClient) -> None:
    created = fleet.create_api_key("ci", ["fleet:read"])
    assert isinstance(created, ApiKeyCreated) and created.token.startswith("elk_")
    reader: FleetClient = fleet_as(created.token)
    assert reader.list_devices().count == 0

    listed = fleet.list_api_keys()
    assert created.key_id in [k.key_id for k in listed.data]
    assert fleet.get_api_key(created.key_id).name == "ci"
    revoked = fleet.revoke_api_key(created.key_id)
    assert revoked.revoked_at is not None
    active = fleet.list_api_keys(include_revoked=False)
    assert created.key_id not in [k.key_id for k in active.data]
    with pytest.raises(FleetAuthError) as refused:
        reader.list_devices()
    assert refused.value.status == 401 and created.key_id in refused.value.detail


def test_audit_lists_mutations(fleet: FleetClient, org_a: Org) -> None:
    fleet.register_device("dev-1", profile=PROFILE)
    with pytest.raises(FleetValidationError):
        fleet.register_device("dev-2", profile="rpi4")
    entries = fleet.list_audit(actor=org_a.key_id)
    assert [e.action for e in entries.data][:2] == [
        "devices.register_device",
        "devices.register_device",
    ]
    assert [e.result for e in entries.data][:2] == ["failed", "ok"]
    only = fleet.list_audit(action="devices.register_device", limit=1)
    assert only.count == 2 and len(only.data) == 1


# ---------------------------------------------------------------- errors from the real app


def test_another_orgs_device_is_not_found(fleet_as: FleetFactory, org_a: Org, org_b: Org) -> None:
    fleet_as(org_b.token).register_device("dev-b", profile=PROFILE)
    fleet_a: FleetClient = fleet_as(org_a.token)
    for call in (fleet_a.get_device, fleet_a.revoke_device, fleet_a.delete_device):
        with pytest.raises(FleetNotFoundError) as missing:
            call("dev-b")
        assert missing.value.status == 404 and missing.value.exit_code == 2
        assert "no device 'dev-b' in organization 'org-a'" in missing.value.detail
    with pytest.raises(FleetNotFoundError):
        fleet_a.get_group(uuid.uuid4())


def test_missing_scope_is_a_permission_error(
    fleet_as: FleetFactory, org_a: Org, make_key: KeyFactory
) -> None:
    reader: FleetClient = fleet_as(make_key(org_a, ["fleet:read"]))
    with pytest.raises(FleetPermissionError) as denied:
        reader.register_device("dev-1", profile=PROFILE)
    err = denied.value
    assert err.status == 403 and err.exit_code == 1
    assert "lacks scope 'fleet:write'" in err.detail
    assert err.method == "POST" and err.url.endswith("/devices")
    with pytest.raises(FleetPermissionError, match="'admin'"):
        reader.list_audit()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"device_id": "bad id!", "profile": PROFILE}, "body.device_id"),
        ({"device_id": "fleet", "profile": PROFILE}, "reserved"),
        ({"device_id": "dev-1", "profile": "rpi4"}, "unknown hardware profile 'rpi4'; choose"),
        ({"device_id": "dev-1", "profile": PROFILE, "tags": {"": "x"}}, "tag key ''"),
    ],
)
def test_bad_input_is_a_validation_error(
    fleet: FleetClient, kwargs: dict[str, Any], fragment: str
) -> None:
    fields = dict(kwargs)
    device_id = fields.pop("device_id")
    with pytest.raises(FleetValidationError) as refused:
        fleet.register_device(device_id, **fields)
    assert refused.value.status == 422 and refused.value.exit_code == 2
    assert fragment in refused.value.detail
    assert fleet.list_devices().count == 0


def test_duplicate_device_is_a_conflict(fleet: FleetClient) -> None:
    fleet.register_device("dev-1", profile=PROFILE)
    with pytest.raises(FleetConflictError) as conflict:
        fleet.register_device("dev-1", profile=PROFILE)
    assert conflict.value.status == 409 and "dev-1" in conflict.value.detail


def test_malformed_token_is_an_auth_error(fleet_as: FleetFactory) -> None:
    with pytest.raises(FleetAuthError) as refused:
        fleet_as("not-a-key").list_devices()
    assert refused.value.status == 401 and "malformed API key" in refused.value.detail


# ---------------------------------------------------------------- over a real socket


def test_over_http_with_the_default_transport(app: FastAPI) -> None:
    with LiveServer(app) as server:
        with Session(app.state.engine) as session:
            token = create_admin_key(session, "org-http").token
        with FleetClient(server.url, token, timeout=5) as fleet:
            fleet.register_device("dev-1", profile=PROFILE)
            assert [d.device_id for d in fleet.list_devices().data] == ["dev-1"]


def test_connection_refused_names_the_url() -> None:
    url = free_url()
    with FleetClient(url, "elk_000000000000_x", timeout=2) as fleet:
        with pytest.raises(FleetConnectionError) as unreachable:
            fleet.list_devices()
    err = unreachable.value
    assert err.status is None and err.exit_code == 1
    assert f"cannot reach the fleet API at {url}" in err.detail
    assert isinstance(err.__cause__, httpx.ConnectError)


# ---------------------------------------------------------------- pure: mapping and arguments


def _mock(status: int, body: bytes, content_type: str = "application/json") -> FleetClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"Content-Type": content_type})

    return FleetClient(BASE, "elk_x_y", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("status", "body", "kind", "detail"),
    [
        (401, b'{"detail": "no key"}', FleetAuthError, "no key"),
        (403, b'{"detail": "lacks"}', FleetPermissionError, "lacks"),
        (404, b'{"detail": "gone"}', FleetNotFoundError, "gone"),
        (409, b'{"detail": "taken"}', FleetConflictError, "taken"),
        (413, b'{"detail": "big"}', FleetRequestError, "big"),
        (415, b'{"detail": "type"}', FleetRequestError, "type"),
        (
            422,
            json.dumps(
                {"detail": [{"loc": ["query", "limit"], "msg": "too big", "type": "x"}]}
            ).encode(),
            FleetValidationError,
            "query.limit: too big",
        ),
        (500, b"Internal Server Error", FleetAPIError, "Internal Server Error"),
        (502, b"", FleetAPIError, "Bad Gateway"),
        (503, b'{"detail": "no broker"}', FleetAPIError, "no broker"),
        (418, b'{"detail": {"nested": 1}}', FleetRequestError, "{'detail': {'nested': 1}}"),
    ],
)
def test_error_mapping(status: int, body: bytes, kind: type[FleetAPIError], detail: str) -> None:
    with _mock(status, body) as fleet, pytest.raises(FleetAPIError) as caught:
        fleet.list_groups()
    assert type(caught.value) is kind
    assert caught.value.status == status and caught.value.detail == detail
    assert str(caught.value) == f"GET {BASE}/groups?offset=0&limit=100: HTTP {status}: {detail}"


def test_upload_422_is_an_invalid_artifact() -> None:
    response = httpx.Response(
        422, json={"detail": "bad"}, request=httpx.Request("POST", f"{BASE}/artifacts")
    )
    assert type(error_for(response, upload=True)) is FleetInvalidArtifactError
    assert type(error_for(response)) is FleetValidationError


def test_an_answer_that_is_not_the_fleet_api() -> None:
    with _mock(200, b"<html>hello</html>", "text/html") as fleet:
        with pytest.raises(FleetConnectionError, match="not a GroupsPublic"):
            fleet.list_groups()


def test_query_parameters_are_sent_as_the_api_reads_them() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [], "count": 0})

    group = uuid.uuid4()
    with FleetClient(BASE + "/", "elk_x_y", transport=httpx.MockTransport(handler)) as fleet:
        fleet.list_devices(group_id=group, revoked=False, limit=5)
        fleet.list_devices()
    assert dict(seen[0].url.params) == {
        "group_id": str(group),
        "revoked": "false",
        "offset": "0",
        "limit": "5",
    }
    assert "revoked" not in seen[1].url.params
    assert seen[0].headers["Authorization"] == "Bearer elk_x_y"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token": "elk_x_y", "timeout": 0}, "timeout must be a positive number"),
        ({"token": "elk_x_y", "timeout": -1.0}, "timeout must be a positive number"),
        ({"token": ""}, "no API token"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FleetClient(BASE, **kwargs)


def test_every_request_has_a_timeout() -> None:
    timeouts: list[dict[str, float | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"])
        return httpx.Response(200, json={"data": [], "count": 0})

    with FleetClient(BASE, "elk_x_y", timeout=3, transport=httpx.MockTransport(handler)) as fleet:
        fleet.list_groups()
    assert timeouts == [{"connect": 3, "read": 3, "write": 3, "pool": 3}]


# ---------------------------------------------------------------- deployments


def test_deployments_against_the_app(fleet: FleetClient) -> None:
    assert fleet.list_deployments().count == 0
    assert fleet.list_deployments(phase="ROLLING").count == 0
    with pytest.raises(FleetNotFoundError):
        fleet.get_deployment(uuid.uuid4())
    with pytest.raises(FleetNotFoundError):
        fleet.cancel_deployment(uuid.uuid4())
    with pytest.raises(FleetValidationError) as refused:
        fleet.create_deployment("d1", model_name="m", variants={})
    assert refused.value.status == 422 and "variant" in refused.value.detail


def test_deployment_commands_use_their_routes() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        return httpx.Response(404, json={"detail": "no deployment"})

    deployment = uuid.uuid4()
    with FleetClient(BASE, "elk_x_y", transport=httpx.MockTransport(handler)) as fleet:
        for command in (
            fleet.get_deployment,
            fleet.pause_deployment,
            fleet.resume_deployment,
            fleet.cancel_deployment,
            fleet.rollback_deployment,
        ):
            with pytest.raises(FleetNotFoundError):
                command(deployment)
    assert seen == [
        f"GET /deployments/{deployment}",
        *(f"POST /deployments/{deployment}/{c}" for c in ("pause", "resume", "cancel", "rollback")),
    ]


def test_create_deployment_body() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(422, json={"detail": "refused"})

    with FleetClient(BASE, "elk_x_y", transport=httpx.MockTransport(handler)) as fleet:
        with pytest.raises(FleetValidationError):
            fleet.create_deployment(
                "d1",
                model_name="m",
                variants={PROFILE: "a" * 64},
                groups=["lab"],
                policy={"rate": {"per_minute": 1}},
                seed=7,
            )
    assert bodies == [
        {
            "name": "d1",
            "model_name": "m",
            "variants": {PROFILE: "a" * 64},
            "target": {"device_ids": [], "groups": ["lab"], "tags": {}},
            "policy": {"rate": {"per_minute": 1}},
            "seed": 7,
        }
    ]
