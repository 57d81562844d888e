"""Benchmark: latency of the agent's OIP HTTP server against an in-process call, same model.

The test MLP (``tests/compiler/models.py``, 1x32 -> 10) is compiled and signed with
``compiler.pipeline.compile_model`` (TVM, trials 0; and ONNX Runtime) in a child process, so
that this process can load it as a device does: ``agent.runtimes.load`` after
``prepare_tvm_runtime_env`` (TVM runtime-only library). Then, batch 1, for each runtime:

* **in-process**: ``LoadedModel.infer([x])``, the call the server makes;
* **repository**: ``ModelRepository.infer``, the same call plus admission control and the
  latency tracker (what the server adds around the model before any HTTP);
* **handle JSON / binary**: ``InferenceServer.handle`` called directly, no socket: routing,
  parsing, the call and encoding (what the server's own code costs, without http.server);
* **HTTP JSON**: ``POST /v2/models/mlp/infer`` on ``agent.server.InferenceServer`` bound to
  127.0.0.1, over one keep-alive ``http.client.HTTPConnection``, JSON tensors both ways;
* **HTTP binary**: the same with the binary tensor data extension both ways;
* **tritonclient JSON / binary**: the stock ``tritonclient.http`` client, if installed;
* **HTTP null** (peer): the same client against a ``ThreadingHTTPServer`` whose handler
  only reads the body and answers a constant: the floor of the standard library's HTTP
  server and client on this machine, without any inference code.

The HTTP clients run in a separate process (a device application is one; in one process
the client and the server's handler thread would share the GIL), interleaved in rounds. The
in-process series is measured before and after the client run. Each HTTP request is
timed from sending it to having read (and, for our own client, parsed) the whole response;
the request body is built once. Overhead = HTTP p50 - in-process p50 (issue target <= 0.3 ms).

It prints numbers and asserts none: a benchmark, not a test. Usage::

    python3 bench/serving_overhead.py                 # tvm + onnxruntime, 5000 requests each
    python3 bench/serving_overhead.py --quick         # 1000 requests
    python3 bench/serving_overhead.py --runtimes tvm --requests 20000 --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
MODEL = "mlp"
SHAPE = (1, 32)


class _NullHandler(BaseHTTPRequestHandler):
    """The floor of the standard library's HTTP server: reads the body, answers a constant."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 1 << 16
    body = b'{"outputs": []}'

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        pass


def start_null_server() -> ThreadingHTTPServer:
    """A keep-alive ``ThreadingHTTPServer`` with :class:`_NullHandler` on a free port."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _NullHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    return httpd


@dataclass
class Series:
    """Latencies of one way of calling the model, in microseconds."""

    runtime: str
    method: str
    micros: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile in milliseconds."""
        return float(np.percentile(np.asarray(self.micros), q)) / 1000.0

    def summary(self) -> dict[str, Any]:
        """p50/p90/p99/mean in ms and the count."""
        return {
            "runtime": self.runtime,
            "method": self.method,
            "n": len(self.micros),
            "p50_ms": round(self.percentile(50), 4),
            "p90_ms": round(self.percentile(90), 4),
            "p99_ms": round(self.percentile(99), 4),
            "mean_ms": round(float(np.mean(self.micros)) / 1000.0, 4),
        }


# ---------------------------------------------------------------- compile (child process)


def compile_bundles(workdir: Path, runtimes: list[str]) -> dict[str, Path]:
    """Export the test MLP and compile one signed bundle per runtime (run in a child)."""
    from compiler.pipeline import CompileRequest, compile_model
    from compiler.settings import CompilerSettings
    from compiler.signing import generate_keys
    from tests.compiler import models

    keys = generate_keys(workdir / "keys")
    settings = CompilerSettings(config_dir=workdir / "cfg", cache_dir=workdir / "cache")
    onnx = models.export_onnx("mlp", workdir / "mlp.onnx")
    out: dict[str, Path] = {}
    for runtime in runtimes:
        result = compile_model(
            CompileRequest(
                model=onnx,
                profile="generic/x86_64",
                output=workdir / f"bundle-{runtime}",
                model_name=MODEL,
                runtime=runtime,
                trials=0,
                samples=2,
                signing_key=keys.private,
            ),
            settings=settings,
        )
        out[runtime] = result.output
    return out


# ---------------------------------------------------------------- HTTP clients (child process)


def _json_body(x: np.ndarray[Any, Any]) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()


def _binary_body(x: np.ndarray[Any, Any]) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + x.astype("<f4").tobytes(), len(header)


def _http_caller(port: int, x: np.ndarray[Any, Any], *, binary: bool) -> Callable[[], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    path = f"/v2/models/{MODEL}/infer"
    if binary:
        body, header_length = _binary_body(x)
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(header_length),
        }
    else:
        body = _json_body(x)
        headers = {"Content-Type": "application/json"}

    def call() -> Any:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        if binary:
            split = int(response.getheader("Inference-Header-Content-Length") or 0)
            return np.frombuffer(data[split:], dtype="<f4")
        return np.asarray(json.loads(data)["outputs"][0]["data"], dtype=np.float32)

    return call


def _null_caller(port: int, x: np.ndarray[Any, Any]) -> Callable[[], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = _json_body(x)
    headers = {"Content-Type": "application/json"}

    def call() -> Any:
        conn.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers)
        response = conn.getresponse()
        return json.loads(response.read())

    return call


def _triton_caller(port: int, x: np.ndarray[Any, Any], *, binary: bool) -> Callable[[], Any]:
    import tritonclient.http as httpclient  # type: ignore[import-untyped]

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}", concurrency=1)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]

    def call() -> Any:
        return client.infer(MODEL, [tensor], outputs=outputs).as_numpy("logits").ravel()

    return call


def client_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Child process: time every HTTP method in interleaved rounds; return the latencies."""
    x = np.asarray(spec["x"], dtype=np.float32).reshape(SHAPE)
    expected = np.asarray(spec["expected"], dtype=np.float32)
    callers: dict[str, Callable[[], Any]] = {
        "http-json": _http_caller(spec["port"], x, binary=False),
        "http-binary": _http_caller(spec["port"], x, binary=True),
    }
    skipped: dict[str, str] = {}
    null = _null_caller(spec["null_port"], x)
    try:
        callers["tritonclient-json"] = _triton_caller(spec["port"], x, binary=False)
        callers["tritonclient-binary"] = _triton_caller(spec["port"], x, binary=True)
    except ImportError as err:
        skipped["tritonclient"] = str(err)
    for name, call in callers.items():
        got = np.asarray(call()).ravel()
        if not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"{name} answered {got}, in-process {expected}")
        for _ in range(spec["warmup"]):
            call()
    for _ in range(spec["warmup"]):
        null()
    callers = {"http-null": null, **callers}
    micros: dict[str, list[float]] = {name: [] for name in callers}
    per_round = max(1, spec["requests"] // spec["rounds"])
    clock = time.perf_counter_ns
    for _ in range(spec["rounds"]):
        for name, call in callers.items():
            series = micros[name]
            for _ in range(per_round):
                start = clock()
                call()
                series.append((clock() - start) / 1000.0)
    return {"micros": micros, "skipped": skipped}


# ---------------------------------------------------------------- in-process


def time_calls(call: Callable[[], Any], n: int, *, warmup: int) -> list[float]:
    """Latencies of ``n`` calls in microseconds, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        start = clock()
        call()
        out.append((clock() - start) / 1000.0)
    return out


def _handle_callers(server: Any, x: np.ndarray[Any, Any]) -> dict[str, Callable[[], Any]]:
    """``InferenceServer.handle`` (routing, parsing, the call, encoding) without a socket."""
    from email.message import Message

    path = f"/v2/models/{MODEL}/infer"
    json_headers = Message()
    json_headers["Content-Type"] = "application/json"
    json_body = _json_body(x)
    binary_body, header_length = _binary_body(x)
    binary_headers = Message()
    binary_headers["Content-Type"] = "application/octet-stream"
    binary_headers["Inference-Header-Content-Length"] = str(header_length)

    def handle(headers: Message, body: bytes) -> Any:
        response = server.handle("POST", path, headers, body)
        if response.status != 200:
            raise RuntimeError(f"handle: {response.status} {response.body[:300]!r}")
        return response

    return {
        "handle-json": lambda: handle(json_headers, json_body),
        "handle-binary": lambda: handle(binary_headers, binary_body),
    }


def measure_runtime(
    runtime: str, bundle_dir: Path, public_key: Path, *, requests: int, rounds: int, warmup: int
) -> tuple[list[Series], dict[str, str]]:
    """Every series for one runtime's bundle."""
    from agent import runtimes
    from agent.server import InferenceServer, ModelRepository
    from compiler.bundle import verify_bundle
    from compiler.signing import load_public_key

    verified = verify_bundle(bundle_dir, load_public_key(public_key))
    model = runtimes.load(bundle_dir, verified.manifest)
    model.self_test()
    repository = ModelRepository(max_concurrency=4)
    repository.set_model(MODEL, "1", verified.artifact_id, runtime, model)
    server = InferenceServer(repository)
    port = server.start("127.0.0.1", 0)
    null_server = start_null_server()
    x = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    expected = model.infer([x])[0].ravel()
    half = requests // 2
    handlers = _handle_callers(server, x)
    try:
        direct = time_calls(lambda: model.infer([x]), half, warmup=warmup)
        repo = time_calls(lambda: repository.infer(MODEL, [x]), half, warmup=warmup)
        handled = {n: time_calls(c, half, warmup=warmup) for n, c in handlers.items()}
        spec = {
            "port": port,
            "null_port": null_server.server_address[1],
            "x": x.ravel().tolist(),
            "expected": expected.tolist(),
            "requests": requests,
            "rounds": rounds,
            "warmup": warmup,
        }
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--client-worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if out.returncode != 0:
            raise RuntimeError(f"client worker failed: {out.stderr[-2000:]}")
        client = json.loads(out.stdout.strip().splitlines()[-1])
        direct += time_calls(lambda: model.infer([x]), half, warmup=0)
        repo += time_calls(lambda: repository.infer(MODEL, [x]), half, warmup=0)
        for name, call in handlers.items():
            handled[name] += time_calls(call, half, warmup=0)
    finally:
        server.stop()
        null_server.shutdown()
        null_server.server_close()
    series = [Series(runtime, "in-process", direct), Series(runtime, "repository", repo)]
    series += [Series(runtime, name, values) for name, values in handled.items()]
    series += [Series(runtime, name, values) for name, values in client["micros"].items()]
    return series, client["skipped"]


# ---------------------------------------------------------------- main


def _machine() -> dict[str, Any]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for dist in ("apache-tvm", "onnxruntime", "tritonclient", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        **versions,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write ``--json`` if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1000 requests per series")
    parser.add_argument("--requests", type=int, default=5000, help="timed calls per series")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of HTTP calls")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--runtimes", default="tvm,onnxruntime")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--client-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compile-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_worker is not None:
        print(json.dumps(client_worker(json.loads(args.client_worker))))
        return 0
    if args.compile_worker is not None:
        spec = json.loads(args.compile_worker)
        bundles = compile_bundles(Path(spec["workdir"]), spec["runtimes"])
        print(json.dumps({k: str(v) for k, v in bundles.items()}))
        return 0
    requests = 1000 if args.quick else args.requests
    runtimes_wanted = [r for r in args.runtimes.split(",") if r]

    from agent import runtimes

    report: dict[str, Any] = {
        "machine": _machine(),
        "settings": {
            "model": "tests/compiler/models.py mlp, 1x32 float32 -> 1x10",
            "requests": requests,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "http": "http.client keep-alive in a separate process; body built once",
            "server": "agent.server.InferenceServer on 127.0.0.1, max_concurrency 4",
        },
        "series": [],
        "overhead": [],
        "skipped": {},
    }
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-serving-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        out = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--compile-worker",
                json.dumps({"workdir": str(work), "runtimes": runtimes_wanted}),
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"},
        )
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        bundles = json.loads(out.stdout.strip().splitlines()[-1])
        # As the agent does, before anything here imports tvm: the runtime-only library.
        report["settings"]["tvm_runtime_only"] = runtimes.prepare_tvm_runtime_env()
        print(
            f"compiled {', '.join(bundles)} in {time.monotonic() - started:.0f} s", file=sys.stderr
        )
        for runtime in runtimes_wanted:
            series, skipped = measure_runtime(
                runtime,
                Path(bundles[runtime]),
                work / "keys" / "signing-key.pub",
                requests=requests,
                rounds=args.rounds,
                warmup=args.warmup,
            )
            report["skipped"].update(skipped)
            report["series"] += [s.summary() for s in series]
            base = series[0]
            for s in series[1:]:
                report["overhead"].append(
                    {
                        "runtime": runtime,
                        "method": s.method,
                        "p50_ms": round(s.percentile(50) - base.percentile(50), 4),
                        "p99_ms": round(s.percentile(99) - base.percentile(99), 4),
                    }
                )
    report["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    _print(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _print(report: dict[str, Any]) -> None:
    s = report["settings"]
    m = report["machine"]
    print(
        f"\nOIP serving overhead, {s['model']}, {s['requests']} calls per series "
        f"({m['cpus']} CPUs, load average {m['loadavg_at_start'][0]} -> {m['loadavg_at_end'][0]})"
    )
    print(
        f"{'runtime':<11} | {'method':<19} | {'p50 ms':>7} | {'p99 ms':>7} | "
        f"{'+p50 ms':>7} | {'+p99 ms':>7} | p50 target +0.3 ms"
    )
    overhead = {(o["runtime"], o["method"]): o for o in report["overhead"]}
    for row in report["series"]:
        extra = overhead.get((row["runtime"], row["method"]))
        if extra is None:
            plus, verdict = f"{'':>7} | {'':>7}", ""
        else:
            plus = f"{extra['p50_ms']:>7.3f} | {extra['p99_ms']:>7.3f}"
            verdict = "ok" if extra["p50_ms"] <= 0.3 else "above"
        print(
            f"{row['runtime']:<11} | {row['method']:<19} | {row['p50_ms']:>7.3f} | "
            f"{row['p99_ms']:>7.3f} | {plus} | {verdict}"
        )
    for what, why in report["skipped"].items():
        print(f"skipped {what}: {why}")


if __name__ == "__main__":
    sys.exit(main())
