"""Deployment jobs until the fleet API exists: publish a ``JobNotify``, watch ``JobUpdate``s.

:func:`build_job` is pure (a stored artifact in, a ``JobNotify`` out); :func:`publish_job`
grants the device the artifact and publishes the job retained at QoS 1, waiting for the
broker's PUBACK; :func:`cancel_job` publishes its cancel in its place; :class:`JobWatcher`
collects every device's job updates.

Errors::

    fleet.responder.BrokerError (503, exit 1): refused, or no PUBACK in time
    JobTimeoutError (504, exit 1): a job did not reach the awaited state in time
    fleet.store.StoreError and subclasses: unknown artifact, malformed ids
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from typing import Literal, Protocol, cast

import paho.mqtt.client as mqtt

from agent import protocol
from agent.protocol import JobNotify, JobState, JobUpdate, ModelVersion
from fleet.responder import BrokerConfig, BrokerError, MqttSession
from fleet.store import ArtifactStore, InvalidRequestError, StoredArtifact

log = logging.getLogger(__name__)

JobKind = Literal["deploy", "rollback", "retire"]
_KINDS: tuple[JobKind, ...] = ("deploy", "rollback", "retire")
_ROLES = ("primary", "candidate", "shadow")


class JobTimeoutError(TimeoutError):
    """A job did not reach one of the awaited states in time."""

    http_status = 504
    exit_code = 1


class Publisher(Protocol):
    """Publishes one message and waits for the broker's acknowledgement."""

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float
    ) -> None:
        """Publish; raise BrokerError if it is not acknowledged within ``timeout``."""
        ...


def build_job(
    stored: StoredArtifact,
    *,
    job_id: str | None = None,
    kind: str = "deploy",
    role: str = "primary",
    traffic_fraction: float = 0.1,
    cancel: bool = False,
) -> JobNotify:
    """The ``JobNotify`` that deploys (or rolls back to) a stored artifact; with ``cancel``,
    the one that withdraws that job.

    Raises:
        InvalidRequestError: unknown ``kind`` or ``role``, a fraction outside [0, 1], or a
            malformed ``job_id``.
    """
    if kind not in _KINDS:
        raise InvalidRequestError(f"job kind {kind!r} is unknown; choose from: {', '.join(_KINDS)}")
    if role not in _ROLES:
        raise InvalidRequestError(f"job role {role!r} is unknown; choose from: {', '.join(_ROLES)}")
    if not 0.0 <= traffic_fraction <= 1.0:
        raise InvalidRequestError(f"traffic fraction {traffic_fraction} is not in [0, 1]")
    job_id = job_id or f"{kind}-{uuid.uuid4().hex}"
    if not 1 <= len(job_id) <= 128:
        raise InvalidRequestError(f"job id {job_id!r} must be 1-128 characters long")
    return JobNotify(
        job_id=job_id,
        kind=kind,
        role=cast(Literal["primary", "candidate", "shadow"], role),
        traffic_fraction=traffic_fraction,
        artifact_id=stored.artifact_id,
        model=ModelVersion(name=stored.model.name, version=stored.model.version),
        profile=stored.profile,
        signature=stored.signature_b64,
        transfer=stored.transfer,
        cancel=cancel,
    )


def publish_job(
    publisher: Publisher | BrokerConfig,
    *,
    store: ArtifactStore,
    device_id: str,
    artifact_id: str,
    job_id: str | None = None,
    kind: str = "deploy",
    role: str = "primary",
    traffic_fraction: float = 0.1,
    timeout: float = 10.0,
) -> JobNotify:
    """Grant ``device_id`` the artifact and publish the job to it (retained, QoS 1).

    Args:
        publisher: a connected :class:`Publisher` (e.g. a started ``MqttSession``), or the
            broker to connect to for this one publish.
        store: the artifact store (and its entitlements).
        device_id: the target device.
        artifact_id: a stored artifact.
        job_id: default ``<kind>-<random hex>``.
        kind: ``deploy``, ``rollback`` or ``retire`` (stop a candidate or shadow).
        role: ``primary``, ``candidate`` (A/B split) or ``shadow``.
        traffic_fraction: share of requests a candidate answers.
        timeout: seconds to connect and to wait for the PUBACK, each.

    Returns:
        The published job.

    Raises:
        InvalidRequestError: malformed device id, job id or kind.
        ArtifactNotFoundError: the artifact is not stored.
        BrokerError: not connected, refused, or not acknowledged in time (a grant made
            for this job is withdrawn again).
    """
    try:
        topic = protocol.jobs_notify(device_id)
    except protocol.ProtocolError as err:
        raise InvalidRequestError(str(err)) from err
    job = build_job(
        store.get(artifact_id),
        job_id=job_id,
        kind=kind,
        role=role,
        traffic_fraction=traffic_fraction,
    )
    had_grant = store.is_entitled(device_id, artifact_id)
    store.grant(device_id, artifact_id)
    try:
        if isinstance(publisher, BrokerConfig):
            session = MqttSession(publisher, role="jobs")
            try:
                session.start(timeout=timeout)
                session.publish(topic, job.to_bytes(), qos=1, retain=True, timeout=timeout)
            finally:
                session.stop()
        else:
            publisher.publish(topic, job.to_bytes(), qos=1, retain=True, timeout=timeout)
    except BrokerError:
        if not had_grant:
            store.revoke(device_id, artifact_id)
        raise
    log.info("published %s job %s of %s to %s", job.kind, job.job_id, artifact_id, device_id)
    return job


def cancel_job(
    publisher: Publisher | BrokerConfig,
    *,
    store: ArtifactStore,
    device_id: str,
    artifact_id: str,
    job_id: str,
    kind: str = "deploy",
    timeout: float = 10.0,
) -> JobNotify:
    """Withdraw a job: publish it again with ``cancel`` set, retained in its place.

    The agent stops the job unless it already activated it and reports CANCELED (or the
    result the job reached); a device that never saw the job records it canceled.

    Raises:
        InvalidRequestError: malformed device id, job id or kind.
        ArtifactNotFoundError: the artifact is not stored.
        BrokerError: not connected, refused, or not acknowledged in time.
    """
    try:
        topic = protocol.jobs_notify(device_id)
    except protocol.ProtocolError as err:
        raise InvalidRequestError(str(err)) from err
    job = build_job(store.get(artifact_id), job_id=job_id, kind=kind, cancel=True)
    if isinstance(publisher, BrokerConfig):
        session = MqttSession(publisher, role="jobs")
        try:
            session.start(timeout=timeout)
            session.publish(topic, job.to_bytes(), qos=1, retain=True, timeout=timeout)
        finally:
            session.stop()
    else:
        publisher.publish(topic, job.to_bytes(), qos=1, retain=True, timeout=timeout)
    log.info("published the cancel of job %s to %s", job_id, device_id)
    return job


def _states(states: Iterable[JobState | str]) -> frozenset[JobState]:
    chosen = set()
    for state in states:
        try:
            chosen.add(JobState(state))
        except ValueError:
            choices = ", ".join(s.value for s in JobState)
            raise InvalidRequestError(
                f"job state {state!r} is unknown; choose from: {choices}"
            ) from None
    return frozenset(chosen)


class JobWatcher:
    """Collects ``JobUpdate``s of every device (as the ``fleet`` user); thread-safe.

    The network thread only appends raw messages; they are decoded by whoever reads.
    Updates whose ``device_id`` differs from the topic's are dropped as malformed.
    """

    def __init__(self, config: BrokerConfig, *, max_updates: int = 10_000) -> None:
        """Configure; :meth:`start` connects and subscribes."""
        self._cond = threading.Condition()
        self._raw: deque[tuple[str, bytes]] = deque(maxlen=max_updates)
        self._updates: deque[JobUpdate] = deque(maxlen=max_updates)
        self._malformed = 0
        self.session = MqttSession(
            config,
            role="job-watcher",
            subscriptions=(protocol.all_devices("jobs/update"),),
            on_message=self._enqueue,
        )

    def _enqueue(self, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._raw.append((message.topic, bytes(message.payload)))
            self._cond.notify_all()

    def __enter__(self) -> JobWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, timeout: float = 10.0) -> None:
        """Connect and wait until subscribed.

        Raises:
            BrokerError: refused, or not subscribed within ``timeout``.
        """
        try:
            self.session.start(timeout=timeout)
        except BrokerError:
            self.session.stop()
            raise

    def stop(self) -> None:
        """Disconnect."""
        self.session.stop()

    def _ingest(self) -> None:
        while self._raw:
            topic, payload = self._raw.popleft()
            try:
                device_id, _ = protocol.parse_device_topic(topic)
                update = protocol.decode(JobUpdate, payload)
                if update.device_id != device_id:
                    raise protocol.ProtocolError(
                        f"update names device {update.device_id!r} but came from {device_id!r}"
                    )
            except protocol.ProtocolError as err:
                log.warning("dropping job update on %s: %s", topic, err)
                self._malformed += 1
                continue
            self._updates.append(update)

    @property
    def malformed(self) -> int:
        """Job updates dropped because they did not parse or lied about their device."""
        with self._cond:
            self._ingest()
            return self._malformed

    def updates(self, job_id: str | None = None) -> list[JobUpdate]:
        """Updates received so far (of one job, if given), in arrival order."""
        with self._cond:
            self._ingest()
            return [u for u in self._updates if job_id is None or u.job_id == job_id]

    def wait_for(
        self,
        job_id: str,
        states: Iterable[JobState | str],
        timeout: float,
        *,
        device_id: str | None = None,
    ) -> JobUpdate:
        """Wait until an update of ``job_id`` (from ``device_id``, if given) is in ``states``.

        Returns:
            The first such update.

        Raises:
            InvalidRequestError: a state that is not a JobState.
            JobTimeoutError: none arrived within ``timeout`` seconds (names the last state seen).
        """
        wanted = _states(states)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._ingest()
                seen = [
                    u
                    for u in self._updates
                    if u.job_id == job_id and (device_id is None or u.device_id == device_id)
                ]
                for update in seen:
                    if update.state in wanted:
                        return update
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    last = seen[-1].state.value if seen else "no update"
                    raise JobTimeoutError(
                        f"job {job_id!r} did not reach {', '.join(sorted(wanted))} within "
                        f"{timeout:g} s; last seen: {last}"
                    )
                self._cond.wait(remaining)
