"""Signed dashboard sessions (pure: stdlib ``hmac``, no web framework, no database).

A session cookie names the API key the operator signed in with and when the session ends:
``<base64url(JSON {"k": key id, "exp": unix seconds})>.<base64url(HMAC-SHA256)>``. The
secret never leaves the server and the cookie holds no secret of the key, so a stolen cookie
is worth at most one session's lifetime, and revoking the key ends every session at once
(the key is looked up on every request). Hand-written rather than ``itsdangerous`` because
that package is not a dependency of the fleet, and these 40 lines are all it takes with
:func:`hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass

DEFAULT_LIFETIME_S = 8 * 3600


@dataclass(frozen=True)
class SessionData:
    """What a valid cookie says: the API key's public id and when the session expires."""

    key_id: str
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, body: str) -> str:
    return _b64(hmac.new(secret, body.encode("ascii"), hashlib.sha256).digest())


def sign(secret: bytes, *, key_id: str, now: float, lifetime_s: float = DEFAULT_LIFETIME_S) -> str:
    """The cookie value of a session for ``key_id`` that ends ``lifetime_s`` after ``now``."""
    if not secret:
        raise ValueError("the session secret is empty")
    payload = json.dumps({"k": key_id, "exp": int(now + lifetime_s)}, separators=(",", ":"))
    body = _b64(payload.encode("utf-8"))
    return f"{body}.{_mac(secret, body)}"


def verify(secret: bytes, value: str | None, *, now: float) -> SessionData | None:
    """The session in ``value`` if its signature is ours and it has not expired, else None."""
    if not value or value.count(".") != 1:
        return None
    body, mac = value.split(".")
    try:
        expected = _mac(secret, body)
    except UnicodeEncodeError:
        return None
    if not hmac.compare_digest(expected.encode("ascii"), mac.encode("utf-8", "replace")):
        return None
    try:
        payload = json.loads(_unb64(body))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(payload, dict):
        return None
    key_id, expires = payload.get("k"), payload.get("exp")
    if not isinstance(key_id, str) or not isinstance(expires, int) or isinstance(expires, bool):
        return None
    if expires <= now:
        return None
    return SessionData(key_id=key_id, expires_at=float(expires))
