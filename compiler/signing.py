"""Ed25519 signing keys and detached signatures over artifact manifests (``cryptography``).

Keys are PEM files: ``signing-key.pem`` (PKCS#8, private, mode 0600) and ``signing-key.pub``
(SubjectPublicKeyInfo). The key id is the first 16 hex digits of sha256 of the raw public key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compiler.errors import ArtifactError, InvalidInputError, UsageError

PRIVATE_KEY_FILE = "signing-key.pem"
PUBLIC_KEY_FILE = "signing-key.pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable id of a public key (16 hex digits)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class KeyPaths:
    """Where a key pair lives."""

    private: Path
    public: Path

    @classmethod
    def in_dir(cls, directory: Path) -> KeyPaths:
        """The standard file names inside ``directory``."""
        return cls(directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE)


def generate_keys(directory: Path, *, overwrite: bool = False) -> KeyPaths:
    """Create a new key pair in ``directory``; refuse to replace an existing one.

    Raises:
        UsageError: a key already exists there and ``overwrite`` is false.
    """
    paths = KeyPaths.in_dir(directory)
    if not overwrite and (paths.private.exists() or paths.public.exists()):
        raise UsageError(
            f"a signing key already exists in {str(directory)!r}; "
            "pass --force to replace it (artifacts signed with it will no longer verify)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_private(paths.private, pem)
    paths.public.write_bytes(pub)
    return paths


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a PEM ed25519 private key.

    Raises:
        InvalidInputError: missing file, or not an ed25519 private key.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInputError(
            f"signing key {str(path)!r} does not exist; create one with 'edgeloop keys generate' "
            "or pass --signing-key PATH"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise InvalidInputError(f"{str(path)!r} is not a PEM private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInputError(
            f"{str(path)!r} holds a {type(key).__name__}; only ed25519 keys are allowed"
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a PEM ed25519 public key (or derive it from a private key file).

    Raises:
        InvalidInputError: missing file, or not an ed25519 key.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInputError(f"public key {str(path)!r} does not exist") from None
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise InvalidInputError(f"{str(path)!r} is not a PEM public key: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInputError(
            f"{str(path)!r} holds a {type(key).__name__}; only ed25519 keys are allowed"
        )
    return key


def sign(private_key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Detached 64-byte ed25519 signature."""
    return private_key.sign(message)


def verify_signature(public_key: Ed25519PublicKey, message: bytes, signature: bytes) -> None:
    """Check a detached signature.

    Raises:
        ArtifactError: the signature does not match this key and message.
    """
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        raise ArtifactError(
            f"manifest signature does not verify with public key {key_id(public_key)} "
            "(wrong key, or the manifest or signature was modified)"
        ) from None
