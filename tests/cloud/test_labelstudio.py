"""Label Studio's JSON task format and PNG rendering, pure (no database, no API)."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import pytest

from cloud.dataloop.labelstudio import (
    ExportItem,
    as_image,
    export_task,
    labeling_config,
    parse_export,
    png_bytes,
)
from cloud.errors import InvalidRequestError


def _decode_png(data: bytes) -> tuple[int, int, int, np.ndarray]:
    """Width, height, colour type and pixels of an 8-bit PNG without filters (ours)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8
    channels = 3 if colour == 2 else 1
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all()
    return width, height, colour, rows[:, 1:].reshape(height, width, channels)


@pytest.mark.parametrize(
    ("shape", "image_shape"),
    [
        ((8, 8), (8, 8)),
        ((1, 8, 8), (8, 8)),
        ((1, 1, 8, 8), (8, 8)),
        ((3, 4, 5), (4, 5, 3)),
        ((1, 3, 4, 5), (4, 5, 3)),
        ((64,), None),
        ((1, 64), None),
        ((2, 8, 8), None),
        ((1, 1), None),
    ],
)
def test_as_image(shape: tuple[int, ...], image_shape: tuple[int, ...] | None) -> None:
    image = as_image(np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape))
    assert (None if image is None else image.shape) == image_shape
    if image is not None:
        assert image.min() == 0 and image.max() == 255


def test_png_round_trip() -> None:
    grey = np.array([[0, 128], [255, 7]], dtype=np.uint8)
    width, height, colour, pixels = _decode_png(png_bytes(grey, scale=3))
    assert (width, height, colour) == (6, 6, 0)
    np.testing.assert_array_equal(pixels[::3, ::3, 0], grey)
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    width, height, colour, pixels = _decode_png(png_bytes(rgb))
    assert (width, height, colour) == (3, 2, 2)
    np.testing.assert_array_equal(pixels, rgb)
    assert as_image(np.full((4, 4), 3.0)) is not None  # constant: black, no division by zero


def _item(inputs: Any, prediction: str | None = "3") -> ExportItem:
    return ExportItem(
        task_id=5,
        sample_id="a" * 32,
        model="m",
        version=2,
        device_id="dev-1",
        reason="low_confidence",
        prediction=prediction,
        confidence=0.4,
        inputs=np.asarray(inputs, dtype=np.float32),
    )


def test_export_image_and_table() -> None:
    image = export_task(_item(np.eye(8)[None]))
    assert image["data"]["image"].startswith("data:image/png;base64,")
    assert image["data"]["edgeloop_task_id"] == 5 and image["data"]["version"] == 2
    (prediction,) = image["predictions"]
    assert prediction == {
        "model_version": "m v2",
        "score": pytest.approx(0.4),
        "result": [
            {
                "from_name": "label",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": ["3"]},
            }
        ],
    }
    table = export_task(_item([1.5, 2.0, -1.0], prediction=None))
    assert table["data"]["values"] == {"f0": 1.5, "f1": 2.0, "f2": -1.0}
    assert "predictions" not in table
    config = labeling_config(["a", 'b"q'], "table")
    assert '<Table name="table" value="$values"/>' in config
    assert '<Choices name="label" toName="table"' in config
    assert "<Choice value='b\"q'/>" in config  # quoted so the XML stays valid


def _task(task_id: Any, *annotations: dict[str, Any]) -> dict[str, Any]:
    return {"id": 1, "data": {"edgeloop_task_id": task_id}, "annotations": list(annotations)}


def _ann(label: str | None, *, when: str = "2026-01-01T00:00:00Z", who: Any = 3) -> dict[str, Any]:
    result = [] if label is None else [{"type": "choices", "value": {"choices": [label]}}]
    return {
        "result": result,
        "was_cancelled": label is None,
        "updated_at": when,
        "completed_by": who,
    }


def test_parse_export_picks_the_newest_live_annotation() -> None:
    parsed = parse_export(
        [
            _task(
                1, _ann("a", when="2026-01-02T00:00:00Z"), _ann("b", when="2026-01-01T00:00:00Z")
            ),
            _task(2, _ann(None)),
            _task(3),
            _task(4, _ann(None), _ann("c", who={"email": "x@y"})),
        ]
    )
    assert [(p.task_id, p.label, p.labeled_by) for p in parsed] == [
        (1, "a", "labelstudio:3"),
        (2, None, "labelstudio:3"),
        (4, "c", "labelstudio:x@y"),
    ]


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"a": 1}, "JSON list of tasks, got dict"),
        (["x"], "task #0: expected an object"),
        ([{"data": {"edgeloop_task_id": "7"}}], "task #0: data.edgeloop_task_id"),
        ([{"data": {"edgeloop_task_id": True}}], "data.edgeloop_task_id"),
        ([_task(1, {"result": [{"type": "labels"}]})], "no 'choices' result"),
        ([_task(1, {"result": [{"type": "choices", "value": {}}]})], "value.choices"),
        (
            [
                _task(
                    1,
                    {
                        "result": [
                            {"type": "choices", "value": {"choices": ["a"]}},
                            {"type": "choices", "value": {"choices": ["b"]}},
                        ]
                    },
                )
            ],
            "several different choices",
        ),
        ([{"data": {"edgeloop_task_id": 1}, "annotations": {}}], "annotations: expected a list"),
        ([_task(1, _ann("a")), _task(1, _ann("b"))], "task #1 (edgeloop_task_id 1): the same"),
    ],
)
def test_parse_export_malformed(payload: Any, needle: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_export(payload)
    assert needle in str(err.value)
