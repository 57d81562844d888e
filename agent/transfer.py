"""Resumable chunked download state (pure: no MQTT, no clock; the caller passes ``now``).

A ``Transfer`` knows which chunks of a file are present (a bitmap), which are in flight and
since when, and what to ask for next within a bounded window. Its JSON form is persisted
beside the ``.part`` file after every chunk, so a restarted agent resumes where it stopped
and re-fetches at most the chunks that were in flight.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from agent.protocol import chunk_count


def ranges_of(indices: list[int]) -> list[tuple[int, int]]:
    """Compress sorted chunk indices into half-open ranges: [1,2,3,7] -> [(1,4),(7,8)]."""
    ranges: list[tuple[int, int]] = []
    for i in indices:
        if ranges and ranges[-1][1] == i:
            ranges[-1] = (ranges[-1][0], i + 1)
        else:
            ranges.append((i, i + 1))
    return ranges


@dataclass
class Transfer:
    """Download state of one artifact's transfer file."""

    artifact_id: str
    sha256: str
    size: int
    chunk_size: int
    bitmap: bytearray = field(default_factory=bytearray)
    in_flight: dict[int, float] = field(default_factory=dict)
    retries: int = 0

    def __post_init__(self) -> None:
        needed = (self.count + 7) // 8
        if len(self.bitmap) != needed:
            self.bitmap = bytearray(needed)

    @property
    def count(self) -> int:
        """Total number of chunks."""
        return chunk_count(self.size, self.chunk_size)

    def has(self, index: int) -> bool:
        """Whether chunk ``index`` is stored."""
        return bool(self.bitmap[index >> 3] & (1 << (index & 7)))

    def mark(self, index: int) -> bool:
        """Record chunk ``index`` as stored; False if it was already there (a duplicate)."""
        if not 0 <= index < self.count:
            raise ValueError(f"chunk index {index} outside 0..{self.count - 1}")
        self.in_flight.pop(index, None)
        if self.has(index):
            return False
        self.bitmap[index >> 3] |= 1 << (index & 7)
        return True

    @property
    def done(self) -> int:
        """Number of chunks stored."""
        return sum(bin(b).count("1") for b in self.bitmap)

    @property
    def complete(self) -> bool:
        """All chunks stored."""
        return self.done == self.count

    def chunk_length(self, index: int) -> int:
        """Expected payload length of chunk ``index`` (the last one may be short)."""
        if index == self.count - 1:
            return self.size - index * self.chunk_size
        return self.chunk_size

    def next_request(self, *, now: float, window: int, timeout: float) -> list[int]:
        """Chunks to ask for now: timed-out in-flight ones first, then missing ones, up to
        ``window`` in flight in total. Marks the returned chunks as in flight at ``now``."""
        expired = [i for i, sent in self.in_flight.items() if now - sent >= timeout]
        for i in expired:
            del self.in_flight[i]
        if expired:
            self.retries += len(expired)
        room = window - len(self.in_flight)
        wanted: list[int] = []
        if room > 0:
            for i in range(self.count):
                if len(wanted) >= room:
                    break
                if not self.has(i) and i not in self.in_flight:
                    wanted.append(i)
        for i in wanted:
            self.in_flight[i] = now
        return wanted

    def reset(self) -> None:
        """Forget every chunk (after a whole-file hash mismatch)."""
        self.bitmap = bytearray(len(self.bitmap))
        self.in_flight.clear()

    def to_json(self) -> dict[str, Any]:
        """Persistent form (in-flight chunks are not persisted: they are lost on restart)."""
        return {
            "artifact_id": self.artifact_id,
            "sha256": self.sha256,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "bitmap": base64.b64encode(bytes(self.bitmap)).decode(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Transfer:
        """Inverse of :meth:`to_json`; raises ValueError/KeyError on a damaged record."""
        transfer = cls(
            artifact_id=str(data["artifact_id"]),
            sha256=str(data["sha256"]),
            size=int(data["size"]),
            chunk_size=int(data["chunk_size"]),
        )
        bitmap = bytearray(base64.b64decode(data["bitmap"]))
        if len(bitmap) != len(transfer.bitmap):
            raise ValueError("bitmap length does not match the chunk count")
        transfer.bitmap = bitmap
        return transfer
