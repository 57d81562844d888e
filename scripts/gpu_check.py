"""Check CUDA artifacts on a real GPU: accuracy against reference outputs, latency vs PyTorch.

Two halves, run on two machines:

``prepare`` (here, no GPU; scripts/gpu_check_prepare.sh calls it)
    compiles the test models (tests/compiler/models.py: cnn, mlp) for the CUDA profiles,
    computes reference outputs with ONNX Runtime on seeded inputs, saves the PyTorch
    weights, and writes all of it under DATA (``.gpu-check/`` by default, git-ignored).

``check`` (on the lent GPU machine; scripts/gpu_check.sh calls it)
    loads each artifact whose host code this machine can run with the *installed* agent
    runtime (``agent.runtimes.load``: TVM runtime-only + libtvm_runtime_cuda.so), compares
    its outputs with the references, times it against PyTorch CUDA eager on the same model
    and weights, and writes ``gpu_check.json`` and ``gpu_check.md`` to OUT.

``tune`` (on the lent GPU machine, before ``check``; needs TVM's *compiler*, not the agent's
runtime-only TVM, so it runs from the checkout in its own process)
    compiles the small model (mlp) for nvidia/h100 twice through ``compile_model`` on this
    machine's GPU: ``--trials 0`` (dlight's default schedules) and ``--trials TUNE_TRIALS``
    (MetaSchedule tuning of the CUDA target, measured on the GPU, dlight for the rest), each
    with a fresh tuning database, and writes both accuracy gates and latencies to
    ``gpu_tune.json``, which ``check`` folds into its JSON and markdown. Where TVM's compiler,
    xgboost or cryptography cannot be imported it records why and skips.

Latency method: both sides are timed like a serving call, numpy in and numpy out (host to
device copy, run, device to host copy), median of ``--runs`` calls after ``--warmup``; the
PyTorch figure with the input already on the GPU is reported beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KINDS = ("cnn", "mlp")
GPU_PROFILES = ("nvidia/h100", "nvidia/jetson-orin-nano")
SAMPLES = 4
TUNE_MODEL, TUNE_PROFILE, TUNE_TRIALS = "mlp", "nvidia/h100", 16
TUNE_FILE = "gpu_tune.json"


def _models_module(repo: Path) -> ModuleType:
    """tests/compiler/models.py loaded by path (it imports only torch)."""
    spec = importlib.util.spec_from_file_location(
        "edgeloop_test_models", repo / "tests/compiler/models.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(data: Path, profiles: list[str]) -> None:
    import onnxruntime as ort
    import torch

    sys.path.insert(0, str(REPO))
    from compiler.bundle import verify_bundle
    from compiler.pipeline import CompileRequest, compile_model
    from compiler.settings import CompilerSettings
    from compiler.signing import generate_keys, load_public_key

    models = _models_module(REPO)
    data.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(data / "keys", ignore_errors=True)
    key = generate_keys(data / "keys").private
    settings = CompilerSettings(config_dir=data / "config", tuning_db=data / "tuning")
    index: dict[str, Any] = {"models": {}, "artifacts": []}
    for kind in KINDS:
        onnx_path = models.export_onnx(kind, data / f"{kind}.onnx")
        torch.save(models.build(kind).state_dict(), data / f"{kind}.pt")
        rng = np.random.default_rng(0)
        shape = models.EXAMPLE_INPUTS[kind]
        inputs = rng.standard_normal((SAMPLES, *shape)).astype(np.float32)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        outputs = np.stack([session.run(None, {"input": x})[0] for x in inputs])
        np.savez(data / f"{kind}_reference.npz", inputs=inputs, outputs=outputs)
        index["models"][kind] = {"input_shape": list(shape), "samples": SAMPLES}
        for profile in profiles:
            out = data / "artifacts" / f"{kind}-{profile.replace('/', '_')}"
            request = CompileRequest(
                model=onnx_path, profile=profile, output=out, signing_key=key, trials=0, force=True
            )
            result = compile_model(request, settings=settings)
            verify_bundle(out, load_public_key(key.with_suffix(".pub")))
            code = result.report["static_checks"]["device_code"]
            index["artifacts"].append(
                {
                    "kind": kind,
                    "profile": profile,
                    "dir": str(out.relative_to(data)),
                    "device_code": code,
                }
            )
            print(
                f"prepared {kind} for {profile}: {code['format']} {code['sass_archs']}",
                file=sys.stderr,
            )
    (data / "index.json").write_text(json.dumps(index, indent=2))


def _tune_row(report: dict[str, Any], wall_s: float) -> dict[str, Any]:
    verification = report["verification"]
    accuracy = report.get("accuracy") or {}
    tuning = report.get("tuning") or {}
    return {
        "executed": verification["executed"],
        "where": verification["where"],
        "gpu": verification.get("gpu"),
        "latency_median_ms": (report["latency"].get("tvm") or {}).get("median_ms"),
        "max_abs_error": max(
            (a.get("max_abs_error", 0.0) for a in accuracy.values()), default=None
        ),
        # compile_model raises AccuracyGateError on a violation: a gate that ran passed.
        "accuracy_passed": bool(verification["executed"] and accuracy),
        "tasks_total": tuning.get("tasks_total"),
        "new_trials": tuning.get("new_trials"),
        "records_applied": tuning.get("records_applied"),
        "untuned_tasks": tuning.get("untuned_tasks"),
        "compile_wall_s": round(wall_s, 1),
    }


def tune(data: Path, out: Path, *, trials: int) -> int:
    """dlight vs MetaSchedule-tuned CUDA build of the small model, on this machine's GPU."""
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "model": TUNE_MODEL,
        "profile": TUNE_PROFILE,
        "trials": trials,
        # Overwritten when it ends: a run killed by its timeout leaves this behind.
        "status": "started (did not finish: killed by its timeout?)",
    }
    path = out / TUNE_FILE
    path.write_text(json.dumps(result, indent=2))
    try:
        import cryptography  # noqa: F401  (signing the bundles)
        import tvm.relax  # noqa: F401  (TVM's compiler, not the runtime-only package)
        import xgboost  # noqa: F401  (MetaSchedule's cost model)
    except ImportError as err:
        result["status"] = f"skipped: the compiler stack cannot be imported here ({err})"
        path.write_text(json.dumps(result, indent=2))
        print(f"gpu_check tune: {result['status']}", file=sys.stderr)
        return 0
    sys.path.insert(0, str(REPO))
    from compiler.execution import detect_host
    from compiler.pipeline import CompileRequest, compile_model
    from compiler.settings import CompilerSettings
    from compiler.signing import generate_keys

    # Bundles and databases stay off OUT (only a few files come back from the machine).
    work = Path(tempfile.mkdtemp(prefix="edgeloop-gpu-tune-"))
    key = generate_keys(work / "keys").private
    host = detect_host()
    result["host_has_cuda_gpu"] = host.has_cuda_gpu
    onnx_path = data / f"{TUNE_MODEL}.onnx"
    rows: dict[str, Any] = {}
    try:
        for name, n in (("dlight", 0), ("tuned", trials)):
            settings = CompilerSettings(config_dir=work / "config", tuning_db=work / f"db-{name}")
            start = time.perf_counter()
            report = compile_model(
                CompileRequest(
                    model=onnx_path,
                    profile=TUNE_PROFILE,
                    output=work / name,
                    signing_key=key,
                    trials=n,
                    force=True,
                ),
                settings=settings,
                host=host,
            ).report
            rows[name] = _tune_row(report, time.perf_counter() - start)
            print(f"gpu_check tune: {name}: {rows[name]}", file=sys.stderr)
    except Exception as err:  # record it; `check` still runs
        result.update(rows=rows, status=f"error: {type(err).__name__}: {err}")
        path.write_text(json.dumps(result, indent=2))
        print(f"gpu_check tune: {result['status']}", file=sys.stderr)
        return 1
    dlight, tuned = rows["dlight"], rows["tuned"]
    ok = bool(dlight["accuracy_passed"] and tuned["accuracy_passed"] and tuned["new_trials"])
    speedup = (
        round(dlight["latency_median_ms"] / tuned["latency_median_ms"], 3)
        if dlight["latency_median_ms"] and tuned["latency_median_ms"]
        else None
    )
    result.update(
        rows=rows,
        speedup_tuned_over_dlight=speedup,
        status="ok" if ok else "FAILED (accuracy, or no trial was measured)",
    )
    path.write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


def _tune_markdown(tune_result: dict[str, Any] | None) -> list[str]:
    if tune_result is None:
        return ["", "CUDA tuning: not run (no gpu_tune.json)"]
    head = (
        f"CUDA tuning ({tune_result['model']} for {tune_result['profile']}, "
        f"{tune_result['trials']} trials): {tune_result['status']}"
    )
    rows = tune_result.get("rows") or {}
    if not rows:
        return ["", head]
    lines = [
        "",
        head
        + f"; tuned speedup over dlight: {tune_result.get('speedup_tuned_over_dlight') or '-'}",
        "",
        "| build | accuracy | max abs err | median ms | new trials | records applied | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {'ok' if r['accuracy_passed'] else 'not run'} | {r['max_abs_error']} | "
            f"{r['latency_median_ms']} | {r['new_trials']} | {r['records_applied']} | "
            f"{r['compile_wall_s']} |"
        )
    return lines


def _median_ms(call: Any, *, warmup: int, runs: int, sync: Any = None) -> float:
    for _ in range(warmup):
        call()
    if sync:
        sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        if sync:
            sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(times), 4)


def _bundle_intact(bundle: Path, manifest: Any) -> None:
    # The signature needs `cryptography`, absent on the GPU machine; the file hashes it
    # signs are checked instead (`prepare` verified the signature after compiling).
    for entry in manifest.files:
        digest = hashlib.sha256((bundle / entry.path).read_bytes()).hexdigest()
        if digest != entry.sha256:
            raise ValueError(f"{bundle / entry.path}: sha256 {digest} != manifest {entry.sha256}")


def _latencies(model: Any, net: Any, ref: Any, *, warmup: int, runs: int) -> dict[str, float]:
    """TVM (agent runtime) and PyTorch eager on one sample, both numpy in and numpy out."""
    import torch

    x = ref["inputs"][0]
    x_gpu = torch.from_numpy(x).cuda()
    with torch.inference_mode():
        torch_out = net(x_gpu).cpu().numpy()
        return {
            "torch_max_abs_error": float(np.max(np.abs(torch_out - ref["outputs"][0]))),
            "tvm_ms": _median_ms(lambda: model.infer([x]), warmup=warmup, runs=runs),
            "torch_eager_ms": _median_ms(
                lambda: net(torch.from_numpy(x).cuda()).cpu().numpy(), warmup=warmup, runs=runs
            ),
            "torch_eager_on_gpu_ms": _median_ms(
                lambda: net(x_gpu), warmup=warmup, runs=runs, sync=torch.cuda.synchronize
            ),
        }


def _check_one(
    bundle: Path,
    manifest: Any,
    kind: str,
    row: dict[str, Any],
    *,
    data: Path,
    models: ModuleType,
    warmup: int,
    runs: int,
) -> bool:
    import torch

    from agent import runtimes

    _bundle_intact(bundle, manifest)
    ref = np.load(data / f"{kind}_reference.npz")
    start = time.perf_counter()
    model = runtimes.load(bundle, manifest)
    row["load_s"] = round(time.perf_counter() - start, 3)
    row["device"] = getattr(model, "device_name", "?")
    got = np.stack([model.infer([x])[0] for x in ref["inputs"]])
    err = float(np.max(np.abs(got - ref["outputs"])))
    top1 = float(np.mean(got.argmax(-1) == ref["outputs"].argmax(-1)))
    row.update(max_abs_error=err, top1_agreement=top1)
    net = models.build(kind)
    net.load_state_dict(torch.load(data / f"{kind}.pt", weights_only=True))
    row.update(_latencies(model, net.eval().cuda(), ref, warmup=warmup, runs=runs))
    row["ratio_tvm_over_torch"] = round(row["tvm_ms"] / row["torch_eager_ms"], 3)
    ok = err <= 1e-3 and top1 == 1.0
    row["status"] = "ok" if ok else "accuracy FAILED"
    return ok


def check(data: Path, out: Path, *, repo: Path, warmup: int, runs: int) -> int:
    import torch

    from compiler.manifest import ArtifactManifest

    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False)",
            file=sys.stderr,
        )
        (out / "gpu_check.json").write_text(json.dumps({"error": "no CUDA GPU"}))
        return 3
    gpu = torch.cuda.get_device_name(0)
    models = _models_module(repo)
    index = json.loads((data / "index.json").read_text())
    machine = platform.machine()
    rows: list[dict[str, Any]] = []
    failed = False
    for item in index["artifacts"]:
        bundle = data / item["dir"]
        manifest = ArtifactManifest.model_validate_json((bundle / "manifest.json").read_bytes())
        row: dict[str, Any] = {
            "model": item["kind"],
            "profile": manifest.profile,
            "arch": manifest.target.get("arch"),
        }
        rows.append(row)
        if manifest.isa != machine:
            row["status"] = (
                f"skipped: {manifest.isa} host code cannot run on this {machine} machine"
            )
            continue
        try:
            ok = _check_one(
                bundle,
                manifest,
                item["kind"],
                row,
                data=data,
                models=models,
                warmup=warmup,
                runs=runs,
            )
        except Exception as err:  # record it and go on with the other artifacts
            row["status"] = f"error: {type(err).__name__}: {err}"
            ok = False
        failed = failed or not ok
    tune_path = out / TUNE_FILE
    tune_result = json.loads(tune_path.read_text()) if tune_path.is_file() else None
    if tune_result is not None and not str(tune_result.get("status", "")).startswith(
        ("ok", "skipped")
    ):
        failed = True
    result = {
        "gpu": gpu,
        "machine": machine,
        "torch": torch.__version__,
        "runs": runs,
        "warmup": warmup,
        "method": "median of numpy-in/numpy-out calls (H2D + run + D2H) for both; "
        "torch_eager_on_gpu_ms keeps the input on the GPU",
        "results": rows,
        "cuda_tuning": tune_result,
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"GPU: {gpu} ({machine}), torch {torch.__version__}, median of {runs} runs",
        "",
        "| model | profile | status | max abs err | TVM ms | torch eager ms | TVM/torch"
        " | torch on-GPU ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['profile']} | {r['status']} | {r.get('max_abs_error', '-')} | "
            f"{r.get('tvm_ms', '-')} | {r.get('torch_eager_ms', '-')} | "
            f"{r.get('ratio_tvm_over_torch', '-')} | {r.get('torch_eager_on_gpu_ms', '-')} |"
        )
    lines += _tune_markdown(tune_result)
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build artifacts, references and weights (no GPU needed)")
    p.add_argument("--data", type=Path, default=REPO / ".gpu-check")
    p.add_argument("--profile", action="append", choices=GPU_PROFILES)
    c = sub.add_parser("check", help="run the artifacts on this machine's GPU")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--repo", type=Path, default=REPO)
    c.add_argument("--warmup", type=int, default=20)
    c.add_argument("--runs", type=int, default=200)
    t = sub.add_parser("tune", help="dlight vs tuned CUDA build on this machine's GPU")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--trials", type=int, default=TUNE_TRIALS)
    args = parser.parse_args(argv)
    if args.command == "tune":
        return tune(args.data.resolve(), args.out, trials=args.trials)
    if args.command == "prepare":
        prepare(args.data.resolve(), args.profile or list(GPU_PROFILES))
        return 0
    return check(args.data.resolve(), args.out, repo=args.repo, warmup=args.warmup, runs=args.runs)


if __name__ == "__main__":
    sys.exit(main())
