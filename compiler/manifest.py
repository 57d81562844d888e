"""The artifact manifest: the wire contract between the compiler, the fleet and the agent.

Imports nothing heavy (pydantic, hashlib, json), so the agent can verify a bundle without
the compiler. The format is documented in docs/artifact-format.md; bump ``SCHEMA_VERSION``
on any incompatible change.

The artifact id is the sha256 of the manifest's canonical bytes (``canonical_bytes``):
sorted keys, no whitespace, UTF-8. The ed25519 signature (``manifest.sig``) covers the same
bytes, and ``manifest.json`` on disk *is* those bytes, so id, signature and file agree.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
REPORT_FILE = "report.json"

# "ethos-u": entry is a Vela-compiled .tflite; LiteRT runs it with the Ethos-U delegate.
RuntimeName = Literal["tvm", "onnxruntime", "tflite", "ethos-u"]
ModelFormat = Literal["onnx", "torch", "tflite"]


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Contract):
    """Name, static shape and dtype of one model input or output."""

    name: str
    shape: list[int]
    dtype: str


class FileEntry(_Contract):
    """One file of the bundle, relative to the bundle root."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ModelRef(_Contract):
    """Which model and version this artifact is a build of."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)


class SourceModel(_Contract):
    """The model file the artifact was compiled from."""

    format: ModelFormat
    filename: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Toolchain(_Contract):
    """Versions of everything that shaped the artifact's bytes."""

    edgeloop: str
    tvm: str | None = None
    tvm_ffi: str | None = None
    onnxruntime: str | None = None
    cross_compiler: str | None = None


class TuningInfo(_Contract):
    """Tuning records the build used (digest over the records applied, not the whole DB)."""

    database_digest: str | None = None
    records_applied: int = 0
    new_trials: int = 0


class ArtifactManifest(_Contract):
    """``manifest.json`` of an artifact bundle (schema version 1)."""

    schema_version: Literal[1] = 1
    kind: Literal["edgeloop.artifact"] = "edgeloop.artifact"
    model: ModelRef
    profile: str
    isa: str
    target: dict[str, Any]
    runtime: RuntimeName
    runtime_reason: str
    entry: str = Field(description="the file the runtime loads, e.g. model.so or model.onnx")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: list[FileEntry]
    toolchain: Toolchain
    tuning: TuningInfo
    source_model: SourceModel
    signing_key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    created_at: datetime

    def canonical_bytes(self) -> bytes:
        """Return the canonical serialization that is hashed, signed and stored."""
        return canonical_json(self.model_dump(mode="json"))

    @property
    def artifact_id(self) -> str:
        """sha256 hex of the canonical bytes."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def file(self, path: str) -> FileEntry:
        """Return the entry of ``path``; KeyError if the bundle has no such file."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)


def canonical_json(data: Any) -> bytes:
    """Serialize JSON data canonically: sorted keys, compact separators, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def artifact_id_of(manifest_bytes: bytes) -> str:
    """The artifact id of manifest bytes as stored (sha256 hex)."""
    return hashlib.sha256(manifest_bytes).hexdigest()
