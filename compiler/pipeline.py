"""``edgeloop compile`` as a library call: load, check, build, verify on the target ISA, sign.

The steps, each failing with its own exception (and CLI exit code):

1. resolve the profile and the runtime choice (UsageError, exit 2);
2. load the signing key before any slow work (InvalidInputError, exit 3);
3. load the model, pin static input shapes, run the operator-coverage pre-check (exit 3);
4. build the TVM library (tuning with the persistent database) into a staging directory;
5. execute it on the target ISA against the reference runtime (AccuracyGateError, exit 4);
6. measure ONNX Runtime beside TVM where both can run (same thread count, interleaved
   rounds in one process), pick the runtime to ship (``compiler.runtime_choice``);
7. write report.json, seal and sign the bundle, move it into place atomically.

Nothing is left at the output path unless every step succeeded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import platform
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

import edgeloop
from compiler import bundle, execution
from compiler.accuracy import OutputAccuracy, compare_output, make_inputs
from compiler.elfcheck import check_elf, read_elf
from compiler.errors import (
    AccuracyGateError,
    BuildFailedError,
    InvalidInputError,
    MissingDependencyError,
    UsageError,
)
from compiler.frontends import SourceModel, load_model
from compiler.fusion_plan import choose_block_fusion, precision_refusal
from compiler.manifest import REPORT_FILE, ArtifactManifest, TensorSpec
from compiler.profiles import AccuracySpec, HardwareProfile, ProfileRegistry
from compiler.runtime_choice import (
    ThreadPlan,
    decide_runtime,
    host_cpu_count,
    plan_threads,
    runs_per_block,
)
from compiler.settings import CompilerSettings
from compiler.signing import KeyPaths, load_private_key
from compiler.tvm_builder import TuningProgress, TuningStats, build_library

log = logging.getLogger(__name__)
RuntimeChoice = Literal["auto", "tvm", "onnxruntime"]
RUNTIME_CHOICES: tuple[str, ...] = ("auto", "tvm", "onnxruntime")
LIBRARY_FILE = "model.so"
ONNX_FILE = "model.onnx"


@dataclass
class CompileRequest:
    """Everything ``edgeloop compile`` was asked to do."""

    model: Path
    profile: str
    output: Path
    model_name: str | None = None
    model_version: str = "1"
    trials: int | None = None
    tuning_db: Path | None = None
    runtime: str = "auto"
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    calibration_data: Path | None = None
    eval_data: Path | None = None  # NPU profiles: int8 accuracy inputs (compiler/npu/data.py)
    # Tuning picks the weights' layout (compiler/tvm_builder.py); None: wherever it can apply.
    weight_prepack: bool | None = None
    # Tune recorded tasks too: continue an earlier tuning (build_library's ``retune``).
    retune: bool = False
    # Inverted-residual blocks as fused kernels (compiler/tvm_fusion.py); None: x86-64 CPUs.
    fuse_blocks: bool | None = None
    # "bf16": 1x1 convolutions with bf16 products on AVX-512 BF16 profiles (compiler/tvm_bf16.py).
    precision: str = "fp32"
    samples: int | None = None
    signing_key: Path | None = None
    force: bool = False
    seed: int = 0
    latency_repeat: int = 30
    latency_rounds: int = 5
    runtime_margin: float | None = None  # None: the setting (EDGELOOP_RUNTIME_MARGIN)


@dataclass
class CompileResult:
    """What a successful compile produced."""

    output: Path
    manifest: ArtifactManifest
    artifact_id: str
    report: dict[str, Any]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _load_samples(
    req: CompileRequest, model: SourceModel, count: int
) -> list[list[npt.NDArray[Any]]]:
    if req.calibration_data is None:
        specs = [(t.name, t.shape, t.dtype) for t in model.inputs]
        return make_inputs(specs, samples=count, seed=req.seed)
    try:
        data = np.load(req.calibration_data)
    except (OSError, ValueError) as err:
        raise InvalidInputError(
            f"--calibration-data {str(req.calibration_data)!r} is not a readable .npz file: {err}"
        ) from err
    missing = [t.name for t in model.inputs if t.name not in data.files]
    if missing:
        raise InvalidInputError(
            f"--calibration-data lacks input(s) {', '.join(missing)}; it has: "
            f"{', '.join(data.files) or 'nothing'} (one array per input, samples on axis 0)"
        )
    arrays = {t.name: np.asarray(data[t.name]) for t in model.inputs}
    n = min(len(a) for a in arrays.values())
    samples = []
    for k in range(min(n, count)):
        sample = []
        for t in model.inputs:
            arr = arrays[t.name][k].astype(t.dtype)
            if list(arr.shape) != t.shape:
                raise InvalidInputError(
                    f"--calibration-data input {t.name!r} sample {k} has shape "
                    f"{'x'.join(map(str, arr.shape))}; "
                    f"the model needs {'x'.join(map(str, t.shape))}"
                )
            sample.append(arr)
        samples.append(sample)
    if not samples:
        raise InvalidInputError(
            f"--calibration-data {str(req.calibration_data)!r} holds no samples"
        )
    return samples


def _ort_latency(
    model: SourceModel, sample: list[npt.NDArray[Any]], repeat: int, *, threads: int
) -> list[float]:
    # A fresh child process, as time_against_ort's blocks (docs/benchmarks.md: an ORT
    # session's threads in a long-lived process often end up sharing one CPU).
    onnx = model.onnx_bytes()
    return execution.run_onnxruntime(
        onnx if onnx is not None else model.path, sample, threads=threads, warmup=3, runs=repeat
    ).latency_ms


def _latency_summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered), 4),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 4),
        "min_ms": round(ordered[0], 4),
        "runs": len(ordered),
    }


def resolve_profile(registry: ProfileRegistry, name: str, runtime: str) -> HardwareProfile:
    """Load the profile and check the runtime option against it (UsageError otherwise)."""
    profile = registry.get(name)
    if runtime not in RUNTIME_CHOICES:
        raise UsageError(
            f"--runtime {runtime!r} is not valid; choose from: {', '.join(RUNTIME_CHOICES)}"
        )
    if runtime != "auto" and runtime not in profile.runtimes:
        raise UsageError(
            f"--runtime {runtime!r} is not available on {profile.name}; "
            f"its runtimes are: {', '.join(profile.runtimes)}"
        )
    return profile


def cuda_tuning_refusal(
    profile: HardwareProfile, plan: execution.ExecutionPlan, trials: int
) -> str | None:
    """Why ``--trials`` cannot tune this CUDA profile here, or None when it can (pure).

    MetaSchedule measures every candidate, so a CUDA target is tuned only where the plan
    runs the artifact on a CUDA GPU of this machine (mode ``cuda``: a GPU, and host code
    this machine runs natively). CPU profiles are not decided here (None).
    """
    if trials <= 0 or not profile.has_gpu or plan.mode == "cuda":
        return None
    return (
        f"--trials {trials} for {profile.name}: MetaSchedule tuning of a CUDA target needs a "
        "CUDA GPU on this machine to measure on, with the profile's host code running "
        f"natively; {plan.reason or plan.where}. Compile with --trials 0 (TVM's default GPU "
        "schedules) here, or tune on a machine with such a GPU"
    )


def compile_model(
    req: CompileRequest,
    *,
    settings: CompilerSettings,
    registry: ProfileRegistry | None = None,
    host: execution.HostFacts | None = None,
    tuning_progress: TuningProgress | None = None,
    step: Callable[[str], None] | None = None,
) -> CompileResult:
    """Compile, verify and sign one model for one profile (see module docstring).

    Raises:
        CompilerError: a subclass naming what failed; nothing is written to ``req.output``.
    """
    say = step or (lambda _msg: None)
    registry = registry or ProfileRegistry(settings.profile_roots())
    profile = resolve_profile(registry, req.profile, req.runtime)
    if req.trials is not None and req.trials < 0:
        raise UsageError(f"--trials {req.trials} is negative; give 0 (no tuning) or more")
    margin = settings.runtime_margin if req.runtime_margin is None else req.runtime_margin
    if not 0 <= margin < 1:
        raise UsageError(f"runtime margin {margin} is outside [0, 1); e.g. 0.05 means 5 %")
    if req.latency_rounds < 1:
        raise UsageError(f"latency rounds {req.latency_rounds} must be at least 1")
    if profile.cross_compiler and shutil.which(profile.cross_compiler) is None:
        package = {
            "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
            "arm-linux-gnueabihf-gcc": "gcc-arm-linux-gnueabihf",
        }.get(profile.cross_compiler, "")
        raise MissingDependencyError(
            profile.cross_compiler,
            hint=(
                f"install the Debian package {package} (apt-get install {package})"
                if package
                else f"install a cross compiler named {profile.cross_compiler} and put it on PATH"
            ),
        )
    key_path = req.signing_key or KeyPaths.in_dir(settings.keys_dir).private
    private_key = load_private_key(key_path)
    trials = profile.tuning.default_trials if req.trials is None else req.trials

    gate = _accuracy_spec(req, profile)
    say(f"loading {req.model.name}")
    model = load_model(req.model, input_shapes=req.input_shapes)
    if profile.npu is not None:
        # NPU profiles: int8 quantization + the vendor compiler instead of TVM (docs/npu.md).
        from compiler.npu.build import compile_npu

        return compile_npu(req, profile=profile, model=model, private_key=private_key, say=say)
    if req.eval_data is not None:
        raise UsageError(
            f"--eval-data {str(req.eval_data)!r} is only used by NPU profiles (int8 accuracy); "
            f"{profile.name} is verified on --calibration-data or generated inputs"
        )
    model.check_coverage()
    if req.runtime == "onnxruntime" and model.onnx_bytes() is None:
        raise UsageError(
            f"--runtime onnxruntime needs an ONNX model; {req.model.name} is {model.format}"
        )
    sample_count = req.samples or gate.samples
    samples = _load_samples(req, model, sample_count)
    say(f"reference outputs of {len(samples)} sample(s) with the {model.format} runtime")
    references = [model.reference(s) for s in samples]
    output_names = model.output_names or [f"output_{j}" for j in range(len(references[0]))]
    outputs = [
        TensorSpec(name=n, shape=list(r.shape), dtype=str(r.dtype))
        for n, r in zip(output_names, references[0], strict=True)
    ]

    host = host or execution.detect_host(cache_dir=settings.cache_dir)
    plan = execution.plan_execution(profile, host)
    threads = plan_threads(profile, host_cpus=host_cpu_count() if plan.mode != "none" else None)
    report: dict[str, Any] = {
        "schema_version": 1,
        "profile": profile.name,
        "precision": req.precision,
        "model": {"file": req.model.name, "format": model.format, "sha256": model.sha256},
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "verification": {
            "executed": plan.mode != "none",
            "where": plan.where,
            "reason": plan.reason,
            "emulated": plan.emulated,
            "samples": len(samples),
            "inputs": "calibration data" if req.calibration_data else f"random (seed {req.seed})",
        },
        "latency": {},
    }
    comparison: dict[str, Any] = {"threads": threads.to_dict()}
    refusal = cuda_tuning_refusal(profile, plan, trials)
    if refusal is not None:
        raise UsageError(refusal)
    if trials > 0 and plan.mode != "native" and not profile.has_gpu:
        raise UsageError(
            f"--trials {trials} for {profile.name}: tuning measures candidates on the target, and "
            f"{profile.isa} code cannot be timed on this machine ({plan.reason or plan.where}); "
            "compile with --trials 0 here, or tune on a machine of that kind"
        )
    if req.retune and trials == 0:
        raise UsageError(
            "--retune continues tuning with new trials; give --trials N with N > 0 "
            "(--trials 0 applies the records as they are)"
        )
    if req.weight_prepack is True and trials == 0:
        raise UsageError(
            "--weight-prepack needs tuning (the layouts come from MetaSchedule's records); "
            "give --trials N with N > 0"
        )
    if req.fuse_blocks is True and profile.has_gpu:
        raise UsageError(
            f"--fuse-blocks for {profile.name}: the fused inverted-residual kernels are CPU "
            "code; GPU profiles build without them (leave the option out or use a CPU profile)"
        )
    tuning = TuningStats()
    with bundle.staging_dir(req.output, overwrite=req.force) as staging:
        build_tvm = req.runtime != "onnxruntime"
        if build_tvm:
            say(f"building with TVM for {profile.name} ({trials} tuning trials)")
            relax_mod = model.to_relax()
            tuning = build_library(
                relax_mod,
                profile,
                out_path=staging / LIBRARY_FILE,
                trials=trials,
                tuning_db=req.tuning_db or settings.tuning_db_dir,
                progress=tuning_progress,
                runner_threads=threads.count,
                weight_prepack=req.weight_prepack,
                retune=req.retune,
                fuse_blocks=req.fuse_blocks,
                precision=req.precision,
            )
            report["tuning"] = tuning.to_dict()
            report["static_checks"] = _static_checks(staging / LIBRARY_FILE, profile)
        rounds: execution.Rounds = []
        onnx_model = model.onnx_bytes() if _can_time_ort(profile, model, plan) else None
        per_round = max(3, req.latency_repeat // req.latency_rounds)
        if build_tvm and plan.mode != "none":
            say(f"executing on {plan.where} ({threads.count} thread(s))")
            result = execution.run_library(
                staging / LIBRARY_FILE,
                samples,
                plan,
                host,
                warmup=1 if plan.emulated else 3,
                repeat=3
                if plan.emulated
                else (per_round if onnx_model is not None else req.latency_repeat),
                num_threads=threads.count,
            )
            accuracy = _gate(profile, gate, output_names, result.outputs, references)
            report["accuracy"] = {a.name: a.to_dict() for a in accuracy}
            report["verification"]["machine"] = result.machine
            if result.extra.get("gpu"):
                report["verification"]["gpu"] = result.extra["gpu"]
            report["verification"]["runtime"] = result.runtime
            if onnx_model is not None:
                per_round = runs_per_block(result.latency_ms, minimum=per_round)
                say(
                    f"timing TVM against ONNX Runtime in {req.latency_rounds} rounds "
                    f"of {per_round} runs"
                )
                rounds = execution.time_against_ort(
                    staging / LIBRARY_FILE,
                    samples[0],
                    plan,
                    host,
                    onnx_model=onnx_model,
                    threads=threads.count,
                    rounds=req.latency_rounds,
                    runs_per_round=per_round,
                    # The first block stands in for round 0's only if it is as long.
                    first_tvm_block=result.latency_ms
                    if len(result.latency_ms) >= per_round
                    else None,
                )
            tvm_runs = [t for tvm_ms, _ in rounds for t in tvm_ms] or result.latency_ms
            report["latency"]["tvm"] = {
                **(_latency_summary(tvm_runs) or {}),
                "emulated": plan.emulated,
                "threads": result.num_threads,
            }
            if rounds:
                report["latency"]["onnxruntime"] = {
                    **(_latency_summary([t for _, ort in rounds for t in ort]) or {}),
                    "emulated": False,
                    "threads": threads.count,
                }
                comparison["rounds"] = [
                    {
                        "first": "tvm" if k % 2 == 0 else "onnxruntime",
                        "tvm_median_ms": round(statistics.median(tvm_ms), 4),
                        "onnxruntime_median_ms": round(statistics.median(ort_ms), 4),
                        "runs_each": len(tvm_ms),
                    }
                    for k, (tvm_ms, ort_ms) in enumerate(rounds)
                ]
                comparison["method"] = (
                    f"{len(rounds)} interleaved rounds (A/B, B/A, ...) of {per_round} runs, "
                    f"{threads.count} thread(s) each, numpy in and out; each runtime in a "
                    "fresh child process per block"
                )
        elif build_tvm:
            report["accuracy"] = None
            log.warning("%s", plan.reason)
        if profile.has_gpu:
            report["verification"]["hardware"] = (
                f"verified on {report['verification'].get('gpu') or 'a CUDA GPU'}"
                if plan.mode == "cuda"
                else "not verified on hardware"
            )

        runtime, reason = _choose_runtime(
            req,
            profile,
            model,
            plan,
            samples,
            rounds=rounds,
            threads=threads,
            margin=margin,
            report=report,
            comparison=comparison,
        )
        report["runtime"] = {
            "chosen": runtime,
            "reason": reason,
            "margin": margin,
            "comparison": comparison,
        }
        if runtime == "onnxruntime":
            (staging / LIBRARY_FILE).unlink(missing_ok=True)
            (staging / ONNX_FILE).write_bytes(req.model.read_bytes())
        return seal(
            staging,
            req,
            model,
            profile,
            {
                "runtime": runtime,
                "runtime_reason": reason,
                "entry": ONNX_FILE if runtime == "onnxruntime" else LIBRARY_FILE,
                "outputs": [t.model_dump() for t in outputs],
                "toolchain": {
                    "edgeloop": edgeloop.__version__,
                    "tvm": _version("apache-tvm"),
                    "tvm_ffi": _version("apache-tvm-ffi"),
                    "onnxruntime": _version("onnxruntime") if runtime == "onnxruntime" else None,
                    "cross_compiler": profile.cross_compiler,
                },
                "tuning": {
                    "database_digest": tuning.database_digest,
                    "records_applied": tuning.records_applied,
                    "new_trials": tuning.new_trials,
                },
            },
            private_key=private_key,
            report=report,
            say=say,
        )


def seal(
    staging: Path,
    req: CompileRequest,
    model: SourceModel,
    profile: HardwareProfile,
    fields: dict[str, Any],
    *,
    private_key: Any,
    report: dict[str, Any],
    say: Callable[[str], None],
) -> CompileResult:
    """Finish a staged bundle: its size in the report, ``report.json``, the manifest (the
    runtime-specific ``fields`` plus model, profile, inputs, source and time), signature, and
    the move into place."""
    report["resources"] = _resources(staging, profile)
    (staging / REPORT_FILE).write_text(
        json.dumps(report, indent=2, sort_keys=True), encoding="utf-8"
    )
    fields = {
        "model": {"name": req.model_name or req.model.stem, "version": req.model_version},
        "profile": profile.name,
        "isa": profile.isa,
        "target": profile.tvm,
        "inputs": [t.model_dump() for t in model.inputs],
        **fields,
        "source_model": {
            "format": model.format,
            "filename": req.model.name,
            "sha256": model.sha256,
        },
        "created_at": datetime.now(UTC).replace(microsecond=0),
    }
    say("signing and writing the bundle")
    manifest = bundle.seal_bundle(
        staging, req.output, manifest_fields=fields, private_key=private_key
    )
    return CompileResult(req.output, manifest, manifest.artifact_id, report)


def _resources(staging: Path, profile: HardwareProfile) -> dict[str, Any]:
    size = sum(p.stat().st_size for p in staging.iterdir() if p.is_file())
    fits = size <= profile.resources.storage_mib * 1024 * 1024
    if not fits:
        log.warning("artifact of %d bytes exceeds %s storage", size, profile.name)
    return {
        "artifact_bytes": size,
        "storage_mib": profile.resources.storage_mib,
        "fits_storage": fits,
    }


def _static_checks(library: Path, profile: HardwareProfile) -> dict[str, Any]:
    facts = read_elf(library)
    problems = check_elf(facts, profile.isa)
    device_code = None
    if profile.has_gpu:
        from compiler import cuda

        code = cuda.inspect_library(library)
        problems += cuda.check_device_code(code, str(profile.tvm["arch"]))
        device_code = {**code.to_dict(), "arch": profile.tvm["arch"], "nvcc": cuda.nvcc_version()}
    if problems:
        raise BuildFailedError(
            f"the {profile.isa} library for {profile.name} is wrong: " + "; ".join(problems)
        )
    checks = {**facts.to_dict(), "passed": True}
    if device_code is not None:
        checks["device_code"] = device_code
    return checks


def _accuracy_spec(req: CompileRequest, profile: HardwareProfile) -> AccuracySpec:
    """The accuracy gate of ``req.precision`` for ``profile``; UsageError where the profile
    cannot build that precision."""
    fused = choose_block_fusion(
        req.fuse_blocks, gpu=profile.has_gpu, isa=profile.isa, features=profile.cpu_features
    )
    refusal = precision_refusal(
        req.precision,
        isa=profile.isa,
        features=profile.cpu_features,
        mcpu=profile.tvm.get("mcpu"),
        fused=fused,
    )
    if refusal is not None:
        raise UsageError(f"{refusal} (profile {profile.name})")
    if req.precision == "fp32":
        return profile.accuracy
    if req.runtime == "onnxruntime":
        raise UsageError(
            f"--precision {req.precision} applies to TVM builds; --runtime onnxruntime ships "
            "the fp32 ONNX model (use --runtime tvm or auto)"
        )
    if profile.accuracy_bf16 is None:
        raise UsageError(
            f"--precision bf16: profile {profile.name} sets no accuracy_bf16 tolerances to gate "
            "a bf16 build with (add an accuracy_bf16 section like its accuracy one)"
        )
    return profile.accuracy_bf16


def _gate(
    profile: HardwareProfile,
    spec: AccuracySpec,
    names: list[str],
    actual: list[list[npt.NDArray[Any]]],
    reference: list[list[npt.NDArray[Any]]],
) -> list[OutputAccuracy]:
    if len(actual[0]) != len(reference[0]):
        raise AccuracyGateError(
            f"the artifact returned {len(actual[0])} output(s); "
            f"the reference has {len(reference[0])}"
        )
    results = []
    for j, name in enumerate(names):
        try:
            results.append(compare_output(name, [a[j] for a in actual], [r[j] for r in reference]))
        except ValueError as err:
            raise AccuracyGateError(str(err)) from err
    problems = [p for r in results for p in r.violations(spec)]
    if problems:
        raise AccuracyGateError(
            f"accuracy gate failed for {profile.name}; no artifact written:\n  "
            + "\n  ".join(problems)
        )
    return results


def _can_time_ort(
    profile: HardwareProfile, model: SourceModel, plan: execution.ExecutionPlan
) -> bool:
    """Whether ONNX Runtime can be timed here beside TVM (native, ONNX source, installed)."""
    return (
        "onnxruntime" in profile.runtimes
        and model.onnx_bytes() is not None
        and plan.mode == "native"
        and importlib.util.find_spec("onnxruntime") is not None
    )


def _choose_runtime(
    req: CompileRequest,
    profile: HardwareProfile,
    model: SourceModel,
    plan: execution.ExecutionPlan,
    samples: list[list[npt.NDArray[Any]]],
    *,
    rounds: execution.Rounds,
    threads: ThreadPlan,
    margin: float,
    report: dict[str, Any],
    comparison: dict[str, Any],
) -> tuple[str, str]:
    ort_possible = "onnxruntime" in profile.runtimes and model.onnx_bytes() is not None
    if not rounds and req.runtime == "onnxruntime" and _can_time_ort(profile, model, plan):
        # No TVM library to interleave with: time ONNX Runtime alone, for the report.
        ort_latency = _ort_latency(model, samples[0], req.latency_repeat, threads=threads.count)
        report["latency"]["onnxruntime"] = {
            **(_latency_summary(ort_latency) or {}),
            "emulated": False,
            "threads": threads.count,
        }
    decision = decide_runtime(rounds, margin=margin) if rounds else None
    if decision is not None:
        comparison["decision"] = decision.to_dict()
    if req.runtime == "tvm":
        return "tvm", "requested with --runtime tvm"
    if req.runtime == "onnxruntime":
        return "onnxruntime", "requested with --runtime onnxruntime"
    if not ort_possible:
        why = (
            "the profile has no ONNX Runtime"
            if "onnxruntime" not in profile.runtimes
            else f"the source model is {model.format}, not ONNX"
        )
        return "tvm", f"auto: TVM is the only candidate ({why})"
    if decision is None and plan.mode == "cuda":
        return "tvm", "auto: TVM runs the model on the GPU; ONNX Runtime would run on the CPU"
    if decision is None:
        return "tvm", (
            f"auto: TVM, since latencies cannot be compared on this machine "
            f"({plan.reason or 'emulated execution is not representative'})"
            if plan.mode != "native"
            else "auto: TVM, since ONNX Runtime is not installed here to compare with"
        )
    return decision.runtime, decision.reason
