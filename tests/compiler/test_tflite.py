"""Tests of the TFLite frontend (compiler.frontends) and ``edgeloop compile model.tflite``.

The .tflite files are written by ``tflite_models`` (flatbuffers, no TensorFlow); references
come from a real TFLite interpreter (LiteRT).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tflite
from click.testing import CliRunner

from compiler.bundle import verify_bundle
from compiler.errors import (
    MissingDependencyError,
    ModelError,
    UnsupportedOperatorsError,
    UsageError,
)
from compiler.frontends import load_model
from compiler.pipeline import CompileRequest, compile_model
from compiler.settings import CompilerSettings
from compiler.signing import load_public_key
from edgeloop.cli import cli
from tests.compiler import tflite_models

OP = tflite.BuiltinOperator
PROFILE = "generic/x86_64"


def _save(builder: tflite_models.GraphBuilder, tmp_path: Path, name: str) -> Path:
    return builder.save(tmp_path / f"{name}.tflite")


def _sample(shape: list[int], seed: int = 0) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _const(builder: tflite_models.GraphBuilder, name: str) -> np.ndarray[Any, Any]:
    data = next(t.data for t in builder.tensors if t.name == name)
    assert data is not None
    return data


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize(
    ("build", "inputs", "outputs"),
    [
        (tflite_models.mlp, [("input", [1, 16], "float32")], ["probabilities"]),
        (tflite_models.conv, [("image", [1, 8, 8, 3], "float32")], ["pool"]),
    ],
    ids=["mlp", "conv"],
)
def test_load_reads_static_input_specs(
    tmp_path: Path,
    build: Callable[[], tflite_models.GraphBuilder],
    inputs: list[tuple[str, list[int], str]],
    outputs: list[str],
) -> None:
    path = _save(build(), tmp_path, "model")
    model = load_model(path)
    assert model.format == "tflite"
    assert [(t.name, t.shape, t.dtype) for t in model.inputs] == inputs
    assert model.output_names == outputs
    model.check_coverage()  # every operator is importable


def test_dynamic_input_needs_a_static_shape(tmp_path: Path) -> None:
    path = _save(tflite_models.dynamic_batch(), tmp_path, "dyn")
    message = r"input 'input' has a dynamic shape \?x16.*--input-shape input:1x16"
    with pytest.raises(ModelError, match=message):
        load_model(path)
    model = load_model(path, input_shapes={"input": [3, 16]})
    assert model.inputs[0].shape == [3, 16]
    out = model.reference([_sample([3, 16])])
    assert out[0].shape == (3, 10)  # the interpreter was resized to the pinned shape


@pytest.mark.parametrize(
    ("shapes", "error", "message"),
    [
        ({"x": [1, 16]}, UsageError, r"unknown input\(s\) 'x'; the model's inputs are: input"),
        ({"input": [1, 16, 1]}, UsageError, r"has rank 3; the model's input has rank 2"),
        ({"input": [2, 16]}, UsageError, r"contradicts the model's static shape 1x16"),
    ],
)
def test_input_shape_overrides_are_checked(
    tmp_path: Path, shapes: dict[str, list[int]], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        load_model(_save(tflite_models.mlp(), tmp_path, "mlp"), input_shapes=shapes)


def _truncated(tmp_path: Path) -> bytes:
    return tflite_models.mlp().serialize()[:200]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda _: b"", id="empty"),
        pytest.param(lambda _: b"not a flatbuffer at all, just text\n" * 4, id="text"),
        pytest.param(lambda _: bytes(range(256)) * 8, id="garbage"),
        pytest.param(_truncated, id="truncated"),
    ],
)
def test_corrupt_file_is_a_model_error(tmp_path: Path, content: Callable[[Path], bytes]) -> None:
    path = tmp_path / "broken.tflite"
    path.write_bytes(content(tmp_path))
    with pytest.raises(ModelError, match="is not a readable TFLite model"):
        load_model(path)


# ------------------------------------------------------------------ operator coverage


def _tvm_convert_map() -> set[str]:
    from compiler.frontends import _tflite_operator_converter

    model = tflite.Model.GetRootAsModel(tflite_models.mlp().serialize(), 0)
    return set(_tflite_operator_converter(model).convert_map)


@pytest.mark.parametrize(
    ("code", "custom", "op_name"),
    [
        (OP.DYNAMIC_UPDATE_SLICE, None, "DYNAMIC_UPDATE_SLICE"),
        (OP.CUSTOM, "MyFancyOp", "CUSTOM:MyFancyOp"),
    ],
)
def test_unsupported_operator_is_named_with_its_node(
    tmp_path: Path, code: int, custom: str | None, op_name: str
) -> None:
    assert op_name.split(":")[0] not in _tvm_convert_map()  # else pick another op for this test
    builder = tflite_models.with_unsupported(code, custom_code=custom)
    model = load_model(_save(builder, tmp_path, "m"))
    with pytest.raises(UnsupportedOperatorsError) as info:
        model.check_coverage()
    assert info.value.unsupported == {op_name: ["mystery"]}
    assert f"{op_name}: 1 node(s): mystery" in str(info.value)
    assert "TFLite" in str(info.value)


def test_supported_custom_detection_postprocess_passes_coverage(tmp_path: Path) -> None:
    """TVM maps this one custom op to its own converter; the pre-check must not reject it."""
    builder = tflite_models.with_unsupported(OP.CUSTOM, custom_code="TFLite_Detection_PostProcess")
    load_model(_save(builder, tmp_path, "det")).check_coverage()


# ------------------------------------------------------------------ reference runtime


def test_reference_runs_the_tflite_interpreter(tmp_path: Path) -> None:
    builder = tflite_models.mlp()
    model = load_model(_save(builder, tmp_path, "mlp"))
    x = _sample([1, 16])
    hidden = np.maximum(x @ _const(builder, "dense/kernel").T + _const(builder, "dense/bias"), 0)
    logits = hidden @ _const(builder, "logits/kernel").T + _const(builder, "logits/bias")
    logits = logits + _const(builder, "logits/shift")
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    (out,) = model.reference([x])
    assert out.shape == (1, 10) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_reference_without_an_interpreter_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    model = load_model(_save(tflite_models.mlp(), tmp_path, "mlp"))
    with pytest.raises(MissingDependencyError, match=r"ai_edge_litert.*edgeloop\[tflite\]"):
        model.reference([_sample([1, 16])])


@pytest.mark.slow
@pytest.mark.parametrize("build", [tflite_models.mlp, tflite_models.conv], ids=["mlp", "conv"])
def test_to_relax_matches_the_interpreter(
    tmp_path: Path, build: Callable[[], tflite_models.GraphBuilder]
) -> None:
    import tvm
    from tvm import relax

    model = load_model(_save(build(), tmp_path, "model"))
    mod = model.to_relax()
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    for seed in range(3):
        x = _sample(model.inputs[0].shape, seed)
        (expected,) = model.reference([x])
        actual = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ compile_model and the CLI


@pytest.fixture
def settings(tmp_path: Path) -> CompilerSettings:
    return CompilerSettings(config_dir=tmp_path / "cfg", cache_dir=tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.parametrize("build", [tflite_models.mlp, tflite_models.conv], ids=["mlp", "conv"])
def test_compile_model_matches_the_interpreter(
    tmp_path: Path,
    settings: CompilerSettings,
    signing_key: Path,
    build: Callable[[], tflite_models.GraphBuilder],
) -> None:
    path = _save(build(), tmp_path, "model")
    out = tmp_path / "artifact"
    result = compile_model(
        CompileRequest(model=path, profile=PROFILE, output=out, signing_key=signing_key, trials=0),
        settings=settings,
    )
    report = result.report
    assert report["verification"]["executed"] is True
    (name,) = report["accuracy"]
    assert name == load_model(path).output_names[0]
    assert report["accuracy"][name]["max_abs_error"] <= 1e-5
    assert result.manifest.runtime == "tvm"
    assert result.manifest.source_model.format == "tflite"
    verified = verify_bundle(out, load_public_key(signing_key.with_suffix(".pub")))
    assert verified.artifact_id == result.artifact_id


def _cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        "EDGELOOP_CONFIG_DIR": str(tmp_path / "cfg"),
        "EDGELOOP_CACHE_DIR": str(tmp_path / "cache"),
    }


@pytest.mark.slow
def test_cli_compiles_a_tflite_model(tmp_path: Path, signing_key: Path) -> None:
    path = _save(tflite_models.mlp(), tmp_path, "mlp")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "compile",
            str(path),
            "--profile",
            PROFILE,
            "-o",
            str(out),
            "--trials",
            "0",
            "--signing-key",
            str(signing_key),
            "--json",
        ],
        env=_cli_env(tmp_path),
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    manifest = data["manifest"]
    assert manifest["inputs"] == [{"name": "input", "shape": [1, 16], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "probabilities", "shape": [1, 10], "dtype": "float32"}]
    assert data["report"]["accuracy"]["probabilities"]["max_abs_error"] <= 1e-5
    assert (out / "model.so").is_file()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (
            lambda p: tflite_models.with_unsupported(OP.DYNAMIC_UPDATE_SLICE).save(p),
            "DYNAMIC_UPDATE_SLICE: 1 node(s): mystery",
        ),
        (
            lambda p: tflite_models.with_unsupported(OP.CUSTOM, custom_code="MyFancyOp").save(p),
            "CUSTOM:MyFancyOp: 1 node(s): mystery",
        ),
        (lambda p: p.write_bytes(b"\x00" * 64), "is not a readable TFLite model"),
    ],
    ids=["builtin", "custom", "corrupt"],
)
def test_cli_rejects_bad_models_with_exit_3(
    tmp_path: Path, signing_key: Path, make: Callable[[Path], object], needle: str
) -> None:
    path = tmp_path / "bad.tflite"
    make(path)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "compile",
            str(path),
            "--profile",
            PROFILE,
            "-o",
            str(out),
            "--signing-key",
            str(signing_key),
        ],
        env=_cli_env(tmp_path),
    )
    assert result.exit_code == 3, result.output
    assert needle in " ".join(result.stderr.split())  # rich may wrap long lines
    assert not out.exists()
