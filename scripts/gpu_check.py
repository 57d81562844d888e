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
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KINDS = ("cnn", "mlp")
GPU_PROFILES = ("nvidia/h100", "nvidia/jetson-orin-nano")
SAMPLES = 4


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
    result = {
        "gpu": gpu,
        "machine": machine,
        "torch": torch.__version__,
        "runs": runs,
        "warmup": warmup,
        "method": "median of numpy-in/numpy-out calls (H2D + run + D2H) for both; "
        "torch_eager_on_gpu_ms keeps the input on the GPU",
        "results": rows,
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
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.data.resolve(), args.profile or list(GPU_PROFILES))
        return 0
    return check(args.data.resolve(), args.out, repo=args.repo, warmup=args.warmup, runs=args.runs)


if __name__ == "__main__":
    sys.exit(main())
