"""The agent's MQTT adapter (paho-mqtt 2.x, MQTT 5 or 3.1.1).

Owns the network thread: connects with a retained "offline" LWT set *before* connecting,
a persistent session (MQTT 5: ``clean_start=False`` + session expiry; 3.1.1, for brokers
without MQTT 5 such as the demo's embedded one: ``clean_session=False``), and reconnects with
exponential backoff and full jitter (``agent.backoff``; paho's own reconnect has no jitter,
so this module drives ``Client.loop`` itself). Callbacks only enqueue; the daemon's worker
thread does the work. Every wait is bounded.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import protocol
from agent.backoff import backoff_delay
from agent.config import BrokerSettings, MqttProtocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inbound:
    """A message taken off the network thread."""

    topic: str
    payload: bytes


@dataclass(frozen=True)
class Connected:
    """The link (re)connected; ``max_packet`` is the broker's limit, if it told us."""

    session_present: bool
    max_packet: int | None


Event = Inbound | Connected


def paho_protocol(version: MqttProtocol) -> MQTTProtocolVersion:
    """paho's protocol constant for a configured MQTT version."""
    return MQTTProtocolVersion.MQTTv5 if version == "5" else MQTTProtocolVersion.MQTTv311


def unshared(topic_filter: str) -> str:
    """The plain filter of a shared subscription (``$share/<group>/<filter>`` -> ``<filter>``);
    any other filter unchanged. MQTT 3.1.1 has no shared subscriptions: a 3.1.1 client
    subscribes to the plain filter and gets every message (so one consumer per group)."""
    if not topic_filter.startswith("$share/"):
        return topic_filter
    parts = topic_filter.split("/", 2)
    if len(parts) < 3 or not parts[1] or not parts[2]:
        raise ValueError(f"malformed shared subscription {topic_filter!r}")
    return parts[2]


def set_tcp_nodelay(client: mqtt.Client) -> None:
    """Turn off Nagle's algorithm on a connected client's socket.

    Chunk requests and PUBACKs are small; with Nagle on (paho's default) each round trip
    waits for the peer's delayed ACK, ~40 ms on Linux, which capped transfers at a few MB/s
    (docs/benchmarks.md).
    """
    sock = client.socket()
    if not isinstance(sock, socket.socket):  # not TCP (a websocket proxy): nothing to tune
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as err:  # a unix-domain socket
        log.debug("TCP_NODELAY not set: %s", err)


class MqttLink:
    """One device's connection to the broker."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        device_id: str,
        agent_version: str,
        events: queue.Queue[Event],
        subscriptions: list[str],
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._device_id = device_id
        self._agent_version = agent_version
        self._events = events
        self._subscriptions = subscriptions
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.connects = 0
        self._client = self._make_client()

    # ------------------------------------------------------------ setup

    def _make_client(self) -> mqtt.Client:
        s = self._settings
        v311 = s.protocol == "3.1.1"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self._device_id,
            protocol=paho_protocol(s.protocol),
            # MQTT 3.1.1's persistent session (MQTT 5 sets clean_start at connect instead).
            clean_session=False if v311 else None,
        )
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls_ca is not None:
            client.tls_set(
                ca_certs=str(s.tls_ca),
                certfile=str(s.tls_cert) if s.tls_cert else None,
                keyfile=str(s.tls_key) if s.tls_key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.will_set(
            protocol.status(self._device_id),
            self._status("offline", "connection lost"),
            qos=1,
            retain=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.max_inflight_messages_set(64)
        client.max_queued_messages_set(1000)
        return client

    def _status(self, state: Literal["online", "offline"], reason: str | None = None) -> bytes:
        return protocol.Status(
            device_id=self._device_id,
            state=state,
            agent_version=self._agent_version,
            reason=reason,
        ).to_bytes()

    # ------------------------------------------------------------ callbacks (network thread)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: Any,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        set_tcp_nodelay(client)
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        client.publish(protocol.status(self._device_id), self._status("online"), qos=1, retain=True)
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties else None
        self.connects += 1
        self._connected.set()
        self._put(Connected(bool(flags.session_present), max_packet))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: Any,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from the broker: %s", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._put(Inbound(message.topic, bytes(message.payload)))

    def _put(self, event: Event) -> None:
        try:
            self._events.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            log.warning("event queue full; dropped a message (%d so far)", self.dropped)

    # ------------------------------------------------------------ network thread

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._settings.session_expiry_s
        return props

    def _run(self) -> None:
        s = self._settings
        attempt = 0
        first = True
        while not self._stop.is_set():
            try:
                if first and s.protocol == "3.1.1":
                    self._client.connect(s.host, s.port, keepalive=s.keepalive_s)
                    first = False
                elif first:
                    self._client.connect(
                        s.host,
                        s.port,
                        keepalive=s.keepalive_s,
                        clean_start=False,
                        properties=self._connect_properties(),
                    )
                    first = False
                else:
                    self._client.reconnect()
            except (OSError, ValueError) as err:
                delay = backoff_delay(
                    attempt, base=s.reconnect_min_s, cap=s.reconnect_max_s, rng=self._rng
                )
                log.info(
                    "connect to %s:%s failed (%s); retrying in %.2f s", s.host, s.port, err, delay
                )
                attempt += 1
                self._stop.wait(delay)
                continue
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.2)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if self._connected.is_set():
                    attempt = 0
            if self._stop.is_set():
                break
            delay = backoff_delay(
                attempt, base=s.reconnect_min_s, cap=s.reconnect_max_s, rng=self._rng
            )
            attempt += 1
            self._stop.wait(delay)

    # ------------------------------------------------------------ public

    def start(self) -> None:
        """Start the network thread (connects in the background)."""
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        """Whether the broker has accepted the connection and it is up."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected or ``timeout`` seconds pass."""
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue a message (paho buffers it while offline, up to its queue limit)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))

    def publish_confirmed(self, topic: str, payload: bytes, *, timeout: float) -> bool:
        """Publish at QoS 1 and wait for the broker's PUBACK; False when offline or none came
        within ``timeout`` seconds (the message may still arrive: the caller re-sends it)."""
        if not self.connected:
            return False
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        try:
            info.wait_for_publish(timeout=timeout)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def stop(self, *, clean: bool = True, timeout: float = 5.0) -> None:
        """Stop; a clean stop publishes a retained 'offline' first and disconnects normally,
        so the broker does not fire the LWT."""
        was_connected = self.connected
        if clean and was_connected:
            info = self._client.publish(
                protocol.status(self._device_id),
                self._status("offline", "stopped"),
                qos=1,
                retain=True,
            )
            try:
                info.wait_for_publish(timeout=timeout)
            except (RuntimeError, ValueError):
                pass
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if clean and was_connected:
            # The network thread has exited; send DISCONNECT from here so the broker
            # discards the will (a normal disconnect never fires the LWT).
            self._client.disconnect()
            for _ in range(5):
                if self._client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                    break
        self._connected.clear()
