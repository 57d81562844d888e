"""The deployment executor: drives the pure planner (:mod:`fleet.rollout`) from the database.

A background thread wakes every ``interval`` seconds (0.5 by default) and

1. drains the messages the MQTT callback enqueued (it does nothing else, STYLE rule 12):
   ``JobUpdate``s (``all_devices("jobs/update")``), heartbeats (``all_devices("heartbeat")``,
   stored as the device's report and turned into a :class:`~fleet.rollout.HealthReport` per
   deployment by :func:`fleet.rollout.health_from_latency`) and presence
   (``all_devices("status")``, the device's online flag);
2. for every active deployment: feeds its job updates to :func:`~fleet.rollout.apply_update`,
   calls :func:`~fleet.rollout.step`, saves the new state (conditional on the row's version;
   a save that lost a race to the API is retried on the next tick with the same updates);
3. carries out the actions, after the commit: those ``step`` returned and those operator
   commands left in the deployment's outbox.

Actions:

* ``StartJob``: grant the device the artifact and publish a ``JobNotify`` (kind ``deploy``,
  the planner's job id, retained, QoS 1) with :func:`fleet.jobs.publish_job`; the device's
  desired artifact of the model becomes the variant.
* ``RollbackDevice``: the same with kind ``rollback`` and the previous artifact.
* ``CancelJob``: agents cannot cancel a job mid-activation and the protocol has no cancel
  message; the planner has already marked the job CANCELED and ignores its later results,
  so the executor only logs it. The retained notify stays: an agent that reconnects may still
  run the job, which then shows in its reported state (``GET /devices/{id}/state``).
* ``CannotRollback``, ``Abort``, ``Pause``, ``Complete``: logged (the state says it all).

A failed publish is logged; the planner's job timeout (``job_timeout_s``) then judges the job.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Engine
from sqlmodel import Session

from agent import protocol
from agent.protocol import Heartbeat, JobUpdate, Status
from fleet import crud, deployments, rollout
from fleet.api.metrics import ApiMetrics
from fleet.jobs import Publisher, publish_job
from fleet.models import Deployment
from fleet.responder import BrokerConfig, BrokerError, MqttSession
from fleet.rollout import (
    Action,
    CancelJob,
    DeviceJob,
    HealthReport,
    RollbackDevice,
    RolloutError,
    StartJob,
)
from fleet.store import ArtifactStore, StoreError

log = logging.getLogger(__name__)

SUBSCRIPTIONS = (
    protocol.all_devices("jobs/update"),
    protocol.all_devices("heartbeat"),
    protocol.all_devices("status"),
)


class Connection(Protocol):
    """What the executor starts and stops with itself (an ``MqttSession``)."""

    def start(self, *, timeout: float | None = 10.0) -> None: ...

    def stop(self) -> None: ...


class _NotConnected:
    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float
    ) -> None:
        raise BrokerError(f"the executor has no broker connection to publish {topic!r}")


class Executor:
    """Steps active deployments and carries out their actions; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        *,
        store: ArtifactStore,
        publisher: Publisher | None = None,
        connection: Connection | None = None,
        clock: Callable[[], float] = time.time,
        interval: float = 0.5,
        publish_timeout: float = 10.0,
    ) -> None:
        """Configure; :meth:`start` runs the loop in a thread, :meth:`tick` runs one pass."""
        self.engine = engine
        self.store = store
        self.metrics: ApiMetrics | None = None
        self.publisher: Publisher = publisher if publisher is not None else _NotConnected()
        self.connection = connection
        self.clock = clock
        self.interval = interval
        self.publish_timeout = publish_timeout
        self._inbox: deque[tuple[str, bytes]] = deque(maxlen=100_000)
        self._updates: list[JobUpdate] = []
        self._heartbeats: dict[str, Heartbeat] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.performed: deque[Action] = deque(maxlen=1000)
        self.errors = 0

    # network thread --------------------------------------------------------

    def enqueue(self, topic: str, payload: bytes) -> None:
        """Queue one raw message (the only thing the MQTT callback does)."""
        self._inbox.append((topic, payload))

    def on_message(self, message: Any) -> None:
        """An ``MqttSession`` ``on_message`` callback."""
        self.enqueue(message.topic, bytes(message.payload))

    # lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (if a connection was given) and start the loop."""
        if self.connection is not None:
            self.connection.start(timeout=None)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="deployment-executor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (waiting up to ``timeout``) and disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.connection is not None:
            self.connection.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:
                self.errors += 1
                log.exception("deployment executor tick failed; trying again")

    # one pass ---------------------------------------------------------------

    def tick(self) -> None:
        """Ingest queued messages, step every active deployment, carry out the actions."""
        now = self.clock()
        heartbeats, statuses = self._ingest()
        if heartbeats or statuses:
            self._record_reports(heartbeats, statuses)
        updates, self._updates = self._updates, []
        with Session(self.engine) as session:
            ids = [d.id for d in deployments.active_deployments(session)]
        for deployment_id in ids:
            self._advance(deployment_id, updates, now=now)

    def _ingest(self) -> tuple[dict[str, Heartbeat], dict[str, Status]]:
        heartbeats: dict[str, Heartbeat] = {}
        statuses: dict[str, Status] = {}
        while self._inbox:
            topic, payload = self._inbox.popleft()
            try:
                device_id, leaf = protocol.parse_device_topic(topic)
                message: JobUpdate | Heartbeat | Status
                if leaf == "jobs/update":
                    message = protocol.decode(JobUpdate, payload)
                elif leaf == "heartbeat":
                    message = protocol.decode(Heartbeat, payload)
                elif leaf == "status":
                    if not payload:
                        continue  # a cleared retained status
                    message = protocol.decode(Status, payload)
                else:
                    continue
                if message.device_id != device_id:
                    raise protocol.ProtocolError(
                        f"message names device {message.device_id!r} but came from {device_id!r}"
                    )
            except protocol.ProtocolError as err:
                log.warning("dropping message on %s: %s", topic, err)
                continue
            if isinstance(message, JobUpdate):
                self._updates.append(message)
            elif isinstance(message, Heartbeat):
                heartbeats[device_id] = message
                self._heartbeats[device_id] = message
            else:
                statuses[device_id] = message
        return heartbeats, statuses

    def _record_reports(
        self, heartbeats: Mapping[str, Heartbeat], statuses: Mapping[str, Status]
    ) -> None:
        seen = datetime.now(UTC)
        with Session(self.engine) as session:
            for device_id in sorted(set(heartbeats) | set(statuses)):
                device = crud.find_device(session, device_id=device_id)
                if device is None:
                    continue
                report = deployments.ensure_report(
                    session, org_id=device.org_id, device_id=device_id
                )
                report.last_seen = seen
                if (beat := heartbeats.get(device_id)) is not None:
                    report.heartbeat = beat.model_dump(mode="json")
                    report.reported_models = [m.model_dump(mode="json") for m in beat.models]
                    report.online = True
                if (status := statuses.get(device_id)) is not None:
                    report.online = status.state == "online"
            session.commit()

    def _health(
        self, deployment: Deployment, device_ids: Mapping[str, object]
    ) -> dict[str, HealthReport]:
        health: dict[str, HealthReport] = {}
        for device_id in device_ids:
            beat = self._heartbeats.get(device_id)
            if beat is None or deployment.model_name not in beat.inference:
                continue
            artifact = next(
                (
                    m.artifact_id
                    for m in beat.models
                    if m.name == deployment.model_name and m.role == "primary"
                ),
                None,
            )
            shadow = beat.shadow.get(deployment.model_name)
            health[device_id] = rollout.health_from_latency(
                beat.inference[deployment.model_name],
                artifact_id=artifact,
                shadow_disagreement=shadow.disagreement if shadow is not None else None,
            )
        return health

    def _advance(self, deployment_id: uuid.UUID, updates: list[JobUpdate], *, now: float) -> None:
        with Session(self.engine) as session:
            deployment = session.get(Deployment, deployment_id)
            if deployment is None:
                return
            state = deployments.load_state(deployment.state)
            prefix = f"{state.rollout_id}."
            mine = [u for u in updates if u.job_id.startswith(prefix)]
            for update in mine:
                before = state.devices.get(update.device_id)
                try:
                    state = rollout.apply_update(state, update, now=now)
                except RolloutError as err:
                    log.warning("dropping job update of %s: %s", update.device_id, err)
                    continue
                self._observe_job(before, update, now=now)
            state, stepped = rollout.step(
                state, now=now, health=self._health(deployment, state.devices)
            )
            actions = [deployments.load_action(a) for a in deployment.outbox] + stepped
            model_name = deployment.model_name
            try:
                deployments.save(session, deployment=deployment, state=state, outbox=[])
                session.commit()
            except deployments.StaleDeploymentError:
                session.rollback()
                self._updates.extend(mine)  # re-read and re-apply on the next tick
                return
        desired: dict[str, str] = {}
        for action in actions:
            sent = self._perform(action, model_name=model_name)
            if sent is not None:
                desired[sent[0]] = sent[1]
        if desired:
            self._set_desired(desired, model_name)

    def _observe_job(self, before: DeviceJob | None, update: JobUpdate, *, now: float) -> None:
        if self.metrics is None or before is None or not update.state.terminal:
            return
        run = before.rollback if update.job_id.endswith(".rollback") else before.deploy
        if run is not None and run.job_id == update.job_id and not run.state.terminal:
            self.metrics.observe_job(outcome=update.state.value, seconds=now - run.started_at)

    # actions ---------------------------------------------------------------

    def _perform(self, action: Action, *, model_name: str) -> tuple[str, str] | None:
        """Carry out one action; returns (device, artifact) when a job was sent."""
        self.performed.append(action)
        if isinstance(action, StartJob | RollbackDevice):
            kind = "deploy" if isinstance(action, StartJob) else "rollback"
            artifact_id = (
                action.artifact_id if isinstance(action, StartJob) else action.to_artifact_id
            )
            try:
                publish_job(
                    self.publisher,
                    store=self.store,
                    device_id=action.device_id,
                    artifact_id=artifact_id,
                    job_id=action.job_id,
                    kind=kind,
                    timeout=self.publish_timeout,
                )
            except (BrokerError, StoreError) as err:
                log.error("could not send %s job %s: %s", kind, action.job_id, err)
                return None
            return action.device_id, artifact_id
        elif isinstance(action, CancelJob):
            log.info(
                "job %s of %s canceled (%s); agents cannot cancel a job mid-activation, "
                "so only the fleet's record changes",
                action.job_id,
                action.device_id,
                action.reason,
            )
        else:
            log.info("deployment action: %s", action)
        return None

    def _set_desired(self, desired: dict[str, str], model_name: str) -> None:
        """Record what each device was sent, in one transaction per batch of jobs."""
        with Session(self.engine) as session:
            for device_id, artifact_id in desired.items():
                device = crud.find_device(session, device_id=device_id)
                if device is None:
                    continue
                report = deployments.ensure_report(
                    session, org_id=device.org_id, device_id=device_id
                )
                report.desired_models = {**report.desired_models, model_name: artifact_id}
            session.commit()


def mqtt_executor(config: BrokerConfig, *, engine: Engine, store: ArtifactStore) -> Executor:
    """An executor that subscribes and publishes over one ``MqttSession`` as ``config``'s user
    (the ``fleet`` user)."""
    executor = Executor(engine, store=store)
    session = MqttSession(
        config, role="executor", subscriptions=SUBSCRIPTIONS, on_message=executor.on_message
    )
    executor.publisher = session
    executor.connection = session
    return executor
