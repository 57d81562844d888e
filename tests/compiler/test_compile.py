"""``edgeloop compile`` end to end with real models, real TVM, real cross compilers and qemu."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result

from compiler import emulation
from compiler.bundle import verify_bundle
from compiler.pipeline import CompileRequest, compile_model
from compiler.settings import CompilerSettings
from compiler.signing import load_public_key
from edgeloop.cli import cli
from tests.compiler import models

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    models.export_onnx("cnn", d / "cnn.onnx")
    models.export_onnx("mlp", d / "mlp.onnx")
    models.export_onnx("mlp", d / "mlp_dynamic.onnx", dynamic_batch=True)
    models.export_program("cnn", d / "cnn.pt2")
    return d


@pytest.fixture(scope="session")
def aarch64_sysroot() -> Path:
    """The qemu sysroot (built by scripts/bootstrap.sh; built here if missing)."""
    return emulation.ensure_sysroot("aarch64")


def _compile(*args: str) -> Result:
    return CliRunner().invoke(cli, ["compile", *args])


def _verify(out: Path, key: Path) -> Any:
    return verify_bundle(out, load_public_key(key.with_suffix(".pub")))


@pytest.mark.qemu
@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize(
    "profile", ["generic/x86_64", "raspberry-pi/4b-aarch64", "raspberry-pi/3b-armv7"]
)
def test_compile_verify_on_target_isa(
    kind: str,
    profile: str,
    model_dir: Path,
    signing_key: Path,
    tmp_path: Path,
    aarch64_sysroot: Path,
) -> None:
    out = tmp_path / "artifact"
    result = _compile(
        str(model_dir / f"{kind}.onnx"),
        "--profile",
        profile,
        "-o",
        str(out),
        "--trials",
        "0",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    verified = _verify(out, signing_key)
    assert verified.artifact_id == printed["artifact_id"]
    manifest, report = verified.manifest, verified.report()
    assert manifest.profile == profile
    assert [t.model_dump() for t in manifest.inputs] == [
        {"name": "input", "shape": list(models.EXAMPLE_INPUTS[kind]), "dtype": "float32"}
    ]
    assert manifest.outputs[0].shape == [1, 10]
    checks = report["static_checks"]
    isa = manifest.isa
    if isa == "armv7":
        assert manifest.runtime == "tvm" and manifest.entry == "model.so"
        assert checks["machine"] == "EM_ARM" and checks["float_abi"] == "hard"
        # Independent check with binutils' readelf, as a device engineer would.
        header = subprocess.run(
            ["readelf", "-h", "-A", str(out / "model.so")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "ARM" in header and "ELF32" in header and "VFP registers" in header
        ver = report["verification"]
        if ver["executed"]:
            assert ver["machine"] == "armv7l"
            assert report["accuracy"]["logits"]["max_abs_error"] <= 1e-4
        else:
            assert "not executed on armv7" in ver["reason"]
            assert report["accuracy"] is None
        return
    assert report["verification"]["executed"] is True
    assert report["verification"]["machine"] == isa
    assert report["verification"]["emulated"] is (isa == "aarch64")
    accuracy = report["accuracy"]["logits"]
    assert accuracy["max_abs_error"] <= 1e-4 and accuracy["top1_agreement"] == 1.0
    assert checks["machine"] == {"x86_64": "EM_X86_64", "aarch64": "EM_AARCH64"}[isa]
    if isa == "aarch64":
        assert manifest.runtime == "tvm" and "not representative" in manifest.runtime_reason


@pytest.mark.parametrize(
    ("profile", "arch"), [("nvidia/h100", "sm_90"), ("nvidia/jetson-orin-nano", "sm_87")]
)
def test_cuda_profiles_build_without_gpu(
    profile: str, arch: str, model_dir: Path, signing_key: Path, tmp_path: Path
) -> None:
    out = tmp_path / "artifact"
    result = _compile(str(model_dir / "cnn.onnx"), "--profile", profile, "-o", str(out))
    assert result.exit_code == 0, result.stderr
    verified = _verify(out, signing_key)
    report = verified.report()
    assert verified.manifest.target["arch"] == arch
    assert report["verification"]["executed"] is False
    assert f"not executed on cuda {arch}" in report["verification"]["reason"]
    assert (
        b"__global__" in (out / "model.so").read_bytes()
        or b"cuda" in (out / "model.so").read_bytes()
    )
    assert "NO: not executed" in CliRunner().invoke(cli, ["artifact", "inspect", str(out)]).output


def test_unsupported_operator_is_named(tmp_path: Path, signing_key: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu_0"),
        helper.make_node("Celu", ["a"], ["b"], name="celu_first", alpha=1.0),
        helper.make_node("Celu", ["b"], ["c"], name="celu_second", alpha=1.0),
        helper.make_node("CumProd", ["c", "axis"], ["y"], name="running_product"),
    ]
    graph = helper.make_graph(
        nodes,
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("axis", TensorProto.INT64, [], [1])],
    )
    path = tmp_path / "unsupported.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 26)]), str(path))
    out = tmp_path / "never"
    result = _compile(str(path), "--profile", "generic/x86_64", "-o", str(out))
    assert result.exit_code == 3
    assert "cannot import 2 operator(s)" in result.stderr
    assert "Celu: 2 node(s): celu_first, celu_second" in result.stderr
    assert "CumProd: 1 node(s): running_product" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.tuning
# Three MetaSchedule searches: ~3 min on 2 idle cores, over 15 min on 2 cores at load 10.
@pytest.mark.timeout(1800)
def test_tuning_database_is_reused(model_dir: Path, signing_key: Path, tmp_path: Path) -> None:
    settings = CompilerSettings()
    db = tmp_path / "tuning-db"
    progress: list[tuple[int, int]] = []

    def run(name: str, model: Path, trials: int, **request: Any) -> dict[str, Any]:
        result = compile_model(
            CompileRequest(
                model=model,
                profile="generic/x86_64",
                output=tmp_path / name,
                trials=trials,
                tuning_db=db,
                **request,
            ),
            settings=settings,
            tuning_progress=lambda done, total: progress.append((done, total)),
        )
        return dict(result.report["tuning"])

    first = run("first", model_dir / "mlp.onnx", 12)
    assert first["new_trials"] > 0 and first["tasks_tuned"] == first["tasks_total"] > 0
    assert first["records_applied"] == first["tasks_total"]
    assert first["warm_start_records"] == 0  # an empty database teaches the cost model nothing
    # The budget follows the roofline estimate: the 64x64 layer gets the most trials.
    budget = {b["name"]: b["trials"] for b in first["budget"]}
    assert sum(budget.values()) == first["trials_planned"] == 12
    assert max(budget, key=budget.__getitem__).startswith("fused_matmul1")
    # Progress starts at 0, moves per measured trial (not only per task), ends at the total.
    planned = first["trials_planned"]
    assert progress[0] == (0, planned) and progress[-1] == (planned, planned)
    assert all(total == planned for _, total in progress)
    done = [d for d, _ in progress]
    assert done == sorted(done) and len(set(done)) > first["tasks_total"] + 1
    assert first["runner_threads"] == min(2, len(os.sched_getaffinity(0)))
    progress.clear()
    second = run("second", model_dir / "mlp.onnx", 12)
    assert second["new_trials"] == 0 and second["tasks_tuned"] == 0
    assert second["tasks_reused"] == second["tasks_total"]
    assert progress == []  # nothing tuned, no bar
    assert second["database_digest"] == first["database_digest"]
    # The dynamic-batch export pinned to batch 1 is a different file with the same layers.
    third = run("third", model_dir / "mlp_dynamic.onnx", 0, input_shapes={"input": [1, 32]})
    assert third["tasks_reused"] >= 1 and third["new_trials"] == 0
    manifest = json.loads((tmp_path / "second" / "manifest.json").read_text())
    assert manifest["tuning"]["database_digest"] == first["database_digest"]
    (records,) = db.glob("*/database_tuning_record.json")
    before = len(records.read_text().splitlines())

    # --retune continues the search on the recorded tasks: the database only grows, and a task
    # whose few schedules are all measured already is left out.
    retuned = run("retuned", model_dir / "mlp.onnx", 8, retune=True)
    assert retuned["retune"] and retuned["tasks_reused"] == retuned["tasks_total"]
    tuned_again = {b["name"] for b in retuned["budget"]}
    searchable = {b["name"] for b in first["budget"] if b["max_useful"] is None}
    assert searchable and searchable <= tuned_again <= {b["name"] for b in first["budget"]}
    assert retuned["tasks_tuned"] == len(tuned_again) and retuned["trials_planned"] == 8
    # Its cost model starts trained on every record there (each workload is under the cap).
    assert retuned["warm_start_records"] == before
    assert retuned["new_trials"] > 0
    assert len(records.read_text().splitlines()) == before + retuned["new_trials"]
    assert retuned["records_applied"] == retuned["tasks_total"] and not retuned["untuned_tasks"]


def _strict_profiles(tmp_path: Path) -> Path:
    data = yaml.safe_load((ROOT / "hw-profiles/generic/x86_64.yaml").read_text())
    data["name"] = "test/x86-strict"
    data["accuracy"]["max_abs_error"] = 1e-30
    data["accuracy"]["max_rel_error"] = 1e-30
    (tmp_path / "profiles" / "test").mkdir(parents=True)
    (tmp_path / "profiles" / "test" / "x86-strict.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "profiles"


def test_accuracy_gate_failure_writes_nothing(
    model_dir: Path, signing_key: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGELOOP_PROFILES_DIR", str(_strict_profiles(tmp_path)))
    out = tmp_path / "artifact"
    result = _compile(str(model_dir / "cnn.onnx"), "--profile", "test/x86-strict", "-o", str(out))
    assert result.exit_code == 4
    assert "accuracy gate failed for test/x86-strict; no artifact written" in result.stderr
    assert "max abs error" in result.stderr
    assert not out.exists()
    # An existing artifact survives a failed --force recompile, byte for byte.
    good = _compile(str(model_dir / "cnn.onnx"), "--profile", "generic/x86_64", "-o", str(out))
    assert good.exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = _compile(
        str(model_dir / "cnn.onnx"), "--profile", "test/x86-strict", "-o", str(out), "--force"
    )
    assert again.exit_code == 4
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if ".staging-" in p.name] == []


def test_torch_export_program_and_module(
    model_dir: Path, signing_key: Path, tmp_path: Path
) -> None:
    import torch

    from compiler.frontends import save_torch_module

    out = tmp_path / "from-pt2"
    result = _compile(
        str(model_dir / "cnn.pt2"), "--profile", "generic/x86_64", "-o", str(out), "--json"
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["model"]["format"] == "torch"
    assert report["verification"]["executed"] is True
    assert next(iter(report["accuracy"].values()))["max_abs_error"] <= 1e-4
    assert report["runtime"]["chosen"] == "tvm" and "not ONNX" in report["runtime"]["reason"]
    # An nn.Module with an example input goes through the same path.
    pt2 = save_torch_module(models.build("mlp"), (torch.randn(1, 32),), tmp_path / "mlp.pt2")
    module_out = tmp_path / "from-module"
    assert _compile(str(pt2), "--profile", "generic/x86_64", "-o", str(module_out)).exit_code == 0
    assert _verify(module_out, signing_key).manifest.inputs[0].shape == [1, 32]


def test_runtime_choices(model_dir: Path, signing_key: Path, tmp_path: Path) -> None:
    ort_out, tvm_out, auto_out = tmp_path / "ort", tmp_path / "tvm", tmp_path / "auto"
    model = str(model_dir / "mlp.onnx")
    assert (
        _compile(
            model, "--profile", "generic/x86_64", "-o", str(ort_out), "--runtime", "onnxruntime"
        ).exit_code
        == 0
    )
    assert (
        _compile(
            model, "--profile", "generic/x86_64", "-o", str(tvm_out), "--runtime", "tvm"
        ).exit_code
        == 0
    )
    assert _compile(model, "--profile", "generic/x86_64", "-o", str(auto_out)).exit_code == 0
    ort, tvm_, auto = (_verify(p, signing_key) for p in (ort_out, tvm_out, auto_out))
    assert ort.manifest.entry == "model.onnx" and not (ort_out / "model.so").exists()
    assert ort.manifest.toolchain.onnxruntime
    assert tvm_.manifest.entry == "model.so" and not (tvm_out / "model.onnx").exists()
    report = auto.report()
    latency, comparison = report["latency"], report["runtime"]["comparison"]
    assert set(latency) == {"tvm", "onnxruntime"}
    # Both runtimes ran with the thread count the profile (2 cores) allows on this machine.
    threads = min(2, len(os.sched_getaffinity(0)))
    assert comparison["threads"]["count"] == threads
    assert latency["tvm"]["threads"] == threads  # what TVM's runtime reported using
    assert latency["onnxruntime"]["threads"] == threads
    # Interleaved rounds, alternating which runtime goes first; the decision is recorded.
    assert len(comparison["rounds"]) == 5
    assert [r["first"] for r in comparison["rounds"][:2]] == ["tvm", "onnxruntime"]
    decision = comparison["decision"]
    assert auto.manifest.runtime == decision["runtime"]
    assert decision["margin"] == report["runtime"]["margin"] == 0.05
    if decision["runtime"] == "tvm":
        assert decision["ratio_tvm_over_ort"] <= 0.95
    else:
        assert decision["ratio_tvm_over_ort"] > 0.95
    assert "interleaved rounds" in auto.manifest.runtime_reason
    # Explicit choices still record the comparison; --runtime onnxruntime times ORT alone.
    assert tvm_.report()["runtime"]["comparison"]["decision"]["rounds"] == 5
    assert ort.report()["latency"]["onnxruntime"]["threads"] == threads


def test_calibration_data(model_dir: Path, signing_key: Path, tmp_path: Path) -> None:
    data = tmp_path / "calib.npz"
    np.savez(data, input=np.random.default_rng(3).standard_normal((5, 1, 32)).astype(np.float32))
    out = tmp_path / "artifact"
    result = _compile(
        str(model_dir / "mlp.onnx"),
        "--profile",
        "generic/x86_64",
        "-o",
        str(out),
        "--calibration-data",
        str(data),
        "--samples",
        "16",
    )
    assert result.exit_code == 0, result.stderr
    ver = _verify(out, signing_key).report()["verification"]
    assert ver["samples"] == 5 and ver["inputs"] == "calibration data"
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, other=np.zeros((2, 1, 32), dtype=np.float32))
    bad = _compile(
        str(model_dir / "mlp.onnx"),
        "--profile",
        "generic/x86_64",
        "-o",
        str(tmp_path / "x"),
        "--calibration-data",
        str(wrong),
    )
    assert bad.exit_code == 3 and "lacks input(s) input; it has: other" in bad.stderr
    shaped = tmp_path / "shaped.npz"
    np.savez(shaped, input=np.zeros((2, 1, 31), dtype=np.float32))
    bad = _compile(
        str(model_dir / "mlp.onnx"),
        "--profile",
        "generic/x86_64",
        "-o",
        str(tmp_path / "x"),
        "--calibration-data",
        str(shaped),
    )
    assert bad.exit_code == 3 and "shape 1x31; the model needs 1x32" in bad.stderr


def test_dynamic_shape_needs_input_shape(
    model_dir: Path, signing_key: Path, tmp_path: Path
) -> None:
    model = str(model_dir / "mlp_dynamic.onnx")
    out = tmp_path / "artifact"
    missing = _compile(model, "--profile", "generic/x86_64", "-o", str(out))
    assert missing.exit_code == 3
    assert "input 'input' has a dynamic shape ?x32" in missing.stderr
    assert "--input-shape input:1x32" in missing.stderr
    ok = _compile(
        model, "--profile", "generic/x86_64", "-o", str(out), "--input-shape", "input:1x32"
    )
    assert ok.exit_code == 0, ok.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--profile", "rpi4"], 2, "unknown hardware profile 'rpi4'; choose from:"),
        (
            ["--profile", "generic/x86_64", "--runtime", "tensorrt"],
            2,
            "--runtime 'tensorrt' is not valid",
        ),
        (
            ["--profile", "raspberry-pi/3b-armv7", "--runtime", "onnxruntime"],
            2,
            "is not available on raspberry-pi/3b-armv7; its runtimes are: tvm, tflite",
        ),
        (["--profile", "generic/x86_64", "--trials", "-1"], 2, "--trials -1 is negative"),
        (
            ["--profile", "generic/x86_64", "--trials", "0", "--weight-prepack"],
            2,
            "--weight-prepack needs tuning",
        ),
        (
            ["--profile", "generic/x86_64", "--trials", "0", "--retune"],
            2,
            "--retune continues tuning with new trials; give --trials N with N > 0",
        ),
        (
            ["--profile", "raspberry-pi/4b-aarch64", "--trials", "8"],
            2,
            "cannot be timed on this machine",
        ),
        (["--profile", "generic/x86_64", "--input-shape", "input:1x2x3"], 2, "has rank 3"),
        (
            ["--profile", "generic/x86_64", "--input-shape", "image:1x32"],
            2,
            "unknown input(s) 'image'",
        ),
        (
            ["--profile", "generic/x86_64", "--input-shape", "input:2x32"],
            2,
            "contradicts the model's static shape",
        ),
        (
            ["--profile", "generic/x86_64", "--signing-key", "/nonexistent/key.pem"],
            3,
            "does not exist",
        ),
    ],
)
def test_bad_options(
    args: list[str], code: int, message: str, model_dir: Path, signing_key: Path, tmp_path: Path
) -> None:
    out = tmp_path / "artifact"
    result = _compile(str(model_dir / "mlp.onnx"), "-o", str(out), *args)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr
    assert not out.exists()


def test_bad_model_files(tmp_path: Path, signing_key: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not protobuf at all\xff" * 10)
    for path, code, message in [
        (tmp_path / "missing.onnx", 3, "does not exist"),
        (garbage, 3, "not a readable ONNX model"),
        (tmp_path / "model.pb", 2, "supported: .onnx, .pt2, .tflite"),
    ]:
        if path.suffix == ".pb":
            path.write_bytes(b"x")
        result = _compile(str(path), "--profile", "generic/x86_64", "-o", str(tmp_path / "out"))
        assert result.exit_code == code, (path, result.stderr)
        assert message in result.stderr


def test_no_signing_key_and_existing_output(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    result = _compile(str(model_dir / "mlp.onnx"), "--profile", "generic/x86_64", "-o", str(out))
    assert result.exit_code == 3 and "edgeloop keys generate" in result.stderr
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    CliRunner().invoke(cli, ["keys", "generate"])
    exists = _compile(str(model_dir / "mlp.onnx"), "--profile", "generic/x86_64", "-o", str(out))
    assert exists.exit_code == 2 and "--force" in exists.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_cross_compiler(
    model_dir: Path, signing_key: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if "aarch64" in name else real_which(name)
    )
    result = _compile(
        str(model_dir / "mlp.onnx"),
        "--profile",
        "raspberry-pi/4b-aarch64",
        "-o",
        str(tmp_path / "out"),
    )
    assert result.exit_code == 5
    assert "apt-get install gcc-aarch64-linux-gnu" in result.stderr


def test_real_artifact_tampering_and_agent_verify(
    model_dir: Path, signing_key: Path, tmp_path: Path
) -> None:
    from agent.cli import cli as agent_cli

    out = tmp_path / "artifact"
    assert (
        _compile(
            str(model_dir / "mlp.onnx"),
            "--profile",
            "generic/x86_64",
            "-o",
            str(out),
            "--runtime",
            "tvm",
        ).exit_code
        == 0
    )
    pub = str(signing_key.with_suffix(".pub"))
    ok = CliRunner().invoke(
        agent_cli, ["verify", str(out), "--public-key", pub, "--profile", "generic/x86_64"]
    )
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["entry"] == "model.so"
    other = CliRunner().invoke(
        agent_cli, ["verify", str(out), "--public-key", pub, "--profile", "raspberry-pi/4b-aarch64"]
    )
    assert other.exit_code == 3 and "built for profile 'generic/x86_64'" in other.stderr
    for name, offset in (("model.so", 2000), ("manifest.json", 30)):
        copy = tmp_path / f"tampered-{name}"
        shutil.copytree(out, copy)
        data = bytearray((copy / name).read_bytes())
        data[offset] ^= 0xFF
        (copy / name).write_bytes(bytes(data))
        result = CliRunner().invoke(cli, ["artifact", "verify", str(copy)])
        assert result.exit_code == 3, name
        assert "error:" in result.stderr


def test_agent_imports_nothing_heavy() -> None:
    code = (
        "import sys, agent.cli, compiler.bundle, compiler.manifest; "
        "heavy = {'tvm', 'torch', 'onnx', 'onnxruntime', 'fastapi', 'sqlmodel'}; "
        "heavy &= set(sys.modules); "
        "print(sorted(heavy)); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run(["python3", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.tuning
@pytest.mark.timeout(1800)
def test_weight_prepack_build_runs_and_matches_onnxruntime(model_dir: Path, tmp_path: Path) -> None:
    """Weights laid out by tuning and folded at compile time: same outputs, own records."""
    import onnxruntime as ort

    from compiler import execution
    from compiler.frontends import load_model
    from compiler.profiles import ProfileRegistry
    from compiler.tvm_builder import build_library

    settings = CompilerSettings()
    profile = ProfileRegistry(settings.profile_roots()).get("generic/x86_64")
    model = load_model(model_dir / "mlp.onnx")
    db = tmp_path / "tuning-db"
    lib = tmp_path / "prepacked.so"
    first = build_library(
        model.to_relax(), profile, out_path=lib, trials=6, tuning_db=db, weight_prepack=True
    )
    assert first.weight_prepack and first.new_trials > 0
    assert first.records_applied == first.tasks_total and first.database_digest
    spec = model.inputs[0]
    x = np.random.default_rng(0).standard_normal(spec.shape).astype(np.float32)
    host = execution.detect_host()
    plan = execution.plan_execution(profile, host)
    result = execution.run_library(lib, [[x]], plan, host, warmup=1, repeat=3)
    session = ort.InferenceSession(str(model_dir / "mlp.onnx"), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(result.outputs[0][0], expected, atol=1e-5, rtol=1e-5)
    again = build_library(
        model.to_relax(), profile, out_path=lib, trials=6, tuning_db=db, weight_prepack=True
    )
    assert again.new_trials == 0 and again.database_digest == first.database_digest
    # By default a --trials 0 rebuild takes the prepacked build the database covers.
    rebuilt = build_library(
        model.to_relax(), profile, out_path=tmp_path / "rebuilt.so", trials=0, tuning_db=db
    )
    assert rebuilt.weight_prepack and rebuilt.new_trials == 0
    assert rebuilt.records_applied == rebuilt.tasks_total == first.tasks_total
    # A plain build's tasks are different workloads: the prepacked records do not serve it.
    plain = build_library(
        model.to_relax(),
        profile,
        out_path=tmp_path / "plain.so",
        trials=0,
        tuning_db=db,
        weight_prepack=False,
    )
    assert not plain.weight_prepack and plain.records_applied == 0
    # Nor do they cover a model with other layers: its default build stays plain.
    other = load_model(models.export_onnx("cnn", tmp_path / "cnn.onnx"))
    assert not build_library(
        other.to_relax(), profile, out_path=tmp_path / "cnn.so", trials=0, tuning_db=db
    ).weight_prepack


def test_task_costs_count_the_bytes_each_task_moves(tmp_path: Path) -> None:
    """The budget's roofline estimate gets each task's argument bytes from its TIR."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from compiler import tvm_builder
    from compiler.frontends import load_model
    from compiler.profiles import ProfileRegistry

    profile = ProfileRegistry(CompilerSettings().profile_roots()).get("generic/x86_64")
    target = tvm.target.Target(tvm_builder.effective_target(profile))
    relax_mod = load_model(models.export_onnx("mlp", tmp_path / "mlp.onnx")).to_relax()
    tasks = ms.relax_integration.extract_tasks(tvm_builder._prepare(relax_mod, target), target)
    contexts, _weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir=str(tmp_path / "ms"), num_threads=1
    )
    moved = {c.name: c.bytes_moved for c in tvm_builder.task_costs(tasks, contexts)}
    # 32-64-64-10 MLP, float32: input, weight, bias and output of each layer.
    assert moved == {
        "fused_matmul_add_relu": 4.0 * (32 + 32 * 64 + 64 + 64),
        "fused_matmul1_add_tir_tanh": 4.0 * (64 + 64 * 64 + 64 + 64),
        "fused_matmul2_add1": 4.0 * (64 + 64 * 10 + 10 + 10),
    }


def test_importing_the_runner_leaves_the_environment_alone() -> None:
    """The agent imports VmCaller from the runner script; that must not make every later
    subprocess (MetaSchedule's workers, the cloud worker) load runtime-only TVM."""
    code = (
        "import os\n"
        "os.environ.pop('TVM_USE_RUNTIME_LIB', None)\n"
        "import compiler.runner_main\n"
        "assert 'TVM_USE_RUNTIME_LIB' not in os.environ, os.environ['TVM_USE_RUNTIME_LIB']\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
