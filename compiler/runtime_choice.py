"""Pure decisions about running an artifact here: TVM's thread count and the runtime to ship.

No TVM or ONNX Runtime import; table-tested in tests/compiler/test_runtime_choice.py.

Threads: TVM's runtime defaults to ``hardware_concurrency() / 2`` threads on x86-64 (it
assumes hyper-threading), i.e. 1 thread on a 2-vCPU machine, while ONNX Runtime uses every
core. The compiler sets the count deliberately (``plan_threads``): the profile's
``num-cores`` (``tvm`` block, or ``tvm.host`` for GPU profiles), else its
``resources.cpu_cores``, capped by the CPUs this process may use when the code runs here.
Both runtimes are measured with that count.

Runtime: ``decide_runtime`` compares interleaved rounds of TVM and ONNX Runtime timings
(A/B, B/A, ...). Its statistic is the median over rounds of the per-round ratio
``median(TVM) / median(ORT)``: load from other processes hits both halves of a round alike
and cancels in the ratio, and the median over rounds ignores a disturbed round. TVM ships
only when that ratio is at most ``1 - margin``; anything closer is a tie and ONNX Runtime,
the reference, ships.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compiler.profiles import HardwareProfile

DEFAULT_MARGIN = 0.05
# Each timed block of the runtime comparison lasts about this long (``runs_per_block``).
BLOCK_SECONDS = 0.4
MAX_BLOCK_RUNS = 200


@dataclass(frozen=True)
class ThreadPlan:
    """How many threads each runtime gets, and why."""

    count: int
    profile_cores: int
    source: str
    host_cpus: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for report.json."""
        return {
            "count": self.count,
            "profile_cores": self.profile_cores,
            "source": self.source,
            "host_cpus": self.host_cpus,
        }


def profile_cores(profile: HardwareProfile) -> tuple[int, str]:
    """The profile's core count and where it came from (``num-cores`` or ``cpu_cores``)."""
    from compiler.profiles import host_target

    cpu = host_target(profile)
    cores = cpu.get("num-cores")
    if isinstance(cores, int) and not isinstance(cores, bool) and cores > 0:
        where = "tvm.host num-cores" if "host" in profile.tvm else "tvm num-cores"
        return cores, where
    return profile.resources.cpu_cores, "resources.cpu_cores"


def plan_threads(profile: HardwareProfile, *, host_cpus: int | None) -> ThreadPlan:
    """Threads for running ``profile``'s code: its core count, capped by ``host_cpus``.

    ``host_cpus`` is None when the code does not run on this machine (no cap).
    """
    cores, where = profile_cores(profile)
    if host_cpus is not None and host_cpus < 1:
        raise ValueError(f"host_cpus {host_cpus} must be at least 1 (or None)")
    count = cores if host_cpus is None else min(cores, host_cpus)
    source = f"profile {where} {cores}"
    if host_cpus is not None:
        source += f", capped by {host_cpus} CPU(s) of this machine"
    return ThreadPlan(count=count, profile_cores=cores, source=source, host_cpus=host_cpus)


def host_cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def tvm_thread_env(count: int) -> dict[str, str]:
    """Environment that makes TVM's runtime use ``count`` unpinned threads.

    Read when TVM's thread pool starts. ``TVM_BIND_THREADS=0`` stops TVM from pinning its
    workers (and the calling thread) to cores: on a shared or busy machine a pinned thread
    that gets preempted stalls every parallel loop (2 threads pinned: 4.4 ms median for the
    bench MLP at load 5; unpinned: 0.16 ms; 1 thread: 0.26 ms).
    """
    return {"TVM_NUM_THREADS": str(count), "TVM_BIND_THREADS": "0"}


def set_tvm_threads(count: int) -> None:
    """Set ``tvm_thread_env(count)`` in this process, before TVM's thread pool starts.

    Used as the initializer of MetaSchedule's runner worker and by anything that runs a TVM
    library in-process (call it before the first inference). TVM's ``runtime.config_threadpool``
    cannot do this: it never raises the count above the default of ``MaxConcurrency()``.
    """
    os.environ.update(tvm_thread_env(count))


@dataclass(frozen=True)
class RuntimeDecision:
    """Which runtime ``--runtime auto`` ships, the statistic behind it, and why."""

    runtime: str
    reason: str
    ratio: float
    tvm_ms: float
    ort_ms: float
    tvm_wins: int
    rounds: int
    margin: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for report.json."""
        return {
            "runtime": self.runtime,
            "reason": self.reason,
            "ratio_tvm_over_ort": round(self.ratio, 4),
            "tvm_median_ms": round(self.tvm_ms, 4),
            "onnxruntime_median_ms": round(self.ort_ms, 4),
            "rounds_tvm_faster_by_margin": self.tvm_wins,
            "rounds": self.rounds,
            "margin": self.margin,
            "statistic": "median over rounds of median(TVM) / median(ORT)",
        }


def runs_per_block(
    latency_ms: Sequence[float],
    *,
    minimum: int,
    seconds: float = BLOCK_SECONDS,
    maximum: int = MAX_BLOCK_RUNS,
) -> int:
    """Timed runs in each block of the TVM / ONNX Runtime comparison: enough calls at the
    model's latency (the median of ``latency_ms``, a first block's timings) for
    ``seconds`` of them, at least ``minimum`` and at most ``maximum`` (or ``minimum``, if
    larger).

    Why: blocks of a fixed 6 runs left the choice to chance on a 2-vCPU VM. ONNX Runtime's
    first calls in a fresh process are slow (mobilenet_v2: 10, 8, 7 ms, then 6), and the
    VM's slow phases, lasting tens of calls or more, slowed it 1.6x (pinning its threads did
    not help) against ~1.1x for TVM, so 6-run medians of ORT ranged 6.4-10.6 ms against 8 ms,
    and `--runtime auto` shipped TVM at 1.15x ORT's in-process time (docs/benchmarks.md,
    twenty-second session). Longer blocks average over those phases; the child process's
    start, not the calls, is most of a block's cost.

    Raises:
        ValueError: no timings, a timing <= 0, or ``minimum`` / ``maximum`` / ``seconds``
            not positive.
    """
    if minimum < 1 or maximum < 1 or seconds <= 0:
        raise ValueError(
            f"minimum {minimum}, maximum {maximum} and seconds {seconds} must be positive"
        )
    if not latency_ms or min(latency_ms) <= 0:
        raise ValueError(f"latencies {list(latency_ms)} must be a non-empty list of times > 0 ms")
    wanted = math.ceil(seconds * 1000 / statistics.median(latency_ms))
    return max(minimum, min(maximum, wanted))


def decide_runtime(
    rounds: Sequence[tuple[Sequence[float], Sequence[float]]], *, margin: float = DEFAULT_MARGIN
) -> RuntimeDecision:
    """Pick TVM or ONNX Runtime from interleaved rounds of ``(tvm_ms, ort_ms)`` timings.

    Raises:
        ValueError: no rounds, a round without timings, a non-positive timing, or a margin
            outside [0, 1).
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin {margin} is outside [0, 1); e.g. 0.05 means 5 %")
    if not rounds:
        raise ValueError("no measurement rounds to decide on")
    ratios = []
    tvm_medians = []
    ort_medians = []
    for k, (tvm_runs, ort_runs) in enumerate(rounds):
        if not tvm_runs or not ort_runs:
            raise ValueError(f"round {k} lacks timings (tvm {len(tvm_runs)}, ort {len(ort_runs)})")
        if min(tvm_runs) <= 0 or min(ort_runs) <= 0:
            raise ValueError(f"round {k} has a timing <= 0 ms")
        tvm_ms = statistics.median(tvm_runs)
        ort_ms = statistics.median(ort_runs)
        tvm_medians.append(tvm_ms)
        ort_medians.append(ort_ms)
        ratios.append(tvm_ms / ort_ms)
    ratio = statistics.median(ratios)
    wins = sum(1 for r in ratios if r <= 1 - margin)
    tvm_ms = statistics.median(tvm_medians)
    ort_ms = statistics.median(ort_medians)
    facts = (
        f"TVM/ORT = {ratio:.3f} (median of {len(ratios)} interleaved rounds; "
        f"TVM {tvm_ms:.4f} ms, ORT {ort_ms:.4f} ms; TVM faster by the margin in "
        f"{wins}/{len(ratios)} rounds)"
    )
    if ratio <= 1 - margin:
        runtime = "tvm"
        reason = f"auto: TVM is faster by at least {margin:.0%}: {facts}"
    elif ratio < 1:
        runtime = "onnxruntime"
        reason = f"auto: ONNX Runtime, TVM is faster by less than the {margin:.0%} margin: {facts}"
    else:
        runtime = "onnxruntime"
        reason = f"auto: ONNX Runtime is faster: {facts}"
    return RuntimeDecision(
        runtime=runtime,
        reason=reason,
        ratio=ratio,
        tvm_ms=tvm_ms,
        ort_ms=ort_ms,
        tvm_wins=wins,
        rounds=len(ratios),
        margin=margin,
    )
