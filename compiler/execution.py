"""Execute a compiled library on its target ISA: natively, under qemu-user, or not at all.

``plan_execution`` is pure (table-tested): given a profile and facts about this machine it
says how the artifact can run here, or why it cannot. ``run_library`` carries the plan out
through the runner protocol of ``compiler/runner_main.py`` in a child process, so that the
artifact is loaded exactly as a device loads it (TVM runtime-only mode) and a crash in
native code cannot take the compiler down. ``run_onnxruntime`` times ONNX Runtime the same
way, in a fresh child process (``compiler/ort_runner_main.py``), and ``time_against_ort``
interleaves the two for ``--runtime auto``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from compiler.errors import BuildFailedError
from compiler.profiles import HardwareProfile
from compiler.runtime_choice import tvm_thread_env

RUNNER_SCRIPT = Path(__file__).with_name("runner_main.py")
ORT_RUNNER_SCRIPT = Path(__file__).with_name("ort_runner_main.py")
Mode = Literal["native", "cuda", "qemu-python", "qemu-armv7-runner", "none"]
_TIMEOUT_NATIVE_S = 600
_TIMEOUT_EMULATED_S = 1200


@dataclass(frozen=True)
class HostFacts:
    """What this machine can run."""

    isa: str
    cpu_features: frozenset[str]
    has_cuda_gpu: bool = False
    aarch64_sysroot: Path | None = None
    armv7_runner: Path | None = None


@dataclass(frozen=True)
class ExecutionPlan:
    """How (and whether) an artifact is executed for the accuracy gate."""

    mode: Mode
    where: str
    reason: str | None = None

    @property
    def emulated(self) -> bool:
        """Whether latencies would be measured under emulation (not representative)."""
        return self.mode.startswith("qemu")


def normalize_isa(machine: str) -> str:
    """Map ``uname -m`` spellings to profile ISA names."""
    return {"amd64": "x86_64", "arm64": "aarch64", "armv7l": "armv7", "armv8l": "armv7"}.get(
        machine.lower(), machine.lower()
    )


def _feature_aliases(feature: str, isa: str) -> set[str]:
    # Profiles use /proc/cpuinfo spellings; aarch64 kernels call NEON "asimd".
    if isa == "aarch64" and feature == "neon":
        return {"neon", "asimd"}
    return {feature}


def plan_execution(profile: HardwareProfile, host: HostFacts) -> ExecutionPlan:
    """Decide how to execute an artifact of ``profile`` on ``host`` (pure)."""
    if profile.has_gpu:
        if not host.has_cuda_gpu:
            return ExecutionPlan(
                "none",
                "cuda",
                f"not executed on cuda {profile.tvm.get('arch')}: no CUDA GPU on this machine "
                "(not verified on hardware)",
            )
        if profile.isa != host.isa:
            return ExecutionPlan(
                "none",
                "cuda",
                f"not executed on cuda {profile.tvm.get('arch')}: its host code is "
                f"{profile.isa} and this machine is {host.isa} (not verified on hardware)",
            )
        # The runner loads TVM's CUDA plugin and runs on cuda(0) (compiler/runner_main.py).
        return ExecutionPlan("cuda", f"cuda {profile.tvm.get('arch')} on native {host.isa}")
    if profile.isa == host.isa:
        missing = [
            f for f in profile.cpu_features if not _feature_aliases(f, host.isa) & host.cpu_features
        ]
        if missing:
            return ExecutionPlan(
                "none",
                f"native {host.isa}",
                f"not executed on {profile.isa}: this CPU lacks {', '.join(missing)}",
            )
        return ExecutionPlan("native", f"native {host.isa}")
    if profile.isa == "aarch64":
        if host.aarch64_sysroot is None:
            return ExecutionPlan(
                "none",
                "qemu-aarch64",
                "not executed on aarch64: no aarch64 "
                "Python sysroot for qemu (run scripts/build-arm-sysroot.sh)",
            )
        return ExecutionPlan("qemu-python", "qemu-aarch64 (emulated Cortex-A, user mode)")
    if profile.isa == "armv7":
        if host.armv7_runner is None:
            return ExecutionPlan(
                "none",
                "qemu-arm",
                "not executed on armv7: PyPI has no armv7 TVM "
                "runtime and the edgeloop armv7 runner is not built "
                "(run scripts/build-armv7-runtime.sh)",
            )
        return ExecutionPlan("qemu-armv7-runner", "qemu-arm (emulated ARMv7 hard-float, user mode)")
    return ExecutionPlan(
        "none", profile.isa, f"not executed on {profile.isa}: no way to run it here"
    )


def read_cpu_features(cpuinfo: str) -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo text (x86 'flags', ARM 'Features')."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def detect_host(*, cache_dir: Path | None = None) -> HostFacts:
    """Facts about this machine (reads /proc/cpuinfo and looks for emulators)."""
    from compiler import emulation

    try:
        features = read_cpu_features(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    except OSError:
        features = frozenset()
    has_gpu = Path("/dev/nvidia0").exists() or Path("/dev/nvhost-ctrl-gpu").exists()
    sysroot = None
    runner = None
    if shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64"):
        sysroot = emulation.find_sysroot("aarch64", cache_dir)
    if shutil.which("qemu-arm-static") or shutil.which("qemu-arm"):
        runner = find_armv7_runner(cache_dir or emulation.default_cache_dir())
    return HostFacts(
        isa=normalize_isa(platform.machine()),
        cpu_features=features,
        has_cuda_gpu=has_gpu,
        aarch64_sysroot=sysroot,
        armv7_runner=runner,
    )


ARMV7_SYSROOT = Path("/usr/arm-linux-gnueabihf")


def find_armv7_runner(cache_dir: Path) -> Path | None:
    """The armv7 C++ runner built by scripts/build-armv7-runtime.sh, if complete."""
    runner = cache_dir / "armv7-runtime" / "edgeloop-armv7-runner"
    stamp = cache_dir / "armv7-runtime" / "STAMP"
    if runner.is_file() and stamp.is_file() and ARMV7_SYSROOT.is_dir():
        return runner
    return None


def armv7_runner_command(runner: Path, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """argv and env to run the armv7 runner under qemu-arm with the cross toolchain's libc."""
    qemu = shutil.which("qemu-arm-static") or shutil.which("qemu-arm") or "qemu-arm-static"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "QEMU_LD_PREFIX": str(ARMV7_SYSROOT)}
    return [qemu, "-L", str(ARMV7_SYSROOT), str(runner), str(workdir)], env


@dataclass
class ExecutionResult:
    """Outputs and timings of one execution."""

    outputs: list[list[npt.NDArray[Any]]]
    latency_ms: list[float]
    machine: str
    runtime: str
    num_threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _run_child(
    argv: list[str], env: dict[str, str] | None, timeout: float, what: str, work: Path
) -> dict[str, Any]:
    """Run a runner child that answers in ``work/result.json``; its failures as BuildFailedError.

    ``what`` starts every message ("executing the artifact (natively)"): a timeout, a
    non-zero exit (with the last lines of its stderr) and a missing or unreadable result.
    """
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise BuildFailedError(f"{what} timed out after {timeout} s") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise BuildFailedError(f"{what} failed with exit code {proc.returncode}:\n{tail}")
    try:
        result: dict[str, Any] = json.loads((work / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BuildFailedError(f"{what} left no readable result.json: {err}") from err
    return result


def run_library(
    library: Path,
    samples: Sequence[Sequence[npt.NDArray[Any]]],
    plan: ExecutionPlan,
    host: HostFacts,
    *,
    warmup: int,
    repeat: int,
    num_threads: int | None = None,
) -> ExecutionResult:
    """Run ``library`` on every sample as planned; time ``repeat`` runs of sample 0.

    Args:
        library: the compiled shared library.
        samples: inputs, one list of arrays per sample.
        plan: how to execute it (from ``plan_execution``).
        host: facts about this machine.
        warmup: untimed calls before timing.
        repeat: timed calls in all, spread over ``rounds``.
        num_threads: TVM's thread count (``compiler.runtime_choice.tvm_thread_env``); None
            leaves TVM's defaults.

    Raises:
        BuildFailedError: the runner failed (load error, crash, timeout).
    """
    from compiler import emulation

    if plan.mode == "none":
        raise ValueError(f"cannot run with plan {plan}")
    with tempfile.TemporaryDirectory(prefix="edgeloop-run-") as tmp:
        work = Path(tmp)
        lib_copy = work / library.name
        shutil.copyfile(library, lib_copy)
        request: dict[str, Any] = {
            "lib": str(lib_copy),
            "num_samples": len(samples),
            "num_inputs": len(samples[0]),
            "warmup": warmup,
            "repeat": repeat,
        }
        if num_threads is not None:
            request["num_threads"] = num_threads
        if plan.mode == "cuda":
            request["device"] = "cuda"
        (work / "request.json").write_text(json.dumps(request), encoding="utf-8")
        for k, sample in enumerate(samples):
            for i, arr in enumerate(sample):
                np.save(work / f"s{k}_in{i}.npy", np.ascontiguousarray(arr))
        env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
        thread_env = {} if num_threads is None else tvm_thread_env(num_threads)
        env.update(thread_env)
        if plan.mode in ("native", "cuda"):
            argv = [sys.executable, str(RUNNER_SCRIPT), str(work)]
            timeout = _TIMEOUT_NATIVE_S
        elif plan.mode == "qemu-python":
            assert host.aarch64_sysroot is not None
            argv, extra_env = emulation.emulated_python_command(
                "aarch64", host.aarch64_sysroot, RUNNER_SCRIPT, [str(work)]
            )
            env = {**extra_env, **thread_env}
            timeout = _TIMEOUT_EMULATED_S
        else:
            assert host.armv7_runner is not None
            argv, env = armv7_runner_command(host.armv7_runner, work)
            env.update(thread_env)
            timeout = _TIMEOUT_EMULATED_S
        result = _run_child(argv, env, timeout, f"executing the artifact ({plan.where})", work)
        outputs = [
            [np.load(work / f"s{k}_out{j}.npy") for j in range(result["num_outputs"])]
            for k in range(len(samples))
        ]
    return ExecutionResult(
        outputs=outputs,
        latency_ms=[float(x) for x in result["latency_ms"]],
        machine=str(result.get("machine", "")),
        runtime=str(result.get("runtime", "")),
        num_threads=result.get("num_threads"),
        extra={"gpu": result["gpu"]} if result.get("gpu") else {},
    )


@dataclass(frozen=True)
class OrtTiming:
    """Timings of one ONNX Runtime block, taken in a child process."""

    latency_ms: list[float]
    pid: int
    runtime: str
    num_threads: int


def run_onnxruntime(
    onnx_model: Path | bytes,
    sample: Sequence[npt.NDArray[Any]],
    *,
    threads: int,
    warmup: int,
    runs: int,
    timeout_s: float = _TIMEOUT_NATIVE_S,
) -> OrtTiming:
    """Time ``runs`` ONNX Runtime calls on ``sample`` in a fresh child process.

    The child (``compiler/ort_runner_main.py``, run with ``sys.executable``) opens one
    session with ``intra_op_num_threads=threads``, ``inter_op_num_threads=1`` and the CPU
    provider, makes ``warmup`` untimed calls, then times ``runs`` calls, numpy in and out.

    Args:
        onnx_model: the ONNX file, or its bytes.
        sample: the inputs, in the model's input order.
        threads: ONNX Runtime's intra-op thread count.
        warmup: untimed calls before timing.
        runs: timed calls.
        timeout_s: how long the child may take.

    Returns:
        The latencies (milliseconds) and the child's pid, ONNX Runtime version and threads.

    Raises:
        MissingDependencyError: ONNX Runtime is not installed.
        BuildFailedError: the child failed (bad model, wrong inputs, crash, timeout).
    """
    from compiler.frontends import require

    require("onnxruntime", "compiler")
    what = (
        f"the model ({len(onnx_model)} bytes)"
        if isinstance(onnx_model, bytes)
        else repr(str(onnx_model))
    )
    with tempfile.TemporaryDirectory(prefix="edgeloop-ort-") as tmp:
        work = Path(tmp)
        if isinstance(onnx_model, bytes):
            model_path = work / "model.onnx"
            model_path.write_bytes(onnx_model)
        else:
            model_path = onnx_model.resolve()
        request = {
            "model": str(model_path),
            "num_inputs": len(sample),
            "threads": threads,
            "warmup": warmup,
            "repeat": runs,
        }
        (work / "request.json").write_text(json.dumps(request), encoding="utf-8")
        for i, arr in enumerate(sample):
            np.save(work / f"s0_in{i}.npy", np.ascontiguousarray(arr))
        argv = [sys.executable, str(ORT_RUNNER_SCRIPT), str(work)]
        result = _run_child(argv, None, timeout_s, f"timing ONNX Runtime on {what}", work)
    return OrtTiming(
        latency_ms=[float(x) for x in result["latency_ms"]],
        pid=int(result["pid"]),
        runtime=str(result["runtime"]),
        num_threads=int(result["num_threads"]),
    )


Rounds = list[tuple[list[float], list[float]]]


def time_against_ort(
    library: Path,
    sample: Sequence[npt.NDArray[Any]],
    plan: ExecutionPlan,
    host: HostFacts,
    *,
    onnx_model: bytes,
    threads: int,
    rounds: int,
    runs_per_round: int,
    warmup: int = 3,
    first_tvm_block: list[float] | None = None,
) -> Rounds:
    """Time TVM and ONNX Runtime on ``sample`` in interleaved rounds (A/B, B/A, ...).

    Each block runs in a fresh child process of its own: TVM in a runner per block (as in
    ``run_library``), ONNX Runtime through ``run_onnxruntime``, both with ``threads``
    threads, each block after ``warmup`` calls. A fresh process per block makes each block
    an independent draw of where the scheduler puts its threads (with 2 unpinned threads
    on 2 CPUs both often share one CPU for hundreds of calls), and the two runtimes never
    share a process (there, TVM at 2 threads on 2 cores was 20-50x slower).
    ``first_tvm_block`` (timings ``run_library`` already took) stands in for round 0's TVM
    block, which goes first.

    Returns:
        ``[(tvm_ms, ort_ms), ...]``, one pair per round.

    Raises:
        ValueError: the plan is not native (emulated timings would be meaningless).
        BuildFailedError: the TVM runner or the ONNX Runtime child failed.
        MissingDependencyError: ONNX Runtime is not installed.
    """
    if plan.mode != "native":
        raise ValueError(f"ONNX Runtime can be timed beside TVM only natively, not {plan.where}")
    from compiler.frontends import require

    require("onnxruntime", "compiler")
    with tempfile.TemporaryDirectory(prefix="edgeloop-ort-model-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_path.write_bytes(onnx_model)

        def ort_block() -> list[float]:
            return run_onnxruntime(
                onnx_path, sample, threads=threads, warmup=warmup, runs=runs_per_round
            ).latency_ms

        def tvm_block() -> list[float]:
            return run_library(
                library,
                [sample],
                plan,
                host,
                warmup=warmup,
                repeat=runs_per_round,
                num_threads=threads,
            ).latency_ms

        result: Rounds = []
        for k in range(rounds):
            if k % 2 == 0:
                tvm_ms = first_tvm_block if k == 0 and first_tvm_block else tvm_block()
                ort_ms = ort_block()
            else:
                ort_ms = ort_block()
                tvm_ms = tvm_block()
            result.append((tvm_ms, ort_ms))
    return result
