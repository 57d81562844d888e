"""Capture-policy delivery: a model's capture policy into each target device's desired state.

A device has one retained :class:`~agent.protocol.DesiredState` (``desired`` topic) whose
:class:`~agent.protocol.CapturePolicy` covers all its models: ``models`` lists the captured
model names and ``sketches`` holds one :class:`~agent.sketches.SketchSpec` per model name,
the spec of the chosen version's training baseline (so device sketches land on the
baseline's edges). Setting model M's policy for a device therefore keeps the device's other
models (their names and specs) and replaces M's; the device-wide settings (rates, rules,
budgets, interval) are the request's. Disabling M removes it; with no model left the
device's capture is off (``capture: null``).

Each change stores the device's new desired state with ``revision`` one above the last one
stored (:class:`~cloud.dataloop.models.DeviceCapture`), commits, then publishes it retained
at QoS 1 through an injected :class:`DesiredPublisher` (production: :class:`fleet.responder.
MqttSession`). A device that was offline gets the retained message when it reconnects, and
the agent ignores revisions lower than the one it applied. A failed publish is reported per
device; the next change publishes a higher revision with everything stored.

:func:`merge_policy` is the pure core.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sqlmodel import Session

from agent import protocol
from agent.protocol import CapturePolicy, DesiredState
from agent.sketches import SketchSpec
from cloud.baseline import load_baseline
from cloud.dataloop import BrokerUnavailableError
from cloud.dataloop.models import (
    CaptureDeliveriesPublic,
    CaptureDeliveryPublic,
    CapturePolicyRequest,
    DeviceCapture,
)
from cloud.dataloop.monitor import version_for
from cloud.errors import InvalidRequestError
from cloud.models import RegisteredModel
from fleet.models import utcnow

if TYPE_CHECKING:
    from cloud.dataloop.settings import DataloopSettings
    from fleet.responder import MqttSession


class DesiredPublisher(Protocol):
    """Publishes one message and waits for the broker's acknowledgement (``MqttSession``)."""

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float
    ) -> None:
        """Publish; raise (e.g. ``BrokerError``) when not acknowledged within ``timeout``."""
        ...


def merge_policy(
    previous: CapturePolicy | None, request: CapturePolicyRequest, *, model: str, spec: SketchSpec
) -> CapturePolicy | None:
    """The device's new capture policy after setting ``model``'s (None: capture off).

    Keeps the other models of ``previous`` (names and sketch specs), sets or (when the
    request disables capture) removes ``model``, and takes the device-wide settings from
    ``request``.
    """
    models = list(previous.models or []) if previous is not None else []
    sketches = dict(previous.sketches) if previous is not None else {}
    if request.enabled:
        if model not in models:
            models.append(model)
        sketches[model] = spec
    else:
        models = [m for m in models if m != model]
        sketches.pop(model, None)
    if not models:
        return None
    return CapturePolicy(
        enabled=True,
        sample_rate=request.sample_rate,
        rules=request.rules,
        models=sorted(models),
        bytes_per_hour=request.bytes_per_hour,
        max_sample_bytes=request.max_sample_bytes,
        sketch_interval_s=request.sketch_interval_s,
        sketches=sketches,
        batch_size=request.batch_size,
    )


def deliver(
    session: Session,
    publisher: DesiredPublisher,
    *,
    model: RegisteredModel,
    request: CapturePolicyRequest,
    timeout: float = 10.0,
) -> CaptureDeliveriesPublic:
    """Set ``model``'s capture policy on ``request.devices``: store, commit, publish (one
    acknowledged publish after the other, each within ``timeout``).

    Raises:
        NotFoundError: no such version (or the model has none).
        CloudError: the version's baseline file is missing or invalid.
        InvalidRequestError: a desired state would exceed the agent's payload limit.
    """
    version = version_for(session, model=model, version=request.version)
    spec = load_baseline(Path(version.baseline_path)).sketch
    messages: list[tuple[str, bytes]] = []
    revisions: list[tuple[str, int]] = []
    for device_id in request.devices:
        row = session.get(DeviceCapture, device_id)
        previous = None
        if row is not None and row.desired.get("capture") is not None:
            previous = CapturePolicy.model_validate(row.desired["capture"])
        revision = row.revision + 1 if row is not None else 1
        desired = DesiredState(
            revision=revision,
            capture=merge_policy(previous, request, model=model.name, spec=spec),
        )
        payload = desired.to_bytes()
        if len(payload) > protocol.MAX_DESIRED_PAYLOAD:
            raise InvalidRequestError(
                f"the desired state of {device_id!r} would be {len(payload)} bytes; devices "
                f"accept at most {protocol.MAX_DESIRED_PAYLOAD} (capture fewer models there)"
            )
        if row is None:
            row = DeviceCapture(device_id=device_id, revision=revision, desired={})
        row.revision = revision
        row.desired = desired.model_dump(mode="json")
        row.updated_at = utcnow()
        session.add(row)
        messages.append((protocol.desired(device_id), payload))
        revisions.append((device_id, revision))
    session.commit()
    errors: list[str | None] = []
    for topic, payload in messages:
        try:
            publisher.publish(topic, payload, qos=1, retain=True, timeout=timeout)
            errors.append(None)
        except Exception as err:  # BrokerError or a transport's own; reported per device
            errors.append(str(err) or type(err).__name__)
    data = [
        CaptureDeliveryPublic(device_id=d, revision=r, published=e is None, error=e)
        for (d, r), e in zip(revisions, errors, strict=True)
    ]
    return CaptureDeliveriesPublic(
        model=model.name, model_version=version.version, data=data, count=len(data)
    )


def mqtt_publisher(settings: DataloopSettings, *, timeout: float = 10.0) -> MqttSession:
    """A connected MQTT session for publishing desired states (the ``fleet`` broker user).

    Raises:
        BrokerUnavailableError: no broker password configured, or no connection in time.
    """
    from fleet.responder import BrokerConfig, BrokerError, MqttSession

    if settings.broker_password is None:
        raise BrokerUnavailableError(
            "capture policies are delivered over MQTT; set EDGELOOP_DATALOOP_BROKER_PASSWORD "
            "(and _BROKER_HOST, _BROKER_PORT, _BROKER_USERNAME) for the cloud API"
        )
    session = MqttSession(
        BrokerConfig(
            host=settings.broker_host,
            port=settings.broker_port,
            username=settings.broker_username,
            password=settings.broker_password.get_secret_value(),
            tls_ca=settings.broker_tls_ca,
        ),
        role="capture-policy",
    )
    try:
        session.start(timeout=timeout)
    except BrokerError as err:
        session.stop()
        raise BrokerUnavailableError(str(err)) from err
    return session
