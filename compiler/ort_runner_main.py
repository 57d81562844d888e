"""Time ONNX Runtime on saved inputs in a process of its own: the ORT half of ``--runtime auto``.

``compiler.execution.run_onnxruntime`` runs this file as a script with ``sys.executable``,
a fresh process per timed block, as ``compiler/runner_main.py`` is run for TVM. Why a fresh
process: with 2 unpinned threads on 2 vCPUs the scheduler often leaves both threads of a
process on one CPU for hundreds of calls (ORT's mlp ~34 instead of ~20 us), so one long-lived
session gives one draw of that placement for a whole comparison (docs/benchmarks.md, "Why ORT
was slower inside the bench"). It imports only the standard library, numpy and onnxruntime:
no compiler library, no TVM (in one process with TVM, TVM at 2 threads ran 20-50x slower).

Protocol, a work directory:

``WORKDIR/request.json``
    ``{"model": "<path to .onnx>", "num_inputs": I, "threads": T, "warmup": W, "repeat": R}``.
``WORKDIR/s0_in{i}.npy``
    input ``i``, in the model's input order.

The runner opens one session (``intra_op_num_threads=T``, ``inter_op_num_threads=1``,
``CPUExecutionProvider``), makes ``W`` untimed calls, times ``R`` calls of
``session.run(None, feeds)`` (numpy in, numpy out) and writes ``WORKDIR/result.json``:
``{"latency_ms": [...], "pid": <this process>, "runtime": "onnxruntime <version>",
"num_threads": T}``. On failure it exits non-zero with the error, one line, on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def main(workdir: str) -> int:
    with open(os.path.join(workdir, "request.json"), encoding="utf-8") as fh:
        request = json.load(fh)
    import onnxruntime as ort

    threads = int(request["threads"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(request["model"], options, providers=["CPUExecutionProvider"])
    arrays = [
        np.load(os.path.join(workdir, f"s0_in{i}.npy")) for i in range(int(request["num_inputs"]))
    ]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(arrays):
        print(
            f"the model takes {len(names)} input(s) ({', '.join(names)}), got {len(arrays)}",
            file=sys.stderr,
        )
        return 3
    feeds = dict(zip(names, arrays, strict=True))
    for _ in range(int(request.get("warmup", 1))):
        session.run(None, feeds)
    latencies = []
    for _ in range(int(request.get("repeat", 0))):
        start = time.perf_counter()
        session.run(None, feeds)
        latencies.append((time.perf_counter() - start) * 1000.0)
    result = {
        "latency_ms": latencies,
        "pid": os.getpid(),
        "runtime": f"onnxruntime {ort.__version__}",
        "num_threads": threads,
    }
    with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: ort_runner_main.py WORKDIR", file=sys.stderr)
        sys.exit(2)
    try:
        code = main(sys.argv[1])
    except Exception as err:  # the parent shows stderr's tail: one line, not a traceback
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        code = 1
    sys.exit(code)
