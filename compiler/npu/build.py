"""``edgeloop compile`` for an NPU profile: quantize, compile with the vendor compiler, sign.

Steps (each failing with the compiler's usual exceptions and exit codes):

1. check the model: ONNX, every operator in the int8 lowering's subset (exit 3);
2. samples (``compiler.npu.data``): calibration from ``--calibration-data`` (float arrays of
   the input shapes, optional ``labels``) or seeded random inputs; evaluation from
   ``--eval-data`` (same layout) or else the held-out last quarter of the calibration
   samples (exit 3 for a bad file); int8 activation ranges from ONNX Runtime;
3. lower to a fully int8 TFLite model (``compiler.npu.lower``);
4. run that int8 model on this CPU with the LiteRT interpreter against the fp32 model on the
   evaluation samples: top-1 agreement (gated by ``accelerator.npu.min_int8_top1_agreement``,
   exit 4), errors, and accuracy against labels when the data has them;
5. vendor compiler (Vela): NPU part as ``ethos-u`` custom ops, the rest stays CPU TFLite ops;
   report the NPU share of operators and MACs, the CPU-fallback operators with reasons, and
   Vela's estimate (cycles, time at the NPU clock, SRAM/DRAM);
6. bundle ``model_vela.tflite`` + report.json, manifest runtime ``ethos-u``, sign.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

import edgeloop
from compiler import bundle
from compiler.accuracy import compare_output
from compiler.errors import (
    AccuracyGateError,
    MissingDependencyError,
    UsageError,
)
from compiler.manifest import TensorSpec
from compiler.npu import lower as npu_lower
from compiler.npu import offload, vela
from compiler.npu.data import SamplePlan, plan_samples
from compiler.profiles import HardwareProfile, NpuCompilerSpec

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from compiler.frontends import SourceModel
    from compiler.pipeline import CompileRequest, CompileResult

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]
ENTRY_FILE = "model_vela.tflite"


def compile_npu(
    req: CompileRequest,
    *,
    profile: HardwareProfile,
    model: SourceModel,
    private_key: Ed25519PrivateKey,
    say: Callable[[str], None],
    vela_runner: vela.Runner | None = None,
) -> CompileResult:
    """Compile ``model`` for an NPU profile (see module docstring).

    Raises:
        CompilerError: a subclass naming what failed; nothing is written to ``req.output``.
    """
    from compiler.pipeline import seal

    spec = profile.npu
    if spec is None:
        raise UsageError(f"profile {profile.name} has no accelerator.npu block")
    if req.runtime not in ("auto", "ethos-u"):
        raise UsageError(
            f"--runtime {req.runtime!r} is not available on {profile.name}; "
            f"NPU profiles ship: {', '.join(profile.runtimes)} (use --runtime auto)"
        )
    if req.trials:
        raise UsageError(f"--trials {req.trials}: NPU profiles are not tuned; give 0 or omit it")
    onnx_bytes = model.onnx_bytes()
    if onnx_bytes is None:
        raise UsageError(
            f"the NPU path quantizes ONNX models; {req.model.name} is {model.format} "
            "(export it to ONNX first)"
        )
    npu_lower.check_operators(onnx_bytes)
    if vela_runner is None and vela.vela_version() is None:
        raise MissingDependencyError("ethos-u-vela", "npu")
    _require_litert()

    plan = plan_samples(
        model,
        count=req.samples or spec.calibration_samples,
        seed=req.seed,
        calibration_data=req.calibration_data,
        eval_data=req.eval_data,
    )
    say(f"calibrating int8 ranges on {len(plan.calibration)} sample(s) with ONNX Runtime")
    ranges = npu_lower.calibration_ranges(onnx_bytes, plan.calibration.samples)
    lowered = npu_lower.lower(
        onnx_bytes, ranges, input_shapes={t.name: list(t.shape) for t in model.inputs}
    )
    say(f"int8 vs fp32 on this CPU (LiteRT interpreter) on {plan.description}")
    samples = plan.evaluation.samples
    references = [model.reference(s) for s in samples]
    int8_outputs = run_tflite(lowered.tflite_bytes, samples)
    output_names = model.output_names or [f"output_{j}" for j in range(len(references[0]))]
    accuracy = _int8_accuracy(output_names, int8_outputs, references, plan, spec)
    outputs = [
        TensorSpec(name=n, shape=list(r.shape), dtype=str(r.dtype))
        for n, r in zip(output_names, references[0], strict=True)
    ]

    config = vela.VelaConfig(
        accelerator_config=spec.accelerator_config,
        system_config=spec.system_config,
        memory_mode=spec.memory_mode,
        config_file=Path(spec.config_file) if spec.config_file else None,
        ignore_ops=_ignored_ops(lowered.layers, spec),
    )
    with bundle.staging_dir(req.output, overwrite=req.force) as staging:
        say(f"compiling the NPU part with Vela for {spec.accelerator_config}")
        result = vela.compile_tflite(
            lowered.tflite_bytes, config, workdir=staging / ".vela", runner=vela_runner
        )
        _remove_tree(staging / ".vela")
        compiled = offload.compiled_operators(result.optimized_tflite)
        share = offload.offload_summary(lowered.layers, compiled, result.cpu_reasons)
        (staging / ENTRY_FILE).write_bytes(result.optimized_tflite)
        report: dict[str, Any] = {
            "schema_version": 1,
            "profile": profile.name,
            "model": {"file": req.model.name, "format": model.format, "sha256": model.sha256},
            "host": {"machine": platform.machine(), "python": platform.python_version()},
            "verification": {
                "executed": True,
                "where": "int8 model (before Vela) on this CPU with the LiteRT interpreter",
                "reason": _verification_caveat(plan),
                "emulated": False,
                "samples": len(samples),
                "inputs": plan.description,
                "npu_executed": False,
            },
            "accuracy": {a["name"]: a for a in accuracy["outputs"]},
            "latency": {},
            "npu": {
                "compiler": "vela",
                "vela_version": result.version,
                "accelerator": profile.accelerator.arch if profile.accelerator else None,
                "quantization": {
                    "scheme": "int8 PTQ: per-channel symmetric weights, per-tensor "
                    "asymmetric activations, int32 bias; float32 I/O quantized at the edges",
                    "calibration_samples": len(plan.calibration),
                    "calibration_source": plan.calibration.source,
                },
                "int8_accuracy": accuracy,
                "offload": share,
                "estimate": vela.estimate(result.summary),
                "ignored_ops": list(config.ignore_ops),
            },
            "runtime": {
                "chosen": "ethos-u",
                "reason": _reason(spec),
                "margin": None,
                "comparison": {},
            },
        }
        return seal(
            staging,
            req,
            model,
            profile,
            {
                "runtime": "ethos-u",
                "runtime_reason": _reason(spec),
                "entry": ENTRY_FILE,
                "outputs": [t.model_dump() for t in outputs],
                "toolchain": {"edgeloop": edgeloop.__version__},
                "tuning": {},
            },
            private_key=private_key,
            report=report,
            say=say,
        )


def _verification_caveat(plan: SamplePlan) -> str | None:
    """Why the measured int8 agreement is weaker evidence, if it is."""
    if not plan.disjoint:
        return plan.description
    if plan.evaluation.random:
        return "random inputs: int8 agreement on real data may differ"
    return None


def _reason(spec: NpuCompilerSpec) -> str:
    return (
        f"NPU profile: int8 model compiled by Vela for {spec.accelerator_config} "
        f"({spec.system_config}, {spec.memory_mode}); LiteRT runs it with the Ethos-U delegate"
    )


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _require_litert() -> None:
    import importlib.util

    if importlib.util.find_spec("ai_edge_litert") is None:
        raise MissingDependencyError("ai_edge_litert", "tflite")


def _ignored_ops(layers: list[npu_lower.LayerInfo], spec: NpuCompilerSpec) -> tuple[str, ...]:
    """Operators of the model outside the profile's ``supported_operators`` (forced to CPU)."""
    if spec.supported_operators is None:
        return ()
    allowed = {op.upper() for op in spec.supported_operators}
    return tuple(sorted({layer.op for layer in layers} - allowed))


def run_tflite(tflite_bytes: bytes, samples: list[list[Array]]) -> list[list[Array]]:
    """Run a (non-delegated) .tflite on this CPU with the LiteRT interpreter, per sample."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=tflite_bytes, num_threads=1)
    interp.allocate_tensors()
    ins = [int(d["index"]) for d in interp.get_input_details()]
    outs = [int(d["index"]) for d in interp.get_output_details()]
    results = []
    for sample in samples:
        for index, array in zip(ins, sample, strict=True):
            interp.set_tensor(index, np.ascontiguousarray(array))
        interp.invoke()
        results.append([np.array(interp.get_tensor(i)) for i in outs])
    return results


def _int8_accuracy(
    names: list[str],
    actual: list[list[Array]],
    reference: list[list[Array]],
    plan: SamplePlan,
    spec: NpuCompilerSpec,
) -> dict[str, Any]:
    """int8-vs-fp32 metrics per output on ``plan.evaluation``; the gate is top-1 agreement
    of the first output."""
    labels = plan.evaluation.labels
    per_output = []
    for j, name in enumerate(names):
        acc = compare_output(name, [a[j] for a in actual], [r[j] for r in reference])
        per_output.append(acc.to_dict())
    top1 = per_output[0]["top1_agreement"]
    result: dict[str, Any] = {
        "outputs": per_output,
        "top1_agreement": top1,
        "min_top1_agreement": spec.min_int8_top1_agreement,
        "labels": None,
        "measured_on": plan.to_dict(),
    }
    if labels is not None and top1 is not None:
        int8_pred = np.array([np.argmax(a[0]) for a in actual])
        fp32_pred = np.array([np.argmax(r[0]) for r in reference])
        result["labels"] = {
            "samples": len(labels),
            "int8_accuracy": round(float(np.mean(int8_pred == labels)), 4),
            "fp32_accuracy": round(float(np.mean(fp32_pred == labels)), 4),
        }
    if top1 is not None and top1 < spec.min_int8_top1_agreement:
        raise AccuracyGateError(
            f"int8 top-1 agreement with fp32 is {top1:.3f} < {spec.min_int8_top1_agreement:.3f} "
            f"(accelerator.npu.min_int8_top1_agreement), measured on {plan.description}; "
            "no artifact written. More or more representative --calibration-data usually helps"
        )
    return result
