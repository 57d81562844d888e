"""Signed bundles for agent tests, made without TVM (the bytes of model.so are random)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compiler import bundle
from compiler.signing import load_private_key


def make_bundle(
    out: Path,
    key: Path,
    *,
    name: str = "m",
    version: str = "1",
    profile: str = "generic/x86_64",
    size: int = 4096,
    runtime: str = "tvm",
) -> Path:
    """Seal a bundle with a random 'library' of ``size`` bytes."""
    fields: dict[str, Any] = {
        "model": {"name": name, "version": version},
        "profile": profile,
        "isa": "x86_64",
        "target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
        "runtime": runtime,
        "runtime_reason": "test",
        "entry": "model.so",
        "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}],
        "toolchain": {"edgeloop": "0.1.0"},
        "tuning": {},
        "source_model": {"format": "onnx", "filename": "m.onnx", "sha256": "0" * 64},
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    with bundle.staging_dir(out) as staging:
        (staging / "model.so").write_bytes(os.urandom(size))
        (staging / "report.json").write_text("{}")
        bundle.seal_bundle(staging, out, manifest_fields=fields, private_key=load_private_key(key))
    return out
