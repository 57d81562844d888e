"""An embedded MQTT 3.1.1 broker (amqtt 0.12) for ``edgeloop demo`` without Mosquitto.

amqtt is a pure-Python asyncio broker; 0.12.1 speaks MQTT 3.1.1 only (it refuses protocol
level 5) and has no shared subscriptions, so its clients run in 3.1.1 mode (``protocol =
"3.1.1"``; docs/protocol.md). What it gives the loop, checked in tests/test_demo_broker.py:
retained messages, QoS 1, persistent sessions (``clean_session=False``: subscriptions kept,
QoS 1 messages queued while the client is away), the retained LWT.

This module adds what the fleet's Mosquitto setup has and amqtt lacks:

* :class:`PasswordFileAuth`: logins from the fleet's Mosquitto password file (``$7$``
  PBKDF2-SHA512 hashes, :func:`fleet.broker_auth.mosquitto_hash`), re-read whenever the file
  changes, so ``MosquittoPasswordFile`` registers devices here unchanged;
* :class:`AclPlugin`: the fleet's Mosquitto ACL file (:func:`fleet.broker.render_acl`:
  ``user``/``topic``/``pattern`` with ``%u``) for subscribe, publish and delivery;
* :class:`EdgeloopBroker`: amqtt 0.12.1 sends a connecting client the retained messages of
  *every* filter any client subscribed to (``Broker._handle_client_session``), e.g. one
  device's retained job and desired state to another; this subclass sends a session only
  those of its own subscriptions, at the QoS it was granted.

What stays reduced (it is a demo broker): no persistence across a broker restart, no
disconnect of an open session whose login was removed (a removed login only stops the next
connect), a publish the ACL denies is acknowledged and dropped (MQTT 3.1.1 has no reason
codes), no TLS listener here, no maximum packet size.

``python -m fleet.embedded_broker --port N --password-file F --acl-file A`` runs one until
SIGTERM/SIGINT; :class:`fleet.broker.EmbeddedBrokerProcess` starts it for the demo and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

log = logging.getLogger(__name__)

Access = Literal["read", "write"]


# ---------------------------------------------------------------- pure: passwords


def verify_mosquitto_hash(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a Mosquitto 2.0 ``$7$`` hash (PBKDF2-HMAC-SHA512,
    ``$7$<iterations>$<base64 salt>$<base64 digest>``); any other format never matches."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        digest = base64.b64decode(parts[4], validate=True)
    except (ValueError, binascii.Error):
        return False
    if iterations < 1 or not digest:
        return False
    computed = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(digest))
    return hmac.compare_digest(computed, digest)


def read_password_file(path: Path) -> dict[str, str]:
    """``user:hash`` lines of a Mosquitto password file (blank lines and ``#`` skipped)."""
    users = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        user, sep, hashed = line.partition(":")
        if line and not line.startswith("#") and sep and user:
            users[user] = hashed
    return users


# ---------------------------------------------------------------- pure: the ACL


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of a topic name against a filter (``+`` one level, ``#`` the rest; a
    ``$`` topic never matches a filter that starts with a wildcard)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    levels = topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(levels) or level not in ("+", levels[i]):
            return False
    return len(filter_levels) == len(levels)


def filter_within(rule: str, requested: str) -> bool:
    """Whether every topic ``requested`` (a subscription filter) can match is matched by the
    ACL filter ``rule``: a ``+`` requested is only covered by ``+`` or ``#``, a ``#`` only by
    ``#`` (Mosquitto's check of a SUBSCRIBE against its ACL)."""
    rule_levels = rule.split("/")
    levels = requested.split("/")
    for i, level in enumerate(rule_levels):
        if level == "#":
            return True
        if i >= len(levels):
            return False
        if level == "+":
            if levels[i] == "#":
                return False
            continue
        if level != levels[i]:
            return False
    return len(rule_levels) == len(levels)


@dataclass(frozen=True)
class Rule:
    """One ``topic`` or ``pattern`` line."""

    access: frozenset[str]
    topic: str
    pattern: bool


@dataclass
class Acl:
    """A Mosquitto ACL file (the subset ``fleet.broker.render_acl`` writes): ``user NAME``
    starts a user's rules, ``topic [read|write|readwrite] FILTER`` grants that user (or, before
    any ``user`` line, anonymous clients), ``pattern [read|write|readwrite] FILTER`` grants
    every user with ``%u`` replaced by the username; anything not granted is denied."""

    users: dict[str | None, list[Rule]] = field(default_factory=dict)
    patterns: list[Rule] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Acl:
        """Parse an ACL file.

        Raises:
            ValueError: a line this subset does not know (named with its number).
        """
        acl = cls()
        user: str | None = None
        acl.users[None] = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            words = line.split(None, 1)
            if words[0] == "user" and len(words) == 2:
                user = words[1].strip()
                acl.users.setdefault(user, [])
                continue
            if words[0] not in ("topic", "pattern") or len(words) != 2:
                raise ValueError(f"ACL line {number} not understood: {line!r}")
            rest = words[1].split(None, 1)
            if rest[0] in ("read", "write", "readwrite"):
                if len(rest) != 2:
                    raise ValueError(f"ACL line {number} has no topic: {line!r}")
                access, topic = rest[0], rest[1].strip()
            else:
                access, topic = "readwrite", words[1].strip()
            granted = frozenset(("read", "write") if access == "readwrite" else (access,))
            rule = Rule(granted, topic, words[0] == "pattern")
            if rule.pattern:
                acl.patterns.append(rule)
            else:
                acl.users[user].append(rule)
        return acl

    def _rules(self, username: str | None) -> list[tuple[str, frozenset[str]]]:
        rules = [(r.topic, r.access) for r in self.users.get(username, [])]
        if username is not None:
            if "/" in username or "+" in username or "#" in username:
                return rules  # never substituted into a pattern (Mosquitto refuses these too)
            rules += [(r.topic.replace("%u", username), r.access) for r in self.patterns]
        return rules

    def allows(self, username: str | None, topic: str, access: Access) -> bool:
        """Whether ``username`` may ``access`` the topic name ``topic``."""
        return any(
            access in granted and topic_matches(rule, topic)
            for rule, granted in self._rules(username)
        )

    def allows_subscribe(self, username: str | None, topic_filter: str) -> bool:
        """Whether ``username`` may subscribe to ``topic_filter`` (read on all it matches)."""
        return any(
            "read" in granted and filter_within(rule, topic_filter)
            for rule, granted in self._rules(username)
        )


# ---------------------------------------------------------------- amqtt plugins


class _Watched:
    """A file parsed again whenever its identity, size or mtime changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None

    def changed(self) -> bool:
        st = os.stat(self.path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True


class PasswordFileAuth(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """Logins from a Mosquitto ``$7$`` password file, re-read when it changes."""

    @dataclass
    class Config:
        """Plugin configuration (amqtt fills it from the broker config)."""

        password_file: str = ""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._file = _Watched(Path(self.config.password_file))
        self._users: dict[str, str] = {}

    async def authenticate(self, *, session: Any) -> bool:
        """Whether the session's username and password match the file (anonymous: no)."""
        username, password = session.username, session.password
        if not username or password is None:
            return False
        try:
            if self._file.changed():
                self._users = read_password_file(self._file.path)
        except OSError as err:
            log.error("password file %s unreadable: %s", self._file.path, err)
            return False
        hashed = self._users.get(username)
        if hashed is None:
            return False
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        return verify_mosquitto_hash(str(password), hashed)


class AclPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    """The fleet's Mosquitto ACL for SUBSCRIBE (read), PUBLISH (write), delivery (read)."""

    @dataclass
    class Config:
        """Plugin configuration (amqtt fills it from the broker config)."""

        acl_file: str = ""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._file = _Watched(Path(self.config.acl_file))
        self._acl = Acl()

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool:
        """Whether the session's user may do ``action`` on ``topic``."""
        if session is None or topic is None:
            return False
        try:
            if self._file.changed():
                self._acl = Acl.parse(self._file.path.read_text())
        except (OSError, ValueError) as err:
            log.error("ACL file %s unusable: %s", self._file.path, err)
            return False
        username = session.username or None
        if action == Action.SUBSCRIBE:
            return self._acl.allows_subscribe(username, topic)
        if action == Action.PUBLISH:
            return self._acl.allows(username, topic, "write")
        if action == Action.RECEIVE:
            return self._acl.allows(username, topic, "read")
        return False


class EdgeloopBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker, sending a session only the retained messages of its own filters.

    amqtt 0.12.1 calls ``_publish_retained_messages_for_subscription`` on every connect for
    each filter in the broker's subscription table, whoever holds it (and at QoS 0); this
    override skips filters the session does not hold and uses the QoS it was granted.
    """

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        topic_filter = subscription[0]
        granted = next(
            (
                qos
                for holder, qos in self._subscriptions.get(topic_filter, ())
                if holder.client_id == session.client_id
            ),
            None,
        )
        if granted is None:
            return
        await super()._publish_retained_messages_for_subscription((topic_filter, granted), session)


# ---------------------------------------------------------------- process


def broker_config(
    *,
    port: int,
    password_file: Path,
    acl_file: Path,
    bind: str = "127.0.0.1",
    session_expiry_s: int = 7 * 24 * 3600,
    max_connections: int = 1000,
) -> dict[str, Any]:
    """The amqtt configuration: one TCP listener, the fleet's logins and ACL."""
    return {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": f"{bind}:{port}",
                "max_connections": max_connections,
            }
        },
        "session_expiry_interval": session_expiry_s,
        "plugins": {
            f"{__name__}.PasswordFileAuth": {"password_file": str(password_file)},
            f"{__name__}.AclPlugin": {"acl_file": str(acl_file)},
        },
    }


async def serve(config: dict[str, Any]) -> None:
    """Run a broker with ``config`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    broker = EdgeloopBroker(config, loop=loop)
    await broker.start()
    log.info("embedded broker (amqtt, MQTT 3.1.1) listening on %s", config["listeners"])
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fleet.embedded_broker``: run until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m fleet.embedded_broker", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--password-file", type=Path, required=True)
    parser.add_argument("--acl-file", type=Path, required=True)
    parser.add_argument("--session-expiry-s", type=int, default=7 * 24 * 3600)
    parser.add_argument("--log-file", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        filename=args.log_file,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # amqtt logs each connection at INFO (kept); its state machine library is chatty.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    config = broker_config(
        port=args.port,
        password_file=args.password_file,
        acl_file=args.acl_file,
        bind=args.bind,
        session_expiry_s=args.session_expiry_s,
    )
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
