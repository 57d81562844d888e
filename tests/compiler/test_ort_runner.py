"""ONNX Runtime timed in a fresh child process (``run_onnxruntime``), alone and in
``time_against_ort``'s interleaved rounds against a real TVM library."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compiler import execution
from compiler.errors import BuildFailedError, MissingDependencyError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SAMPLE = [np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 8)]


def _tiny_onnx(path: Path) -> Path:
    """y = relu(x @ W + b), x: 1x8 float32 (built with onnx.helper: no torch, fast)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    return _tiny_onnx(tmp_path / "tiny.onnx")


@pytest.mark.parametrize("form", ["path", "bytes"])
def test_run_onnxruntime_times_in_a_fresh_child(tiny_onnx: Path, form: str) -> None:
    model: Path | bytes = tiny_onnx if form == "path" else tiny_onnx.read_bytes()
    first = execution.run_onnxruntime(model, SAMPLE, threads=1, warmup=1, runs=5)
    second = execution.run_onnxruntime(model, SAMPLE, threads=2, warmup=0, runs=3)
    assert len(first.latency_ms) == 5 and len(second.latency_ms) == 3
    assert all(t > 0 for t in first.latency_ms + second.latency_ms)
    # Not this process, and a new process for every block.
    assert os.getpid() not in (first.pid, second.pid)
    assert first.pid != second.pid
    assert (first.num_threads, second.num_threads) == (1, 2)
    assert first.runtime.startswith("onnxruntime ")


def test_broken_onnx_file_is_a_build_failure_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not a protobuf")
    with pytest.raises(BuildFailedError) as info:
        execution.run_onnxruntime(broken, SAMPLE, threads=1, warmup=0, runs=1)
    message = str(info.value)
    assert f"timing ONNX Runtime on {str(broken)!r} failed with exit code" in message
    # the tail of the child's stderr: ONNX Runtime's own complaint about the file
    assert "protobuf" in message.lower(), message
    assert "Traceback" not in message


def test_wrong_inputs_are_a_build_failure(tiny_onnx: Path) -> None:
    with pytest.raises(BuildFailedError, match=r"takes 1 input\(s\) \(x\), got 2"):
        execution.run_onnxruntime(tiny_onnx.read_bytes(), SAMPLE * 2, threads=1, warmup=0, runs=1)


def test_child_timeout_is_a_build_failure(tiny_onnx: Path) -> None:
    with pytest.raises(BuildFailedError, match="timed out after 0.01 s"):
        execution.run_onnxruntime(tiny_onnx, SAMPLE, threads=1, warmup=0, runs=1, timeout_s=0.01)


def test_missing_onnxruntime_is_named_in_the_parent(
    tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(MissingDependencyError, match="onnxruntime"):
        execution.run_onnxruntime(tiny_onnx, SAMPLE, threads=1, warmup=0, runs=1)
    host = execution.HostFacts(isa="x86_64", cpu_features=frozenset())
    plan = execution.ExecutionPlan("native", "native x86_64")
    with pytest.raises(MissingDependencyError, match="onnxruntime"):
        execution.time_against_ort(
            tiny_onnx.with_suffix(".so"),  # never reached: checked before any block runs
            SAMPLE,
            plan,
            host,
            onnx_model=tiny_onnx.read_bytes(),
            threads=1,
            rounds=2,
            runs_per_round=1,
        )


def test_time_against_ort_refuses_emulated_plans(tiny_onnx: Path) -> None:
    host = execution.HostFacts(isa="x86_64", cpu_features=frozenset())
    plan = execution.ExecutionPlan("qemu-python", "qemu-aarch64 (emulated)")
    with pytest.raises(ValueError, match="only natively"):
        execution.time_against_ort(
            tiny_onnx.with_suffix(".so"),
            SAMPLE,
            plan,
            host,
            onnx_model=tiny_onnx.read_bytes(),
            threads=1,
            rounds=1,
            runs_per_round=1,
        )


@pytest.mark.slow
def test_time_against_ort_runs_every_block_in_a_fresh_process(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real TVM library, real ORT: 3 rounds, A/B order alternating, 3 distinct ORT children."""
    pytest.importorskip("tvm")
    from compiler.frontends import load_model
    from compiler.profiles import ProfileRegistry
    from compiler.settings import CompilerSettings
    from compiler.tvm_builder import build_library

    settings = CompilerSettings()
    profile = ProfileRegistry(settings.profile_roots()).get("generic/x86_64")
    host = execution.detect_host(cache_dir=settings.cache_dir)
    plan = execution.plan_execution(profile, host)
    if plan.mode != "native":
        pytest.skip(f"generic/x86_64 does not run natively here: {plan.reason}")
    library = tmp_path / "tiny.so"
    build_library(
        load_model(tiny_onnx).to_relax(), profile, out_path=library, trials=0, tuning_db=None
    )

    order: list[str] = []
    ort_pids: list[int] = []
    real_ort, real_tvm = execution.run_onnxruntime, execution.run_library

    def ort_spy(*args: Any, **kwargs: Any) -> execution.OrtTiming:
        timing = real_ort(*args, **kwargs)
        order.append("ort")
        ort_pids.append(timing.pid)
        return timing

    def tvm_spy(*args: Any, **kwargs: Any) -> execution.ExecutionResult:
        order.append("tvm")
        return real_tvm(*args, **kwargs)

    monkeypatch.setattr(execution, "run_onnxruntime", ort_spy)
    monkeypatch.setattr(execution, "run_library", tvm_spy)
    rounds = execution.time_against_ort(
        library,
        SAMPLE,
        plan,
        host,
        onnx_model=tiny_onnx.read_bytes(),
        threads=1,
        rounds=3,
        runs_per_round=4,
        warmup=1,
    )
    assert order == ["tvm", "ort", "ort", "tvm", "tvm", "ort"]
    assert [(len(tvm_ms), len(ort_ms)) for tvm_ms, ort_ms in rounds] == [(4, 4)] * 3
    assert len(set(ort_pids)) == 3 and os.getpid() not in ort_pids


def test_tvm_runner_failure_names_the_artifact_run_and_the_runners_complaint(
    tmp_path: Path,
) -> None:
    """run_library shares the child handling above: a library TVM cannot load is a
    BuildFailedError that says where it ran and ends with the runner's own error."""
    broken = tmp_path / "model.so"
    broken.write_bytes(b"\x7fELF but not really a shared library")
    host = execution.HostFacts(isa="x86_64", cpu_features=frozenset())
    plan = execution.ExecutionPlan(mode="native", where="natively on x86_64")
    with pytest.raises(BuildFailedError) as info:
        execution.run_library(broken, [SAMPLE], plan, host, warmup=0, repeat=1)
    message = str(info.value)
    assert message.startswith("executing the artifact (natively on x86_64) failed with exit code")
    assert "model.so" in message, message
