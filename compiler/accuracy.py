"""Accuracy-gate arithmetic: compare artifact outputs with reference outputs (pure numpy).

Metrics per output (over all samples): max absolute error, max relative error
(``max|a-r| / max(max|r|, tiny)`` so near-zero references do not explode), cosine
similarity of the flattened tensors, and top-1 agreement when the output is a score
vector (last dimension > 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from compiler.profiles import AccuracySpec

_TINY = 1e-12


@dataclass(frozen=True)
class OutputAccuracy:
    """Agreement of one model output with its reference over all samples."""

    name: str
    max_abs_error: float
    max_rel_error: float
    cosine: float
    top1_agreement: float | None

    def violations(self, spec: AccuracySpec) -> list[str]:
        """Human-readable tolerance violations (empty when within tolerance)."""
        problems = []
        if not self.max_abs_error <= spec.max_abs_error:
            problems.append(f"max abs error {self.max_abs_error:.3g} > {spec.max_abs_error:.3g}")
        if not self.max_rel_error <= spec.max_rel_error:
            problems.append(f"max rel error {self.max_rel_error:.3g} > {spec.max_rel_error:.3g}")
        if not self.cosine >= spec.min_cosine:
            problems.append(f"cosine {self.cosine:.6f} < {spec.min_cosine:.6f}")
        if self.top1_agreement is not None and self.top1_agreement < spec.min_top1_agreement:
            problems.append(
                f"top-1 agreement {self.top1_agreement:.3f} < {spec.min_top1_agreement:.3f}"
            )
        return [f"output {self.name!r}: {p}" for p in problems]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for report.json."""
        return asdict(self)


def compare_output(
    name: str,
    actual: Sequence[npt.NDArray[Any]],
    reference: Sequence[npt.NDArray[Any]],
) -> OutputAccuracy:
    """Compare one output across samples.

    Raises:
        ValueError: sample counts or shapes differ (a broken artifact, not a tolerance issue).
    """
    if len(actual) != len(reference) or not actual:
        raise ValueError(f"output {name!r}: {len(actual)} samples vs {len(reference)} references")
    for k, (a, r) in enumerate(zip(actual, reference, strict=True)):
        if a.shape != r.shape:
            raise ValueError(f"output {name!r} sample {k}: shape {a.shape} != reference {r.shape}")
    a_all = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in actual])
    r_all = np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in reference])
    if not (np.all(np.isfinite(a_all)) and np.all(np.isfinite(r_all))):
        nan_cos = float("nan")
        return OutputAccuracy(name, float("inf"), float("inf"), nan_cos, None)
    diff = np.abs(a_all - r_all)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(r_all).max()) if r_all.size else 0.0
    max_rel = max_abs / max(scale, _TINY)
    norm = float(np.linalg.norm(a_all) * np.linalg.norm(r_all))
    cosine = float(np.dot(a_all, r_all) / norm) if norm > 0 else (1.0 if max_abs == 0 else 0.0)
    top1: float | None = None
    if (
        actual[0].ndim >= 1
        and actual[0].shape[-1] > 1
        and np.issubdtype(actual[0].dtype, np.floating)
    ):
        hits = [
            np.mean(np.argmax(a, axis=-1) == np.argmax(r, axis=-1))
            for a, r in zip(actual, reference, strict=True)
        ]
        top1 = float(np.mean(hits))
    return OutputAccuracy(name, max_abs, max_rel, min(cosine, 1.0), top1)


def make_inputs(
    specs: Sequence[tuple[str, Sequence[int], str]], *, samples: int, seed: int = 0
) -> list[list[npt.NDArray[Any]]]:
    """Random inputs per sample: standard normal for floats, small integers otherwise."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(samples):
        one = []
        for _name, shape, dtype in specs:
            if np.issubdtype(np.dtype(dtype), np.floating):
                one.append(rng.standard_normal(tuple(shape)).astype(dtype))
            elif np.dtype(dtype) == np.bool_:
                one.append(rng.integers(0, 2, size=tuple(shape)).astype(dtype))
            else:
                one.append(rng.integers(0, 10, size=tuple(shape)).astype(dtype))
        batches.append(one)
    return batches
