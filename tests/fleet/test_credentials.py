"""API key tokens and their hashes at rest (pure)."""

from __future__ import annotations

import pytest

from fleet import credentials


def test_token_round_trip() -> None:
    key_id, secret = credentials.new_key_id(), credentials.new_secret()
    token = credentials.format_token(key_id, secret)
    assert token.startswith(f"elk_{key_id}_")
    assert credentials.parse_token(token) == credentials.ParsedToken(key_id, secret)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "elk",
        "elk_0123456789ab",
        "elk_0123456789ab_short",
        "xyz_0123456789ab_" + "s" * 43,
        "elk_0123456789AB_" + "s" * 43,
        "elk_0123456789a_" + "s" * 43,
    ],
)
def test_malformed_tokens(token: str) -> None:
    assert credentials.parse_token(token) is None


def test_secret_with_underscores_parses() -> None:
    parsed = credentials.parse_token("elk_0123456789ab_a_b-c_" + "s" * 40)
    assert parsed is not None and parsed.secret == "a_b-c_" + "s" * 40


def test_hash_is_salted_and_verifies() -> None:
    secret = credentials.new_secret()
    first, second = credentials.hash_secret(secret), credentials.hash_secret(secret)
    assert first != second  # salted
    assert secret not in first
    assert first.startswith("scrypt$4096$8$1$")
    assert credentials.verify_secret(secret, first)
    assert credentials.verify_secret(secret, second)
    assert not credentials.verify_secret(secret + "x", first)


@pytest.mark.parametrize(
    "stored", ["", "plain", "md5$1$2$3$4$5", "scrypt$x$8$1$AAAA$AAAA", "scrypt$4096$8$1$!!$AAAA"]
)
def test_malformed_hashes_never_verify(stored: str) -> None:
    assert not credentials.verify_secret("anything", stored)


def test_device_passwords_are_random() -> None:
    passwords = {credentials.new_device_password() for _ in range(20)}
    assert len(passwords) == 20 and all(len(p) == 32 for p in passwords)
