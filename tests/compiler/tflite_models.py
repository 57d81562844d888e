"""Small .tflite models for tests, written with the flatbuffers builders of the ``tflite`` package.

TensorFlow is not needed: a model is a list of tensors (constant ones carry their data) and
a list of operators, serialized the way the TFLite schema (version 3, identifier ``TFL3``)
lays them out. Weights come from a seeded RNG so every run builds the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import numpy.typing as npt
import tflite

# Builds the op's BuiltinOptions table and returns (BuiltinOptions type, table offset).
OptionsFn = Callable[[flatbuffers.Builder], tuple[int, int]]
_TENSOR_TYPES = {
    np.dtype("float32"): tflite.TensorType.FLOAT32,
    np.dtype("int32"): tflite.TensorType.INT32,
}


@dataclass
class _Tensor:
    name: str
    shape: list[int]
    dtype: np.dtype[Any]
    data: npt.NDArray[Any] | None
    signature: list[int] | None = None


@dataclass
class _Op:
    code: int
    custom_code: str | None
    inputs: list[int]
    outputs: list[int]
    options: OptionsFn | None


@dataclass
class GraphBuilder:
    """One-subgraph TFLite model under construction."""

    tensors: list[_Tensor] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def tensor(
        self,
        name: str,
        shape: list[int],
        dtype: str = "float32",
        *,
        signature: list[int] | None = None,
    ) -> int:
        """Add an activation tensor (-1 in ``signature`` marks a dynamic dim); returns its index."""
        self.tensors.append(_Tensor(name, list(shape), np.dtype(dtype), None, signature))
        return len(self.tensors) - 1

    def const(self, name: str, value: npt.NDArray[Any]) -> int:
        """Add a constant tensor backed by a buffer; returns its index."""
        arr = np.ascontiguousarray(value)
        self.tensors.append(_Tensor(name, list(arr.shape), arr.dtype, arr))
        return len(self.tensors) - 1

    def op(
        self,
        code: int,
        inputs: list[int],
        outputs: list[int],
        options: OptionsFn | None = None,
        *,
        custom_code: str | None = None,
    ) -> None:
        """Append an operator (``code`` from ``tflite.BuiltinOperator``)."""
        self.ops.append(_Op(code, custom_code, inputs, outputs, options))

    def serialize(self) -> bytes:
        """The .tflite flatbuffer."""
        b = flatbuffers.Builder(1024)
        codes: list[tuple[int, str | None]] = []
        for o in self.ops:
            if (o.code, o.custom_code) not in codes:
                codes.append((o.code, o.custom_code))

        # Buffer 0 is the empty sentinel; each constant tensor gets its own buffer after it.
        buffer_of: dict[int, int] = {}
        buffer_offsets = [_buffer(b, None)]
        for index, t in enumerate(self.tensors):
            if t.data is not None:
                buffer_of[index] = len(buffer_offsets)
                buffer_offsets.append(_buffer(b, t.data))

        tensor_offsets = []
        for index, t in enumerate(self.tensors):
            name = b.CreateString(t.name)
            shape = _int_vector(b, tflite.TensorStartShapeVector, t.shape)
            signature = None
            if t.signature is not None:
                signature = _int_vector(b, tflite.TensorStartShapeSignatureVector, t.signature)
            tflite.TensorStart(b)
            tflite.TensorAddShape(b, shape)
            if signature is not None:
                tflite.TensorAddShapeSignature(b, signature)
            tflite.TensorAddType(b, _TENSOR_TYPES[t.dtype])
            tflite.TensorAddBuffer(b, buffer_of.get(index, 0))
            tflite.TensorAddName(b, name)
            tensor_offsets.append(tflite.TensorEnd(b))

        op_offsets = []
        for o in self.ops:
            options = o.options(b) if o.options else None
            ins = _int_vector(b, tflite.OperatorStartInputsVector, o.inputs)
            outs = _int_vector(b, tflite.OperatorStartOutputsVector, o.outputs)
            tflite.OperatorStart(b)
            tflite.OperatorAddOpcodeIndex(b, codes.index((o.code, o.custom_code)))
            tflite.OperatorAddInputs(b, ins)
            tflite.OperatorAddOutputs(b, outs)
            if options is not None:
                tflite.OperatorAddBuiltinOptionsType(b, options[0])
                tflite.OperatorAddBuiltinOptions(b, options[1])
            op_offsets.append(tflite.OperatorEnd(b))

        tensors = _table_vector(b, tflite.SubGraphStartTensorsVector, tensor_offsets)
        operators = _table_vector(b, tflite.SubGraphStartOperatorsVector, op_offsets)
        inputs = _int_vector(b, tflite.SubGraphStartInputsVector, self.inputs)
        outputs = _int_vector(b, tflite.SubGraphStartOutputsVector, self.outputs)
        graph_name = b.CreateString("main")
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, tensors)
        tflite.SubGraphAddInputs(b, inputs)
        tflite.SubGraphAddOutputs(b, outputs)
        tflite.SubGraphAddOperators(b, operators)
        tflite.SubGraphAddName(b, graph_name)
        subgraph = tflite.SubGraphEnd(b)

        code_offsets = []
        for code, custom in codes:
            custom_name = b.CreateString(custom) if custom is not None else None
            tflite.OperatorCodeStart(b)
            # Codes above 127 keep 127 (PLACEHOLDER_FOR_GREATER_OP_CODES) in the int8 field.
            tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            tflite.OperatorCodeAddBuiltinCode(b, code)
            tflite.OperatorCodeAddVersion(b, 1)
            if custom_name is not None:
                tflite.OperatorCodeAddCustomCode(b, custom_name)
            code_offsets.append(tflite.OperatorCodeEnd(b))

        subgraphs = _table_vector(b, tflite.ModelStartSubgraphsVector, [subgraph])
        op_codes = _table_vector(b, tflite.ModelStartOperatorCodesVector, code_offsets)
        buffers = _table_vector(b, tflite.ModelStartBuffersVector, buffer_offsets)
        description = b.CreateString("edgeloop test model")
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, 3)
        tflite.ModelAddOperatorCodes(b, op_codes)
        tflite.ModelAddSubgraphs(b, subgraphs)
        tflite.ModelAddDescription(b, description)
        tflite.ModelAddBuffers(b, buffers)
        b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    def save(self, path: Path) -> Path:
        """Write the model to ``path``; returns it."""
        path.write_bytes(self.serialize())
        return path


def _int_vector(b: flatbuffers.Builder, start: Callable[..., Any], values: list[int]) -> int:
    start(b, len(values))
    for v in reversed(values):
        b.PrependInt32(int(v))
    return int(b.EndVector())


def _table_vector(b: flatbuffers.Builder, start: Callable[..., Any], offsets: list[int]) -> int:
    start(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def _buffer(b: flatbuffers.Builder, data: npt.NDArray[Any] | None) -> int:
    vector = None
    if data is not None:
        raw = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
        b.StartVector(1, raw.size, 16)  # 16-byte aligned, as the TFLite converter writes them
        b.head -= raw.size
        b.Bytes[b.head : b.head + raw.size] = raw.tobytes()
        vector = b.EndVector()
    tflite.BufferStart(b)
    if vector is not None:
        tflite.BufferAddData(b, vector)
    return int(tflite.BufferEnd(b))


def _fc_options(activation: int = tflite.ActivationFunctionType.NONE) -> OptionsFn:
    def build(b: flatbuffers.Builder) -> tuple[int, int]:
        tflite.FullyConnectedOptionsStart(b)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(b, activation)
        return tflite.BuiltinOptions.FullyConnectedOptions, tflite.FullyConnectedOptionsEnd(b)

    return build


def _softmax_options(b: flatbuffers.Builder) -> tuple[int, int]:
    tflite.SoftmaxOptionsStart(b)
    tflite.SoftmaxOptionsAddBeta(b, 1.0)
    return tflite.BuiltinOptions.SoftmaxOptions, tflite.SoftmaxOptionsEnd(b)


def _add_options(b: flatbuffers.Builder) -> tuple[int, int]:
    tflite.AddOptionsStart(b)
    tflite.AddOptionsAddFusedActivationFunction(b, tflite.ActivationFunctionType.NONE)
    return tflite.BuiltinOptions.AddOptions, tflite.AddOptionsEnd(b)


def _conv_options(b: flatbuffers.Builder) -> tuple[int, int]:
    tflite.Conv2DOptionsStart(b)
    tflite.Conv2DOptionsAddPadding(b, tflite.Padding.SAME)
    tflite.Conv2DOptionsAddStrideW(b, 1)
    tflite.Conv2DOptionsAddStrideH(b, 1)
    tflite.Conv2DOptionsAddDilationWFactor(b, 1)
    tflite.Conv2DOptionsAddDilationHFactor(b, 1)
    tflite.Conv2DOptionsAddFusedActivationFunction(b, tflite.ActivationFunctionType.RELU)
    return tflite.BuiltinOptions.Conv2DOptions, tflite.Conv2DOptionsEnd(b)


def _pool_options(b: flatbuffers.Builder) -> tuple[int, int]:
    tflite.Pool2DOptionsStart(b)
    tflite.Pool2DOptionsAddPadding(b, tflite.Padding.VALID)
    tflite.Pool2DOptionsAddStrideW(b, 2)
    tflite.Pool2DOptionsAddStrideH(b, 2)
    tflite.Pool2DOptionsAddFilterWidth(b, 2)
    tflite.Pool2DOptionsAddFilterHeight(b, 2)
    tflite.Pool2DOptionsAddFusedActivationFunction(b, tflite.ActivationFunctionType.NONE)
    return tflite.BuiltinOptions.Pool2DOptions, tflite.Pool2DOptionsEnd(b)


def _weights(rng: np.random.Generator, *shape: int) -> npt.NDArray[np.float32]:
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def mlp(seed: int = 0) -> GraphBuilder:
    """input[1,16] -> FC(+bias) -> RELU -> FC(+bias) -> ADD -> SOFTMAX -> probabilities[1,10]."""
    rng = np.random.default_rng(seed)
    op = tflite.BuiltinOperator
    g = GraphBuilder()
    x = g.tensor("input", [1, 16])
    w1 = g.const("dense/kernel", _weights(rng, 32, 16))  # TFLite FC weights are [out, in]
    b1 = g.const("dense/bias", _weights(rng, 32))
    h = g.tensor("dense/MatMul", [1, 32])
    r = g.tensor("dense/Relu", [1, 32])
    w2 = g.const("logits/kernel", _weights(rng, 10, 32))
    b2 = g.const("logits/bias", _weights(rng, 10))
    logits = g.tensor("logits/MatMul", [1, 10])
    shift = g.const("logits/shift", _weights(rng, 1, 10))
    shifted = g.tensor("logits/add", [1, 10])
    probs = g.tensor("probabilities", [1, 10])
    g.op(op.FULLY_CONNECTED, [x, w1, b1], [h], _fc_options())
    g.op(op.RELU, [h], [r])
    g.op(op.FULLY_CONNECTED, [r, w2, b2], [logits], _fc_options())
    g.op(op.ADD, [logits, shift], [shifted], _add_options)
    g.op(op.SOFTMAX, [shifted], [probs], _softmax_options)
    g.inputs, g.outputs = [x], [probs]
    return g


def conv(seed: int = 0) -> GraphBuilder:
    """NHWC image[1,8,8,3] -> CONV_2D 3x3 SAME (+bias, RELU) -> AVERAGE_POOL_2D 2x2 -> [1,4,4,4]."""
    rng = np.random.default_rng(seed)
    op = tflite.BuiltinOperator
    g = GraphBuilder()
    x = g.tensor("image", [1, 8, 8, 3])
    w = g.const("conv/filter", _weights(rng, 4, 3, 3, 3))  # OHWI
    bias = g.const("conv/bias", _weights(rng, 4))
    c = g.tensor("conv/Relu", [1, 8, 8, 4])
    p = g.tensor("pool", [1, 4, 4, 4])
    g.op(op.CONV_2D, [x, w, bias], [c], _conv_options)
    g.op(op.AVERAGE_POOL_2D, [c], [p], _pool_options)
    g.inputs, g.outputs = [x], [p]
    return g


def with_unsupported(code: int, *, custom_code: str | None = None, seed: int = 0) -> GraphBuilder:
    """input[1,16] -> FULLY_CONNECTED -> ``code`` (output ``mystery``); for import checks only."""
    rng = np.random.default_rng(seed)
    op = tflite.BuiltinOperator
    g = GraphBuilder()
    x = g.tensor("input", [1, 16])
    w = g.const("dense/kernel", _weights(rng, 16, 16))
    h = g.tensor("dense/MatMul", [1, 16])
    out = g.tensor("mystery", [1, 16])
    g.op(op.FULLY_CONNECTED, [x, w, -1], [h], _fc_options())
    g.op(code, [h], [out], custom_code=custom_code)
    g.inputs, g.outputs = [x], [out]
    return g


def dynamic_batch(seed: int = 0) -> GraphBuilder:
    """The MLP with its batch dimension declared dynamic (shape_signature [-1, 16])."""
    g = mlp(seed)
    g.tensors[g.inputs[0]].signature = [-1, 16]
    return g
