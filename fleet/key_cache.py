"""Remembers which API key secrets were verified, so a repeat request skips scrypt (pure).

Checking a key's secret against its scrypt hash costs about 10 ms by design
(:mod:`fleet.credentials`); a client sending the same key on every request would pay it on
every request. After a successful check of key id K against stored hash H, the cache keeps
K -> (H, HMAC-SHA256(salt, secret)), with a salt drawn at random per cache (per app). The next
check of K with the row's *current* hash passes without scrypt only if that hash is still H
and the presented secret has the same HMAC; anything else is a full scrypt check, which
refreshes the entry on success and drops it on failure. The caller reads the key's row from
the database on every request, so revocation, scope changes, deletion and a changed hash act
at once. Only salted HMACs are held in memory, never a secret; an unknown key id never
reaches the cache (the caller checks a dummy hash).

Hand-written rather than ``functools.lru_cache`` or ``cachetools``: a hit must be decided
against the hash in the row just read (not only the key id), must compare in constant time,
and a failed check must evict; no caching library does that, and the whole thing is an
``OrderedDict`` under a lock (routes run in a thread pool).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from fleet import credentials

DEFAULT_MAX_ENTRIES = 4096
SALT_BYTES = 32


@dataclass(frozen=True)
class _Entry:
    stored_hash: str
    secret_mac: bytes


class VerifiedKeyCache:
    """A bounded, thread-safe LRU of verified API key secrets (salted HMACs only)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries is {max_entries}; it must be at least 1")
        self.max_entries = max_entries
        self._salt = secrets.token_bytes(SALT_BYTES)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key_id: object) -> bool:
        with self._lock:
            return key_id in self._entries

    def _mac(self, secret: str) -> bytes:
        return hmac.new(self._salt, secret.encode(), hashlib.sha256).digest()

    def verify(self, key_id: str, secret: str, stored_hash: str) -> bool:
        """Whether ``secret`` matches ``stored_hash`` (the key row's current hash).

        A hit (same key id, same stored hash, same secret as a past successful check) skips
        scrypt; otherwise :func:`fleet.credentials.verify_secret` decides, and the entry is
        refreshed on success or dropped on failure.

        Args:
            key_id: the key's public id, as read from its row.
            secret: the secret the client presented.
            stored_hash: the row's ``secret_hash`` as read for this request.

        Returns:
            True if the secret is right.
        """
        mac = self._mac(secret)
        with self._lock:
            entry = self._entries.get(key_id)
            if entry is not None:
                self._entries.move_to_end(key_id)
        if (
            entry is not None
            and hmac.compare_digest(entry.stored_hash.encode(), stored_hash.encode())
            and hmac.compare_digest(entry.secret_mac, mac)
        ):
            return True
        valid = credentials.verify_secret(secret, stored_hash)
        with self._lock:
            if valid:
                self._entries[key_id] = _Entry(stored_hash, mac)
                self._entries.move_to_end(key_id)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            else:
                self._entries.pop(key_id, None)
        return valid

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()
