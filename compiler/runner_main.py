"""Run a compiled TVM artifact on saved inputs: the target-side half of the accuracy gate.

This file is executed as a script on the target ISA (natively, or under qemu-user with a
foreign Python sysroot), so it imports only the standard library, numpy and the TVM
*runtime* (``TVM_USE_RUNTIME_LIB=1``): no compiler library, no edgeloop package.

Runner protocol (shared with the C++ armv7 runner, see docs/artifact-format.md):

``WORKDIR/request.json``
    ``{"lib": "<path to .so>", "num_samples": K, "num_inputs": I, "warmup": W, "repeat": R}``,
    optionally ``"num_threads": T`` (TVM's thread count; set before TVM starts its pool) and
    ``"device": "cuda"`` (run on ``cuda(0)``; the result then names the ``"gpu"``).
``WORKDIR/s{k}_in{i}.npy``
    input ``i`` (in the model's input order) of sample ``k``.

The runner writes ``WORKDIR/s{k}_out{j}.npy`` for every output ``j`` of every sample and
``WORKDIR/result.json``: ``{"num_outputs": J, "latency_ms": [...], "machine": "...",
"runtime": "tvm <version>", "num_threads": T}``; latencies are measured on sample 0 after
``W`` warm-up runs; ``num_threads`` is what TVM's runtime reports using. The C++ armv7
runner ignores ``num_threads`` and reads ``TVM_NUM_THREADS`` from its environment.

ONNX Runtime is timed by the compiler in its own process, never here: in one process with
TVM at 2 threads on 2 cores it made TVM 20-50x slower (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")

import numpy as np  # noqa: E402


def _flatten(result: object) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        return [np.asarray(result.numpy())]
    try:
        items = list(result)  # type: ignore[call-overload]
    except TypeError:
        return [np.asarray(result)]
    flat: list[np.ndarray] = []
    for item in items:
        flat.extend(_flatten(item))
    return flat


def _timed(call: Callable[[], object], runs: int) -> list[float]:
    latencies = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - start) * 1000.0)
    return latencies


def _tvm_threads(tvm: object) -> int | None:
    try:
        return int(tvm.get_global_func("runtime.NumThreads")())  # type: ignore[attr-defined]
    except Exception:  # an older or stripped runtime without the function
        return None


def main(workdir: str) -> int:
    with open(os.path.join(workdir, "request.json"), encoding="utf-8") as fh:
        request = json.load(fh)
    threads = request.get("num_threads")
    if threads:
        # Read by TVM's runtime when its thread pool starts, i.e. after this import.
        os.environ["TVM_NUM_THREADS"] = str(int(threads))

    import tvm
    from tvm import runtime
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cpu(0)
    if request.get("device") == "cuda":
        # CUDA artifacts: TVM's CUDA plugin registers the loader of their fatbin modules.
        import ctypes

        lib_dir = os.path.join(os.path.dirname(os.path.abspath(tvm.__file__)), "lib")
        ctypes.CDLL(os.path.join(lib_dir, "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
        dev = tvm.cuda(0)
    vm = VirtualMachine(runtime.load_module(request["lib"]), dev)
    entry = vm[request.get("entry", "main")]

    def load(k: int) -> list[object]:
        return [
            runtime.tensor(np.load(os.path.join(workdir, f"s{k}_in{i}.npy")), dev)
            for i in range(request["num_inputs"])
        ]

    num_outputs = 0
    for k in range(request["num_samples"]):
        outputs = _flatten(entry(*load(k)))
        num_outputs = len(outputs)
        for j, out in enumerate(outputs):
            np.save(os.path.join(workdir, f"s{k}_out{j}.npy"), out)

    # Timed like a serving call (and like ONNX Runtime's session.run, which the compiler
    # compares against): numpy inputs in, numpy outputs out, conversions included.
    arrays = [np.load(os.path.join(workdir, f"s0_in{i}.npy")) for i in range(request["num_inputs"])]

    def call() -> list[np.ndarray]:
        return _flatten(entry(*[runtime.tensor(a, dev) for a in arrays]))

    for _ in range(request.get("warmup", 1)):
        call()
    result = {
        "num_outputs": num_outputs,
        "latency_ms": _timed(call, int(request.get("repeat", 0))),
        "machine": platform.machine(),
        "runtime": f"tvm {tvm.__version__}",
        "num_threads": _tvm_threads(tvm),
    }
    if request.get("device") == "cuda":
        result["gpu"] = str(dev.device_name)
    with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: runner_main.py WORKDIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
