"""Compiled model libraries (a bench run's ``tuned.so``) compared in one process.

This box changes speed by up to 1.6x between minutes, so two libraries timed in separate
runs cannot be compared; alternating them in one process can. Two modes:

    python -m bench.kernel_profile W/.../tuned.so W2/.../tuned.so          # end to end
    python -m bench.kernel_profile W/.../tuned.so --ort W/.../model.onnx   # and ORT in turn
    python -m bench.kernel_profile --kernels W/.../tuned.so W2/.../tuned.so # per kernel

End to end: rounds of ``--calls`` calls of each library in turn through the Relax VM, the
median per round, then the median and range over the rounds and each library's ratio to the
first; with ``--ort``, ONNX Runtime's session of that model (``--threads`` intra-op
threads) takes its turn in every round too, and each library's ratio to it (the median of
the rounds' ratios, and their range) is printed. Per kernel: the Relax VM's instrument
hook times every kernel call (one timer per call, so a kernel's time includes ~1 us of VM
overhead), printed per library as the total per model call, largest first. Inputs are
random, of the shape ``--input-shape`` (default 1x3x224x224). Results: docs/benchmarks.md
(thirteenth, fourteenth and twentieth sessions).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _load(path: str) -> Any:
    import tvm
    from tvm import relax

    return relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())


def _ort_runner(model: str, x: np.ndarray, threads: int) -> Callable[[], Any]:
    """One ONNX Runtime call of ``model`` on ``x`` (its first input), ``threads`` intra-op."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def alternate(
    libs: Sequence[str],
    x: np.ndarray,
    *,
    rounds: int,
    calls: int,
    extra: Sequence[Callable[[], Any]] = (),
) -> list[list[float]]:
    """Per library (then per ``extra`` runner), the median ms of each round; all take turns
    every round."""
    import tvm

    arg = tvm.runtime.tensor(x, tvm.cpu())
    runners = [functools.partial(_load(p)["main"], arg) for p in libs] + list(extra)
    medians: list[list[float]] = [[] for _ in runners]
    for _ in range(rounds):
        for k, run in enumerate(runners):
            for _ in range(max(1, calls // 5)):  # warm up: caches, thread pools
                run()
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            medians[k].append(statistics.median(times) * 1e3)
    return medians


def kernel_times(lib: str, x: np.ndarray, *, calls: int) -> dict[str, float]:
    """us per model call of each kernel (and VM builtin), the median call times the calls
    per model call."""
    import tvm

    vm = _load(lib)
    arg = tvm.runtime.tensor(x, tvm.cpu())
    for _ in range(max(1, calls // 3)):
        vm["main"](arg)
    times: dict[str, list[float]] = defaultdict(list)
    started: dict[str, float] = {}

    def instrument(_func: Any, name: str, before: bool, _ret: Any, *_args: Any) -> int:
        if before:
            started[name] = time.perf_counter()
        else:
            times[name].append((time.perf_counter() - started.pop(name)) * 1e6)
        return 0  # run the call, keep instrumenting

    vm.set_instrument(instrument)
    for _ in range(calls):
        vm["main"](arg)
    vm.set_instrument(None)
    return {name: statistics.median(ts) * (len(ts) // calls) for name, ts in times.items()}


def parse_shape(text: str) -> tuple[int, ...]:
    """``1x3x224x224`` as a tuple; ValueError naming the value otherwise."""
    try:
        shape = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ValueError(f"--input-shape {text!r}: expected positive sizes like 1x3x224x224")
    return shape


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("libs", nargs="+", help="compiled libraries (tuned.so of bench runs)")
    parser.add_argument("--kernels", action="store_true", help="per-kernel times instead")
    parser.add_argument(
        "--ort", metavar="MODEL.onnx", help="also ONNX Runtime on this model, in every round"
    )
    parser.add_argument("--input-shape", default="1x3x224x224")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--top", type=int, default=30, help="kernels listed per library")
    args = parser.parse_args(argv)
    try:
        shape = parse_shape(args.input_shape)
    except ValueError as err:
        parser.error(str(err))  # exit 2
    missing = [p for p in args.libs if not os.path.isfile(p)]
    if missing:
        parser.error(f"no such library: {', '.join(missing)}")
    if min(args.rounds, args.calls, args.threads, args.top) < 1:
        parser.error("--rounds, --calls, --threads and --top must be at least 1")
    if args.ort is not None and not os.path.isfile(args.ort):
        parser.error(f"--ort {args.ort!r}: no such ONNX model")
    if args.ort is not None and args.kernels:
        parser.error("--ort compares end to end; it does not combine with --kernels")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    if args.kernels:
        for lib in args.libs:
            per_kernel = kernel_times(lib, x, calls=args.calls)
            print(f"{lib}: {sum(per_kernel.values()):.0f} us of calls per model call")
            ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])
            for name, us in ranked[: args.top]:
                print(f"  {us:8.1f} us  {name}")
        return 0
    extra = [] if args.ort is None else [_ort_runner(args.ort, x, args.threads)]
    medians = alternate(args.libs, x, rounds=args.rounds, calls=args.calls, extra=extra)
    first = statistics.median(medians[0])
    ort_rounds = medians[-1] if extra else None
    for lib, rounds in zip(args.libs, medians, strict=False):
        mid = statistics.median(rounds)
        versus = ""
        if ort_rounds is not None:
            ratios = [t / o for t, o in zip(rounds, ort_rounds, strict=True)]
            versus = (
                f", {statistics.median(ratios):.2f}x ORT "
                f"(rounds {min(ratios):.2f}-{max(ratios):.2f})"
            )
        print(
            f"{mid:.3f} ms ({min(rounds):.3f}-{max(rounds):.3f}, {len(rounds)} rounds), "
            f"{mid / first:.2f}x the first{versus}: {lib}"
        )
    if ort_rounds is not None:
        mid = statistics.median(ort_rounds)
        print(
            f"{mid:.3f} ms ({min(ort_rounds):.3f}-{max(ort_rounds):.3f}, "
            f"{len(ort_rounds)} rounds): ORT {args.ort}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
