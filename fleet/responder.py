"""The chunk responder: answers devices' ``ChunkRequest``s with chunk frames over MQTT.

Responders share the subscription ``protocol.responder_subscription()``, so running more of
them spreads the load (over MQTT 5; a 3.1.1 client, for a broker without MQTT 5, subscribes to
the plain filter, so run one responder per broker then). The device id comes from the topic
(which the broker's ACL ties to the username), never from the payload. The paho network
thread only enqueues; one worker thread decodes, checks the entitlement and publishes frames,
with at most ``window`` frames (and ``window_bytes`` bytes) awaiting their PUBACK.

:func:`plan_chunks` is the pure core (which chunks, which error frames); :class:`MqttSession`
is the small paho adapter that :mod:`fleet.jobs` reuses.

Errors::

    BrokerError (503, exit 1): the broker refused us or did not answer in time
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import protocol
from agent.config import MqttProtocol
from agent.mqtt import paho_protocol, set_tcp_nodelay, unshared
from agent.protocol import ChunkFrame, ChunkRequest, TransferInfo
from fleet.store import Entitlements, StoreError

log = logging.getLogger(__name__)


class BrokerError(Exception):
    """The broker refused the connection, a subscription or a publish, or timed out."""

    http_status = 503
    exit_code = 1


# ---------------------------------------------------------------- pure core


@dataclass(frozen=True)
class ChunkPlan:
    """What to answer to one request: chunks to send and error frames ``(index, reason)``."""

    indices: list[int]
    errors: list[tuple[int, str]] = field(default_factory=list)
    truncated: int = 0


def plan_chunks(request: ChunkRequest, *, count: int, max_chunks: int) -> ChunkPlan:
    """Clamp the request's ranges to ``count`` chunks and cap them at ``max_chunks``.

    A range that starts at or past ``count`` yields one error frame (at its start index); a
    range that only ends past it is clamped. Indices come out in request order, without
    duplicates; those past ``max_chunks`` are counted in ``truncated`` (the device asks again).
    """
    indices: dict[int, None] = {}
    errors: list[tuple[int, str]] = []
    for start, stop in request.ranges:
        if start >= count:
            errors.append(
                (
                    start,
                    f"chunk range [{start}, {stop}) is outside 0..{count - 1} of artifact "
                    f"{request.artifact_id} at chunk size {request.chunk_size}",
                )
            )
            continue
        for index in range(start, min(stop, count)):
            indices[index] = None
    ordered = list(indices)
    return ChunkPlan(
        indices=ordered[:max_chunks],
        errors=errors,
        truncated=max(0, len(ordered) - max_chunks),
    )


# ---------------------------------------------------------------- MQTT adapter


@dataclass(frozen=True)
class BrokerConfig:
    """How to reach the broker."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    client_id: str | None = None
    tls_ca: Path | None = None
    keepalive: int = 30
    protocol: MqttProtocol = "5"
    """"5", or "3.1.1" for a broker without MQTT 5 (the demo's embedded one): a persistent
    session is then ``clean_session=False`` (no expiry of our choosing) and a shared
    subscription ``$share/<group>/<filter>`` becomes the plain ``<filter>``."""


@dataclass
class Outgoing:
    """A publish handed to paho (:meth:`MqttSession.publish_async`): settled once the broker
    acknowledged or refused it, or it could not be sent at all."""

    topic: str
    info: mqtt.MQTTMessageInfo | None
    session: MqttSession = field(repr=False)
    failure: str | None = None
    _checked: bool = field(default=False, repr=False)

    def settled(self) -> bool:
        """Whether the outcome is known (``failure`` is then final)."""
        if self.failure is not None or self._checked:
            return True
        if self.info is None or not self.info.is_published():
            return False
        self._checked = True
        refused = self.session._take_failure(self.info.mid)
        if refused is not None:
            self.failure = f"broker refused the publish to {self.topic!r}: {refused}"
        return True

    def wait(self, timeout: float) -> str | None:
        """Wait up to ``timeout`` to settle; the failure, if any (not acknowledged in time is
        one)."""
        if self.info is not None and not self.settled():
            try:
                self.info.wait_for_publish(max(0.0, timeout))
            except (RuntimeError, ValueError) as err:
                self.failure = f"publish to {self.topic!r} failed: {err}"
        if not self.settled():
            return f"broker did not acknowledge the publish to {self.topic!r} in {timeout:g} s"
        return self.failure


class MqttSession:
    """A paho-mqtt 2.x client (MQTT 5, or 3.1.1 by ``BrokerConfig.protocol``) that reconnects
    by itself with exponential backoff, re-subscribes after every CONNACK, and reports
    readiness and refusals through events.

    Callbacks only set events, record reason codes or call ``on_message`` (which must only
    enqueue).
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        role: str,
        subscriptions: tuple[str, ...] = (),
        on_message: Callable[[mqtt.MQTTMessage], None] | None = None,
        max_reconnect_delay: int = 30,
        session_expiry_s: int | None = None,
        max_inflight: int = 20,
    ) -> None:
        """Configure (but do not connect) a client for ``config``.

        With ``session_expiry_s`` the session is persistent (``clean_start`` false, the
        broker keeps subscriptions and queues QoS 1 messages for that long while we are
        away); that needs a fixed ``config.client_id``. ``max_inflight`` bounds QoS 1
        publishes awaiting their PUBACK (Mosquitto's ``max_inflight_messages`` caps it too).
        """
        if session_expiry_s is not None and config.client_id is None:
            raise ValueError("a persistent session (session_expiry_s) needs a fixed client_id")
        self.config = config
        self.session_expiry_s = session_expiry_s
        if config.protocol == "3.1.1":
            # No shared subscriptions in 3.1.1: every consumer gets every message.
            subscriptions = tuple(unshared(topic) for topic in subscriptions)
        self.subscriptions = subscriptions
        self.client_id = config.client_id or f"edgeloop-{role}-{uuid.uuid4().hex[:12]}"
        self._on_message = on_message
        self._ready = threading.Event()
        self._refused = threading.Event()
        self._refusal = ""
        self._sub_mid: int | None = None
        self._lock = threading.Lock()
        self._failed_publishes: OrderedDict[int, str] = OrderedDict()
        self.max_packet_size: int | None = None
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho_protocol(config.protocol),
            # 3.1.1 sets the session's persistence here; MQTT 5 at connect (clean_start).
            clean_session=(session_expiry_s is None) if config.protocol == "3.1.1" else None,
        )
        client.username_pw_set(config.username, config.password)
        if config.tls_ca is not None:
            client.tls_set(ca_certs=str(config.tls_ca))
        client.reconnect_delay_set(min_delay=1, max_delay=max_reconnect_delay)
        client.max_inflight_messages_set(max_inflight)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_subscribe = self._handle_subscribe
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        self.client = client
        self._started = False

    # callbacks (network thread) ----------------------------------------

    def _handle_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._refuse(
                f"broker refused the connection as {self.config.username!r}: {reason_code}"
            )
            return
        set_tcp_nodelay(client)
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        if not self.subscriptions:
            self._ready.set()
            return
        result, mid = client.subscribe([(topic, 1) for topic in self.subscriptions])
        with self._lock:
            self._sub_mid = mid
        log.info("%s connected; subscribing (rc %s)", self.client_id, result)

    def _handle_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._lock:
            if mid != self._sub_mid:
                return
        refused = [
            f"{topic} ({code})"
            for topic, code in zip(self.subscriptions, reason_codes, strict=False)
            if code.is_failure
        ]
        if refused:
            self._refuse(f"broker refused subscription(s): {', '.join(refused)}")
        else:
            self._ready.set()

    def _handle_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._ready.clear()
        if self._started:
            log.warning(
                "%s disconnected (%s); paho reconnects with backoff", self.client_id, reason_code
            )

    def _handle_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        if reason_code.is_failure:
            with self._lock:
                self._failed_publishes[mid] = str(reason_code)
                while len(self._failed_publishes) > 1024:
                    self._failed_publishes.popitem(last=False)

    def _handle_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        if self._on_message is not None:
            self._on_message(message)

    def _refuse(self, why: str) -> None:
        log.error("%s: %s", self.client_id, why)
        with self._lock:
            self._refusal = why
        self._refused.set()

    # API ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Connected and every subscription acknowledged."""
        return self._ready.is_set()

    def start(self, *, timeout: float | None = 10.0) -> None:
        """Connect in the background; with a ``timeout``, wait until ready.

        Raises:
            BrokerError: refused (bad credentials, ACL), or not ready within ``timeout``.
        """
        self._started = True
        if self.config.protocol == "3.1.1":
            # clean_session was set on the client; 3.1.1 has no properties, no clean_start.
            self.client.connect_async(
                self.config.host, self.config.port, keepalive=self.config.keepalive
            )
        else:
            properties = None
            if self.session_expiry_s is not None:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = self.session_expiry_s
            self.client.connect_async(
                self.config.host,
                self.config.port,
                keepalive=self.config.keepalive,
                clean_start=self.session_expiry_s is None,
                properties=properties,
            )
        self.client.loop_start()
        if timeout is not None:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Wait until connected and subscribed.

        Raises:
            BrokerError: refused, or not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._refused.is_set():
                with self._lock:
                    raise BrokerError(self._refusal)
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"no connection to the broker at {self.config.host}:{self.config.port} "
                    f"within {timeout:g} s (as {self.config.username!r})"
                )

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float
    ) -> None:
        """Publish and wait for the broker's acknowledgement (PUBACK at QoS 1).

        Raises:
            BrokerError: not connected, no acknowledgement within ``timeout``, or the broker
                refused it (e.g. the ACL denies the topic).
        """
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as err:
            raise BrokerError(f"publish to {topic!r} failed: {err}") from err
        if not info.is_published():
            raise BrokerError(
                f"broker did not acknowledge the publish to {topic!r} in {timeout:g} s"
            )
        with self._lock:
            failure = self._failed_publishes.pop(info.mid, None)
        if failure is not None:
            raise BrokerError(f"broker refused the publish to {topic!r}: {failure}")

    def publish_async(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> Outgoing:
        """Hand a publish to paho without waiting for its acknowledgement.

        Up to ``max_inflight`` QoS 1 publishes are on the wire at once; paho queues the rest.
        Ask the returned :class:`Outgoing` whether (and how) it settled.
        """
        try:
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
        except (RuntimeError, ValueError) as err:
            return Outgoing(topic, None, self, f"publish to {topic!r} failed: {err}")
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            return Outgoing(topic, None, self, f"publish to {topic!r} failed: rc {info.rc}")
        return Outgoing(topic, info, self)

    def _take_failure(self, mid: int) -> str | None:
        with self._lock:
            return self._failed_publishes.pop(mid, None)

    def stop(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        if not self._started:
            return
        self._started = False
        self.client.disconnect()
        self.client.loop_stop()
        self._ready.clear()


# ---------------------------------------------------------------- responder


class ChunkSource(Protocol):
    """Where the responder reads artifacts (``fleet.store.ArtifactStore``)."""

    def transfer_info(self, artifact_id: str) -> TransferInfo:
        """sha256 and size of the transfer file; StoreError if unknown."""
        ...

    def read_chunk(self, artifact_id: str, index: int, chunk_size: int) -> bytes:
        """One chunk of the transfer file; StoreError if unknown or out of range."""
        ...


_MAX_INDEX = 2**32 - 1
_STATS = (
    "requests",
    "chunks_sent",
    "bytes_sent",
    "errors",
    "dropped",
    "malformed",
    "publish_failures",
    "failures",
)


class Responder:
    """Serves chunk requests of entitled devices from a :class:`ChunkSource`."""

    def __init__(
        self,
        store: ChunkSource,
        entitlements: Entitlements,
        *,
        host: str,
        port: int,
        username: str,
        password: str,
        client_id: str | None = None,
        max_chunks_per_request: int = 64,
        queue_size: int = 256,
        window: int = 64,
        window_bytes: int = 32 * 1024 * 1024,
        publish_timeout: float = 10.0,
        tls_ca: Path | None = None,
        session_expiry_s: int = 300,
        mqtt_protocol: MqttProtocol = "5",
    ) -> None:
        """Configure a responder; :meth:`start` connects.

        Args:
            store: artifacts to serve.
            entitlements: which device may fetch which artifact.
            host: broker host.
            port: broker port.
            username: broker user (the ``responder`` ACL role).
            password: its password.
            client_id: MQTT client id. Given, the session is persistent: the broker keeps
                the shared subscription and queues the requests that arrive while this
                responder restarts (for ``session_expiry_s``), so none is lost. Default: a
                random id and a clean session (requests sent while it is away are dropped
                when no other responder is subscribed).
            max_chunks_per_request: most chunks answered per request; the rest is ignored.
            queue_size: requests waiting for the worker; more are dropped and counted.
            window: most frames awaiting PUBACK before the worker waits.
            window_bytes: most frame bytes awaiting PUBACK before the worker waits.
            publish_timeout: how long the worker waits for one PUBACK.
            tls_ca: CA bundle; enables TLS.
            session_expiry_s: how long the broker keeps a persistent session (with a
                ``client_id``) after a disconnect (MQTT 5 only; a 3.1.1 broker keeps it as
                long as it is configured to).
            mqtt_protocol: "5", or "3.1.1" for a broker without MQTT 5: the responder then
                subscribes to the plain (unshared) request filter, so it must be the only one.

        Raises:
            ValueError: a limit below 1, naming it.
        """
        for name, value in (
            ("max_chunks_per_request", max_chunks_per_request),
            ("queue_size", queue_size),
            ("window", window),
            ("window_bytes", window_bytes),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.store = store
        self.entitlements = entitlements
        self.max_chunks_per_request = max_chunks_per_request
        self.window = window
        self.window_bytes = window_bytes
        self.publish_timeout = publish_timeout
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=queue_size)
        self._stats = dict.fromkeys(_STATS, 0)
        self._stats_lock = threading.Lock()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._outstanding: deque[tuple[mqtt.MQTTMessageInfo, int]] = deque()
        self._outstanding_bytes = 0
        self.session = MqttSession(
            BrokerConfig(
                host=host,
                port=port,
                username=username,
                password=password,
                client_id=client_id,
                tls_ca=tls_ca,
                protocol=mqtt_protocol,
            ),
            role="responder",
            subscriptions=(protocol.responder_subscription(),),
            on_message=self._enqueue,
            session_expiry_s=session_expiry_s if client_id is not None else None,
        )

    @property
    def stats(self) -> dict[str, int]:
        """Counters: requests, chunks_sent, bytes_sent, errors (error frames sent), dropped
        (queue full or disconnected), malformed, publish_failures, failures (unexpected)."""
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[name] += n

    def _enqueue(self, message: mqtt.MQTTMessage) -> None:
        try:
            self._queue.put_nowait((message.topic, bytes(message.payload)))
        except queue.Full:
            self._count("dropped")

    # lifecycle ---------------------------------------------------------

    def start(self, *, timeout: float | None = 10.0) -> None:
        """Start the worker and connect; with a ``timeout``, wait until subscribed.

        Raises:
            BrokerError: refused or not subscribed within ``timeout`` (the responder is
                stopped again).
        """
        if self._worker is not None:
            raise RuntimeError("responder already started")
        self._stopping.clear()
        self._worker = threading.Thread(
            target=self._work, name=f"{self.session.client_id}-worker", daemon=True
        )
        self._worker.start()
        try:
            self.session.start(timeout=timeout)
        except BrokerError:
            self.stop()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker (after the request in hand), then disconnect."""
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout)
            if self._worker.is_alive():
                log.warning("responder worker did not stop within %g s", timeout)
            self._worker = None
        self.session.stop()

    def serve_forever(self, *, connect_timeout: float = 30.0) -> None:
        """Start, serve until SIGTERM/SIGINT (or :meth:`stop` from another thread), then stop.

        Raises:
            BrokerError: the broker refused us or was unreachable for ``connect_timeout``.
        """
        done = threading.Event()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():

            def on_signal(signum: int, frame: FrameType | None) -> None:
                done.set()

            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            self.start(timeout=connect_timeout)
            log.info("responder %s serving", self.session.client_id)
            while not done.wait(1.0) and not self._stopping.is_set():
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # worker ------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                topic, payload = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._reap(block=False)
                continue
            try:
                self._serve(topic, payload)
            except Exception:  # the worker must survive anything one request does
                log.exception("unexpected failure serving %s", topic)
                self._count("failures")
        self._drain(self.publish_timeout)

    def _connected(self) -> bool:
        """Whether frames can go out, waiting up to ``publish_timeout`` for a reconnect.

        Connected is enough: requests a persistent session queued while we were away
        arrive right after the CONNACK, before the SUBACK of our re-subscription.
        """
        deadline = time.monotonic() + self.publish_timeout
        while not self.session.client.is_connected():
            if self._stopping.is_set() or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _serve(self, topic: str, payload: bytes) -> None:
        try:
            device_id, leaf = protocol.parse_device_topic(topic)
            if leaf != "artifacts/req":
                raise protocol.ProtocolError(f"topic {topic!r} is not an artifacts/req topic")
            request = protocol.decode(ChunkRequest, payload)
        except protocol.ProtocolError as err:
            log.warning("dropping malformed request on %s: %s", topic, err)
            self._count("malformed")
            return
        if not self._connected():
            self._count("dropped")
            return
        self._count("requests")
        data_topic = protocol.artifacts_data(device_id)
        artifact_id = request.artifact_id
        first = request.ranges[0][0]
        if not self.entitlements.is_entitled(device_id, artifact_id):
            self._send_error(
                data_topic,
                artifact_id,
                first,
                f"device {device_id!r} is not entitled to artifact {artifact_id}",
            )
            return
        try:
            info = self.store.transfer_info(artifact_id)
        except StoreError as err:
            self._send_error(data_topic, artifact_id, first, str(err))
            return
        too_big = self._chunk_size_problem(request.chunk_size, data_topic)
        if too_big:
            self._send_error(data_topic, artifact_id, first, too_big)
            return
        count = protocol.chunk_count(info.size, request.chunk_size)
        plan = plan_chunks(request, count=count, max_chunks=self.max_chunks_per_request)
        for index, reason in plan.errors:
            self._send_error(data_topic, artifact_id, index, reason)
        if plan.truncated:
            log.debug(
                "request %s: %d chunk(s) past the cap ignored", request.request_id, plan.truncated
            )
        for index in plan.indices:
            try:
                chunk = self.store.read_chunk(artifact_id, index, request.chunk_size)
            except StoreError as err:
                self._send_error(data_topic, artifact_id, index, str(err))
                return
            frame = ChunkFrame(artifact_id, index, count, chunk).encode()
            if self._send(data_topic, frame):
                self._count("chunks_sent")
                self._count("bytes_sent", len(chunk))

    def _chunk_size_problem(self, chunk_size: int, topic: str) -> str | None:
        limit = self.session.max_packet_size
        if limit is None:
            return None
        try:
            allowed = protocol.max_chunk_size(limit, topic, wanted=chunk_size)
        except protocol.ProtocolError as err:
            return str(err)
        if allowed < chunk_size:
            return (
                f"chunk size {chunk_size} does not fit the broker's maximum packet size "
                f"{limit}; use at most {allowed}"
            )
        return None

    def _send_error(self, topic: str, artifact_id: str, index: int, reason: str) -> None:
        log.info("error frame to %s: %s", topic, reason)
        index = min(index, _MAX_INDEX)  # the frame's index field is a uint32
        if self._send(topic, ChunkFrame.error_frame(artifact_id, index, reason).encode()):
            self._count("errors")

    def _send(self, topic: str, frame: bytes) -> bool:
        info = self.session.client.publish(topic, frame, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))
            self._count("publish_failures")
            return False
        self._outstanding.append((info, len(frame)))
        self._outstanding_bytes += len(frame)
        while len(self._outstanding) > self.window or self._outstanding_bytes > self.window_bytes:
            self._reap(block=True)
        return True

    def _reap(self, *, block: bool) -> None:
        """Forget settled frames; with ``block``, first wait (bounded) for the oldest one."""
        if block and self._outstanding:
            info, size = self._outstanding.popleft()
            self._outstanding_bytes -= size
            try:
                info.wait_for_publish(self.publish_timeout)
                if not info.is_published():
                    log.warning("no PUBACK for frame %d in %g s", info.mid, self.publish_timeout)
                    self._count("publish_failures")
            except (RuntimeError, ValueError) as err:
                log.warning("frame %d was not published: %s", info.mid, err)
                self._count("publish_failures")
        while self._outstanding:
            info, size = self._outstanding[0]
            try:
                if not info.is_published():
                    return
            except (RuntimeError, ValueError) as err:
                log.warning("frame %d was not published: %s", info.mid, err)
                self._count("publish_failures")
            self._outstanding.popleft()
            self._outstanding_bytes -= size

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._outstanding and time.monotonic() < deadline:
            info, size = self._outstanding.popleft()
            self._outstanding_bytes -= size
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                self._count("publish_failures")
