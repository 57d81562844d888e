"""NPU profiles: int8 PTQ to TFLite, Vela for Ethos-U, the report, and the agent's refusal.

Real components throughout: ONNX Runtime calibrates, the LiteRT interpreter runs the int8
model, ethos-u-vela compiles it. The models are the shipped digits CNN and variants of it
built with ``onnx.helper``; calibration data are scikit-learn's 8x8 digits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner

from agent import runtimes
from compiler.bundle import verify_bundle
from compiler.errors import InvalidInputError, ModelError, ProfileError, UsageError
from compiler.frontends import load_model
from compiler.npu import offload, vela
from compiler.npu.data import plan_samples
from compiler.npu.quantize import activation_qparams, quantize_bias, quantize_weights
from compiler.pipeline import CompileRequest, CompileResult, compile_model
from compiler.profiles import ProfileRegistry, parse_profile
from compiler.settings import CompilerSettings
from compiler.signing import generate_keys, load_public_key
from edgeloop.cli import cli

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "models" / "digits_cnn.onnx"
PROFILE = "nxp/imx93-ethos-u65"
# Bound on int8-vs-fp32 top-1 agreement on the digits images (measured: ~0.98).
MIN_TOP1 = 0.9


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("npu")


@pytest.fixture(scope="module")
def keys(work: Path) -> Path:
    return generate_keys(work / "keys").private


@pytest.fixture(scope="module")
def calibration(work: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:128, None, None]  # N x 1x1x8x8
    path = work / "digits.npz"
    np.savez(path, image=images, labels=digits.target[:128])
    return path


def _with_tail(op_type: str, out: Path, *, logit_gain: float = 1.0) -> Path:
    """The digits CNN with one more operator on its logits (output 'scores').

    ``logit_gain`` scales the last layer: the seeded (untrained) CNN's logits lie within
    ~0.1 of each other, finer than int8 log-softmax's fixed 1/16 step; a trained model's
    are spread like the scaled ones.
    """
    model = onnx.load(str(DIGITS))
    for init in model.graph.initializer:
        if init.name.startswith("head.3."):
            scaled = onnx.numpy_helper.to_array(init) * np.float32(logit_gain)
            init.CopyFrom(onnx.numpy_helper.from_array(scaled, init.name))
    logits = model.graph.output[0].name
    model.graph.node.append(
        onnx.helper.make_node(op_type, [logits], ["scores"], name=f"tail_{op_type}", axis=-1)
        if op_type.endswith("Softmax")
        else onnx.helper.make_node(op_type, [logits], ["scores"], name=f"tail_{op_type}")
    )
    del model.graph.output[:]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, 10])
    )
    onnx.save(model, str(out))
    return out


def _compile(
    model: Path,
    out: Path,
    keys: Path,
    *,
    calibration: Path | None = None,
    eval_data: Path | None = None,
    samples: int | None = None,
    registry: ProfileRegistry | None = None,
    profile: str = PROFILE,
) -> CompileResult:
    return compile_model(
        CompileRequest(
            model=model,
            profile=profile,
            output=out,
            calibration_data=calibration,
            eval_data=eval_data,
            samples=samples,
            signing_key=keys,
            force=True,
        ),
        settings=CompilerSettings(),
        registry=registry,
    )


@pytest.fixture(scope="module")
def digits_artifact(work: Path, keys: Path, calibration: Path) -> CompileResult:
    return _compile(DIGITS, work / "digits-npu", keys, calibration=calibration)


# ------------------------------------------------------------------ end to end


def test_digits_cnn_compiles_for_ethos_u65(digits_artifact: CompileResult, keys: Path) -> None:
    result = digits_artifact
    assert result.manifest.runtime == "ethos-u"
    assert result.manifest.entry == "model_vela.tflite"
    verify_bundle(result.output, load_public_key(keys.with_suffix(".pub")))
    compiled = offload.compiled_operators((result.output / "model_vela.tflite").read_bytes())
    assert [op.op for op in compiled] == ["QUANTIZE", "ethos-u", "DEQUANTIZE"]

    npu = json.loads((result.output / "report.json").read_text())["npu"]
    share = npu["offload"]
    # Every conv, pool and FC is on the NPU; only the float I/O boundary stays on the CPU.
    assert share["mac_share_npu"] == 1.0 and share["macs_npu"] == share["macs_total"] > 300_000
    assert {op["op"] for op in share["cpu_operators"]} == {"QUANTIZE", "DEQUANTIZE"}
    assert 0.5 < share["operator_share_npu"] < 1.0
    est = npu["estimate"]
    assert est["accelerator"] == "Ethos_U65_256" and est["clock_mhz"] == 1000.0
    assert est["cycles_total"] >= est["cycles_npu"] > 0
    assert est["inference_time_ms"] == pytest.approx(est["cycles_total"] / 1e6, rel=1e-3)
    assert est["sram_used_kib"] > 0 and est["dram_used_kib"] > 0
    acc = npu["int8_accuracy"]
    assert acc["top1_agreement"] >= MIN_TOP1
    assert acc["outputs"][0]["cosine"] > 0.999
    # The profile's 64 calibration_samples: the last 16 are held out and measured on.
    assert acc["labels"]["samples"] == 16
    assert acc["measured_on"] == {
        "kind": "held_out",
        "source": "digits.npz",
        "samples": 16,
        "calibration_samples": 48,
        "disjoint_from_calibration": True,
        "description": "16 held-out sample(s): the last 25% of 64 from digits.npz, "
        "which calibration (on the first 48) did not see",
    }
    assert npu["quantization"]["calibration_samples"] == 48
    assert npu["quantization"]["calibration_source"] == "digits.npz"
    ver = result.report["verification"]
    assert ver["samples"] == 16 and ver["reason"] is None
    assert ver["inputs"] == acc["measured_on"]["description"]


def test_cli_prints_the_npu_report(work: Path, keys: Path, calibration: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "compile",
            str(DIGITS),
            "--profile",
            PROFILE,
            "-o",
            str(work / "cli-npu"),
            "--calibration-data",
            str(calibration),
            "--signing-key",
            str(keys),
        ],
    )
    assert result.exit_code == 0, result.output
    for row in ("npu offload", "npu estimate", "int8 vs fp32", "cpu fallback", "ethos-u"):
        assert row in result.output
    measured = next(line for line in result.output.splitlines() if "int8 measured on" in line)
    assert "16 held-out sample(s)" in measured


def test_operator_the_npu_cannot_run_falls_back_to_cpu(
    work: Path, keys: Path, calibration: Path
) -> None:
    # LOG_SOFTMAX is not in Vela 5.2's Ethos-U55/U65 supported-operator list.
    model = _with_tail("LogSoftmax", work / "digits_logsoftmax.onnx", logit_gain=50.0)
    result = _compile(model, work / "logsoftmax-npu", keys, calibration=calibration)
    compiled = offload.compiled_operators((result.output / "model_vela.tflite").read_bytes())
    assert [op.op for op in compiled] == ["QUANTIZE", "ethos-u", "LOG_SOFTMAX", "DEQUANTIZE"]
    share = result.report["npu"]["offload"]
    fallback = {op["op"]: op for op in share["cpu_operators"]}
    assert set(fallback) == {"QUANTIZE", "LOG_SOFTMAX", "DEQUANTIZE"}
    assert fallback["LOG_SOFTMAX"]["onnx_node"] == "tail_LogSoftmax"
    assert "Unsupported" in fallback["LOG_SOFTMAX"]["reason"]
    assert share["mac_share_npu"] == 1.0
    assert result.report["npu"]["int8_accuracy"]["top1_agreement"] >= MIN_TOP1


def test_profile_operator_list_moves_operators_to_cpu(
    work: Path, keys: Path, calibration: Path
) -> None:
    data = yaml.safe_load((ROOT / "hw-profiles" / f"{PROFILE}.yaml").read_text())
    data["name"] = "test/imx93-no-fc"
    data["accelerator"]["npu"]["supported_operators"] = [
        "CONV_2D",
        "MAX_POOL_2D",
        "RESHAPE",
        "RELU",
    ]
    extra = work / "profiles"
    (extra / "test").mkdir(parents=True)
    (extra / "test" / "imx93-no-fc.yaml").write_text(yaml.safe_dump(data))
    registry = ProfileRegistry([ROOT / "hw-profiles", extra])
    result = _compile(
        DIGITS,
        work / "no-fc",
        keys,
        calibration=calibration,
        registry=registry,
        profile="test/imx93-no-fc",
    )
    npu = result.report["npu"]
    assert "FULLY_CONNECTED" in npu["ignored_ops"]
    cpu = [op for op in npu["offload"]["cpu_operators"] if op["op"] == "FULLY_CONNECTED"]
    assert len(cpu) == 2
    share = npu["offload"]
    assert share["macs_cpu"] == sum(op["macs"] for op in cpu) > 0
    assert 0.8 < share["mac_share_npu"] < 1.0  # the convolutions carry most MACs


def _zoo_model(path: Path) -> Path:
    """Every lowered operator kind: 3-channel input (TRANSPOSE), Conv+Clip(0,6), depthwise
    Conv+Relu, residual Add, stride-2 Conv with TFLite-SAME pads, AveragePool,
    GlobalAveragePool, Flatten, Gemm, Softmax; a second output is a 4-D feature map."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits: list[Any] = []

    def const(name: str, *shape: int, gain: float = 0.3) -> str:
        value = (rng.standard_normal(shape) * gain).astype(np.float32)
        inits.append(numpy_helper.from_array(value, name))
        return name

    inits += [
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    node = helper.make_node
    nodes = [
        node(
            "Conv",
            ["x", const("c1w", 8, 3, 3, 3), const("c1b", 8)],
            ["c1"],
            name="conv1",
            pads=[1, 1, 1, 1],
        ),
        node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
        node(
            "Conv",
            ["r1", const("dww", 8, 1, 3, 3), const("dwb", 8)],
            ["dw"],
            name="dw",
            pads=[1, 1, 1, 1],
            group=8,
        ),
        node("Relu", ["dw"], ["r2"], name="relu"),
        node("Add", ["r2", "r1"], ["sum"], name="residual"),
        node(
            "Conv",
            ["sum", const("c3w", 16, 8, 3, 3)],
            ["c3"],
            name="conv_s2",
            pads=[0, 0, 1, 1],
            strides=[2, 2],
        ),
        node("AveragePool", ["c3"], ["ap"], name="avgpool", kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
        node("GlobalAveragePool", ["ap"], ["gap"], name="gap"),
        node("Flatten", ["gap"], ["flat"], name="flatten"),
        node(
            "Gemm",
            ["flat", const("fw", 10, 16, gain=0.5), const("fb", 10)],
            ["logits"],
            name="fc",
            transB=1,
        ),
        node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "zoo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10]),
            helper.make_tensor_value_info("c3", TensorProto.FLOAT, [1, 16, 4, 4]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_every_lowered_operator_matches_fp32_and_runs_on_the_npu(work: Path, keys: Path) -> None:
    # No --calibration-data: seeded random inputs calibrate and measure (the report says so).
    result = _compile(_zoo_model(work / "zoo.onnx"), work / "zoo-npu", keys)
    npu = result.report["npu"]
    measured = npu["int8_accuracy"]["measured_on"]
    assert (measured["kind"], measured["source"]) == ("held_out", "random (seed 0)")
    assert (measured["samples"], measured["calibration_samples"]) == (16, 48)
    assert result.report["verification"]["reason"].startswith("random inputs")
    assert [o["name"] for o in npu["int8_accuracy"]["outputs"]] == ["probs", "c3"]
    for output in npu["int8_accuracy"]["outputs"]:
        assert output["cosine"] > 0.999, output
    assert npu["int8_accuracy"]["top1_agreement"] >= MIN_TOP1
    assert npu["int8_accuracy"]["labels"] is None
    assert [spec.shape for spec in result.manifest.outputs] == [[1, 10], [1, 16, 4, 4]]
    share = npu["offload"]
    assert sorted(op["op"] for op in share["cpu_operators"]) == [
        "DEQUANTIZE",
        "DEQUANTIZE",
        "QUANTIZE",
    ]
    assert share["mac_share_npu"] == 1.0 and share["operators_total"] == 14


# ------------------------------------------------------------------ what accuracy is measured on


def _fp32_predictions(images: np.ndarray) -> np.ndarray:
    model = load_model(DIGITS)
    return np.array([int(np.argmax(model.reference([image])[0])) for image in images])


def test_eval_data_is_what_int8_accuracy_is_measured_on(
    work: Path, keys: Path, calibration: Path
) -> None:
    images = np.load(calibration)["image"][96:120]  # 24 images
    # Labels = the fp32 model's own predictions, so fp32 accuracy is 1.0 exactly when (and
    # only when) the measurement ran on these 24 samples.
    eval_data = _npz(work / "eval.npz", image=images, y=_fp32_predictions(images))
    result = _compile(DIGITS, work / "eval-npu", keys, calibration=calibration, eval_data=eval_data)
    acc = result.report["npu"]["int8_accuracy"]
    assert acc["labels"]["samples"] == 24 and acc["labels"]["fp32_accuracy"] == 1.0
    assert acc["measured_on"]["kind"] == "eval_data"
    assert acc["measured_on"]["samples"] == 24 == result.report["verification"]["samples"]
    assert acc["measured_on"]["disjoint_from_calibration"] is True
    # Nothing held out: calibration sees all 64 of its samples.
    assert acc["measured_on"]["calibration_samples"] == 64
    assert result.report["npu"]["quantization"]["calibration_samples"] == 64
    assert acc["measured_on"]["description"] == (
        "24 sample(s) of --eval-data eval.npz, not used for calibration"
    )
    assert result.report["verification"]["reason"] is None


def test_too_few_samples_to_hold_out_says_so(work: Path, keys: Path, calibration: Path) -> None:
    result = _compile(DIGITS, work / "few-npu", keys, calibration=calibration, samples=7)
    measured = result.report["npu"]["int8_accuracy"]["measured_on"]
    assert measured["kind"] == "calibration" and measured["disjoint_from_calibration"] is False
    assert measured["samples"] == measured["calibration_samples"] == 7
    assert result.report["verification"]["reason"] == measured["description"]
    assert "the 7 calibration sample(s) themselves" in measured["description"]
    assert "flatters the int8 model" in measured["description"]


def test_held_out_split_is_the_last_quarter(calibration: Path, tmp_path: Path) -> None:
    model = load_model(DIGITS)
    data = np.load(calibration)
    plan = plan_samples(model, count=40, seed=0, calibration_data=calibration, eval_data=None)
    assert (len(plan.calibration), len(plan.evaluation)) == (30, 10)
    got = np.stack([s[0] for s in plan.evaluation.samples])
    np.testing.assert_array_equal(got, data["image"][30:40])
    np.testing.assert_array_equal(
        np.stack([s[0] for s in plan.calibration.samples]), data["image"][:30]
    )
    assert plan.evaluation.labels is not None
    assert plan.evaluation.labels.tolist() == data["labels"][30:40].tolist()
    # 8 samples: 2 held out; 7: none (measured on the calibration samples).
    for count, held in ((8, 2), (7, 0)):
        plan = plan_samples(model, count=count, seed=0, calibration_data=None, eval_data=None)
        assert len(plan.evaluation) == (held or count)
        assert len(plan.calibration) == count - held
    # The calibration file again as --eval-data (a copy, even): not disjoint, and it says so.
    copy = tmp_path / "copy.npz"
    copy.write_bytes(calibration.read_bytes())
    plan = plan_samples(model, count=20, seed=0, calibration_data=calibration, eval_data=copy)
    assert plan.kind == "eval_data" and plan.disjoint is False
    assert "the same file as --calibration-data" in plan.description
    with pytest.raises(UsageError, match="--samples 0: give at least 1"):
        plan_samples(model, count=0, seed=0, calibration_data=None, eval_data=None)


# ------------------------------------------------------------------ bad input


def _npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.npz", "is not a readable .npz file"),
        (
            lambda d: _npz(d / "shape.npz", image=np.zeros((4, 1, 1, 7, 7), np.float32)),
            "has shape 1x1x7x7; the model needs 1x1x8x8",
        ),
        (
            lambda d: _npz(d / "rank.npz", image=np.zeros((4, 8, 8), np.float32)),
            "expected N x 1x1x8x8",
        ),
        (
            lambda d: _npz(d / "dtype.npz", image=np.zeros((4, 1, 1, 8, 8), np.int64)),
            "input 'image' is int64; the model needs float32",
        ),
        (lambda d: _npz(d / "name.npz", pixels=np.zeros((4, 1, 1, 8, 8))), "lacks input(s) image"),
        (
            lambda d: _npz(
                d / "labels.npz", image=np.zeros((4, 1, 1, 8, 8), np.float32), labels=np.zeros(3)
            ),
            "has 3 labels for 4 samples",
        ),
        (
            lambda d: _npz(
                d / "fraction.npz",
                image=np.zeros((4, 1, 1, 8, 8), np.float32),
                labels=np.array([0, 1.5, 2, 3]),
            ),
            "'labels' must hold class indices (integers >= 0, one per sample); it is float64",
        ),
    ],
    ids=["missing", "shape", "rank", "dtype", "name", "labels", "fractional-labels"],
)
def test_bad_calibration_data_is_named(make: Any, message: str, tmp_path: Path, keys: Path) -> None:
    with pytest.raises(InvalidInputError, match="calibration-data") as err:
        _compile(DIGITS, tmp_path / "out", keys, calibration=make(tmp_path))
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.npz", "--eval-data '{d}/missing.npz' is not a readable .npz"),
        (
            lambda d: _npz(d / "shape.npz", image=np.zeros((4, 1, 1, 8, 7), np.float32)),
            "--eval-data input 'image': each sample has shape 1x1x8x7; the model needs 1x1x8x8",
        ),
        (
            lambda d: _npz(d / "dtype.npz", image=np.zeros((4, 1, 1, 8, 8), np.int32)),
            "--eval-data input 'image' is int32; the model needs float32",
        ),
        (
            lambda d: _npz(d / "empty.npz", image=np.zeros((0, 1, 1, 8, 8), np.float32)),
            "--eval-data '{d}/empty.npz' holds no samples",
        ),
        (
            lambda d: _npz(
                d / "labels.npz", image=np.zeros((4, 1, 1, 8, 8), np.float32), y=np.arange(5)
            ),
            "--eval-data 'y' has 5 labels for 4 samples",
        ),
        (
            lambda d: _npz(
                d / "neg.npz", image=np.zeros((2, 1, 1, 8, 8), np.float32), label=[-1, 2]
            ),
            "--eval-data 'label' must hold class indices (integers >= 0, one per sample); "
            "it is int64 starting -1, 2",
        ),
    ],
    ids=["missing", "shape", "dtype", "empty", "labels", "negative-labels"],
)
def test_bad_eval_data_is_named(
    make: Any, message: str, tmp_path: Path, keys: Path, calibration: Path
) -> None:
    bad = make(tmp_path)
    with pytest.raises(InvalidInputError) as err:
        _compile(DIGITS, tmp_path / "out", keys, calibration=calibration, eval_data=bad)
    assert message.format(d=tmp_path) in str(err.value)
    assert not (tmp_path / "out").exists()


def _cli_compile(tmp_path: Path, keys: Path, option: str, data: Path) -> Any:
    """``edgeloop compile`` of the digits CNN for the NPU profile with ``option data``."""
    args = ["compile", str(DIGITS), "--profile", PROFILE, "-o", str(tmp_path / "o")]
    return CliRunner().invoke(cli, [*args, option, str(data), "--signing-key", str(keys)])


def test_bad_eval_data_exits_3_on_the_cli(tmp_path: Path, keys: Path) -> None:
    bad = _npz(tmp_path / "eval.npz", pixels=np.zeros((4, 1, 1, 8, 8), np.float32))
    result = _cli_compile(tmp_path, keys, "--eval-data", bad)
    assert result.exit_code == 3, result.output
    assert "--eval-data lacks input(s) image; it has: pixels" in result.output
    assert not (tmp_path / "o").exists()


def test_bad_calibration_data_exits_3_on_the_cli(tmp_path: Path, keys: Path) -> None:
    bad = _npz(tmp_path / "dtype.npz", image=np.array([["a"]] * 4))
    result = _cli_compile(tmp_path, keys, "--calibration-data", bad)
    assert result.exit_code == 3
    assert "input 'image' is <U1; the model needs float32" in result.output


def test_operator_outside_the_quantizer_is_named(tmp_path: Path, keys: Path) -> None:
    model = _with_tail("Sigmoid", tmp_path / "sigmoid.onnx")
    with pytest.raises(ModelError, match=r"Sigmoid: tail_Sigmoid; it supports: Add, "):
        _compile(model, tmp_path / "out", keys)


def test_npu_profile_refuses_tuning_and_other_runtimes(tmp_path: Path, keys: Path) -> None:
    with pytest.raises(UsageError, match="NPU profiles are not tuned"):
        compile_model(
            CompileRequest(DIGITS, PROFILE, tmp_path / "o", trials=8, signing_key=keys),
            settings=CompilerSettings(),
        )
    with pytest.raises(UsageError, match="'tvm' is not available on nxp/imx93-ethos-u65"):
        compile_model(
            CompileRequest(DIGITS, PROFILE, tmp_path / "o", runtime="tvm", signing_key=keys),
            settings=CompilerSettings(),
        )


def test_eval_data_on_a_cpu_profile_is_refused(tmp_path: Path, keys: Path) -> None:
    data = tmp_path / "eval.npz"
    with pytest.raises(UsageError, match="--eval-data .*only used by NPU profiles"):
        compile_model(
            CompileRequest(
                DIGITS, "generic/x86_64", tmp_path / "o", eval_data=data, signing_key=keys
            ),
            settings=CompilerSettings(),
        )
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the agent


def test_agent_refuses_npu_artifact_without_the_delegate(
    digits_artifact: CompileResult, tmp_path: Path
) -> None:
    assert not any(p.exists() for p in runtimes.ETHOS_U_DELEGATE_PATHS)
    assert "ethos-u" not in runtimes.available_runtimes()
    with pytest.raises(runtimes.NpuUnavailableError) as err:
        runtimes.load(digits_artifact.output, digits_artifact.manifest)
    assert err.value.http_status == 503
    assert "Ethos-U delegate library is not on this device" in str(err.value)
    assert "/usr/lib/libethosu_op_delegate.so" in str(err.value)
    configured = tmp_path / "libethosu_op_delegate.so"
    with pytest.raises(runtimes.NpuUnavailableError, match=str(configured)):
        runtimes.load(
            digits_artifact.output,
            digits_artifact.manifest,
            options=runtimes.RuntimeOptions(ethos_u_delegate=configured),
        )


# LiteRT's Delegate.__del__ trips over its own failed constructor (ai-edge-litert 2.3).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_agent_reports_a_delegate_that_does_not_load(
    digits_artifact: CompileResult, tmp_path: Path
) -> None:
    broken = tmp_path / "libethosu_op_delegate.so"
    broken.write_bytes(b"not an ELF file")
    with pytest.raises(runtimes.ModelLoadError, match="Ethos-U delegate"):
        runtimes.load(
            digits_artifact.output,
            digits_artifact.manifest,
            options=runtimes.RuntimeOptions(ethos_u_delegate=broken),
        )


# ------------------------------------------------------------------ pure pieces


@pytest.mark.parametrize(
    ("lo", "hi", "zero_point"),
    [(0.0, 6.0, -128), (-1.0, 1.0, 0), (-2.0, 0.0, 127), (1.0, 2.0, -128), (-3.0, -1.0, 127)],
)
def test_activation_qparams_cover_zero(lo: float, hi: float, zero_point: int) -> None:
    q = activation_qparams(lo, hi)
    assert q.zero_point == (zero_point,)
    assert q.scale[0] == pytest.approx((max(hi, 0) - min(lo, 0)) / 255)


def test_weights_per_channel_and_bias_scales() -> None:
    w = np.array([[1.0, -0.5], [0.125, 0.5]], np.float32)
    q, params = quantize_weights(w, axis=0)
    assert q.tolist() == [[127, -64], [32, 127]]
    assert params.scale == pytest.approx((1.0 / 127, 0.5 / 127))
    b, bparams = quantize_bias(np.array([0.5, 0.0], np.float32), input_scale=0.1, weight=params)
    assert bparams.scale == pytest.approx((0.1 / 127, 0.05 / 127))
    assert b.tolist() == [635, 0]


def test_vela_log_and_summary_parsers() -> None:
    log = (
        "Warning (supported operators) operator: LOG_SOFTMAX, ofm: 'scores/int8'\n"
        "Reason: Unsupported opType\n\n"
        "Warning (supported operators) operator: QUANTIZE, ofm: 'image/quantized'\n"
        "Reason: Operation has tensor with unsupported DataType Float32 (image)\n"
        'Feature-map dataTypes must be one of {"INT8"}\n\nNetwork summary\n'
    )
    assert vela.parse_cpu_reasons(log) == {
        "scores/int8": "Unsupported opType",
        "image/quantized": "Operation has tensor with unsupported DataType Float32 (image) "
        'Feature-map dataTypes must be one of {"INT8"}',
    }
    with pytest.raises(Exception, match="2 data rows"):
        vela.parse_summary_csv("a,b\n1,2\n3,4\n")
    with pytest.raises(Exception, match="lacks a numeric 'core_clock'"):
        vela.estimate({"cycles_total": "5"})


def test_npu_profile_needs_its_npu_block() -> None:
    data = yaml.safe_load((ROOT / "hw-profiles" / f"{PROFILE}.yaml").read_text())
    parse_profile(data)
    del data["accelerator"]["npu"]
    with pytest.raises(ProfileError, match="accelerator.kind 'npu' needs an npu block"):
        parse_profile(data)


def test_agent_config_names_the_delegate(tmp_path: Path) -> None:
    """``[runtime] ethos_u_delegate`` in agent.toml reaches the runtimes: ethos-u is offered."""
    from agent.config import load_settings

    delegate = tmp_path / "libethosu_op_delegate.so"
    delegate.write_bytes(b"\x7fELF")
    config = tmp_path / "agent.toml"
    config.write_text(
        'device_id = "npu-1"\nprofile = "nxp/imx93-ethos-u65"\n'
        f'trusted_key = "{tmp_path / "key.pub"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[runtime]\nethos_u_delegate = "{delegate}"\nnum_threads = 2\n'
    )
    settings = load_settings(config)
    options = runtimes.RuntimeOptions(
        num_threads=settings.runtime.num_threads,
        ethos_u_delegate=settings.runtime.ethos_u_delegate,
    )
    assert options.ethos_u_delegate == delegate and options.num_threads == 2
    assert "ethos-u" in runtimes.available_runtimes(options)
    assert "ethos-u" not in runtimes.available_runtimes()
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace("num_threads = 2", "num_threads = 0"))
    with pytest.raises(ValueError, match="num_threads"):
        load_settings(bad)
