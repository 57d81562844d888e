"""Benchmark: TVM (untuned and MetaSchedule-tuned) against ONNX Runtime, batch 1, on this CPU.

For each model (plain-torch definitions in ``bench/models.py``, exported to ONNX) and each
hardware profile it measures, in one run on one machine:

* TVM untuned: ``build_library(..., trials=0)``, the default schedules;
* TVM tuned: ``build_library(..., trials=N, tuning_db=DB)``, MetaSchedule with N trials;
* ONNX Runtime on the same ONNX file and the same input;
* the runtime ``edgeloop compile --runtime auto`` would ship (``compile_model`` on the tuned
  database with ``trials=0``), judged against this script's own ORT measurement.

TVM libraries run through ``compiler.execution.run_library`` (a child process in TVM
runtime-only mode, as on a device). ONNX Runtime runs through
``compiler.execution.run_onnxruntime``, in a child process of its own, a fresh one per block,
as ``edgeloop compile --runtime auto`` times it: the same thread count (``--threads``:
``TVM_NUM_THREADS`` with unpinned threads, ``intra_op_num_threads``; also MetaSchedule's
runner while tuning), the same input, warm-up and runs, in interleaved rounds (A/B, B/A, ...)
so that load from other processes hits both alike. Why a fresh process per block: with 2
unpinned threads on 2 vCPUs the scheduler often leaves both threads of a process on one CPU,
for hundreds of calls at a time (ORT's mlp: ~34 us instead of ~19 us, as slow as 1 thread;
docs/benchmarks.md), so one long-lived ORT session against a fresh TVM runner per block
compared different luck, not runtimes. Ratios are TVM median / ORT median: below 1 means TVM
is faster.

It prints numbers and asserts none: a benchmark, not a test. Usage::

    python -m bench.compile_vs_ort              # all models, generic/x86_64: 25-40 min on 2 cores
    python -m bench.compile_vs_ort --quick      # small_cnn + mlp with few trials: ~5 min
    python -m bench.compile_vs_ort --models mlp --trials mlp=192 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` and `compiler` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL_NAMES = ("mobilenet_v2", "resnet18", "small_cnn", "mlp")
# Total MetaSchedule trials per model and profile. build_library splits them over the model's
# tasks (33 / 19 / 9 / 3) by weight x max(FLOPs, 4 x bytes), at most the profile's
# max_trials_per_task (512 for x86) each and one for tasks with a single schedule
# (compiler/tuning_plan.py), so the big convolutions get most of them. These defaults keep a
# full run under an hour; the target needs far more. Each task costs 15-30 s of search and
# builds on 2 shared cores besides its trials (docs/benchmarks.md).
DEFAULT_TRIALS = {"mobilenet_v2": 264, "resnet18": 304, "small_cnn": 144, "mlp": 96}
QUICK_MODELS = ("small_cnn", "mlp")
QUICK_TRIALS = {"mobilenet_v2": 66, "resnet18": 38, "small_cnn": 72, "mlp": 48}
DEFAULT_PROFILES = ("generic/x86_64",)
TARGET_RATIO = 0.8  # issue 2: tuned TVM <= 0.8x ORT

log = logging.getLogger("bench")


@dataclass
class Measurement:
    """Latencies of one runtime on one model (milliseconds)."""

    runs_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float | None:
        """Median latency, or None when nothing was measured."""
        return statistics.median(self.runs_ms) if self.runs_ms else None

    def summary(self) -> dict[str, float | int | None]:
        """JSON-ready summary (median, p90, min, number of runs)."""
        if not self.runs_ms:
            return {"median_ms": None, "runs": 0}
        ordered = sorted(self.runs_ms)
        return {
            "median_ms": round(statistics.median(ordered), 4),
            "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
            "min_ms": round(ordered[0], 4),
            "runs": len(ordered),
        }


@dataclass
class ModelResult:
    """Everything measured for one model on one profile."""

    model: str
    description: str
    input_shape: list[int]
    profile: str
    trials_requested: int
    precision: str = "fp32"  # of the TVM builds; ORT's is fp32
    tuning: dict[str, Any] = field(default_factory=dict)
    untuned_build_s: float | None = None
    tvm_untuned: Measurement = field(default_factory=Measurement)
    tvm_tuned: Measurement = field(default_factory=Measurement)
    tvm_tuned_default_threads: Measurement = field(default_factory=Measurement)
    tvm_default_threads: int | None = None
    tvm_threads_reported: int | None = None
    ort: Measurement = field(default_factory=Measurement)
    round_ratios: list[float] = field(default_factory=list)
    round_medians_ms: list[dict[str, float]] = field(default_factory=list)
    max_abs_diff_vs_ort: float | None = None
    multiply_adds: int | None = None
    shipped_runtime: str | None = None
    shipped_reason: str | None = None
    shipped_error: str | None = None
    error: str | None = None

    def ratio(self, which: Measurement) -> float | None:
        """``which`` median over the ORT median (TVM/ORT; below 1 means TVM is faster)."""
        num, den = which.median_ms, self.ort.median_ms
        return num / den if num is not None and den else None

    def min_ratio(self, which: Measurement) -> float | None:
        """``which`` fastest run over ORT's fastest run: less sensitive to load from others."""
        if not which.runs_ms or not self.ort.runs_ms:
            return None
        return min(which.runs_ms) / min(self.ort.runs_ms)

    def gmacs(self, which: Measurement) -> float | None:
        """G multiply-adds per second at ``which``'s median latency."""
        ms = which.median_ms
        return self.multiply_adds / ms / 1e6 if self.multiply_adds and ms else None

    @property
    def target_gmacs(self) -> float | None:
        """The throughput TVM would need to run at ``TARGET_RATIO`` x ORT's median latency."""
        ort = self.gmacs(self.ort)
        return ort / TARGET_RATIO if ort is not None else None

    @property
    def shipped(self) -> Measurement:
        """This run's measurement of the runtime that ``--runtime auto`` chose to ship."""
        if self.shipped_runtime == "tvm":
            return self.tvm_tuned
        if self.shipped_runtime == "onnxruntime":
            return self.ort
        return Measurement()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, ratios included."""
        data = asdict(self)
        keys = ("tvm_untuned", "tvm_tuned", "tvm_tuned_default_threads", "ort")
        for key in keys:
            data[key] = getattr(self, key).summary()
        data["ratios_vs_ort"] = {
            "tvm_untuned": _round(self.ratio(self.tvm_untuned)),
            "tvm_tuned": _round(self.ratio(self.tvm_tuned)),
            "tvm_tuned_default_threads": _round(self.ratio(self.tvm_tuned_default_threads)),
            "shipped": _round(self.ratio(self.shipped)),
            "tvm_tuned_min_over_ort_min": _round(self.min_ratio(self.tvm_tuned)),
            "median_of_round_ratios": _round(
                statistics.median(self.round_ratios) if self.round_ratios else None
            ),
        }
        data["gmacs_per_s"] = {
            "tvm_tuned": _round(self.gmacs(self.tvm_tuned), 1),
            "ort": _round(self.gmacs(self.ort), 1),
            "needed_for_target": _round(self.target_gmacs, 1),
        }
        return data


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@contextlib.contextmanager
def tvm_threads(threads: int | None) -> Iterator[None]:
    """Set ``TVM_NUM_THREADS`` (None: unset, TVM's own default) for child processes."""
    previous = os.environ.get("TVM_NUM_THREADS")
    if threads is None:
        os.environ.pop("TVM_NUM_THREADS", None)
    else:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = previous


def tvm_default_threads() -> int:
    """The thread count TVM's runtime picks when ``TVM_NUM_THREADS`` is unset (child process)."""
    code = "import tvm; print(tvm.get_global_func('runtime.NumThreads')())"
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env["TVM_USE_RUNTIME_LIB"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Options:
    """Parsed command line."""

    models: tuple[str, ...]
    profiles: tuple[str, ...]
    trials: dict[str, int]
    image_size: int
    threads: int
    warmup: int
    repeat: int
    rounds: int
    untuned_repeat: int
    tuning_db: Path | None
    work_dir: Path | None
    pipeline: bool
    seed: int
    json_out: Path | None
    verbose: int
    quick: bool
    weight_prepack: bool | None = None  # None: build_library's default (on when tuning)
    max_trials_per_task: int | None = None  # None: the profile's
    retune: bool = False  # tune the --tuning-db's recorded tasks further (staged tuning)
    fuse_blocks: bool | None = None  # None: build_library's default (on for AVX-512, AVX2 x86-64)
    precision: str = "fp32"  # "bf16": 1x1 convolutions with bf16 products (compiler/tvm_bf16.py)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _progress_printer(label: str) -> Any:
    state = {"next": 0.0, "start": time.monotonic()}

    def progress(done: int, planned: int) -> None:
        if planned and (done >= state["next"] or done == planned):
            elapsed = time.monotonic() - state["start"]
            _say(f"  {label}: {done}/{planned} trials measured ({elapsed:.0f} s)")
            state["next"] = done + max(1, planned // 4)

    return progress


def bench_model(
    spec: Any,
    profile_name: str,
    opts: Options,
    *,
    work: Path,
    tuning_db: Path,
    key_path: Path,
    default_threads: int,
) -> ModelResult:
    """Build, tune and time one model for one profile (see module docstring)."""
    from bench.models import export_onnx, multiply_adds
    from compiler import execution
    from compiler.accuracy import make_inputs
    from compiler.errors import CompilerError
    from compiler.frontends import load_model
    from compiler.profiles import ProfileRegistry
    from compiler.settings import CompilerSettings
    from compiler.tvm_builder import build_library

    settings = CompilerSettings()
    profile = ProfileRegistry(settings.profile_roots()).get(profile_name)
    if opts.max_trials_per_task is not None:
        cap = {"max_trials_per_task": opts.max_trials_per_task}
        profile = profile.model_copy(update={"tuning": profile.tuning.model_copy(update=cap)})
    host = execution.detect_host(cache_dir=settings.cache_dir)
    plan = execution.plan_execution(profile, host)
    trials = opts.trials[spec.name]
    result = ModelResult(
        model=spec.name,
        description=spec.description,
        input_shape=list(spec.input_shape),
        profile=profile_name,
        trials_requested=trials,
        precision=opts.precision,
        tvm_default_threads=default_threads,
        multiply_adds=multiply_adds(spec),
    )
    if plan.mode != "native":
        result.error = f"cannot run natively here: {plan.reason}"
        return result

    model_dir = work / profile_name.replace("/", "_") / spec.name
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = model_dir / f"{spec.name}.onnx"
    export_onnx(spec, str(onnx_path), seed=opts.seed)
    model = load_model(onnx_path)
    model.check_coverage()
    sample = make_inputs(
        [(t.name, t.shape, t.dtype) for t in model.inputs], samples=1, seed=opts.seed
    )[0]

    with tvm_threads(opts.threads):
        _say(f"{spec.name} / {profile_name}: untuned build")
        start = time.monotonic()
        untuned_lib = model_dir / "untuned.so"
        build_library(
            model.to_relax(),
            profile,
            out_path=untuned_lib,
            trials=0,
            tuning_db=None,
            fuse_blocks=opts.fuse_blocks,
            precision=opts.precision,
        )
        result.untuned_build_s = round(time.monotonic() - start, 1)
        untuned = execution.run_library(
            untuned_lib, [sample], plan, host, warmup=1, repeat=opts.untuned_repeat
        )
        result.tvm_untuned.runs_ms = untuned.latency_ms

        _say(f"{spec.name} / {profile_name}: tuning with {trials} trials")
        tuned_lib = model_dir / "tuned.so"
        stats = build_library(
            model.to_relax(),
            profile,
            out_path=tuned_lib,
            trials=trials,
            tuning_db=tuning_db,
            progress=_progress_printer(f"{spec.name} / {profile_name}"),
            runner_threads=opts.threads,
            weight_prepack=opts.weight_prepack,
            retune=opts.retune,
            fuse_blocks=opts.fuse_blocks,
            precision=opts.precision,
        )
        result.tuning = stats.to_dict()
        _say(
            f"{spec.name} / {profile_name}: tuned in {stats.wall_time_s:.0f} s "
            f"({stats.new_trials} new trials, {stats.tasks_total} tasks, "
            f"{len(stats.untuned_tasks)} left untuned)"
        )

    _say(f"{spec.name} / {profile_name}: timing TVM tuned and ORT in {opts.rounds} rounds")
    # Each runtime in a fresh child process per block, rounds alternating which goes first
    # (module docstring).
    per_round = max(1, opts.repeat // opts.rounds)

    def tvm_block() -> execution.ExecutionResult:
        return execution.run_library(
            tuned_lib,
            [sample],
            plan,
            host,
            warmup=opts.warmup,
            repeat=per_round,
            num_threads=opts.threads,
        )

    def ort_block() -> list[float]:
        return execution.run_onnxruntime(
            onnx_path, sample, threads=opts.threads, warmup=opts.warmup, runs=per_round
        ).latency_ms

    tuned = None
    for k in range(opts.rounds):
        if k % 2 == 0:
            tvm_run = tvm_block()
            ort_ms = ort_block()
        else:
            ort_ms = ort_block()
            tvm_run = tvm_block()
        tuned = tuned or tvm_run
        result.tvm_tuned.runs_ms += tvm_run.latency_ms
        result.ort.runs_ms += ort_ms
        medians = {
            "tvm": statistics.median(tvm_run.latency_ms),
            "ort": statistics.median(ort_ms),
        }
        result.round_medians_ms.append({n: round(v, 4) for n, v in medians.items()})
        result.round_ratios.append(medians["tvm"] / medians["ort"])
    assert tuned is not None
    result.tvm_threads_reported = tuned.num_threads
    ort_out = model.reference(sample)[0]
    diff = np.abs(np.asarray(tuned.outputs[0][0], dtype=np.float64) - ort_out)
    result.max_abs_diff_vs_ort = float(diff.max())
    with tvm_threads(None):
        default = execution.run_library(
            tuned_lib, [sample], plan, host, warmup=opts.warmup, repeat=per_round
        )
    result.tvm_tuned_default_threads.runs_ms = default.latency_ms

    if opts.pipeline:
        _say(f"{spec.name} / {profile_name}: edgeloop compile --runtime auto (trials 0, tuned DB)")
        from compiler.pipeline import CompileRequest, compile_model

        request = CompileRequest(
            model=onnx_path,
            profile=profile_name,
            output=model_dir / "artifact",
            trials=0,
            tuning_db=tuning_db,
            runtime="auto",
            signing_key=key_path,
            force=True,
            seed=opts.seed,
            latency_repeat=opts.repeat,
            fuse_blocks=opts.fuse_blocks,
            precision=opts.precision,
        )
        try:
            with tvm_threads(opts.threads):
                compiled = compile_model(request, settings=settings)
            result.shipped_runtime = compiled.report["runtime"]["chosen"]
            result.shipped_reason = compiled.report["runtime"]["reason"]
        except CompilerError as err:
            result.shipped_error = f"{type(err).__name__}: {err}"
    return result


def _fmt_ms(m: Measurement) -> str:
    value = m.median_ms
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _fmt_gmacs(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_table(
    results: Sequence[ModelResult], opts: Options, *, sgemm_gmacs: float | None = None
) -> None:
    """The results table (stdout), then any errors in full."""
    from rich.console import Console
    from rich.table import Table

    default_threads = next((r.tvm_default_threads for r in results if r.tvm_default_threads), "?")
    table = Table(
        title=f"TVM vs ONNX Runtime, batch 1, median ms, {opts.threads} thread(s) each"
        + (f"; TVM {opts.precision}, ORT fp32" if opts.precision != "fp32" else ""),
        caption="÷ORT columns are the ratios TVM latency / ORT latency measured in this run "
        "(medians; 'min' = fastest runs; 'default thr' = the tuned library without "
        f"TVM_NUM_THREADS, i.e. {default_threads} thread(s)): < 1 means TVM is faster. "
        "Both runtimes run in a fresh child process per block. "
        "'shipped' = the runtime edgeloop compile --runtime auto chose. "
        "GMAC/s: the model's multiply-adds per second at the median latency; 'for target': "
        f"what tuned TVM would need for {TARGET_RATIO}x ORT"
        + (
            f", against this machine's fp32 SGEMM at {sgemm_gmacs:.0f} GMAC/s "
            f"({opts.threads} thread(s), torch 2048x2048)."
            if sgemm_gmacs
            else "."
        ),
    )
    headers = (
        "model",
        "input",
        "profile",
        "trials new/tasks",
        "tune s",
        "untuned ms",
        "tuned ms",
        "ORT ms",
        "untuned ÷ORT",
        "tuned ÷ORT",
        "tuned ÷ORT min",
        "tuned ÷ORT default thr",
        "shipped",
        "shipped ÷ORT",
        "GMAC/s tuned / ORT / for target",
    )
    for name in headers:
        left = name in ("model", "profile", "shipped")
        table.add_column(name, justify="left" if left else "right", no_wrap=left)
    for r in results:
        shape = "x".join(map(str, r.input_shape))
        if r.error:
            table.add_row(r.model, shape, r.profile, *(["-"] * 9), "error", "-", "-")
            continue
        trials = f"{r.tuning.get('new_trials', 0)}/{r.tuning.get('tasks_total', 0)}"
        untuned_count = len(r.tuning.get("untuned_tasks", []))
        if untuned_count:
            trials += f" ({untuned_count} untuned)"
        table.add_row(
            r.model,
            shape,
            r.profile,
            trials,
            f"{r.tuning.get('wall_time_s', 0):.0f}",
            _fmt_ms(r.tvm_untuned),
            _fmt_ms(r.tvm_tuned),
            _fmt_ms(r.ort),
            _fmt_ratio(r.ratio(r.tvm_untuned)),
            _fmt_ratio(r.ratio(r.tvm_tuned)),
            _fmt_ratio(r.min_ratio(r.tvm_tuned)),
            _fmt_ratio(r.ratio(r.tvm_tuned_default_threads)),
            r.shipped_runtime or ("error" if r.shipped_error else "-"),
            _fmt_ratio(r.ratio(r.shipped)),
            " / ".join(
                _fmt_gmacs(v) for v in (r.gmacs(r.tvm_tuned), r.gmacs(r.ort), r.target_gmacs)
            ),
        )
    Console(width=220).print(table)
    for r in results:
        if r.error:
            print(f"{r.model} / {r.profile}: {r.error}")
        if r.shipped_error:
            print(f"{r.model} / {r.profile}: edgeloop compile failed: {r.shipped_error}")


def environment(opts: Options) -> dict[str, Any]:
    """Machine and versions, for the record."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    versions: dict[str, str | None] = {}
    for dist in ("apache-tvm", "apache-tvm-ffi", "onnxruntime", "onnx", "torch", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": versions,
        "threads": {
            "tvm_num_threads": opts.threads,
            "ort_intra_op_num_threads": opts.threads,
            "ort_inter_op_num_threads": 1,
        },
        "load_average_start": list(os.getloadavg()),
    }


def run(opts: Options) -> list[ModelResult]:
    """Run the benchmark for every model and profile; prints the table, returns results."""
    from bench.models import model_specs, sgemm_gmacs
    from compiler.signing import generate_keys

    specs = model_specs(image_size=opts.image_size)
    env = environment(opts)
    default_threads = tvm_default_threads()
    env["tvm_default_threads"] = default_threads
    env["sgemm_gmacs"] = round(sgemm_gmacs(opts.threads), 1)
    _say(
        f"{env['cpu']}, {env['logical_cpus']} CPUs, load average {env['load_average_start']}; "
        f"TVM and ORT use {opts.threads} thread(s) (TVM's own default here: {default_threads})"
    )
    results: list[ModelResult] = []
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        if opts.work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgeloop-bench-")))
        else:
            work = opts.work_dir
            work.mkdir(parents=True, exist_ok=True)
        tuning_db = opts.tuning_db or work / "tuning-db"
        key_path = generate_keys(work / "keys", overwrite=True).private
        for profile in opts.profiles:
            for name in opts.models:
                try:
                    results.append(
                        bench_model(
                            specs[name],
                            profile,
                            opts,
                            work=work,
                            tuning_db=tuning_db,
                            key_path=key_path,
                            default_threads=default_threads,
                        )
                    )
                except Exception as err:  # a benchmark reports a failed model and goes on
                    log.exception("%s / %s failed", name, profile)
                    results.append(
                        ModelResult(
                            model=name,
                            description=specs[name].description,
                            input_shape=list(specs[name].input_shape),
                            profile=profile,
                            trials_requested=opts.trials[name],
                            error=f"{type(err).__name__}: {err}",
                        )
                    )
    env["load_average_end"] = list(os.getloadavg())
    env["total_wall_s"] = round(time.monotonic() - start, 1)
    print_table(results, opts, sgemm_gmacs=env["sgemm_gmacs"])
    print(
        f"total wall time {env['total_wall_s']:.0f} s; load average {env['load_average_start']} "
        f"at start, {env['load_average_end']} at end"
    )
    if opts.json_out is not None:
        payload = {
            "schema_version": 1,
            "command": sys.argv,
            "environment": env,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
            "results": [r.to_dict() for r in results],
        }
        opts.json_out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        _say(f"wrote {opts.json_out}")
    return results


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line (exits 2 on a usage error, like argparse does)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--models", type=_csv, help=f"comma-separated subset of {', '.join(MODEL_NAMES)}"
    )
    parser.add_argument(
        "--profiles",
        type=_csv,
        default=DEFAULT_PROFILES,
        help="comma-separated hardware profiles (default: generic/x86_64); "
        "intel/x86_64-avx512 also runs natively on AVX-512 hosts",
    )
    parser.add_argument(
        "--trials",
        action="append",
        default=[],
        metavar="[MODEL=]N",
        help="total MetaSchedule trials per model (N for all, MODEL=N for one; "
        "repeatable). Defaults: " + ", ".join(f"{k}={v}" for k, v in DEFAULT_TRIALS.items()),
    )
    parser.add_argument(
        "--max-trials-per-task",
        type=int,
        default=None,
        metavar="N",
        help="most trials one task may get (default: the profile's tuning.max_trials_per_task); "
        "a big convolution keeps improving for several hundred",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{', '.join(QUICK_MODELS)} only (unless --models), few trials, "
        "fewer repeats: a few minutes",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="input height/width of mobilenet_v2 and resnet18 (default 224)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="TVM_NUM_THREADS and ORT intra_op_num_threads (default: all CPUs)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per round (5)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="timed runs per runtime, split over the rounds (60; quick 30)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved TVM/ORT measurement rounds (default 3)"
    )
    parser.add_argument(
        "--untuned-repeat",
        type=int,
        default=None,
        help="timed runs of the untuned library (10; quick 5)",
    )
    parser.add_argument(
        "--tuning-db",
        type=Path,
        default=None,
        help="reuse this MetaSchedule database (default: a fresh temporary one, "
        "so every task is tuned in this run)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep ONNX files, libraries, artifacts and (unless --tuning-db) the "
        "tuning database with MetaSchedule's logs here (default: a temporary "
        "directory, deleted)",
    )
    parser.add_argument(
        "--no-pipeline",
        dest="pipeline",
        action="store_false",
        help="skip the edgeloop compile --runtime auto check",
    )
    parser.add_argument(
        "--weight-prepack",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tuned build with tuning picking the weights' layout, folded at compile time "
        "(build_library's default when tuning; its own tuning records); --no-weight-prepack "
        "for the plain layouts",
    )
    parser.add_argument(
        "--fuse-blocks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="inverted-residual blocks and 3x3, first-layer and small-map 1x1 convolutions "
        "as hand-scheduled "
        "kernels in both TVM builds (build_library's default on AVX-512 and AVX2 x86-64); "
        "--no-fuse-blocks for MetaSchedule's kernels only",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: the TVM builds compute small-map 1x1 convolutions with bf16 products "
        "(edgeloop compile --precision; AVX-512 BF16 profiles); ORT stays fp32",
    )
    parser.add_argument(
        "--retune",
        action="store_true",
        help="with --tuning-db: spend --trials on every task again, recorded ones included "
        "(continue an earlier run's tuning in stages; edgeloop compile --retune)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json",
        dest="json_out",
        type=Path,
        default=None,
        metavar="OUT",
        help="also write the results as JSON to OUT",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="-v: MetaSchedule progress logs"
    )
    args = parser.parse_args(argv)

    models = args.models or (QUICK_MODELS if args.quick else MODEL_NAMES)
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        parser.error(
            f"unknown model(s) {', '.join(unknown)}; choose from: {', '.join(MODEL_NAMES)}"
        )
    trials = dict(QUICK_TRIALS if args.quick else DEFAULT_TRIALS)
    for item in args.trials:
        name, sep, count = item.rpartition("=")
        if sep and name not in MODEL_NAMES:
            parser.error(
                f"--trials {item}: unknown model {name!r}; choose from: {', '.join(MODEL_NAMES)}"
            )
        try:
            value = int(count)
        except ValueError:
            parser.error(f"--trials {item}: {count!r} is not an integer")
        if value < 0:
            parser.error(f"--trials {item}: must be 0 or more")
        for m in (name,) if sep else MODEL_NAMES:
            trials[m] = value
    stale_db = args.work_dir is not None and (args.work_dir / "tuning-db").exists()
    if stale_db and args.tuning_db is None:
        parser.error(
            f"--work-dir {args.work_dir} already holds a tuning-db; pass --tuning-db "
            f"{args.work_dir / 'tuning-db'} to reuse it, or choose an empty directory"
        )
    if args.retune and args.tuning_db is None:
        parser.error("--retune continues the tuning in --tuning-db DIR; give that directory")
    if args.threads < 1 or args.rounds < 1:
        parser.error("--threads and --rounds must be at least 1")
    if args.max_trials_per_task is not None and args.max_trials_per_task < 1:
        parser.error(f"--max-trials-per-task {args.max_trials_per_task}: must be at least 1")
    return Options(
        models=tuple(models),
        profiles=tuple(args.profiles),
        trials=trials,
        image_size=args.image_size,
        threads=args.threads,
        warmup=args.warmup if args.warmup is not None else (3 if args.quick else 5),
        repeat=args.repeat if args.repeat is not None else (30 if args.quick else 60),
        rounds=args.rounds,
        untuned_repeat=args.untuned_repeat
        if args.untuned_repeat is not None
        else (5 if args.quick else 10),
        tuning_db=args.tuning_db,
        work_dir=args.work_dir,
        pipeline=args.pipeline,
        seed=args.seed,
        json_out=args.json_out,
        verbose=args.verbose,
        quick=args.quick,
        weight_prepack=args.weight_prepack,
        max_trials_per_task=args.max_trials_per_task,
        retune=args.retune,
        fuse_blocks=args.fuse_blocks,
        precision=args.precision,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    opts = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if opts.verbose == 0:
        # MetaSchedule logs every task table at INFO; keep stderr to this script's progress.
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    run(opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
