"""Label Studio's JSON task format, and sample tensors as PNG images (pure: numpy, zlib).

Export (:func:`export_task`): one Label Studio task per open label task, in the "Basic Label
Studio JSON format" its import accepts (https://labelstud.io/guide/task_format,
https://labelstud.io/guide/predictions)::

    {"data": {"image": "data:image/png;base64,...",        # image samples, or
              "values": {"f0": 0.1, "f1": 2.0, ...},         # tabular ones
              "edgeloop_task_id": 7, "sample_id": "...", "model": "m", "version": 1,
              "device_id": "...", "reason": "low_confidence"},
     "predictions": [{"model_version": "m v1", "score": 0.41,
                      "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                  "value": {"choices": ["3"]}}]}]}

The model's top-1 prediction is the pre-annotation. :func:`labeling_config` is the matching
labeling configuration (``<Choices name="label" toName="image">`` with one ``<Choice>`` per
class). Label Studio keeps ``data`` as it is, so its JSON export carries ``edgeloop_task_id``
back.

Import (:func:`parse_export`): Label Studio's JSON export, a list of tasks each with
``annotations`` (``result`` items of type ``choices``, ``was_cancelled``, ``completed_by``).
Per task the newest annotation that is not cancelled counts; a task whose annotations are all
cancelled is a skip; a task without annotations is left open. Every problem of the whole file
is collected and reported in one :class:`~cloud.errors.InvalidRequestError` naming the task
(its position and ``edgeloop_task_id``) and the field, before anything is applied.

Images: an input of shape ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` (a leading batch axis
of 1 is dropped) with ``H, W >= 2`` is an image; it is scaled min..max to 0..255 (a constant
image is black) and encoded as an 8-bit grey or RGB PNG, enlarged ``scale`` times with
nearest-neighbour so tiny inputs (8x8 digits) are visible. Anything else is tabular.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from xml.sax.saxutils import quoteattr

import numpy as np
import numpy.typing as npt

from cloud.errors import InvalidRequestError

FROM_NAME = "label"
MAX_PNG_SIDE = 512
MAX_IMPORT_ERRORS = 20


# ---------------------------------------------------------------- images


def as_image(x: npt.NDArray[Any]) -> npt.NDArray[np.uint8] | None:
    """``x`` as an ``(H, W)`` or ``(H, W, 3)`` uint8 image, or None if it is not an image."""
    a = np.asarray(x)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim == 3 and a.shape[0] == 3:
        a = np.transpose(a, (1, 2, 0))
    elif a.ndim != 2:
        return None
    if a.shape[0] < 2 or a.shape[1] < 2 or not np.issubdtype(a.dtype, np.number):
        return None
    f = np.nan_to_num(a.astype(np.float64))
    lo, hi = float(f.min()), float(f.max())
    scaled = (f - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(f)
    return np.ascontiguousarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def png_bytes(image: npt.NDArray[np.uint8], *, scale: int = 1) -> bytes:
    """An 8-bit grey (``(H, W)``) or RGB (``(H, W, 3)``) PNG of ``image``, ``scale`` x larger."""
    if scale > 1:
        image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    height, width = int(image.shape[0]), int(image.shape[1])
    colour = 2 if image.ndim == 3 else 0
    rows = image.reshape(height, -1)
    raw = b"".join(b"\x00" + rows[r].tobytes() for r in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def display_scale(image: npt.NDArray[np.uint8], *, target: int = 256) -> int:
    """The integer enlargement that brings the longer side near ``target`` (at most 512)."""
    side = max(int(image.shape[0]), int(image.shape[1]))
    return max(1, min(target // side, MAX_PNG_SIDE // side))


def png_data_uri(image: npt.NDArray[np.uint8], *, scale: int | None = None) -> str:
    """``data:image/png;base64,...`` of ``image``."""
    factor = display_scale(image) if scale is None else scale
    return "data:image/png;base64," + base64.b64encode(png_bytes(image, scale=factor)).decode()


# ---------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportItem:
    """What one exported task needs: the label task's fields and its input."""

    task_id: int
    sample_id: str
    model: str
    version: int
    device_id: str
    reason: str
    prediction: str | None
    confidence: float | None
    inputs: npt.NDArray[Any]


def sample_kind(x: npt.NDArray[Any]) -> Literal["image", "table"]:
    """``image`` if :func:`as_image` can draw ``x``, else ``table``."""
    return "image" if as_image(x) is not None else "table"


def labeling_config(classes: Sequence[str], kind: Literal["image", "table"]) -> str:
    """The Label Studio labeling configuration (XML) matching :func:`export_task`."""
    obj = (
        '  <Image name="image" value="$image"/>'
        if kind == "image"
        else '  <Table name="table" value="$values"/>'
    )
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n"
        f"{obj}\n"
        f'  <Choices name="{FROM_NAME}" toName="{kind}" choice="single" showInLine="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def export_task(item: ExportItem) -> dict[str, Any]:
    """One Label Studio task (data + the prediction as a pre-annotation)."""
    image = as_image(item.inputs)
    data: dict[str, Any] = {}
    if image is not None:
        data["image"] = png_data_uri(image)
        to_name = "image"
    else:
        flat = np.asarray(item.inputs, dtype=np.float64).ravel()
        data["values"] = {f"f{i}": float(v) for i, v in enumerate(flat)}
        to_name = "table"
    data.update(
        edgeloop_task_id=item.task_id,
        sample_id=item.sample_id,
        model=item.model,
        version=item.version,
        device_id=item.device_id,
        reason=item.reason,
    )
    task: dict[str, Any] = {"data": data}
    if item.prediction is not None:
        prediction: dict[str, Any] = {
            "model_version": f"{item.model} v{item.version}",
            "result": [
                {
                    "from_name": FROM_NAME,
                    "to_name": to_name,
                    "type": "choices",
                    "value": {"choices": [item.prediction]},
                }
            ],
        }
        if item.confidence is not None:
            prediction["score"] = float(item.confidence)
        task["predictions"] = [prediction]
    return task


# ---------------------------------------------------------------- import


@dataclass(frozen=True)
class ImportedLabel:
    """One task's outcome in a Label Studio export: a label, or a skip (``label`` None)."""

    task_id: int
    label: str | None
    labeled_by: str
    position: int


def _who(annotation: dict[str, Any]) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return f"labelstudio:{who}" if who not in (None, "") else "labelstudio"


def _when(annotation: dict[str, Any]) -> str:
    value = annotation.get("updated_at") or annotation.get("created_at") or ""
    if not isinstance(value, str):
        return ""
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).isoformat()
    except ValueError:
        return value


def _choice(result: Any, where: str, errors: list[str]) -> str | None:
    if not isinstance(result, list):
        errors.append(f"{where}.result: expected a list, got {type(result).__name__}")
        return None
    found: list[str] = []
    for j, item in enumerate(result):
        at = f"{where}.result[{j}]"
        if not isinstance(item, dict):
            errors.append(f"{at}: expected an object, got {type(item).__name__}")
            continue
        if item.get("type") != "choices":
            continue
        value = item.get("value")
        choices = value.get("choices") if isinstance(value, dict) else None
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], str):
            errors.append(f"{at}.value.choices: expected exactly one class name, got {choices!r}")
            continue
        found.append(choices[0])
    if not found:
        errors.append(f"{where}.result: no 'choices' result (the class label)")
        return None
    if len(set(found)) > 1:
        errors.append(f"{where}.result: several different choices {sorted(set(found))}")
        return None
    return found[0]


def parse_export(payload: Any) -> list[ImportedLabel]:
    """The labels and skips in a Label Studio JSON export (tasks without annotations: none).

    Raises:
        InvalidRequestError: the payload is not a list of tasks, or a task lacks
            ``data.edgeloop_task_id`` or has a malformed annotation; every problem is named
            as ``task #<position> (edgeloop_task_id <id>): <field>: <what is wrong>``.
    """
    if not isinstance(payload, list):
        raise InvalidRequestError(
            f"a Label Studio export is a JSON list of tasks, got {type(payload).__name__}"
        )
    errors: list[str] = []
    out: list[ImportedLabel] = []
    seen: dict[int, int] = {}
    for position, task in enumerate(payload):
        where = f"task #{position}"
        if not isinstance(task, dict):
            errors.append(f"{where}: expected an object, got {type(task).__name__}")
            continue
        data = task.get("data")
        task_id = data.get("edgeloop_task_id") if isinstance(data, dict) else None
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            errors.append(
                f"{where}: data.edgeloop_task_id: expected the integer id EdgeLoop exported, "
                f"got {task_id!r}"
            )
            continue
        where = f"{where} (edgeloop_task_id {task_id})"
        if task_id in seen:
            errors.append(f"{where}: the same task as task #{seen[task_id]}")
            continue
        seen[task_id] = position
        annotations = task.get("annotations", [])
        if not isinstance(annotations, list):
            errors.append(f"{where}: annotations: expected a list")
            continue
        live: list[tuple[str, int, dict[str, Any]]] = []
        cancelled = 0
        for k, annotation in enumerate(annotations):
            if not isinstance(annotation, dict):
                errors.append(f"{where}: annotations[{k}]: expected an object")
                continue
            if annotation.get("was_cancelled"):
                cancelled += 1
                continue
            live.append((_when(annotation), k, annotation))
        if live:
            _, k, newest = max(live, key=lambda t: (t[0], t[1]))
            label = _choice(newest.get("result"), f"{where}: annotations[{k}]", errors)
            if label is not None:
                out.append(ImportedLabel(task_id, label, _who(newest), position))
        elif cancelled:
            last = annotations[-1] if isinstance(annotations[-1], dict) else {}
            out.append(ImportedLabel(task_id, None, _who(last), position))
    if errors:
        more = len(errors) - MAX_IMPORT_ERRORS
        shown = "; ".join(errors[:MAX_IMPORT_ERRORS]) + (f"; and {more} more" if more > 0 else "")
        raise InvalidRequestError(f"Label Studio import refused, nothing applied: {shown}")
    return out
