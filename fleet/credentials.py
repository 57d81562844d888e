"""API key tokens, their salted hashes at rest, and device MQTT passwords (pure: hashlib).

A token is ``elk_<key id>_<secret>``: the key id (12 hex digits) is stored in clear to find
the row, the secret (256 random bits) only as ``scrypt$<n>$<r>$<p>$<salt>$<hash>``. The
secret is random, not a password a person chose, so a modest scrypt cost suffices (about
10 ms per check); the parameters travel with the hash and can be raised later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

TOKEN_PREFIX = "elk"
_KEY_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_SCRYPT_N = 2**12
_SCRYPT_R = 8
_SCRYPT_P = 1
_DKLEN = 32


@dataclass(frozen=True)
class ParsedToken:
    """A token split into its public key id and its secret."""

    key_id: str
    secret: str


def new_key_id() -> str:
    """A random public key id (12 hex digits)."""
    return secrets.token_hex(6)


def new_secret() -> str:
    """A random API key secret (256 bits, URL-safe base64)."""
    return secrets.token_urlsafe(32)


def format_token(key_id: str, secret: str) -> str:
    """The token a client sends: ``elk_<key id>_<secret>``."""
    return f"{TOKEN_PREFIX}_{key_id}_{secret}"


def parse_token(token: str) -> ParsedToken | None:
    """Split a token; None if it is not shaped like ``elk_<12 hex>_<secret>``."""
    prefix, _, rest = token.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not _KEY_ID_RE.match(key_id) or len(secret) < 16:
        return None
    return ParsedToken(key_id=key_id, secret=secret)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_secret(secret: str) -> str:
    """A salted scrypt hash of ``secret`` with its parameters, for storage."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        secret.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=_DKLEN
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches the stored hash (constant-time; False if malformed)."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(digest_b64, validate=True)
        actual = hashlib.scrypt(
            secret.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def new_device_password() -> str:
    """A random MQTT password for a device (192 bits, URL-safe base64)."""
    return secrets.token_urlsafe(24)
