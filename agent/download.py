"""One artifact download on disk: the ``.part`` file and its persisted chunk bitmap.

Wraps the pure ``agent.transfer.Transfer`` with file I/O. Each accepted chunk is written at
its offset; every ``flush_every`` chunks (and at the end, and on close) the file is flushed
(fdatasync) and only then the bitmap is persisted by atomic rename. So after a crash the
bitmap never claims a chunk whose bytes are not on disk, and a killed agent re-fetches at
most the chunks in flight plus the ones since the last flush. Flushing per chunk instead
made the disk, not the network, the limit of the transfer (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from agent import protocol
from agent.transfer import Transfer, ranges_of
from compiler.bundle import sha256_file

log = logging.getLogger(__name__)


class DownloadError(Exception):
    """The transfer cannot complete (whole-file hash mismatch, bad frames)."""


class Download:
    """Resumable download of one transfer file into ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        artifact_id: str,
        info: protocol.TransferInfo,
        chunk_size: int,
        flush_every: int = 16,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.artifact_id = artifact_id
        self.part = directory / f"{artifact_id}.part"
        self.state_file = directory / f"{artifact_id}.json"
        self.transfer = self._load(info, chunk_size)
        if not self.part.exists() or self.part.stat().st_size != info.size:
            with self.part.open("wb") as fh:
                fh.truncate(info.size)
            if self.transfer.done:
                log.warning("partial file of %s was missing; starting over", artifact_id)
                self.transfer.reset()
        self._fd = os.open(self.part, os.O_RDWR)
        self.flush_every = max(1, flush_every)
        self._unflushed = 0
        self.resent_chunks = 0
        self._persist()

    def _load(self, info: protocol.TransferInfo, chunk_size: int) -> Transfer:
        if self.state_file.exists():
            try:
                saved = Transfer.from_json(json.loads(self.state_file.read_text()))
            except (ValueError, KeyError, TypeError) as err:
                log.warning(
                    "download state of %s is damaged (%s); starting over", self.artifact_id, err
                )
            else:
                if (saved.sha256, saved.size) == (info.sha256, info.size):
                    return saved  # keeps its own chunk size: the bitmap is in its units
        return Transfer(self.artifact_id, info.sha256, info.size, chunk_size)

    def _persist(self) -> None:
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(self.transfer.to_json()))
        os.replace(tmp, self.state_file)

    @property
    def complete(self) -> bool:
        """All chunks are on disk."""
        return self.transfer.complete

    def next_request(
        self, *, now: float, window: int, timeout: float
    ) -> protocol.ChunkRequest | None:
        """The chunk request to send now, if any chunk should be asked for."""
        wanted = self.transfer.next_request(now=now, window=window, timeout=timeout)
        if not wanted:
            return None
        return protocol.ChunkRequest(
            request_id=uuid.uuid4().hex[:16],
            artifact_id=self.artifact_id,
            chunk_size=self.transfer.chunk_size,
            ranges=ranges_of(sorted(wanted)),
        )

    def accept(self, frame: protocol.ChunkFrame) -> bool:
        """Store a chunk frame; False for duplicates. Raises DownloadError for a frame that
        cannot belong to this transfer (wrong count or length)."""
        t = self.transfer
        if frame.count != t.count or not 0 <= frame.index < t.count:
            raise DownloadError(
                f"chunk {frame.index}/{frame.count} does not fit a transfer of {t.count} chunks"
            )
        if len(frame.payload) != t.chunk_length(frame.index):
            raise DownloadError(
                f"chunk {frame.index} has {len(frame.payload)} bytes; "
                f"expected {t.chunk_length(frame.index)}"
            )
        if t.has(frame.index):
            self.resent_chunks += 1
            t.in_flight.pop(frame.index, None)
            return False
        os.pwrite(self._fd, frame.payload, frame.index * t.chunk_size)
        t.mark(frame.index)
        self._unflushed += 1
        if self._unflushed >= self.flush_every or t.complete:
            self.flush()
        return True

    def flush(self) -> None:
        """Make every written chunk durable, then record them in the persisted bitmap."""
        if self._unflushed:
            os.fdatasync(self._fd)
            self._unflushed = 0
            self._persist()

    def finish(self) -> Path:
        """Check the whole file's sha256; on mismatch start over and raise DownloadError."""
        actual = sha256_file(self.part)
        if actual != self.transfer.sha256:
            self.transfer.reset()
            self._persist()
            raise DownloadError(
                f"transfer file sha256 {actual} != expected {self.transfer.sha256}; re-downloading"
            )
        return self.part

    def close(self) -> None:
        """Flush, then close the file descriptor (state stays on disk for resuming).

        Idempotent: a second close must not ``os.close`` the same number again, since the
        process may have reused it for another file or socket by then.
        """
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if self._unflushed:
                os.fdatasync(fd)
                self._unflushed = 0
                self._persist()
        except OSError as err:
            log.warning("could not flush the download of %s: %s", self.artifact_id, err)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Close and delete the partial file and its state."""
        self.close()
        self.part.unlink(missing_ok=True)
        self.state_file.unlink(missing_ok=True)
