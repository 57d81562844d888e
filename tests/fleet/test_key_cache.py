"""The verified API key cache (pure): hits skip scrypt, anything else pays it."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from fleet import credentials
from fleet.key_cache import VerifiedKeyCache

Counter = Callable[[], int]


SECRET = credentials.new_secret()
HASH = credentials.hash_secret(SECRET)


def test_a_verified_secret_skips_scrypt_while_the_hash_is_unchanged(scrypt_calls: Counter) -> None:
    cache = VerifiedKeyCache()
    assert cache.verify("k1", SECRET, HASH)
    assert scrypt_calls() == 1
    assert cache.verify("k1", SECRET, HASH) and cache.verify("k1", SECRET, HASH)
    assert scrypt_calls() == 0


def test_a_changed_hash_is_checked_again(scrypt_calls: Counter) -> None:
    cache = VerifiedKeyCache()
    assert cache.verify("k1", SECRET, HASH)
    other = credentials.new_secret()
    rotated = credentials.hash_secret(other)
    scrypt_calls()
    assert not cache.verify("k1", SECRET, rotated)  # the old secret against the new hash
    assert scrypt_calls() == 1 and "k1" not in cache
    assert cache.verify("k1", other, rotated)
    assert cache.verify("k1", other, rotated)
    assert scrypt_calls() == 1
    # The same secret hashed again (new salt or parameters): a full check, then hits again.
    rehashed = credentials.hash_secret(other)
    assert cache.verify("k1", other, rehashed) and cache.verify("k1", other, rehashed)
    assert scrypt_calls() == 1


def test_a_wrong_secret_pays_scrypt_and_drops_the_entry(scrypt_calls: Counter) -> None:
    cache = VerifiedKeyCache()
    assert cache.verify("k1", SECRET, HASH)
    scrypt_calls()
    assert not cache.verify("k1", SECRET[::-1], HASH)
    assert scrypt_calls() == 1 and "k1" not in cache
    assert cache.verify("k1", SECRET, HASH)  # the right secret is checked in full again
    assert scrypt_calls() == 1


def test_an_entry_is_for_its_key_id_only(scrypt_calls: Counter) -> None:
    cache = VerifiedKeyCache()
    assert cache.verify("k1", SECRET, HASH)
    assert cache.verify("k2", SECRET, HASH)
    assert scrypt_calls() == 2


def test_a_malformed_hash_is_refused(scrypt_calls: Counter) -> None:
    cache = VerifiedKeyCache()
    assert not cache.verify("k1", SECRET, "not-a-hash")
    assert scrypt_calls() == 1 and len(cache) == 0


def test_lru_bound_evicts_the_least_recently_used(scrypt_calls: Counter) -> None:
    cache = VerifiedKeyCache(max_entries=2)
    assert cache.verify("k1", SECRET, HASH) and cache.verify("k2", SECRET, HASH)
    assert cache.verify("k1", SECRET, HASH)  # a hit makes k1 the most recent
    assert scrypt_calls() == 2
    assert cache.verify("k3", SECRET, HASH)
    assert len(cache) == 2 and "k2" not in cache and "k1" in cache and "k3" in cache
    scrypt_calls()
    assert cache.verify("k2", SECRET, HASH)  # evicted: a full check again
    assert scrypt_calls() == 1
    assert len(cache) == 2 and "k1" not in cache


def test_only_salted_macs_are_kept() -> None:
    first, second = VerifiedKeyCache(), VerifiedKeyCache()
    assert first.verify("k1", SECRET, HASH) and second.verify("k1", SECRET, HASH)
    macs = [cache._entries["k1"].secret_mac for cache in (first, second)]
    assert macs[0] != macs[1]  # each cache draws its own salt
    for cache in (first, second):
        held = repr(cache._entries) + repr(vars(cache))
        assert SECRET not in held and SECRET.encode() not in cache._entries["k1"].secret_mac


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries is 0"):
        VerifiedKeyCache(max_entries=0)


def test_threads_share_the_cache_safely(scrypt_calls: Counter) -> None:
    cache = VerifiedKeyCache(max_entries=3)
    assert cache.verify("k0", SECRET, HASH)
    results: list[bool] = []
    lock = threading.Lock()

    def work(index: int) -> None:
        for round_ in range(10):
            ok = cache.verify(f"k{(index + round_) % 4}", SECRET, HASH)
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 40 and all(results)
    assert len(cache) <= 3
