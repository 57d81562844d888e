"""Samples of the NPU path: calibration inputs and the inputs int8 accuracy is measured on.

Calibration and measurement must not share samples, or the int8 model's agreement with
fp32 is measured where its activation ranges were fitted (flattering it). So:

- ``--eval-data FILE.npz`` given: calibrate on the calibration samples, measure on these;
- otherwise, with at least ``MIN_SAMPLES_TO_HOLD_OUT`` calibration samples: hold out the
  last ``HOLDOUT_SHARE`` of them (deterministic, at least one), calibrate on the rest;
- otherwise: measure on the calibration samples themselves, and say so in the report.

Both files share one layout: one array per model input (samples on axis 0, each sample the
input's full shape) and optionally ``labels`` (or ``label``/``y``), one class index each.
"""

from __future__ import annotations

import filecmp
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from compiler.accuracy import make_inputs
from compiler.errors import InvalidInputError, UsageError

if TYPE_CHECKING:
    from compiler.frontends import SourceModel

Array = npt.NDArray[Any]
LABEL_KEYS = ("labels", "label", "y")
HOLDOUT_SHARE = 0.25
MIN_SAMPLES_TO_HOLD_OUT = 8
EvalKind = Literal["eval_data", "held_out", "calibration"]


@dataclass(frozen=True)
class SampleSet:
    """Samples (one array per model input each) and their labels, if the data had any."""

    samples: list[list[Array]]
    labels: Array | None
    source: str  # file name, or "random (seed N)"
    random: bool = False  # seeded random inputs, not data
    available: int = 0  # samples in the file (more than ``samples`` when capped)

    def __len__(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class SamplePlan:
    """What calibration sees and what int8 accuracy is measured on."""

    calibration: SampleSet
    evaluation: SampleSet
    kind: EvalKind
    disjoint: bool  # no evaluation sample was seen by calibration
    description: str

    def to_dict(self) -> dict[str, Any]:
        """``int8_accuracy.measured_on`` of report.json."""
        return {
            "kind": self.kind,
            "source": self.evaluation.source,
            "samples": len(self.evaluation),
            "calibration_samples": len(self.calibration),
            "disjoint_from_calibration": self.disjoint,
            "description": self.description,
        }


def held_out_count(total: int) -> int:
    """How many of ``total`` calibration samples are held out for measuring accuracy."""
    if total < MIN_SAMPLES_TO_HOLD_OUT:
        return 0
    return max(1, int(total * HOLDOUT_SHARE))


def plan_samples(
    model: SourceModel,
    *,
    count: int,
    seed: int,
    calibration_data: Path | None,
    eval_data: Path | None,
) -> SamplePlan:
    """Load (and check) the calibration and evaluation samples, ``count`` at most of each.

    Raises:
        UsageError: ``count`` below 1.
        InvalidInputError: a file that is missing, unreadable or does not fit the model,
            naming the option and the value (nothing is computed before this).
    """
    if count < 1:
        raise UsageError(f"--samples {count}: give at least 1 sample")
    if calibration_data is not None:
        loaded = load_npz(calibration_data, "--calibration-data", model, count)
    else:
        specs = [(t.name, t.shape, t.dtype) for t in model.inputs]
        inputs = make_inputs(specs, samples=count, seed=seed)
        loaded = SampleSet(inputs, None, f"random (seed {seed})", random=True)
    if eval_data is not None:
        evaluation = load_npz(eval_data, "--eval-data", model, count)
        same = calibration_data is not None and _same_file(calibration_data, eval_data)
        shown = (
            f"the first {len(evaluation)} of {evaluation.available}"
            if evaluation.available > len(evaluation)
            else str(len(evaluation))
        )
        description = f"{shown} sample(s) of --eval-data {evaluation.source}" + (
            ", the same file as --calibration-data: measured on calibration samples, "
            "which flatters the int8 model"
            if same
            else ", not used for calibration"
        )
        return SamplePlan(loaded, evaluation, "eval_data", not same, description)
    held = held_out_count(len(loaded))
    if held == 0:
        description = (
            f"the {len(loaded)} calibration sample(s) themselves ({loaded.source}; fewer than "
            f"{MIN_SAMPLES_TO_HOLD_OUT} to hold any out): this flatters the int8 model, give "
            "--eval-data or more calibration samples"
        )
        return SamplePlan(loaded, loaded, "calibration", False, description)
    keep = len(loaded) - held
    labels = loaded.labels
    calibration = replace(
        loaded, samples=loaded.samples[:keep], labels=None if labels is None else labels[:keep]
    )
    evaluation = replace(
        loaded, samples=loaded.samples[keep:], labels=None if labels is None else labels[keep:]
    )
    description = (
        f"{held} held-out sample(s): the last {HOLDOUT_SHARE:.0%} of {len(loaded)} from "
        f"{loaded.source}, which calibration (on the first {keep}) did not see"
    )
    return SamplePlan(calibration, evaluation, "held_out", True, description)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def load_npz(path: Path, option: str, model: SourceModel, count: int) -> SampleSet:
    """The first ``count`` samples of an .npz for ``model``'s inputs, with labels if any.

    Raises:
        InvalidInputError: unreadable or single-array file, a missing input, an array of the
            wrong kind (float vs integer), rank or per-sample shape, no samples, or labels
            that are not one integer class index per sample. The message names ``option``.
    """
    try:
        data = np.load(path)
    except (OSError, ValueError) as err:
        raise InvalidInputError(
            f"{option} {str(path)!r} is not a readable .npz file: {err}"
        ) from err
    names = ", ".join(t.name for t in model.inputs)
    if not hasattr(data, "files"):
        raise InvalidInputError(
            f"{option} {str(path)!r} is a single array; give an .npz with one "
            f"array per input ({names}), samples on axis 0"
        )
    with data:
        missing = [t.name for t in model.inputs if t.name not in data.files]
        if missing:
            raise InvalidInputError(
                f"{option} lacks input(s) {', '.join(missing)}; it has: "
                f"{', '.join(data.files) or 'nothing'} (one array per input, samples on axis 0)"
            )
        arrays = {t.name: np.asarray(data[t.name]) for t in model.inputs}
        for t in model.inputs:
            arr = arrays[t.name]
            want = np.dtype(t.dtype)
            dims = "x".join(map(str, t.shape))
            same_kind = (
                np.issubdtype(arr.dtype, np.floating) and np.issubdtype(want, np.floating)
            ) or (np.issubdtype(arr.dtype, np.integer) and np.issubdtype(want, np.integer))
            if not same_kind:
                raise InvalidInputError(
                    f"{option} input {t.name!r} is {arr.dtype}; the model needs "
                    f"{want} (samples on axis 0, shape N x {dims})"
                )
            if arr.ndim != len(t.shape) + 1:
                raise InvalidInputError(
                    f"{option} input {t.name!r} has shape "
                    f"{'x'.join(map(str, arr.shape))}; expected N x {dims} (samples on axis 0)"
                )
            if list(arr.shape[1:]) != list(t.shape):
                raise InvalidInputError(
                    f"{option} input {t.name!r}: each sample has shape "
                    f"{'x'.join(map(str, arr.shape[1:]))}; the model needs {dims}"
                )
        available = min((len(a) for a in arrays.values()), default=0)
        if available == 0:
            raise InvalidInputError(f"{option} {str(path)!r} holds no samples")
        key = next((k for k in LABEL_KEYS if k in data.files), None)
        labels = _check_labels(option, key, data[key], available) if key else None
    n = min(available, count)
    samples = [[arrays[t.name][k].astype(t.dtype) for t in model.inputs] for k in range(n)]
    return SampleSet(samples, None if labels is None else labels[:n], path.name, False, available)


def _check_labels(option: str, key: str, raw: Any, count: int) -> Array:
    labels = np.asarray(raw).reshape(-1)
    if len(labels) != count:
        raise InvalidInputError(f"{option} {key!r} has {len(labels)} labels for {count} samples")
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating)
        and bool(np.all(np.isfinite(labels)))
        and bool(np.all(labels == np.round(labels)))
    )
    if not integral or (labels.size and int(labels.min()) < 0):
        shown = ", ".join(map(str, labels[:3].tolist()))
        raise InvalidInputError(
            f"{option} {key!r} must hold class indices (integers >= 0, one per sample); "
            f"it is {labels.dtype} starting {shown}"
        )
    return labels.astype(np.int64)
