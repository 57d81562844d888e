"""The wire contract: topics, payload decoding, chunk frames, transfer state, backoff."""

from __future__ import annotations

import json
import random

import pytest

from agent import protocol
from agent.backoff import backoff_delay
from agent.protocol import ChunkFrame, ChunkRequest, JobNotify, ProtocolError
from agent.transfer import Transfer, ranges_of

AID = "ab" * 32


def test_topics() -> None:
    assert protocol.status("dev-1") == "edgeloop/v1/devices/dev-1/status"
    assert protocol.artifacts_data("d.2") == "edgeloop/v1/devices/d.2/artifacts/data"
    assert protocol.responder_subscription() == (
        "$share/edgeloop-responders/edgeloop/v1/devices/+/artifacts/req"
    )
    assert protocol.parse_device_topic("edgeloop/v1/devices/x/jobs/update") == ("x", "jobs/update")


@pytest.mark.parametrize("device_id", ["", "a/b", "a+b", "#", "x" * 65, "dev 1"])
def test_bad_device_ids(device_id: str) -> None:
    with pytest.raises(ProtocolError, match="device id"):
        protocol.status(device_id)


@pytest.mark.parametrize(
    "topic", ["other/v1/devices/x/status", "edgeloop/v1/devices/x", "edgeloop/v1/devices/+/a"]
)
def test_bad_topics(topic: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_device_topic(topic)


def _job() -> dict[str, object]:
    return {
        "schema_version": 1,
        "job_id": "j1",
        "artifact_id": AID,
        "model": {"name": "m", "version": "2"},
        "profile": "generic/x86_64",
        "signature": "c2ln",
        "transfer": {"sha256": "cd" * 32, "size": 10},
    }


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "schema_version None"),
        (json.dumps({**_job(), "schema_version": 9}).encode(), "schema_version 9"),
        (json.dumps({**_job(), "artifact_id": "xyz"}).encode(), "artifact_id"),
        (json.dumps({**_job(), "extra": 1}).encode(), "extra"),
        (b"{" + b" " * (70 * 1024) + b"}", "exceeds"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_decode_rejects(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        protocol.decode(JobNotify, payload)


def test_decode_round_trip() -> None:
    job = protocol.decode(JobNotify, json.dumps(_job()).encode())
    assert protocol.decode(JobNotify, job.to_bytes()) == job


@pytest.mark.parametrize("ranges", [[[3, 3]], [[-1, 2]], [[5, 2]]])
def test_chunk_request_ranges_must_be_nonempty(ranges: list[list[int]]) -> None:
    with pytest.raises(ValueError):
        ChunkRequest(request_id="r", artifact_id=AID, chunk_size=4096, ranges=ranges)


def test_chunk_request_indices_dedup() -> None:
    req = ChunkRequest(request_id="r", artifact_id=AID, chunk_size=4096, ranges=[(0, 3), (2, 5)])
    assert req.indices() == [0, 1, 2, 3, 4]


def test_frame_round_trip_and_corruption() -> None:
    frame = ChunkFrame(AID, 3, 10, b"payload" * 100)
    data = frame.encode()
    assert len(data) == protocol.FRAME_HEADER_SIZE + 700
    assert protocol.decode_frame(data) == frame
    corrupted = bytearray(data)
    corrupted[-1] ^= 1
    with pytest.raises(ProtocolError, match="does not match its sha256"):
        protocol.decode_frame(bytes(corrupted))
    with pytest.raises(ProtocolError, match="shorter than its header"):
        protocol.decode_frame(data[:20])
    with pytest.raises(ProtocolError, match="header says"):
        protocol.decode_frame(data[:-5])
    with pytest.raises(ProtocolError, match="magic"):
        protocol.decode_frame(b"XXXX" + data[4:])
    error = protocol.decode_frame(ChunkFrame.error_frame(AID, 0, "not entitled").encode())
    assert error.error and error.reason == "not entitled"


@pytest.mark.parametrize(
    ("max_packet", "expected"), [(None, 131072), (1 << 20, 131072), (65536, 65536 - 199)]
)
def test_max_chunk_size(max_packet: int | None, expected: int) -> None:
    topic = "edgeloop/v1/devices/dev-1/artifacts/data"
    assert protocol.max_chunk_size(max_packet, topic) == expected


def test_max_chunk_size_too_small() -> None:
    with pytest.raises(ProtocolError, match="too small"):
        protocol.max_chunk_size(900, "t")


@pytest.mark.parametrize(
    ("indices", "ranges"),
    [
        ([], []),
        ([0], [(0, 1)]),
        ([1, 2, 3, 7], [(1, 4), (7, 8)]),
        ([0, 2, 4], [(0, 1), (2, 3), (4, 5)]),
    ],
)
def test_ranges_of(indices: list[int], ranges: list[tuple[int, int]]) -> None:
    assert ranges_of(indices) == ranges


def test_transfer_window_timeouts_and_persistence() -> None:
    t = Transfer(AID, "cd" * 32, size=10 * 1000 + 1, chunk_size=1000)
    assert t.count == 11 and t.chunk_length(10) == 1
    first = t.next_request(now=0.0, window=4, timeout=5.0)
    assert first == [0, 1, 2, 3]
    assert t.next_request(now=1.0, window=4, timeout=5.0) == []
    assert t.mark(1) and not t.mark(1)
    assert t.next_request(now=1.0, window=4, timeout=5.0) == [4]
    # 0, 2, 3 time out at t=5 and are asked again before new ones
    again = t.next_request(now=5.5, window=4, timeout=5.0)
    assert again[:3] == [0, 2, 3] and t.retries == 3
    restored = Transfer.from_json(json.loads(json.dumps(t.to_json())))
    assert restored.has(1) and not restored.has(0) and restored.in_flight == {}
    for i in range(11):
        restored.mark(i)
    assert restored.complete
    with pytest.raises(ValueError):
        restored.mark(11)
    with pytest.raises(ValueError):
        Transfer.from_json({**t.to_json(), "size": 100000})


@pytest.mark.parametrize("attempt", [0, 1, 5, 40])
def test_backoff_is_bounded_and_jittered(attempt: int) -> None:
    rng = random.Random(1)
    delays = [backoff_delay(attempt, base=0.5, cap=30.0, rng=rng) for _ in range(200)]
    ceiling = min(30.0, 0.5 * 2**attempt)
    assert all(0 <= d <= ceiling for d in delays)
    assert len({round(d, 6) for d in delays}) > 150
    with pytest.raises(ValueError):
        backoff_delay(-1, base=1, cap=2, rng=rng)


@pytest.mark.parametrize("ranges", [[(0, 2**32)], [(0, 5000)], [(0, 3000), (3000, 6000)]])
def test_chunk_request_is_bounded(ranges: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError):
        ChunkRequest(request_id="r", artifact_id=AID, chunk_size=4096, ranges=ranges)


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_schema_version_must_be_the_integer(version: object) -> None:
    with pytest.raises(ProtocolError, match="schema_version"):
        protocol.decode(JobNotify, json.dumps({**_job(), "schema_version": version}).encode())


@pytest.mark.parametrize("device_id", [".", "..", "-x", "_x"])
def test_device_ids_start_with_alnum(device_id: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.check_device_id(device_id)


def test_job_cancel_is_on_the_wire_only_when_set() -> None:
    job = protocol.decode(JobNotify, json.dumps(_job()).encode())
    assert job.cancel is False and "cancel" not in json.loads(job.to_bytes())  # old agents parse it
    cancel = job.model_copy(update={"cancel": True})
    assert json.loads(cancel.to_bytes())["cancel"] is True
    assert protocol.decode(JobNotify, cancel.to_bytes()) == cancel
