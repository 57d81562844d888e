"""bench.kernel_profile: libraries alternated in one process, and per-kernel times."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.kernel_profile import main, parse_shape


@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-kernel Relax model (matmul, then ReLU) compiled for this CPU."""
    import tvm
    from tvm import relax

    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8), "float32"))
    weight = relax.const(np.ones((8, 4), np.float32))
    with builder.function("main", [x]):
        with builder.dataflow():
            y = builder.emit(relax.op.matmul(x, weight))
            out = builder.emit_output(relax.op.nn.relu(y))
        builder.emit_func_output(out)
    path = tmp_path_factory.mktemp("profile") / "tiny.so"
    tvm.compile(builder.get(), target="llvm").export_library(str(path))
    return path


def test_alternating_two_libraries_prints_their_ratio(
    tiny_library: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lib = str(tiny_library)
    assert main([lib, lib, "--input-shape", "1x8", "--rounds", "2", "--calls", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("2 rounds" in line and line.endswith(lib) for line in lines)
    assert "1.00x the first" in lines[0]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model as ``tiny_library`` in ONNX, for ORT."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["out"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.ones((8, 4), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("profile_onnx") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def test_ort_takes_its_turn_and_each_library_gets_its_ratio_to_it(
    tiny_library: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lib = str(tiny_library)
    argv = [lib, "--ort", str(tiny_onnx), "--input-shape", "1x8", "--rounds", "2", "--calls", "3"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "x ORT (rounds " in lines[0] and lines[0].endswith(lib)
    assert "2 rounds): ORT " in lines[1] and lines[1].endswith(str(tiny_onnx))


def test_kernel_mode_times_each_kernel(
    tiny_library: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--kernels", str(tiny_library), "--input-shape", "1x8", "--calls", "3"]) == 0
    out = capsys.readouterr().out
    assert "us of calls per model call" in out
    assert "matmul" in out and "relu" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.so"], "no such library: missing.so"),
        (["--input-shape", "1xx8", "missing.so"], "--input-shape '1xx8': expected positive"),
        (["--rounds", "0", "{lib}"], "--rounds, --calls, --threads and --top must be at least 1"),
        (["--ort", "nope.onnx", "{lib}"], "--ort 'nope.onnx': no such ONNX model"),
        (["--ort", "{lib}", "--kernels", "{lib}"], "it does not combine with --kernels"),
    ],
)
def test_bad_arguments_exit_2_naming_the_value(
    argv: list[str], message: str, tiny_library: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([a.format(lib=tiny_library) for a in argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_shape() -> None:
    assert parse_shape("1X3x224x224") == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="--input-shape '0x3'"):
        parse_shape("0x3")
