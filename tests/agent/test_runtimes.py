"""agent.runtimes with real artifacts: TVM (runtime-only), ONNX Runtime and TFLite bundles.

Artifacts are compiled once per session by the real compiler (:func:`build_artifacts`, also
used by test_server.py) and verified with the signing key before they are loaded, exactly
as the agent does. References come from ONNX Runtime on the source ONNX file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import runtimes
from agent.runtimes import (
    Array,
    InvalidInputError,
    LoadedModel,
    ModelLoadError,
    RuntimeUnavailableError,
    SelfTestError,
    Signature,
)
from compiler import bundle
from compiler.bundle import verify_bundle
from compiler.manifest import ArtifactManifest, TensorSpec
from compiler.pipeline import CompileRequest, compile_model
from compiler.settings import CompilerSettings
from compiler.signing import generate_keys, load_private_key, load_public_key

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ shared artifacts


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: ArtifactManifest
    artifact_id: str


@dataclass(frozen=True)
class Artifacts:
    """Source models and the bundles compiled from them."""

    onnx: dict[str, Path]  # kind -> source .onnx
    bundles: dict[tuple[str, str], Bundle]  # (kind, runtime) -> bundle

    def reference(self, kind: str, x: Array) -> Array:
        """ONNX Runtime on the source model: the expected logits."""
        import onnxruntime as ort

        session = ort.InferenceSession(str(self.onnx[kind]), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {"input": x})
        return np.asarray(out)


_ARTIFACTS: dict[str, Artifacts] = {}
_BUILD_LOCK = threading.Lock()


def build_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    """Compile cnn and mlp for generic/x86_64 with TVM and ONNX Runtime, once per session."""
    with _BUILD_LOCK:
        if "session" in _ARTIFACTS:
            return _ARTIFACTS["session"]
        from tests.compiler import models

        root = tmp_path_factory.mktemp("agent-artifacts")
        keys = generate_keys(root / "keys")
        settings = CompilerSettings(
            config_dir=root / "config",
            cache_dir=root / "cache",
            profiles_dir=None,
            tuning_db=root / "tuning",
        )
        onnx = {kind: models.export_onnx(kind, root / f"{kind}.onnx") for kind in ("cnn", "mlp")}
        public = load_public_key(keys.public)
        bundles: dict[tuple[str, str], Bundle] = {}
        for kind in ("cnn", "mlp"):
            for runtime in ("tvm", "onnxruntime"):
                out = root / f"{kind}-{runtime}"
                compile_model(
                    CompileRequest(
                        model=onnx[kind],
                        profile="generic/x86_64",
                        output=out,
                        runtime=runtime,
                        model_version="1" if runtime == "tvm" else "2",
                        trials=0,
                        samples=2,
                        latency_repeat=3,
                        signing_key=keys.private,
                    ),
                    settings=settings,
                )
                verified = verify_bundle(out, public)
                bundles[(kind, runtime)] = Bundle(out, verified.manifest, verified.artifact_id)
        _ARTIFACTS["session"] = Artifacts(onnx=onnx, bundles=bundles)
        return _ARTIFACTS["session"]


@pytest.fixture(scope="session")
def full_tvm() -> None:
    """Import TVM with its compiler library before any in-process agent load.

    ``prepare_tvm_runtime_env`` would otherwise switch this whole test process to the
    runtime-only library, and the compiler tests that run after it could not import relax.
    """
    import tvm

    assert not tvm.base._RUNTIME_ONLY


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory, full_tvm: None) -> Artifacts:
    return build_artifacts(tmp_path_factory)


def _sample(shape: list[int], seed: int) -> Array:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


SIG = Signature(
    inputs=(TensorSpec(name="x", shape=[1, 4], dtype="float32"),),
    outputs=(TensorSpec(name="y", shape=[1, 3], dtype="float32"),),
)


class FakeModel(LoadedModel):
    """A pure-numpy model for the checks that need no runtime."""

    def __init__(self, fn: Any, signature: Signature = SIG) -> None:
        super().__init__(signature, runtime="fake", thread_safe=True)
        self.fn = fn

    def _run(self, inputs: list[Array]) -> list[Array]:
        return list(self.fn(inputs))


# ------------------------------------------------------------------ availability, imports


def test_available_runtimes_lists_the_installed_ones() -> None:
    assert {"tvm", "onnxruntime", "tflite"} <= set(runtimes.available_runtimes())


def test_agent_modules_import_nothing_heavy() -> None:
    code = (
        "import sys, agent.runtimes, agent.server, agent.metrics\n"
        "print(agent.runtimes.available_runtimes())\n"
        "heavy = ['tvm', 'onnxruntime', 'onnx', 'torch', 'fastapi', 'sqlmodel', "
        "'ai_edge_litert', 'tflite_runtime', 'tflite', 'paho']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    available, loaded = out.stdout.strip().splitlines()
    assert "tvm" in available
    assert loaded == "[]"


@pytest.mark.parametrize(
    ("runtime", "modules", "package"),
    [
        ("tvm", ["tvm"], "pip install apache-tvm"),
        ("onnxruntime", ["onnxruntime"], "pip install onnxruntime"),
        ("tflite", ["ai_edge_litert", "tflite_runtime"], "pip install ai-edge-litert"),
    ],
)
def test_missing_runtime_names_runtime_and_package(
    runtime: str,
    modules: list[str],
    package: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like
    assert runtime not in runtimes.available_runtimes()
    manifest = _manifest(tmp_path, runtime=runtime, entry="model.bin")
    with pytest.raises(RuntimeUnavailableError) as info:
        runtimes.load(tmp_path, manifest)
    assert f"runtime {runtime!r} is not available" in str(info.value)
    assert package in str(info.value)
    assert info.value.http_status == 503


def _manifest(root: Path, *, runtime: str, entry: str) -> ArtifactManifest:
    return ArtifactManifest(
        model={"name": "m", "version": "1"},
        profile="generic/x86_64",
        isa="x86_64",
        target={"kind": "llvm"},
        runtime=runtime,
        runtime_reason="test",
        entry=entry,
        inputs=[TensorSpec(name="x", shape=[1, 4], dtype="float32")],
        outputs=[TensorSpec(name="y", shape=[1, 3], dtype="float32")],
        files=[],
        toolchain={"edgeloop": "0.1.0"},
        tuning={},
        source_model={"format": "onnx", "filename": "m.onnx", "sha256": "0" * 64},
        signing_key_id="0" * 16,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_missing_entry_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="entry file 'model.onnx' is missing"):
        runtimes.load(tmp_path, _manifest(tmp_path, runtime="onnxruntime", entry="model.onnx"))


@pytest.mark.parametrize(("runtime", "entry"), [("tvm", "model.so"), ("onnxruntime", "model.onnx")])
def test_corrupt_entry_file_is_a_load_error(
    runtime: str, entry: str, tmp_path: Path, full_tvm: None
) -> None:
    (tmp_path / entry).write_bytes(b"\x7fELF not really" * 8)
    with pytest.raises(ModelLoadError, match="cannot load"):
        runtimes.load(tmp_path, _manifest(tmp_path, runtime=runtime, entry=entry))


# ------------------------------------------------------------------ real artifacts


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("runtime", ["tvm", "onnxruntime"])
def test_runtime_matches_onnxruntime_on_the_source(
    kind: str, runtime: str, artifacts: Artifacts
) -> None:
    b = artifacts.bundles[(kind, runtime)]
    model = runtimes.load(b.path, b.manifest)
    assert model.runtime == runtime
    assert model.signature == Signature.of(b.manifest)
    for seed in range(3):
        x = _sample(b.manifest.inputs[0].shape, seed)
        (out,) = model.infer([x])
        assert out.shape == tuple(b.manifest.outputs[0].shape)
        np.testing.assert_allclose(out, artifacts.reference(kind, x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_tvm_fast_call_path_keeps_results_apart(kind: str, artifacts: Artifacts) -> None:
    """The saved-closure path (bound input tensors, DLPack outputs) gives independent arrays."""
    b = artifacts.bundles[(kind, "tvm")]
    model = runtimes.load(b.path, b.manifest)
    assert model._call.fast  # type: ignore[attr-defined]
    shape = b.manifest.inputs[0].shape
    x1, x2 = _sample(shape, 1), _sample(shape, 2)
    (out1,) = model.infer([x1])
    kept = out1.copy()
    # A non-contiguous input of the same values, then another input: out1 must not move.
    strided = np.empty([*shape[:-1], shape[-1] * 2], np.float32)[..., ::2]
    strided[...] = x2
    (out2,) = model.infer([strided])
    x1[...] = 0.0
    np.testing.assert_array_equal(out1, kept)
    assert not np.shares_memory(out1, out2)
    np.testing.assert_allclose(out1, artifacts.reference(kind, _sample(shape, 1)), atol=1e-5)
    np.testing.assert_allclose(out2, artifacts.reference(kind, x2), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["tvm", "onnxruntime"])
def test_self_test_warms_up(runtime: str, artifacts: Artifacts) -> None:
    b = artifacts.bundles[("cnn", runtime)]
    model = runtimes.load(b.path, b.manifest, options=runtimes.RuntimeOptions(num_threads=1))
    model.self_test()
    assert model.warmup_ms is not None and model.warmup_ms > 0


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["tvm", "onnxruntime"])
def test_concurrent_calls_give_correct_results(runtime: str, artifacts: Artifacts) -> None:
    b = artifacts.bundles[("cnn", runtime)]
    model = runtimes.load(b.path, b.manifest)
    samples = [_sample([1, 3, 16, 16], seed) for seed in range(4)]
    expected = [artifacts.reference("cnn", x) for x in samples]
    failures: list[str] = []

    def work(i: int) -> None:
        for _ in range(25):
            (out,) = model.infer([samples[i]])
            if not np.allclose(out, expected[i], atol=1e-5):
                failures.append(f"thread {i}: wrong output")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures


@pytest.mark.slow
def test_tvm_runs_runtime_only_in_a_fresh_process(artifacts: Artifacts, tmp_path: Path) -> None:
    b = artifacts.bundles[("cnn", "tvm")]
    x = _sample([1, 3, 16, 16], 7)
    np.save(tmp_path / "x.npy", x)
    code = f"""
import json, sys
import numpy as np
from pathlib import Path
from agent import runtimes
from compiler.bundle import read_manifest
runtime_only = runtimes.prepare_tvm_runtime_env()
manifest, _ = read_manifest(Path({str(b.path)!r}))
model = runtimes.load(Path({str(b.path)!r}), manifest)
model.self_test()
(out,) = model.infer([np.load({str(tmp_path / "x.npy")!r})])
np.save({str(tmp_path / "out.npy")!r}, out)
import tvm.base
maps = open("/proc/self/maps").read()
torch_loaded = "torch" in sys.modules
import torch  # importable again once tvm is loaded
print(json.dumps({{
    "prepared": runtime_only,
    "runtime_only": tvm.base._RUNTIME_ONLY,
    "compiler_lib": "libtvm_compiler" in maps,
    "relax": "tvm.relax" in sys.modules,
    "torch_loaded": torch_loaded,
    "torch_after": torch.__name__,
}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    # Serving an artifact loads neither TVM's compiler nor torch (tvm-ffi would import torch,
    # 2 s of the agent's start), and torch stays importable for whoever needs it later.
    assert facts == {
        "prepared": True,
        "runtime_only": True,
        "compiler_lib": False,
        "relax": False,
        "torch_loaded": False,
        "torch_after": "torch",
    }
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"), artifacts.reference("cnn", x), atol=1e-5, rtol=1e-5
    )


def test_tvm_runtime_import_keeps_a_torch_imported_before_it(tmp_path: Path) -> None:
    code = """
import json, sys
import torch
from compiler.runner_main import import_tvm_runtime
import_tvm_runtime()
import tvm
print(json.dumps({"same_torch": sys.modules["torch"] is torch, "tvm": "tvm" in sys.modules}))
"""
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"same_torch": True, "tvm": True}


def test_prepare_tvm_runtime_env_reports_an_already_imported_tvm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class FakeBase:
        _RUNTIME_ONLY = False

    monkeypatch.setitem(sys.modules, "tvm", object())  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "tvm.base", FakeBase())  # type: ignore[arg-type]
    monkeypatch.delenv("TVM_USE_RUNTIME_LIB", raising=False)
    assert runtimes.prepare_tvm_runtime_env() is False
    assert "TVM_USE_RUNTIME_LIB" not in __import__("os").environ


# ------------------------------------------------------------------ TFLite


def _tflite_bundle(tmp_path: Path) -> tuple[Bundle, Any]:
    from tests.compiler import tflite_models

    builder = tflite_models.mlp()
    keys = generate_keys(tmp_path / "keys")
    out = tmp_path / "mlp-tflite"
    fields: dict[str, Any] = {
        "model": {"name": "mlp", "version": "1"},
        "profile": "generic/x86_64",
        "isa": "x86_64",
        "target": {"kind": "llvm"},
        "runtime": "tflite",
        "runtime_reason": "test",
        "entry": "model.tflite",
        "inputs": [{"name": "input", "shape": [1, 16], "dtype": "float32"}],
        "outputs": [{"name": "probabilities", "shape": [1, 10], "dtype": "float32"}],
        "toolchain": {"edgeloop": "0.1.0"},
        "tuning": {},
        "source_model": {"format": "tflite", "filename": "mlp.tflite", "sha256": "0" * 64},
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    with bundle.staging_dir(out) as staging:
        builder.save(staging / "model.tflite")
        (staging / "report.json").write_text("{}")
        bundle.seal_bundle(
            staging, out, manifest_fields=fields, private_key=load_private_key(keys.private)
        )
    verified = verify_bundle(out, load_public_key(keys.public))
    return Bundle(out, verified.manifest, verified.artifact_id), builder


def _const(builder: Any, name: str) -> Array:
    data = next(t.data for t in builder.tensors if t.name == name)
    assert data is not None
    return np.asarray(data)


def test_tflite_runtime_matches_numpy(tmp_path: Path) -> None:
    b, builder = _tflite_bundle(tmp_path)
    model = runtimes.load(b.path, b.manifest, options=runtimes.RuntimeOptions(num_threads=1))
    model.self_test()
    x = _sample([1, 16], 3)
    hidden = np.maximum(x @ _const(builder, "dense/kernel").T + _const(builder, "dense/bias"), 0)
    logits = hidden @ _const(builder, "logits/kernel").T + _const(builder, "logits/bias")
    logits = logits + _const(builder, "logits/shift")
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    (out,) = model.infer([x])
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ signature and self-test


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "got 0 input(s); expected input 'x' float32 [1,4]"),
        ([np.zeros((1, 5), np.float32)], "input 'x' is float32 [1,5]; expected input 'x'"),
        ([np.zeros((1, 4), np.float64)], "input 'x' is float64 [1,4]; expected input 'x'"),
        ([np.zeros((1, 4), np.float32)] * 2, "got 2 input(s)"),
    ],
    ids=["none", "shape", "dtype", "count"],
)
def test_infer_checks_the_signature(inputs: list[Array], message: str) -> None:
    model = FakeModel(lambda xs: [np.zeros((1, 3), np.float32)])
    with pytest.raises(InvalidInputError) as info:
        model.infer(inputs)
    assert message in str(info.value)
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda xs: [np.full((1, 3), np.nan, np.float32)], "3 non-finite value(s)"),
        (lambda xs: [np.zeros((1, 4), np.float32)], "output 'y' has shape [1,4], declared [1,3]"),
        (lambda xs: [], "returned 0 output(s), the manifest declares 1: y"),
        (lambda xs: 1 / 0, "self-test run failed: fake inference failed: division by zero"),
    ],
    ids=["nan", "shape", "count", "raises"],
)
def test_self_test_rejects_bad_outputs(fn: Any, message: str) -> None:
    with pytest.raises(SelfTestError) as info:
        FakeModel(fn).self_test()
    assert message in str(info.value)


def test_self_test_passes_a_good_model() -> None:
    model = FakeModel(lambda xs: [np.tanh(xs[0][:, :3])])
    model.self_test(seed=3, runs=3)
    assert model.warmup_ms is not None


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [
        ("float32", -10.0, 10.0),
        ("float16", -10.0, 10.0),
        ("int64", 0, 1),
        ("uint8", 0, 1),
        ("bool", 0, 1),
    ],
)
def test_random_inputs_follow_the_declared_signature(dtype: str, low: float, high: float) -> None:
    sig = Signature(inputs=(TensorSpec(name="a", shape=[2, 3], dtype=dtype),), outputs=())
    (a,) = runtimes.random_inputs(sig, seed=1)
    (again,) = runtimes.random_inputs(sig, seed=1)
    assert a.dtype == np.dtype(dtype) and a.shape == (2, 3)
    assert np.array_equal(a, again)
    assert low <= float(a.min()) and float(a.max()) <= high
