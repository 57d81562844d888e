"""The deployment executor: drives the pure planner (:mod:`fleet.rollout`) from the database.

A background thread steps the active deployments **when something happens**, not on a fixed
tick: a message from a device (the MQTT callback enqueues it and wakes the thread; it does
nothing else, STYLE rule 12), an operator command or a new deployment (the API calls
:meth:`Executor.wake` after its commit), or the next timer of a deployment
(:func:`fleet.rollout.next_due`: a job timeout, the end of an observe window, the rate
schedule's next minute). ``interval`` (5 s) only bounds the sleep, for changes made by
another process. Passes are coalesced while messages keep arriving: the next pass waits as
long as each 10 ms brings more messages, at most as long as the last pass took (at most
0.25 s), so a stream is handled in batches and the MQTT network thread, which shares the GIL,
gets time to move it; when the stream stops the pass starts at once. Each pass
(:meth:`Executor.tick`):

1. drains the queued messages: ``JobUpdate``s (``all_devices("jobs/update")``), heartbeats
   (``all_devices("heartbeat")``, stored as the device's report and turned into a
   :class:`~fleet.rollout.HealthReport` per deployment by :func:`fleet.rollout.health_from_latency`,
   with the device's latest posted drift score, :mod:`fleet.drift`) and presence
   (``all_devices("status")``, the device's online flag); everything that arrived while the
   previous pass ran is handled in one batch;
2. for every active deployment: feeds its job updates to :func:`~fleet.rollout.apply_update`,
   calls :func:`~fleet.rollout.step`, saves the new state (conditional on the row's version;
   a save that lost a race to the API is retried at once with the same updates). The state
   is **incremental**: the executor keeps the state it saved last with the row's version and
   reads the row without its state column while the version is still its own (a command
   from the API, or another process, moves it on: then the row is read whole); a save dumps
   only the jobs that changed (:class:`~fleet.deployments.StateDumper`), and a pass that
   changed nothing and has nothing to do saves nothing;
3. carries out the actions, after the commit, **a batch at a time**: those ``step`` returned
   and those operator commands left in the deployment's outbox.

Actions:

* ``StartJob`` / ``RollbackDevice``: grant the devices the artifact (one entitlement write per
  artifact and batch, :meth:`~fleet.store.ArtifactStore.grant_many`) and publish each a
  ``JobNotify`` (kind ``deploy`` or ``rollback``, the planner's job id, retained, QoS 1),
  pipelined: all are handed to the client at once (``publish_async``; up to 64 QoS 1
  publishes in flight) and the pass goes on without waiting; the device's desired artifact
  of the model becomes the variant (one batched UPDATE per batch) while the PUBACKs come in.
  Later passes judge them; one not acknowledged within ``publish_timeout`` has failed.
* ``CancelJob``: publish the job again with ``cancel`` set, retained in its place
  (docs/protocol.md): the agent stops it unless it already activated, and reports
  CANCELED (or the result it had reached; the planner ignores results of a canceled job).
* ``CannotRollback``, ``Abort``, ``Pause``, ``Complete``: logged (the state says it all).

A publish that is refused or not acknowledged in time is logged, its new grant withdrawn and
its desired state undone; the planner's job timeout (``job_timeout_s``) then judges the job.
A publisher without ``publish_async`` (a plain :class:`~fleet.jobs.Publisher`) is used one
acknowledged publish after another.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Engine
from sqlalchemy.orm import defer
from sqlmodel import Session, select

from agent import protocol
from agent.protocol import Heartbeat, JobUpdate, Status
from fleet import deployments, drift, rollout
from fleet.api.metrics import ApiMetrics
from fleet.jobs import Publisher, build_job
from fleet.models import Deployment
from fleet.responder import BrokerConfig, BrokerError, MqttSession
from fleet.rollout import (
    Action,
    CancelJob,
    DeviceJob,
    HealthReport,
    RollbackDevice,
    RolloutState,
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


class PendingPublish(Protocol):
    """A publish handed over without waiting (``publish_async``; ``responder.Outgoing``)."""

    failure: str | None

    def settled(self) -> bool: ...

    def wait(self, timeout: float) -> str | None: ...


class _NotConnected:
    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float
    ) -> None:
        raise BrokerError(f"the executor has no broker connection to publish {topic!r}")


_MIN_SLEEP = 0.005
_MAX_COALESCE_S = 0.25
_QUIET_S = 0.01


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
        interval: float = 5.0,
        publish_timeout: float = 10.0,
    ) -> None:
        """Configure; :meth:`start` runs the loop in a thread, :meth:`tick` runs one pass.

        Args:
            engine: the fleet database.
            store: artifacts and entitlements.
            publisher: sends jobs (an ``MqttSession``; with ``publish_async``, a batch is
                pipelined and never waited for in a pass).
            connection: started and stopped with the executor.
            clock: the planner's time.
            interval: the longest sleep between passes when nothing wakes the thread (picks
                up changes made by another process).
            publish_timeout: seconds to wait for a batch's acknowledgements.
        """
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
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.performed: deque[Action] = deque(maxlen=1000)
        self.errors = 0
        self.passes = 0
        self.publish_failures = 0
        self._unacked: list[_Unacked] = []
        self._states: dict[uuid.UUID, _Cached] = {}
        self.skipped_saves = 0

    # network thread / API ----------------------------------------------------

    def enqueue(self, topic: str, payload: bytes) -> None:
        """Queue one raw message and wake the loop (all the MQTT callback does)."""
        self._inbox.append((topic, payload))
        self._wake.set()

    def on_message(self, message: Any) -> None:
        """An ``MqttSession`` ``on_message`` callback."""
        self.enqueue(message.topic, bytes(message.payload))

    def wake(self) -> None:
        """Step the deployments now (a deployment was created or commanded)."""
        self._wake.set()

    # lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (if a connection was given) and start the loop."""
        if self.connection is not None:
            self.connection.start(timeout=None)
        self._stop.clear()
        self._wake.set()
        self._thread = threading.Thread(target=self._run, name="deployment-executor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (waiting up to ``timeout``) and disconnect."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.connection is not None:
            self.connection.stop()

    def _run(self) -> None:
        due: float | None = None
        took = 0.0
        while not self._stop.is_set():
            sleep = self.interval
            if due is not None:
                sleep = min(sleep, max(_MIN_SLEEP, due - self.clock()))
            ended = time.monotonic()
            self._wake.wait(sleep)
            # Coalesce while a stream of messages is still arriving: wait in steps of
            # _QUIET_S for as long as each step brings more, at most as long as the last pass
            # took (capped), so a burst is handled in batches and the MQTT network thread
            # (which shares the GIL) gets time to move it; once the stream stops (the last
            # job updates of a wave), the pass starts within _QUIET_S instead of waiting out
            # the whole budget.
            budget_end = ended + min(took, _MAX_COALESCE_S)
            while not self._stop.is_set():
                rest = budget_end - time.monotonic()
                if rest <= 0:
                    break
                before = len(self._inbox)
                self._stop.wait(min(_QUIET_S, rest))
                if len(self._inbox) == before:
                    break
            self._wake.clear()
            if self._stop.is_set():
                break
            started = time.monotonic()
            try:
                due = self.tick()
            except Exception:
                self.errors += 1
                due = None
                log.exception("deployment executor pass failed; trying again")
            took = time.monotonic() - started

    # one pass ---------------------------------------------------------------

    def tick(self) -> float | None:
        """Ingest queued messages, step every active deployment, carry out the actions.

        Returns:
            When (on ``clock``) the next timer of an active deployment falls due, if any.
        """
        self.passes += 1
        now = self.clock()
        heartbeats, statuses = self._ingest()
        if heartbeats or statuses:
            self._record_reports(heartbeats, statuses)
        updates, self._updates = self._updates, []
        with Session(self.engine) as session:
            ids = [d.id for d in deployments.active_deployments(session)]
        dues = []
        for deployment_id in ids:
            for _ in range(3):  # a save that lost a race to the API: re-read, re-apply
                done, due = self._advance(deployment_id, updates, now=now)
                if done:
                    break
            if due is not None:
                dues.append(due)
        if (ack_due := self._settle(now=self.clock())) is not None:
            dues.append(ack_due)
        return min(dues, default=None)

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
        reports: dict[str, dict[str, Any]] = {}
        for device_id in set(heartbeats) | set(statuses):
            columns: dict[str, Any] = {"last_seen": seen}
            if (beat := heartbeats.get(device_id)) is not None:
                columns["heartbeat"] = beat.model_dump(mode="json")
                columns["reported_models"] = [m.model_dump(mode="json") for m in beat.models]
                columns["online"] = True
            if (status := statuses.get(device_id)) is not None:
                columns["online"] = status.state == "online"
            reports[device_id] = columns
        with Session(self.engine, autoflush=False) as session:
            deployments.record_reports(session, reports=reports)
            session.commit()

    def _health(
        self, session: Session, deployment: Deployment, state: RolloutState
    ) -> dict[str, HealthReport]:
        scores = (
            drift.latest_scores(session, org_id=deployment.org_id, model_name=deployment.model_name)
            if state.policy.health_gates.max_drift is not None
            else {}
        )
        health: dict[str, HealthReport] = {}
        for device_id, job in state.devices.items():
            beat = self._heartbeats.get(device_id)
            score = scores.get((device_id, job.artifact_id))
            drift_score = score.score if score is not None else None
            drift_samples = score.samples if score is not None else None
            if beat is None or deployment.model_name not in beat.inference:
                if score is not None:
                    health[device_id] = HealthReport(
                        samples=0,
                        drift=drift_score,
                        drift_samples=drift_samples,
                        artifact_id=job.artifact_id,
                    )
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
                drift=drift_score,
                drift_samples=drift_samples,
                shadow_disagreement=shadow.disagreement if shadow is not None else None,
            )
        return health

    def _advance(
        self, deployment_id: uuid.UUID, updates: list[JobUpdate], *, now: float
    ) -> tuple[bool, float | None]:
        """Step one deployment; returns (saved, next timer)."""
        with Session(self.engine) as session:
            # The row without its state column: the state of the version this executor saved
            # last is in memory, and only a row another writer moved on is read whole.
            deployment = session.exec(
                select(Deployment)
                .where(Deployment.id == deployment_id)
                .options(defer(Deployment.state))  # type: ignore[arg-type]
            ).first()
            if deployment is None:
                self._states.pop(deployment_id, None)
                return True, None
            cached = self._states.get(deployment_id)
            if cached is not None and cached.version == deployment.version:
                state = cached.state
            else:
                state = deployments.load_state(deployment.state)
                cached = _Cached(deployment.version, state, deployments.StateDumper())
            prefix = f"{state.rollout_id}."
            mine = [u for u in updates if u.job_id.startswith(prefix)]
            jobs_before = state.devices
            state, refused = rollout.apply_updates(state, mine, now=now)
            for update, err in refused:
                log.warning("dropping job update of %s: %s", update.device_id, err)
            dropped = {id(u) for u, _ in refused}
            observed = [(jobs_before.get(u.device_id), u) for u in mine if id(u) not in dropped]
            state, stepped = rollout.step(
                state, now=now, health=self._health(session, deployment, state)
            )
            actions = [deployments.load_action(a) for a in deployment.outbox] + stepped
            model_name = deployment.model_name
            dumped = cached.dumper.dump(state)
            if cached.dumper.unchanged and not actions:
                # Nothing to store or do (a pass woken by heartbeats or another deployment's
                # messages): no rewrite of the whole state; the version stays ours.
                self._states[deployment_id] = _Cached(deployment.version, state, cached.dumper)
                self.skipped_saves += 1
                return True, rollout.next_due(state, now=now)
            try:
                version = deployments.save(
                    session,
                    deployment=deployment,
                    state=state,
                    outbox=[],
                    dumped=dumped,
                )
                session.commit()
            except deployments.StaleDeploymentError:
                session.rollback()
                self._states.pop(deployment_id, None)
                return False, None
            except BaseException:
                self._states.pop(deployment_id, None)
                raise
        if state.phase.final:  # no more passes unless a command (a new version) comes
            self._states.pop(deployment_id, None)
        else:
            self._states[deployment_id] = _Cached(version, state, cached.dumper)
        for before, update in observed:
            self._observe_job(before, update, now=now)
        self._perform_all(actions, state=state, model_name=model_name)
        return True, rollout.next_due(state, now=now)

    def _observe_job(self, before: DeviceJob | None, update: JobUpdate, *, now: float) -> None:
        if self.metrics is None or before is None or not update.state.terminal:
            return
        run = before.rollback if update.job_id.endswith(".rollback") else before.deploy
        if run is not None and run.job_id == update.job_id and not run.state.terminal:
            self.metrics.observe_job(outcome=update.state.value, seconds=now - run.started_at)

    # actions ---------------------------------------------------------------

    def _perform_all(self, actions: list[Action], *, state: RolloutState, model_name: str) -> None:
        """Carry out a batch of actions: grants per artifact, then every publish at once."""
        messages: list[tuple[str, bytes]] = []
        sent: list[tuple[StartJob | RollbackDevice | CancelJob, str]] = []  # per message
        new_grants: dict[str, set[str]] = {}
        jobs = [a for a in actions if isinstance(a, StartJob | RollbackDevice)]
        by_artifact: dict[str, list[str]] = {}
        for job in jobs:
            by_artifact.setdefault(_artifact_of(job), []).append(job.device_id)
        for artifact_id, device_ids in by_artifact.items():
            try:
                new_grants[artifact_id] = self.store.grant_many(device_ids, artifact_id)
            except StoreError as err:
                log.error("could not grant %s to %d devices: %s", artifact_id, len(device_ids), err)
        for action in actions:
            self.performed.append(action)
            if isinstance(action, StartJob | RollbackDevice):
                if _artifact_of(action) not in new_grants:
                    continue
                kind = "deploy" if isinstance(action, StartJob) else "rollback"
                message = self._notify(action.device_id, _artifact_of(action), action.job_id, kind)
            elif isinstance(action, CancelJob):
                log.info(
                    "canceling job %s of %s (%s)", action.job_id, action.device_id, action.reason
                )
                message = self._cancel_notify(action, state)
            else:
                log.info("deployment action: %s", action)
                continue
            if message is not None:
                messages.append(message)
                sent.append((action, _artifact_of_message(action, state)))
        if not messages:
            return
        send_async = getattr(self.publisher, "publish_async", None)
        if send_async is None:  # a plain Publisher: one acknowledged publish after another
            failures = [self._publish_one(topic, payload) for topic, payload in messages]
            desired = {
                a.device_id: artifact
                for (a, artifact), failure in zip(sent, failures, strict=True)
                if failure is None and not isinstance(a, CancelJob)
            }
            previous = self._set_desired(desired, model_name)
            for (action, artifact), failure in zip(sent, failures, strict=True):
                if failure is not None:
                    self._failed(action, artifact, failure, new_grants, previous, model_name)
            return
        # Pipelined: hand every message to the client at once, record the desired state while
        # the acknowledgements come in, and judge them in later passes (never waiting here).
        deadline = self.clock() + self.publish_timeout
        outgoing = [send_async(topic, payload, qos=1, retain=True) for topic, payload in messages]
        desired = {a.device_id: artifact for a, artifact in sent if not isinstance(a, CancelJob)}
        previous = self._set_desired(desired, model_name)
        for (action, artifact), out in zip(sent, outgoing, strict=True):
            self._unacked.append(
                _Unacked(out, action, artifact, deadline, new_grants, previous, model_name)
            )
        self._settle(now=self.clock())

    def _publish_one(self, topic: str, payload: bytes) -> str | None:
        try:
            self.publisher.publish(topic, payload, qos=1, retain=True, timeout=self.publish_timeout)
        except BrokerError as err:
            return str(err)
        return None

    def _settle(self, *, now: float) -> float | None:
        """Judge the pipelined publishes that settled or ran out of time; returns the
        earliest deadline of those still waiting."""
        waiting: list[_Unacked] = []
        for item in self._unacked:
            if item.outgoing.settled():
                failure = item.outgoing.failure
            elif now >= item.deadline:
                failure = item.outgoing.wait(0.0)
            else:
                waiting.append(item)
                continue
            if failure is not None:
                self._failed(
                    item.action,
                    item.artifact_id,
                    failure,
                    item.new_grants,
                    item.previous,
                    item.model_name,
                )
        self._unacked = waiting
        return min((item.deadline for item in waiting), default=None)

    def _failed(
        self,
        action: StartJob | RollbackDevice | CancelJob,
        artifact_id: str,
        failure: str,
        new_grants: Mapping[str, set[str]],
        previous: Mapping[str, str | None],
        model_name: str,
    ) -> None:
        """A job that did not reach the broker: log it, withdraw a grant made for it and the
        desired state recorded for it; the planner's job timeout judges the job."""
        log.error("could not send job %s to %s: %s", action.job_id, action.device_id, failure)
        self.publish_failures += 1
        if isinstance(action, CancelJob):
            return
        if action.device_id in new_grants.get(artifact_id, set()):
            try:
                self.store.revoke(action.device_id, artifact_id)
            except StoreError as err:
                log.error("could not withdraw the grant of %s: %s", action.device_id, err)
        if action.device_id in previous:
            self._set_desired({action.device_id: previous[action.device_id]}, model_name)

    def _notify(
        self, device_id: str, artifact_id: str, job_id: str, kind: str
    ) -> tuple[str, bytes] | None:
        try:
            job = build_job(self.store.get(artifact_id), job_id=job_id, kind=kind)
            return protocol.jobs_notify(device_id), job.to_bytes()
        except (StoreError, protocol.ProtocolError) as err:
            log.error("could not build %s job %s: %s", kind, job_id, err)
            return None

    def _cancel_notify(self, action: CancelJob, state: RolloutState) -> tuple[str, bytes] | None:
        artifact_id = _artifact_of_message(action, state)
        if not artifact_id:
            log.error("job %s of %s: no artifact recorded", action.job_id, action.device_id)
            return None
        kind = "rollback" if action.job_id.endswith(".rollback") else "deploy"
        try:
            cancel = build_job(
                self.store.get(artifact_id), job_id=action.job_id, kind=kind, cancel=True
            )
            return protocol.jobs_notify(action.device_id), cancel.to_bytes()
        except (StoreError, protocol.ProtocolError) as err:
            log.error("could not build the cancel of job %s: %s", action.job_id, err)
            return None

    def _set_desired(
        self, desired: Mapping[str, str | None], model_name: str
    ) -> dict[str, str | None]:
        """Record what each device was sent, in one transaction per batch of jobs; returns
        the previous values."""
        if not desired:
            return {}
        with Session(self.engine, autoflush=False) as session:
            previous = deployments.set_desired(session, model_name=model_name, desired=desired)
            session.commit()
        return previous


@dataclass
class _Cached:
    """The state of a deployment as this executor last saved it (row ``version``)."""

    version: int
    state: RolloutState
    dumper: deployments.StateDumper


@dataclass
class _Unacked:
    """A pipelined job publish waiting for its PUBACK, and what to undo if it fails."""

    outgoing: PendingPublish
    action: StartJob | RollbackDevice | CancelJob
    artifact_id: str
    deadline: float
    new_grants: Mapping[str, set[str]]
    previous: Mapping[str, str | None]
    model_name: str


def _artifact_of(action: StartJob | RollbackDevice) -> str:
    return action.artifact_id if isinstance(action, StartJob) else action.to_artifact_id


def _artifact_of_message(action: Action, state: RolloutState) -> str:
    if isinstance(action, StartJob | RollbackDevice):
        return _artifact_of(action)
    assert isinstance(action, CancelJob)
    job = state.devices.get(action.device_id)
    if job is None:
        return ""
    if action.job_id.endswith(".rollback"):
        return job.previous_artifact_id or ""
    return job.artifact_id


def mqtt_executor(config: BrokerConfig, *, engine: Engine, store: ArtifactStore) -> Executor:
    """An executor that subscribes and publishes over one ``MqttSession`` as ``config``'s user
    (the ``fleet`` user), with up to 64 job publishes in flight (Mosquitto's default cap in
    :func:`fleet.broker.render_config`)."""
    executor = Executor(engine, store=store)
    session = MqttSession(
        config,
        role="executor",
        subscriptions=SUBSCRIPTIONS,
        on_message=executor.on_message,
        max_inflight=64,
    )
    executor.publisher = session
    executor.connection = session
    return executor
