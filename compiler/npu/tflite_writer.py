"""Serialize a TFLite model (schema v3, ``TFL3``) with the ``tflite`` flatbuffers builders.

Hand-written on purpose: the converters that emit int8 TFLite (TensorFlow's TFLiteConverter,
onnx2tf) need TensorFlow (hundreds of MB, not in our extras), and litert-converter 0.5
converts StableHLO/MLIR rather than ONNX and pins typing-extensions<4.13, which breaks
pydantic. The model here is one subgraph of tensors and builtin operators, which is all the
post-training quantizer in ``compiler.npu.lower`` produces. The float test models of the
TFLite frontend (``tests/compiler/tflite_models.py``) are written with it too, hence the
float tensors without quantization, dynamic dims (``shape_signature``) and custom op codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np
import numpy.typing as npt
import tflite

from compiler.npu.quantize import QParams

# Builds an operator's BuiltinOptions table; returns (BuiltinOptions type, table offset).
OptionsFn = Callable[[flatbuffers.Builder], tuple[int, int]]
_TYPES = {
    np.dtype("float32"): tflite.TensorType.FLOAT32,
    np.dtype("int32"): tflite.TensorType.INT32,
    np.dtype("int8"): tflite.TensorType.INT8,
}


@dataclass
class Tensor:
    """One tensor; constants carry ``data``, quantized ones ``qparams``.

    ``shape_signature`` (-1 marks a dynamic dim) is written only when given.
    """

    name: str
    shape: list[int]
    dtype: np.dtype[Any]
    data: npt.NDArray[Any] | None = None
    qparams: QParams | None = None
    shape_signature: list[int] | None = None


@dataclass
class Operator:
    """One operator: ``code`` from ``tflite.BuiltinOperator``, ``custom_code`` for CUSTOM ops."""

    code: int
    inputs: list[int]
    outputs: list[int]
    options: OptionsFn | None = None
    name: str = ""
    custom_code: str | None = None


@dataclass
class Model:
    """A one-subgraph TFLite model under construction."""

    tensors: list[Tensor] = field(default_factory=list)
    operators: list[Operator] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def tensor(
        self,
        name: str,
        shape: list[int],
        dtype: str = "float32",
        qparams: QParams | None = None,
        *,
        shape_signature: list[int] | None = None,
    ) -> int:
        """Add an activation tensor (-1 in ``shape_signature`` marks a dynamic dim)."""
        signature = list(shape_signature) if shape_signature is not None else None
        self.tensors.append(
            Tensor(name, list(shape), np.dtype(dtype), None, qparams, shape_signature=signature)
        )
        return len(self.tensors) - 1

    def const(self, name: str, value: npt.NDArray[Any], qparams: QParams | None = None) -> int:
        """Add a constant tensor backed by its own buffer; returns its index."""
        arr = np.ascontiguousarray(value)
        self.tensors.append(Tensor(name, list(arr.shape), arr.dtype, arr, qparams))
        return len(self.tensors) - 1

    def op(
        self,
        code: int,
        inputs: list[int],
        outputs: list[int],
        options: OptionsFn | None = None,
        *,
        name: str = "",
        custom_code: str | None = None,
    ) -> None:
        """Append an operator (``custom_code`` names a ``BuiltinOperator.CUSTOM`` one)."""
        self.operators.append(Operator(code, inputs, outputs, options, name, custom_code))


def serialize(model: Model, *, description: str = "edgeloop int8 PTQ") -> bytes:
    """The .tflite flatbuffer of ``model``."""
    b = flatbuffers.Builder(4096)
    # One OperatorCode per (builtin code, custom code) pair, in order of first use.
    codes: list[tuple[int, str | None]] = []
    for o in model.operators:
        if (o.code, o.custom_code) not in codes:
            codes.append((o.code, o.custom_code))
    buffer_of: dict[int, int] = {}
    buffers = [_buffer(b, None)]
    for index, t in enumerate(model.tensors):
        if t.data is not None:
            buffer_of[index] = len(buffers)
            buffers.append(_buffer(b, t.data))
    tensors = []
    for index, t in enumerate(model.tensors):
        name = b.CreateString(t.name)
        shape = _ints(b, tflite.TensorStartShapeVector, t.shape)
        signature = None
        if t.shape_signature is not None:
            signature = _ints(b, tflite.TensorStartShapeSignatureVector, t.shape_signature)
        quant = _quantization(b, t.qparams) if t.qparams is not None else None
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        if signature is not None:
            tflite.TensorAddShapeSignature(b, signature)
        tflite.TensorAddType(b, _TYPES[t.dtype])
        tflite.TensorAddBuffer(b, buffer_of.get(index, 0))
        tflite.TensorAddName(b, name)
        if quant is not None:
            tflite.TensorAddQuantization(b, quant)
        tensors.append(tflite.TensorEnd(b))
    ops = []
    for o in model.operators:
        options = o.options(b) if o.options else None
        ins = _ints(b, tflite.OperatorStartInputsVector, o.inputs)
        outs = _ints(b, tflite.OperatorStartOutputsVector, o.outputs)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, codes.index((o.code, o.custom_code)))
        tflite.OperatorAddInputs(b, ins)
        tflite.OperatorAddOutputs(b, outs)
        if options is not None:
            tflite.OperatorAddBuiltinOptionsType(b, options[0])
            tflite.OperatorAddBuiltinOptions(b, options[1])
        ops.append(tflite.OperatorEnd(b))
    t_vec = _tables(b, tflite.SubGraphStartTensorsVector, tensors)
    o_vec = _tables(b, tflite.SubGraphStartOperatorsVector, ops)
    i_vec = _ints(b, tflite.SubGraphStartInputsVector, model.inputs)
    out_vec = _ints(b, tflite.SubGraphStartOutputsVector, model.outputs)
    graph_name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, t_vec)
    tflite.SubGraphAddInputs(b, i_vec)
    tflite.SubGraphAddOutputs(b, out_vec)
    tflite.SubGraphAddOperators(b, o_vec)
    tflite.SubGraphAddName(b, graph_name)
    subgraph = tflite.SubGraphEnd(b)
    code_tables = []
    for code, custom in codes:
        custom_name = b.CreateString(custom) if custom is not None else None
        tflite.OperatorCodeStart(b)
        # Codes above 127 keep 127 (PLACEHOLDER_FOR_GREATER_OP_CODES) in the int8 field.
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, 1)
        if custom_name is not None:
            tflite.OperatorCodeAddCustomCode(b, custom_name)
        code_tables.append(tflite.OperatorCodeEnd(b))
    subgraphs = _tables(b, tflite.ModelStartSubgraphsVector, [subgraph])
    op_codes = _tables(b, tflite.ModelStartOperatorCodesVector, code_tables)
    buf_vec = _tables(b, tflite.ModelStartBuffersVector, buffers)
    desc = b.CreateString(description)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, op_codes)
    tflite.ModelAddSubgraphs(b, subgraphs)
    tflite.ModelAddDescription(b, desc)
    tflite.ModelAddBuffers(b, buf_vec)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _quantization(b: flatbuffers.Builder, q: QParams) -> int:
    tflite.QuantizationParametersStartScaleVector(b, len(q.scale))
    for s in reversed(q.scale):
        b.PrependFloat32(s)
    scale = b.EndVector()
    tflite.QuantizationParametersStartZeroPointVector(b, len(q.zero_point))
    for z in reversed(q.zero_point):
        b.PrependInt64(z)
    zero = b.EndVector()
    tflite.QuantizationParametersStart(b)
    tflite.QuantizationParametersAddScale(b, scale)
    tflite.QuantizationParametersAddZeroPoint(b, zero)
    tflite.QuantizationParametersAddQuantizedDimension(b, q.axis)
    return int(tflite.QuantizationParametersEnd(b))


def _ints(b: flatbuffers.Builder, start: Callable[..., Any], values: list[int]) -> int:
    start(b, len(values))
    for v in reversed(values):
        b.PrependInt32(int(v))
    return int(b.EndVector())


def _tables(b: flatbuffers.Builder, start: Callable[..., Any], offsets: list[int]) -> int:
    start(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def _buffer(b: flatbuffers.Builder, data: npt.NDArray[Any] | None) -> int:
    vector = None
    if data is not None:
        raw = np.ascontiguousarray(data).tobytes()
        b.StartVector(1, len(raw), 16)  # 16-byte aligned, as the TFLite converter writes them
        b.head -= len(raw)
        b.Bytes[b.head : b.head + len(raw)] = raw
        vector = b.EndVector()
    tflite.BufferStart(b)
    if vector is not None:
        tflite.BufferAddData(b, vector)
    return int(tflite.BufferEnd(b))


# ------------------------------------------------------------------ options builders


def conv_options(
    *, stride: tuple[int, int], padding: int, activation: int, depth_multiplier: int | None = None
) -> OptionsFn:
    """Conv2DOptions, or DepthwiseConv2DOptions when ``depth_multiplier`` is given."""

    def build(b: flatbuffers.Builder) -> tuple[int, int]:
        if depth_multiplier is not None:
            tflite.DepthwiseConv2DOptionsStart(b)
            tflite.DepthwiseConv2DOptionsAddPadding(b, padding)
            tflite.DepthwiseConv2DOptionsAddStrideH(b, stride[0])
            tflite.DepthwiseConv2DOptionsAddStrideW(b, stride[1])
            tflite.DepthwiseConv2DOptionsAddDepthMultiplier(b, depth_multiplier)
            tflite.DepthwiseConv2DOptionsAddDilationHFactor(b, 1)
            tflite.DepthwiseConv2DOptionsAddDilationWFactor(b, 1)
            tflite.DepthwiseConv2DOptionsAddFusedActivationFunction(b, activation)
            end = tflite.DepthwiseConv2DOptionsEnd(b)
            return tflite.BuiltinOptions.DepthwiseConv2DOptions, end
        tflite.Conv2DOptionsStart(b)
        tflite.Conv2DOptionsAddPadding(b, padding)
        tflite.Conv2DOptionsAddStrideH(b, stride[0])
        tflite.Conv2DOptionsAddStrideW(b, stride[1])
        tflite.Conv2DOptionsAddDilationHFactor(b, 1)
        tflite.Conv2DOptionsAddDilationWFactor(b, 1)
        tflite.Conv2DOptionsAddFusedActivationFunction(b, activation)
        return tflite.BuiltinOptions.Conv2DOptions, tflite.Conv2DOptionsEnd(b)

    return build


def pool_options(*, kernel: tuple[int, int], stride: tuple[int, int], padding: int) -> OptionsFn:
    """Pool2DOptions."""

    def build(b: flatbuffers.Builder) -> tuple[int, int]:
        tflite.Pool2DOptionsStart(b)
        tflite.Pool2DOptionsAddPadding(b, padding)
        tflite.Pool2DOptionsAddStrideH(b, stride[0])
        tflite.Pool2DOptionsAddStrideW(b, stride[1])
        tflite.Pool2DOptionsAddFilterHeight(b, kernel[0])
        tflite.Pool2DOptionsAddFilterWidth(b, kernel[1])
        tflite.Pool2DOptionsAddFusedActivationFunction(b, tflite.ActivationFunctionType.NONE)
        return tflite.BuiltinOptions.Pool2DOptions, tflite.Pool2DOptionsEnd(b)

    return build


def fc_options(*, activation: int) -> OptionsFn:
    """FullyConnectedOptions (default weights format, 2-D output)."""

    def build(b: flatbuffers.Builder) -> tuple[int, int]:
        tflite.FullyConnectedOptionsStart(b)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(b, activation)
        return tflite.BuiltinOptions.FullyConnectedOptions, tflite.FullyConnectedOptionsEnd(b)

    return build


def add_options(*, activation: int) -> OptionsFn:
    """AddOptions."""

    def build(b: flatbuffers.Builder) -> tuple[int, int]:
        tflite.AddOptionsStart(b)
        tflite.AddOptionsAddFusedActivationFunction(b, activation)
        return tflite.BuiltinOptions.AddOptions, tflite.AddOptionsEnd(b)

    return build


def softmax_options(b: flatbuffers.Builder) -> tuple[int, int]:
    """SoftmaxOptions with beta 1."""
    tflite.SoftmaxOptionsStart(b)
    tflite.SoftmaxOptionsAddBeta(b, 1.0)
    return tflite.BuiltinOptions.SoftmaxOptions, tflite.SoftmaxOptionsEnd(b)


def reshape_options(shape: list[int]) -> OptionsFn:
    """ReshapeOptions with the new shape."""

    def build(b: flatbuffers.Builder) -> tuple[int, int]:
        vec = _ints(b, tflite.ReshapeOptionsStartNewShapeVector, shape)
        tflite.ReshapeOptionsStart(b)
        tflite.ReshapeOptionsAddNewShape(b, vec)
        return tflite.BuiltinOptions.ReshapeOptions, tflite.ReshapeOptionsEnd(b)

    return build


def mean_options(b: flatbuffers.Builder) -> tuple[int, int]:
    """ReducerOptions keeping dims."""
    tflite.ReducerOptionsStart(b)
    tflite.ReducerOptionsAddKeepDims(b, True)
    return tflite.BuiltinOptions.ReducerOptions, tflite.ReducerOptionsEnd(b)
