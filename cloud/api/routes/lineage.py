"""``/lineage/{artifact_id}``: dataset → run → model version → compile → artifact → devices."""

from __future__ import annotations

from fastapi import APIRouter

from cloud.api.deps import SessionDep, SettingsDep
from cloud.crud import RegistryLineageSource
from cloud.lineage import Lineage, build_lineage

router = APIRouter(prefix="/lineage", tags=["lineage"])


@router.get("/{artifact_id}")
def get_lineage(session: SessionDep, settings: SettingsDep, artifact_id: str) -> Lineage:
    """How an artifact came to be; devices running it when a fleet API is configured."""
    fleet = None
    client = None
    if settings.fleet_url and settings.fleet_api_key is not None:
        from cloud.lineage import FleetDeviceSource
        from fleet.sdk import FleetClient

        client = FleetClient(settings.fleet_url, settings.fleet_api_key.get_secret_value())
        fleet = FleetDeviceSource(client)
    try:
        return build_lineage(artifact_id, RegistryLineageSource(session), fleet)
    finally:
        if client is not None:
            client.close()
