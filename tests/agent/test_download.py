"""Download on disk: batched durability, resume after a crash, idempotent close."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent import protocol
from agent.download import Download, DownloadError
from agent.protocol import ChunkFrame

AID = "ab" * 32


def _info(data: bytes) -> protocol.TransferInfo:
    return protocol.TransferInfo(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _frame(data: bytes, index: int, chunk: int) -> ChunkFrame:
    count = protocol.chunk_count(len(data), chunk)
    return ChunkFrame(AID, index, count, data[index * chunk : (index + 1) * chunk])


def test_bitmap_is_persisted_once_per_window_and_resumes(tmp_path: Path) -> None:
    data = os.urandom(10 * 4096 + 100)
    d = Download(tmp_path, artifact_id=AID, info=_info(data), chunk_size=4096, flush_every=4)
    for i in range(6):
        assert d.accept(_frame(data, i, 4096))
    assert not d.accept(_frame(data, 0, 4096))  # duplicate
    # Simulate a crash: no close. Only the first flush (4 chunks) is on record.
    resumed = Download(tmp_path, artifact_id=AID, info=_info(data), chunk_size=4096)
    assert resumed.transfer.done == 4
    for i in range(resumed.transfer.count):
        if not resumed.transfer.has(i):
            resumed.accept(_frame(data, i, 4096))
    assert resumed.complete
    assert resumed.finish().read_bytes() == data
    resumed.discard()
    assert not list(tmp_path.iterdir())


def test_wrong_length_and_count_are_rejected(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096)
    d = Download(tmp_path, artifact_id=AID, info=_info(data), chunk_size=4096)
    with pytest.raises(DownloadError, match="expected 4096"):
        d.accept(ChunkFrame(AID, 0, 3, b"short"))
    with pytest.raises(DownloadError, match="does not fit"):
        d.accept(ChunkFrame(AID, 0, 7, data[:4096]))
    d.close()


def test_hash_mismatch_starts_over(tmp_path: Path) -> None:
    data = os.urandom(2 * 4096)
    wrong = protocol.TransferInfo(sha256="0" * 64, size=len(data))
    d = Download(tmp_path, artifact_id=AID, info=wrong, chunk_size=4096)
    for i in range(2):
        d.accept(_frame(data, i, 4096))
    with pytest.raises(DownloadError, match="re-downloading"):
        d.finish()
    assert d.transfer.done == 0
    d.close()


def test_close_twice_never_closes_a_reused_descriptor(tmp_path: Path) -> None:
    data = os.urandom(4096)
    d = Download(tmp_path, artifact_id=AID, info=_info(data), chunk_size=4096)
    d.close()
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)  # likely reuses the number
    try:
        d.close()
        d.discard()
        os.fstat(other)  # still open
    finally:
        os.close(other)
