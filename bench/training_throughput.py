"""Benchmark: training throughput of ``cloud.training.train`` against a plain torch loop, and
Optuna tuning trials/hour with 1 and 2 worker processes.

**Overhead.** For each model (built-in ``mlp`` and ``cnn`` on ``builtin:digits``, optionally
tiled ``--repeat`` times for longer epochs) and in interleaved rounds (``--rounds``) so that
load from other processes hits both sides alike:

* **plain**: the loop as one would write it by hand: same split (``split_dataset``), same
  model (``build_model``, same seed), same optimizer, batch size, per-epoch permutation from
  a seeded generator, one torch thread, a held-out evaluation after each epoch; only the
  training phase is timed.
* **train()**: our job's function on the same data and spec; its per-epoch
  ``EpochMetrics.samples_per_s`` (training phase, what the plain loop measures), and
  end-to-end samples/s (all epochs' samples over the whole call: evaluation after every
  epoch, ONNX export, baseline and files included).

Overhead = plain samples/s / train() samples/s - 1, from per-epoch medians (epoch 1, which
pays one-time allocations, excluded on both sides). Target (issue #5): within 10%.

**Tuning.** ``--trials`` trials (mlp, 3 epochs, no pruning) of one study on a fresh SQLite
database, run by 1 and then 2 spawned worker processes (``run_hpo_worker``). Reported:
trials/hour over the wall time including process start and imports, and over the span from
the first trial's start to the last trial's end (Optuna's timestamps): the steady rate.

It prints numbers and asserts none. Usage::

    python3 bench/training_throughput.py                  # mlp + cnn, 3 rounds, 8 trials
    python3 bench/training_throughput.py --quick          # 2 rounds, fewer epochs, 4 trials
    python3 bench/training_throughput.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _dataset(repeat: int) -> Any:
    from cloud.datasets import ArrayDataset, load_dataset

    ds = load_dataset("builtin:digits")
    if repeat <= 1:
        return ds
    return ArrayDataset(np.tile(ds.x, (repeat, 1, 1, 1)), np.tile(ds.y, repeat), ds.classes)


def plain_loop(spec: Any, ds: Any) -> list[float]:
    """The same training written plainly; samples/s of each epoch's training phase."""
    import torch
    from torch.nn import functional as F

    from cloud.datasets import split_dataset
    from cloud.training.models import build_model

    torch.set_num_threads(1)
    train_ds, test_ds = split_dataset(ds, test_fraction=spec.test_fraction, seed=spec.seed)
    torch.manual_seed(spec.seed)
    model = build_model(
        spec.architecture, spec.hparams, input_shape=ds.input_shape, num_classes=len(ds.classes)
    )
    opt = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
    x = torch.from_numpy(train_ds.x)
    y = torch.from_numpy(train_ds.y)
    gen = torch.Generator().manual_seed(spec.seed)
    rates = []
    for _ in range(spec.epochs):
        model.train()
        perm = torch.randperm(len(train_ds), generator=gen)
        t0 = time.perf_counter()
        seen = 0
        running = 0.0
        for start in range(0, len(train_ds), spec.batch_size):
            idx = perm[start : start + spec.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            running += loss.item() * len(idx)
            seen += len(idx)
        rates.append(seen / (time.perf_counter() - t0))
        model.eval()  # the held-out check every loop has (untimed, as in train())
        with torch.no_grad():
            logits = model(torch.from_numpy(test_ds.x))
            float((logits.argmax(1) == torch.from_numpy(test_ds.y)).float().mean())
    return rates


def ours(spec: Any, ds: Any, out: Path) -> tuple[list[float], float]:
    """Per-epoch training-phase samples/s of train(), and its end-to-end samples/s."""
    from cloud.training import train

    t0 = time.perf_counter()
    result = train(spec, ds, out)
    wall = time.perf_counter() - t0
    total = sum(m.samples for m in result.epochs)
    return [m.samples_per_s for m in result.epochs], total / wall


def overhead(args: argparse.Namespace) -> list[dict[str, Any]]:
    from cloud.training import TrainingSpec

    ds = _dataset(args.repeat)
    rows = []
    for arch, epochs in (("mlp", args.epochs), ("cnn", max(2, args.epochs // 2))):
        spec = TrainingSpec(architecture=arch, epochs=epochs, batch_size=64, learning_rate=3e-3)
        plain_r: list[float] = []
        ours_r: list[float] = []
        e2e: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            plain_loop(spec, ds)  # warm-up (first-use imports, allocator)
            for r in range(args.rounds):
                plain_r += plain_loop(spec, ds)[1:]
                rates, end_to_end = ours(spec, ds, Path(tmp) / f"run-{r}")
                ours_r += rates[1:]
                e2e.append(end_to_end)
        row = {
            "model": arch,
            "samples_per_epoch": int(round(len(ds) * (1 - spec.test_fraction))),
            "epochs": epochs,
            "rounds": args.rounds,
            "plain_samples_per_s": statistics.median(plain_r),
            "train_samples_per_s": statistics.median(ours_r),
            "train_end_to_end_samples_per_s": statistics.median(e2e),
        }
        row["overhead"] = row["plain_samples_per_s"] / row["train_samples_per_s"] - 1
        rows.append(row)
        print(
            f"{arch:4s} plain {row['plain_samples_per_s']:9.0f}/s  train() "
            f"{row['train_samples_per_s']:9.0f}/s  overhead {100 * row['overhead']:+5.1f}%  "
            f"(end-to-end {row['train_end_to_end_samples_per_s']:.0f}/s)",
            flush=True,
        )
    return rows


def _worker(url: str, study: str, spec_json: str, data: str, out_root: str) -> int:
    from cloud.datasets import load_dataset
    from cloud.training import HpoSpec, run_hpo_worker

    return run_hpo_worker(
        url, study, HpoSpec.model_validate_json(spec_json), load_dataset(data), Path(out_root)
    )


def tuning(args: argparse.Namespace) -> list[dict[str, Any]]:
    import optuna

    from cloud.training import create_study, parse_hpo_spec
    from cloud.training.hpo import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ds = _dataset(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits.npz"
        np.savez(data, x=ds.x, y=ds.y, classes=np.array(ds.classes))
        for workers in (1, 2):
            spec = parse_hpo_spec(
                {
                    "base": {"architecture": "mlp", "epochs": 3},
                    "search_space": {
                        "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                        "hidden": {"type": "int", "low": 32, "high": 128, "step": 32},
                    },
                    "n_trials": args.trials,
                    "workers": workers,
                    "pruner": "none",
                }
            )
            url = f"sqlite:///{tmp}/w{workers}.db"
            create_study(url, "bench", spec)
            ctx = multiprocessing.get_context("spawn")
            job = (url, "bench", spec.model_dump_json(), str(data), f"{tmp}/t{workers}")
            t0 = time.perf_counter()
            with ctx.Pool(workers) as pool:
                ran = pool.starmap(_worker, [job] * workers)
            wall = time.perf_counter() - t0
            trials = optuna.load_study(study_name="bench", storage=make_storage(url)).trials
            span = (
                max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
            ).total_seconds()
            row = {
                "workers": workers,
                "trials": sum(ran),
                "per_worker": ran,
                "wall_s": wall,
                "trials_per_hour_wall": 3600 * sum(ran) / wall,
                "span_s": span,
                "trials_per_hour_steady": 3600 * sum(ran) / span,
            }
            rows.append(row)
            print(
                f"{workers} worker(s): {sum(ran)} trials {ran}, wall {wall:.1f} s "
                f"({row['trials_per_hour_wall']:.0f}/h), first start to last end {span:.1f} s "
                f"({row['trials_per_hour_steady']:.0f}/h)",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the numbers (and write JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8, help="mlp epochs (cnn: half)")
    parser.add_argument("--repeat", type=int, default=1, help="tile digits N times")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 4 epochs, 4 trials")
    parser.add_argument("--skip-tuning", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.epochs, args.trials = 2, 4, 4
    import os

    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()}", flush=True)
    result: dict[str, Any] = {"overhead": overhead(args)}
    if not args.skip_tuning:
        result["tuning"] = tuning(args)
    result["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
