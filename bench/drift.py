"""Benchmark: our drift statistics (PSI, KS, Wasserstein) against scipy.stats and Evidently.

For each n (10k, 100k and 1M rows by default) of a reference and a current frame of 10
float64 features (the current one shifted and widened on half of the features), in one run:

* **ours**: the production path from raw rows, as the data loop runs it
  (``agent.sketches`` + ``cloud.drift``). *baseline*: ``baseline_spec`` (quantile edges of
  the reference, 10 bins per feature) and the reference's counts on those edges
  (``SketchAccumulator``), which training does once per model version; *window*: the
  current rows' counts on the baseline's edges (``SketchAccumulator``, what a device does)
  and ``score_window`` (PSI, binned KS, Jensen-Shannon and binned Wasserstein for every
  feature, what the cloud does). The ratios use *ours total* = baseline + window.
* **scipy**: ``scipy.stats.ks_2samp`` and ``scipy.stats.wasserstein_distance`` per feature
  on the raw rows (method ``auto``: exact KS p-values up to 10k rows, asymptotic above).
* **Evidently**: ``Report([DataDriftPreset()]).run(current, reference)`` on pandas frames of
  the same rows (its default per-column test: Wasserstein for numerical columns over 1,000
  rows), with ``--evidently-methods`` also once per stat test ``psi``, ``ks`` and
  ``wasserstein`` (the same three statistics as ours, summed). Building the DataFrames is not
  timed. Skipped, with the reason printed, when ``evidently`` is not installed.

Times are the median of ``--repeat`` runs after one warm-up. It prints per n the times, the
ratios ours / Evidently (issue target <= 0.1) and ours / scipy, the scaling exponent of each
method (slope of log time against log n, least squares over the sizes) and a sanity check of
the statistics (our binned KS is a lower bound of the exact one). It asserts nothing about
timings: a benchmark, not a test. Usage::

    python -m bench.drift                      # n = 10k, 100k, 1M
    python -m bench.drift --quick              # n = 10k, 100k
    python -m bench.drift --n 50000 --repeat 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

from agent.sketches import SketchAccumulator, SketchCounts, baseline_spec  # noqa: E402
from cloud.baseline import TrainingBaseline  # noqa: E402
from cloud.drift import WindowDrift, score_window  # noqa: E402

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
N_FEATURES = 10
BINS = 10
EVIDENTLY_METHODS = ("psi", "ks", "wasserstein")

Frame = npt.NDArray[np.float64]


def make_data(n: int, *, features: int = N_FEATURES, seed: int = 0) -> tuple[Frame, Frame]:
    """A reference and a current frame of ``n`` rows; the current one drifts on half the
    features (mean +1, scale x1.2)."""
    rng = np.random.default_rng(seed)
    reference = rng.standard_normal((n, features))
    current = rng.standard_normal((n, features))
    current[:, : features // 2] = current[:, : features // 2] * 1.2 + 1.0
    return reference, current


# ---------------------------------------------------------------- the three contenders


def ours_baseline(reference: Frame) -> TrainingBaseline:
    """The training side: quantile edges of ``reference`` and its counts on them."""
    spec = baseline_spec(reference, num_classes=1, bins=BINS)
    acc = SketchAccumulator(spec)
    acc.update(reference, None)
    counts = acc.take()
    return TrainingBaseline(
        sketch=spec,
        classes=["c"],
        n_samples=counts.n_samples,
        feature_counts=counts.feature_counts,
        class_counts=[0],
        label_counts=[0],
        confidence_counts=[0] * (len(spec.confidence_edges) + 1),
        quantile_levels=[],
        feature_quantiles=[[] for _ in range(spec.reduction.num_features)],
        reservoir=[],
    )


def ours_window(baseline: TrainingBaseline, current: Frame) -> WindowDrift:
    """The device and cloud side: ``current``'s counts on the baseline's edges, scored."""
    acc = SketchAccumulator(baseline.sketch)
    acc.update(current, None)
    counts: SketchCounts = acc.take()
    return score_window(baseline, counts, metric="psi")


def scipy_direct(reference: Frame, current: Frame) -> list[tuple[float, float]]:
    """(KS statistic, Wasserstein distance) per feature on the raw rows."""
    from scipy.stats import ks_2samp, wasserstein_distance  # type: ignore[import-untyped]

    return [
        (
            float(ks_2samp(reference[:, j], current[:, j]).statistic),
            float(wasserstein_distance(reference[:, j], current[:, j])),
        )
        for j in range(reference.shape[1])
    ]


def evidently_missing() -> str | None:
    """Why Evidently cannot run here (None: it can)."""
    try:
        from evidently import Report  # type: ignore[import-untyped]  # noqa: F401
        from evidently.presets import (  # type: ignore[import-untyped]  # noqa: F401
            DataDriftPreset,
        )
    except ImportError as err:
        return (
            f"evidently is not importable ({err}); pip install evidently "
            "(the dev extra has it) to compare with it"
        )
    return None


def evidently_frames(reference: Frame, current: Frame) -> tuple[Any, Any]:
    """The rows as pandas DataFrames (not timed)."""
    import pandas as pd  # type: ignore[import-untyped]

    columns = [f"f{j}" for j in range(reference.shape[1])]
    return pd.DataFrame(reference, columns=columns), pd.DataFrame(current, columns=columns)


def evidently_run(ref_df: Any, cur_df: Any, method: str | None = None) -> Any:
    """Evidently's data drift preset (its default per-column test, or ``method``)."""
    from evidently import Report
    from evidently.presets import DataDriftPreset

    preset = DataDriftPreset() if method is None else DataDriftPreset(method=method)
    return Report([preset]).run(current_data=cur_df, reference_data=ref_df)


# ---------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds of ``repeat`` calls after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def scaling_exponent(sizes: Sequence[int], seconds: Sequence[float]) -> float | None:
    """Slope of log(time) against log(n) (None with fewer than two sizes)."""
    if len(sizes) < 2:
        return None
    slope, _ = np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(seconds)), 1)
    return float(slope)


def run_size(n: int, *, repeat: int, evidently: bool, methods: bool) -> dict[str, Any]:
    """Every contender on ``n`` rows; seconds and a check of the statistics."""
    reference, current = make_data(n)
    row: dict[str, Any] = {"n": n}
    row["ours_baseline_s"], baseline = timed(lambda: ours_baseline(reference), repeat)
    row["ours_window_s"], drift = timed(lambda: ours_window(baseline, current), repeat)
    row["ours_s"] = row["ours_baseline_s"] + row["ours_window_s"]
    row["scipy_s"], exact = timed(lambda: scipy_direct(reference, current), repeat)
    row["check"] = {
        "ours_psi_max": round(drift.metrics["psi"], 4),
        "ours_ks_binned_max": round(drift.metrics["ks"], 4),
        "scipy_ks_max": round(max(ks for ks, _ in exact), 4),
        "drifted_features_ours": sorted(drift.drifted_features),
    }
    if evidently:
        ref_df, cur_df = evidently_frames(reference, current)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["evidently_s"], _ = timed(lambda: evidently_run(ref_df, cur_df), repeat)
            if methods:
                per = {}
                for method in EVIDENTLY_METHODS:
                    per[method], _ = timed(
                        lambda m=method: evidently_run(ref_df, cur_df, m),  # type: ignore[misc]
                        repeat,
                    )
                row["evidently_methods_s"] = per
                row["evidently_3_s"] = sum(per.values())
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value * 1000:.1f}"
    return f"{value:.3f}"


def print_report(report: dict[str, Any]) -> None:
    """The table of times and ratios, the scaling exponents and the statistics' check."""
    rows = report["rows"]
    has_ev = "evidently_s" in rows[0]
    has_3 = "evidently_3_s" in rows[0]
    print(
        f"\nDrift: {N_FEATURES} features, {BINS} bins, median of {report['settings']['repeat']} "
        f"(ms; {report['machine']['cpus']} CPUs, load at start {report['machine']['loadavg']})"
    )
    head = ["n", "ours base", "ours window", "ours total", "scipy"]
    if has_ev:
        head += ["Evidently", "ours÷Evidently"]
    if has_3:
        head += ["Evidently 3 tests", "ours÷Ev 3 tests"]
    head += ["ours÷scipy"]
    print(" | ".join(head))
    for r in rows:
        cells = [
            f"{r['n']:,}",
            _fmt(r["ours_baseline_s"], "ms"),
            _fmt(r["ours_window_s"], "ms"),
            _fmt(r["ours_s"], "ms"),
            _fmt(r["scipy_s"], "ms"),
        ]
        if has_ev:
            cells += [_fmt(r["evidently_s"], "ms"), _fmt(_ratio(r["ours_s"], r["evidently_s"]))]
        if has_3:
            cells += [
                _fmt(r["evidently_3_s"], "ms"),
                _fmt(_ratio(r["ours_s"], r["evidently_3_s"])),
            ]
        cells += [_fmt(_ratio(r["ours_s"], r["scipy_s"]))]
        print(" | ".join(cells))
    print("scaling exponent (slope of log time vs log n):")
    for name, value in report["scaling"].items():
        print(f"  {name}: {_fmt(value)}")
    if report.get("evidently_skipped"):
        print(f"Evidently skipped: {report['evidently_skipped']}")
    print("check (max over features):")
    for r in rows:
        print(f"  n={r['n']:,}: {r['check']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write ``--json`` if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="n = 10k and 100k only")
    parser.add_argument(
        "--n", type=int, action="append", default=None, help="rows (repeatable; overrides sizes)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender (median)")
    parser.add_argument("--no-evidently", action="store_true", help="skip Evidently")
    parser.add_argument(
        "--evidently-methods",
        action="store_true",
        help="also time Evidently once per stat test psi, ks, wasserstein",
    )
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    sizes = tuple(args.n) if args.n else (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if any(n < 10 for n in sizes):
        parser.error(f"--n must be >= 10 rows, got {list(sizes)}")
    skipped = "--no-evidently" if args.no_evidently else evidently_missing()
    if skipped and not args.no_evidently:
        print(f"Evidently skipped: {skipped}", file=sys.stderr)
    report: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg": [round(v, 2) for v in os.getloadavg()],
        },
        "settings": {"sizes": list(sizes), "repeat": args.repeat, "features": N_FEATURES},
        "evidently_skipped": skipped,
        "rows": [],
    }
    for n in sizes:
        print(f"n = {n:,} ...", file=sys.stderr)
        report["rows"].append(
            run_size(
                n,
                repeat=args.repeat,
                evidently=skipped is None,
                methods=args.evidently_methods,
            )
        )
    rows = report["rows"]
    names = ["ours_s", "ours_window_s", "scipy_s"]
    names += [k for k in ("evidently_s", "evidently_3_s") if k in rows[0]]
    report["scaling"] = {
        name: scaling_exponent([r["n"] for r in rows], [r[name] for r in rows]) for name in names
    }
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if all(math.isfinite(r["ours_s"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
