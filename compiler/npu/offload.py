"""Which operators and MACs of the int8 model run on the NPU (pure; reads .tflite bytes).

Vela replaces the operators it accepts by ``ethos-u`` custom operators and keeps the rest
as builtins; an int8-model operator is on the CPU when its output tensor is the output of a
builtin left in the compiled model, and on the NPU otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tflite

from compiler.npu.lower import LayerInfo

ETHOS_U_CUSTOM_CODE = "ethos-u"
_NAMES = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}


@dataclass(frozen=True)
class CompiledOp:
    """One operator of the compiled model: a builtin (CPU) or an ``ethos-u`` custom op (NPU)."""

    op: str
    outputs: tuple[str, ...]
    npu: bool


def compiled_operators(tflite_bytes: bytes) -> list[CompiledOp]:
    """The operators of a (vela-compiled) .tflite, first subgraph, in order."""
    model = tflite.Model.GetRootAsModel(tflite_bytes, 0)
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    graph = model.Subgraphs(0)
    ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = codes[op.OpcodeIndex()]
        custom = code.CustomCode()
        builtin = max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))
        name = custom.decode() if custom else _NAMES.get(builtin, str(builtin))
        outs = tuple(
            graph.Tensors(op.Outputs(j)).Name().decode() for j in range(op.OutputsLength())
        )
        ops.append(CompiledOp(name, outs, npu=name == ETHOS_U_CUSTOM_CODE))
    return ops


def offload_summary(
    layers: list[LayerInfo], compiled: list[CompiledOp], reasons: dict[str, str]
) -> dict[str, Any]:
    """Share of operators and MACs on the NPU, and the CPU-fallback operators with reasons.

    ``reasons`` maps output tensor names to vela's explanation; the float boundary
    QUANTIZE/DEQUANTIZE of the model's float signature are listed like any other.
    """
    cpu_outputs = {name for op in compiled if not op.npu for name in op.outputs}
    cpu_layers = [layer for layer in layers if layer.output in cpu_outputs]
    total_macs = sum(layer.macs for layer in layers)
    cpu_macs = sum(layer.macs for layer in cpu_layers)
    n_total, n_cpu = len(layers), len(cpu_layers)
    return {
        "operators_total": n_total,
        "operators_npu": n_total - n_cpu,
        "operators_cpu": n_cpu,
        "operator_share_npu": round((n_total - n_cpu) / n_total, 4) if n_total else 0.0,
        "macs_total": total_macs,
        "macs_npu": total_macs - cpu_macs,
        "macs_cpu": cpu_macs,
        "mac_share_npu": round((total_macs - cpu_macs) / total_macs, 4) if total_macs else 0.0,
        "npu_subgraphs": sum(1 for op in compiled if op.npu),
        "cpu_operators": [
            {
                "op": layer.op,
                "output": layer.output,
                "onnx_node": layer.onnx_node,
                "macs": layer.macs,
                "reason": reasons.get(layer.output, "not accepted by the NPU compiler"),
            }
            for layer in cpu_layers
        ],
    }
