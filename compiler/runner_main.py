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
"runtime": "tvm <version>", "num_threads": T, "call_path": "saved-closure" | "plain"}``;
latencies are measured on sample 0 after ``W`` warm-up runs; ``num_threads`` is what TVM's
runtime reports using, ``call_path`` how :class:`VmCaller` called it. The C++ armv7
runner ignores ``num_threads`` and reads ``TVM_NUM_THREADS`` from its environment.

ONNX Runtime is timed in a child process of its own (``compiler/ort_runner_main.py``), never
here: in one process with TVM at 2 threads on 2 cores it made TVM 20-50x slower
(docs/benchmarks.md).

Calls go through :class:`VmCaller`, which the agent's TVM runtime uses too
(``agent/runtimes.py``), so that the compiler times the call path a device serves with.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np

_SAVED_NAME = "__edgeloop_saved_{}"
_DLPACK_CPU = 1  # DLDeviceType kDLCPU


def import_tvm_runtime() -> None:
    """Import ``tvm`` without letting it import torch, unless torch is imported already.

    tvm-ffi imports torch, if installed, before it loads its own library (a workaround for a
    symbol clash seen only on Windows) and probes torch for its DLPack extension: in a
    process that only runs artifacts that is 2.1 of the 2.8 s its import takes (the runner
    child per timed block, the agent's start). The runtime never uses torch, and on a device
    it is not installed; here ``import torch`` fails while ``tvm`` is imported, and works
    again afterwards. Where torch is in this process already, nothing changes.
    """
    if "tvm" in sys.modules:
        return
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment]  # import torch -> ImportError
    try:
        import tvm  # noqa: F401
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


class VmCaller:
    """Call a Relax VM function with numpy arrays and get numpy arrays back, cheaply.

    On a CPU device the inputs go into tensors allocated once (``np.copyto`` into numpy
    views of them, valid for any strides and alignment), the function is called as a closure
    saved with those tensors bound (``VirtualMachine.save_function``: no argument conversion
    or name lookup per call), and each output is copied out of its tensor through DLPack
    instead of ``Tensor.numpy()``. That is 2-3 us of fixed cost per call instead of 15-20
    (docs/benchmarks.md). The copy keeps returned arrays independent of the VM's memory.
    Other devices, or a runtime without ``save_function`` or numpy without DLPack, take the
    plain path: ``runtime.tensor`` per input, ``vm[entry](...)``, ``.numpy()`` per output.

    Not thread-safe: the bound input tensors are shared by all calls (callers serialise).
    """

    def __init__(
        self,
        vm: object,
        device: object,
        entry: str,
        inputs: list[tuple[tuple[int, ...], str]],
    ) -> None:
        from tvm import runtime

        self._tensor = runtime.tensor
        self._device = device
        self._entry = vm[entry]  # type: ignore[index]
        self._views: list[np.ndarray] | None = None
        self._saved: Callable[[], object] | None = None
        self.fast = False
        on_cpu = device.dlpack_device_type() == _DLPACK_CPU  # type: ignore[attr-defined]
        if not on_cpu or not hasattr(np, "from_dlpack"):
            return
        try:
            buffers = [runtime.empty(shape, dtype, device) for shape, dtype in inputs]
            views = [np.from_dlpack(b) for b in buffers]
            name = _SAVED_NAME.format(entry)
            vm.save_function(entry, name, *buffers)  # type: ignore[attr-defined]
            self._saved = vm[name]  # type: ignore[index]
        except Exception:  # an older runtime: keep the plain path
            return
        self._views = views
        self._buffers = buffers  # the closure holds them too; keep the owner explicit
        self.fast = True

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Run the function on ``arrays`` (shapes and dtypes as declared)."""
        if self._saved is None or self._views is None:
            args = [self._tensor(np.ascontiguousarray(a), self._device) for a in arrays]
            return _flatten(self._entry(*args))
        for view, array in zip(self._views, arrays, strict=True):
            np.copyto(view, array, casting="no")
        return _flatten_copy(self._saved())


def _flatten_copy(result: object) -> list[np.ndarray]:
    """CPU outputs as numpy copies through DLPack (cheaper than ``Tensor.numpy()``)."""
    if hasattr(result, "__dlpack__"):
        return [np.from_dlpack(result).copy()]
    flat: list[np.ndarray] = []
    for item in result:  # type: ignore[attr-defined]
        flat.extend(_flatten_copy(item))
    return flat


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

    import_tvm_runtime()
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

    def load(k: int) -> list[np.ndarray]:
        return [
            np.load(os.path.join(workdir, f"s{k}_in{i}.npy")) for i in range(request["num_inputs"])
        ]

    arrays = load(0)
    caller = VmCaller(
        vm, dev, request.get("entry", "main"), [(a.shape, str(a.dtype)) for a in arrays]
    )
    num_outputs = 0
    for k in range(request["num_samples"]):
        outputs = caller(load(k))
        num_outputs = len(outputs)
        for j, out in enumerate(outputs):
            np.save(os.path.join(workdir, f"s{k}_out{j}.npy"), out)

    # Timed like a serving call (and like ONNX Runtime's session.run, which the compiler
    # compares against): numpy inputs in, numpy outputs out, conversions included, through
    # the same VmCaller the agent serves with.
    def call() -> list[np.ndarray]:
        return caller(arrays)

    for _ in range(request.get("warmup", 1)):
        call()
    result = {
        "num_outputs": num_outputs,
        "latency_ms": _timed(call, int(request.get("repeat", 0))),
        "machine": platform.machine(),
        "runtime": f"tvm {tvm.__version__}",
        "num_threads": _tvm_threads(tvm),
        "call_path": "saved-closure" if caller.fast else "plain",
    }
    if request.get("device") == "cuda":
        result["gpu"] = str(dev.device_name)
    with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    # Only as the runner process: imported (the agent and the compiler use VmCaller) it must
    # not touch the environment, or every later subprocess (MetaSchedule workers, the cloud
    # worker) would inherit runtime-only TVM. TVM itself is imported inside main().
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    if len(sys.argv) != 2:
        print("usage: runner_main.py WORKDIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
