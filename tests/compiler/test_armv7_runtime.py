"""Execute armv7 (armhf) TVM artifacts under qemu-arm-static with the C++ runner.

The runner (runtime/armv7) is cross-built by scripts/build-armv7-runtime.sh into
``${EDGELOOP_CACHE_DIR:-~/.cache/edgeloop}/armv7-runtime`` (about 2 minutes on 2 cores the first
time, a no-op afterwards) and speaks the same runner protocol as compiler/runner_main.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-armv7-runtime.sh"
ARMHF_SYSROOT = Path("/usr/arm-linux-gnueabihf")
QEMU = "qemu-arm-static"
ARMV7_TARGET = {
    "kind": "llvm",
    "mtriple": "armv7a-linux-gnueabihf",
    "mattr": ["+neon", "+vfp4"],
    "mcpu": "cortex-a53",
    "mfloat-abi": "hard",
}
ELF_MACHINE_ARM = 40
RUN_TIMEOUT_S = 300


def _missing_tools() -> list[str]:
    tools = [QEMU, "arm-linux-gnueabihf-gcc", "arm-linux-gnueabihf-g++", "cmake"]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not (ARMHF_SYSROOT / "lib" / "ld-linux-armhf.so.3").exists():
        missing.append(f"{ARMHF_SYSROOT} (libc6-armhf-cross)")
    return missing


@pytest.fixture(scope="module")
def runner() -> Path:
    """Builds the armhf runner if needed and returns its path."""
    missing = _missing_tools()
    if missing:
        pytest.skip(
            "armv7 emulation needs "
            + ", ".join(missing)
            + " (apt-get install qemu-user-static g++-arm-linux-gnueabihf cmake)"
        )
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1200, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"{BUILD_SCRIPT.name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    cache = Path(os.environ.get("EDGELOOP_CACHE_DIR", Path.home() / ".cache" / "edgeloop"))
    binary = cache / "armv7-runtime" / "edgeloop-armv7-runner"
    assert binary.is_file(), f"build script succeeded but {binary} is missing"
    return binary


def _run_runner(runner: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QEMU, "-L", str(ARMHF_SYSROOT), str(runner), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def _compile_armv7(model: Any, path: Path) -> Path:
    tvm = pytest.importorskip("tvm")
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, keep_params_in_input=False)
    ex = tvm.compile(mod, target=tvm.target.Target(ARMV7_TARGET))
    ex.export_library(str(path), cc="arm-linux-gnueabihf-gcc")
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 1, "expected a 32-bit ELF"
    assert int.from_bytes(header[18:20], "little") == ELF_MACHINE_ARM, "expected an ARM ELF"
    return path


def _write_request(
    workdir: Path,
    *,
    lib: Path,
    samples: Sequence[Sequence[np.ndarray]],
    warmup: int,
    repeat: int,
) -> None:
    for k, inputs in enumerate(samples):
        for i, array in enumerate(inputs):
            np.save(workdir / f"s{k}_in{i}.npy", array)
    request = {
        "lib": str(lib),
        "num_samples": len(samples),
        "num_inputs": len(samples[0]),
        "warmup": warmup,
        "repeat": repeat,
    }
    (workdir / "request.json").write_text(json.dumps(request), encoding="utf-8")


def _mlp_conv_model() -> Any:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((8,)).astype(np.float32), "B"),
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "CW"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("Add", ["m", "B"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
        helper.make_node("Conv", ["img", "CW"], ["c"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp_conv",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4, 8, 8]),
        ],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_mlp_conv_matches_onnxruntime(runner: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    tvm = pytest.importorskip("tvm")
    model = _mlp_conv_model()
    lib = _compile_armv7(model, tmp_path / "model_armv7.so")
    rng = np.random.default_rng(1)
    samples = [
        [
            rng.standard_normal((2, 16)).astype(np.float32),
            rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
        ]
        for _ in range(3)
    ]
    workdir = tmp_path / "work"
    workdir.mkdir()
    _write_request(workdir, lib=lib, samples=samples, warmup=1, repeat=3)

    proc = _run_runner(runner, str(workdir))

    assert proc.returncode == 0, proc.stderr
    result = json.loads((workdir / "result.json").read_text(encoding="utf-8"))
    assert result["num_outputs"] == 2
    assert len(result["latency_ms"]) == 3
    assert all(latency > 0 for latency in result["latency_ms"])
    assert result["machine"] == "armv7l"
    assert result["runtime"] == f"tvm {tvm.__version__} (edgeloop armv7 runner)"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for k, (x, img) in enumerate(samples):
        expected = session.run(None, {"x": x, "img": img})
        for j, want in enumerate(expected):
            got = np.load(workdir / f"s{k}_out{j}.npy")
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


DTYPES = [np.float32, np.float16, np.int8, np.uint8, np.int32, np.int64]


def test_npy_dtypes_round_trip(runner: Path, tmp_path: Path) -> None:
    """Every input dtype of the protocol goes in and comes out (y_i = x_i + x_i)."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    inputs, outputs, nodes = [], [], []
    for i, dtype in enumerate(DTYPES):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        inputs.append(helper.make_tensor_value_info(f"x{i}", elem, [2, 3]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", elem, [2, 3]))
        nodes.append(helper.make_node("Add", [f"x{i}", f"x{i}"], [f"y{i}"]))
    graph = helper.make_graph(nodes, "dtypes", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    lib = _compile_armv7(model, tmp_path / "dtypes_armv7.so")
    rng = np.random.default_rng(2)
    sample = [rng.integers(0, 50, size=(2, 3)).astype(dtype) for dtype in DTYPES]
    workdir = tmp_path / "work"
    workdir.mkdir()
    _write_request(workdir, lib=lib, samples=[sample], warmup=0, repeat=0)

    proc = _run_runner(runner, str(workdir))

    assert proc.returncode == 0, proc.stderr
    result = json.loads((workdir / "result.json").read_text(encoding="utf-8"))
    assert result["num_outputs"] == len(DTYPES)
    assert result["latency_ms"] == []
    for j, x in enumerate(sample):
        got = np.load(workdir / f"s0_out{j}.npy")
        assert got.dtype == x.dtype and got.shape == x.shape
        np.testing.assert_array_equal(got, x + x)


def test_parallel_kernel_runs_on_the_runner_thread_pool(runner: Path, tmp_path: Path) -> None:
    """A T.parallel loop calls back into the runner (TVMBackendParallelLaunch) like tuned code."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax, s_tir, te

    a = te.placeholder((64, 256), name="A")
    b = te.compute((64, 256), lambda i, j: a[i, j] + 1.0, name="B")
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    outer, _ = sch.get_loops(sch.get_sblock("B"))
    sch.parallel(outer)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64, 256), "float32"))
    with bb.function("main", [x]):
        gv = bb.add_func(sch.mod["main"].with_attr("global_symbol", "add_one"), "add_one")
        with bb.dataflow():
            y = bb.emit(relax.call_tir(gv, (x,), relax.TensorType((64, 256), "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    lib = tmp_path / "parallel_armv7.so"
    ex = tvm.compile(bb.get(), target=tvm.target.Target(ARMV7_TARGET))
    ex.export_library(str(lib), cc="arm-linux-gnueabihf-gcc")
    sample = np.arange(64 * 256, dtype=np.float32).reshape(64, 256)
    workdir = tmp_path / "work"
    workdir.mkdir()
    _write_request(workdir, lib=lib, samples=[[sample]], warmup=1, repeat=2)

    proc = _run_runner(runner, str(workdir))

    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(workdir / "s0_out0.npy"), sample + 1)


def test_missing_library_is_a_clear_error(runner: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model.so"
    request = {"lib": str(missing), "num_samples": 1, "num_inputs": 1, "warmup": 0, "repeat": 0}
    (tmp_path / "request.json").write_text(json.dumps(request), encoding="utf-8")

    proc = _run_runner(runner, str(tmp_path))

    assert proc.returncode == 1
    assert str(missing) in proc.stderr
    assert not (tmp_path / "result.json").exists()


@pytest.mark.parametrize(
    ("request_text", "message"),
    [
        ("{", "invalid JSON"),
        ('{"num_samples": 1, "num_inputs": 1}', "missing key 'lib'"),
        (
            '{"lib": "m.so", "num_samples": "one", "num_inputs": 1}',
            "'num_samples' must be an integer",
        ),
    ],
)
def test_bad_request_is_a_clear_error(
    runner: Path, tmp_path: Path, request_text: str, message: str
) -> None:
    (tmp_path / "request.json").write_text(request_text, encoding="utf-8")

    proc = _run_runner(runner, str(tmp_path))

    assert proc.returncode == 1
    assert message in proc.stderr


def test_usage_error_exits_2(runner: Path) -> None:
    proc = _run_runner(runner)

    assert proc.returncode == 2
    assert "usage:" in proc.stderr
