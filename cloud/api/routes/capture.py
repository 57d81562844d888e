"""``/capture-policies``: set a model's capture policy on devices (published retained to each
device's ``desired`` topic with a higher revision) and read a device's desired state.

The publisher is ``app.state.capture_publisher`` when set (tests, embedding); otherwise an
MQTT session from ``EDGELOOP_DATALOOP_BROKER_*`` is opened on first use (503 without one).
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request

from cloud.api.deps import ModelDep, SessionDep
from cloud.dataloop.models import (
    CaptureDeliveriesPublic,
    CapturePolicyRequest,
    DeviceCapture,
    DeviceCapturePublic,
)
from cloud.dataloop.policy import DesiredPublisher, deliver, mqtt_publisher
from cloud.errors import NotFoundError

router = APIRouter(prefix="/capture-policies", tags=["capture"])
_publisher_lock = threading.Lock()


def get_publisher(request: Request) -> DesiredPublisher:
    """The app's desired-state publisher, connected on first use."""
    with _publisher_lock:
        publisher: DesiredPublisher | None = getattr(request.app.state, "capture_publisher", None)
        if publisher is None:
            from cloud.dataloop.settings import DataloopSettings

            publisher = mqtt_publisher(DataloopSettings())
            request.app.state.capture_publisher = publisher
        return publisher


PublisherDep = Annotated[DesiredPublisher, Depends(get_publisher)]


@router.put("/{name}")
def put_capture_policy(
    session: SessionDep, model: ModelDep, publisher: PublisherDep, body: CapturePolicyRequest
) -> CaptureDeliveriesPublic:
    """Capture (or stop capturing, ``enabled: false``) the model on the devices, sketching on
    the chosen version's baseline; per device the revision published and any error."""
    return deliver(session, publisher, model=model, request=body)


@router.get("/devices/{device_id}")
def get_device_capture(
    session: SessionDep, device_id: Annotated[str, Path(max_length=64)]
) -> DeviceCapturePublic:
    """The desired state last published to a device."""
    row = session.get(DeviceCapture, device_id)
    if row is None:
        raise NotFoundError(
            f"no capture policy was ever set for device {device_id!r}; set one with "
            "PUT /capture-policies/{model}"
        )
    return DeviceCapturePublic.model_validate(row)
