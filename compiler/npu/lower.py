"""Post-training int8 quantization of an ONNX CNN into a TFLite model, without TensorFlow.

Steps:

1. calibration: the fp32 ONNX model runs in ONNX Runtime on the calibration samples with
   every intermediate tensor exposed as an output; each tensor's min/max gives its int8
   activation params (per-tensor, asymmetric);
2. lowering: each ONNX node becomes a TFLite builtin in NHWC layout with per-channel int8
   weights and int32 biases; a ReLU/Clip(0, 6) that is a conv/FC/add's only consumer is
   fused into it; Flatten of an NHWC tensor feeding a Gemm permutes the Gemm's weight
   columns instead of transposing the activations;
3. the model keeps the ONNX signature: float32 inputs in ONNX layout are quantized
   (QUANTIZE) and transposed to NHWC, outputs are dequantized (DEQUANTIZE), as TensorFlow's
   converter does with float I/O. Those boundary ops run on the CPU beside the NPU.

Operators outside the subset raise ``ModelError`` naming each node and the supported set.
Why hand-written: see ``compiler.npu.tflite_writer``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import tflite

from compiler.errors import ModelError
from compiler.npu import tflite_writer as tw
from compiler.npu.quantize import (
    QParams,
    activation_qparams,
    fixed_qparams,
    quantize_bias,
    quantize_tensor,
    quantize_weights,
)

Array = npt.NDArray[Any]
SUPPORTED_ONNX_OPS = (
    "Add",
    "AveragePool",
    "Clip",
    "Conv",
    "Flatten",
    "Gemm",
    "GlobalAveragePool",
    "LogSoftmax",
    "MaxPool",
    "Relu",
    "Reshape",
    "Softmax",
)
_OP = tflite.BuiltinOperator
_ACT = tflite.ActivationFunctionType


@dataclass(frozen=True)
class LayerInfo:
    """What one TFLite operator of the int8 model computes (for the offload report)."""

    index: int
    op: str
    output: str
    macs: int
    onnx_node: str


@dataclass
class Lowered:
    """The int8 model and what the report needs about it."""

    tflite_bytes: bytes
    layers: list[LayerInfo]
    input_qparams: list[QParams]
    output_qparams: list[QParams]


@dataclass
class _Value:
    index: int  # tensor index in the TFLite model
    shape: list[int]  # TFLite shape (NHWC for 4-D)
    nhwc: bool  # a 4-D tensor whose ONNX layout is NCHW
    flat_from: list[int] | None = None  # NHWC shape this 2-D tensor was flattened from


def calibration_ranges(
    onnx_bytes: bytes, samples: list[list[Array]]
) -> dict[str, tuple[float, float]]:
    """Min/max of every tensor of the fp32 ONNX model over the calibration samples."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(onnx_bytes)
    known = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in known:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                known.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    feeds_names = [i.name for i in session.get_inputs()]
    ranges: dict[str, tuple[float, float]] = {}
    for sample in samples:
        feeds = dict(zip(feeds_names, sample, strict=True))
        for name, value in zip(feeds_names, sample, strict=True):
            _widen(ranges, name, np.asarray(value))
        for name, value in zip(names, session.run(names, feeds), strict=True):
            _widen(ranges, name, np.asarray(value))
    return ranges


def _widen(ranges: dict[str, tuple[float, float]], name: str, value: Array) -> None:
    if value.size == 0 or not np.issubdtype(value.dtype, np.floating):
        return
    lo, hi = float(value.min()), float(value.max())
    old = ranges.get(name)
    ranges[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))


def check_operators(onnx_bytes: bytes) -> None:
    """Raise ModelError naming every node whose operator the int8 lowering cannot handle."""
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    bad: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type not in SUPPORTED_ONNX_OPS:
            bad.setdefault(node.op_type, []).append(node.name or node.output[0])
    if bad:
        listed = "; ".join(f"{op}: {', '.join(nodes)}" for op, nodes in sorted(bad.items()))
        raise ModelError(
            f"the int8 NPU quantizer cannot lower {len(bad)} operator(s): {listed}; "
            f"it supports: {', '.join(SUPPORTED_ONNX_OPS)}"
        )


def lower(
    onnx_bytes: bytes,
    ranges: dict[str, tuple[float, float]],
    *,
    input_shapes: dict[str, list[int]] | None = None,
) -> Lowered:
    """Quantize and lower the ONNX model (see module docstring).

    ``input_shapes`` pins inputs whose ONNX shape has symbolic dimensions.

    Raises:
        ModelError: an unsupported operator, attribute or layout, naming the node.
    """
    import onnx
    from onnx import numpy_helper

    check_operators(onnx_bytes)
    graph = onnx.load_from_string(onnx_bytes).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    g = _Lowering(tw.Model(), ranges, consts, consumers)
    for inp in graph.input:
        if inp.name not in consts:
            g.add_input(inp, (input_shapes or {}).get(inp.name))
    for node in graph.node:
        if node.name in g.fused:
            continue
        g.node(node)
    for out in graph.output:
        g.add_output(out.name)
    return Lowered(
        tflite_bytes=tw.serialize(g.m),
        layers=g.layers,
        input_qparams=g.input_qparams,
        output_qparams=g.output_qparams,
    )


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Lowering:
    def __init__(
        self,
        m: tw.Model,
        ranges: dict[str, tuple[float, float]],
        consts: dict[str, Array],
        consumers: dict[str, list[Any]],
    ) -> None:
        self.m = m
        self.ranges = ranges
        self.consts = consts
        self.consumers = consumers
        self.values: dict[str, _Value] = {}
        self.layers: list[LayerInfo] = []
        self.fused: set[str] = set()
        self.input_qparams: list[QParams] = []
        self.output_qparams: list[QParams] = []

    # ---------------------------------------------------------------- helpers

    def qp(self, name: str, node: str) -> QParams:
        if name not in self.ranges:
            raise ModelError(f"node {node!r}: no calibration range for tensor {name!r}")
        return activation_qparams(*self.ranges[name])

    def emit(
        self,
        code: int,
        inputs: list[int],
        outputs: list[int],
        options: tw.OptionsFn | None,
        *,
        onnx_node: str,
        macs: int = 0,
    ) -> None:
        self.m.op(code, inputs, outputs, options, name=onnx_node)
        op_name = next(k for k, v in vars(_OP).items() if v == code and not k.startswith("_"))
        out_name = self.m.tensors[outputs[0]].name
        self.layers.append(LayerInfo(len(self.layers), op_name, out_name, macs, onnx_node))

    def value(self, name: str, node: str) -> _Value:
        if name not in self.values:
            raise ModelError(f"node {node!r}: input {name!r} is not produced by a lowered node")
        return self.values[name]

    def fusable_activation(self, out_name: str) -> tuple[int, str]:
        """(fused activation, final output name) when a ReLU/Clip(0,6) is the only consumer."""
        users = self.consumers.get(out_name, [])
        if len(users) != 1:
            return _ACT.NONE, out_name
        user = users[0]
        act = self.activation_of(user)
        if act is None:
            return _ACT.NONE, out_name
        self.fused.add(user.name)
        return act, str(user.output[0])

    def activation_of(self, node: Any) -> int | None:
        if node.op_type == "Relu":
            return int(_ACT.RELU)
        if node.op_type == "Clip":
            lo, hi = self.clip_bounds(node)
            if lo == 0.0 and hi == 6.0:
                return int(_ACT.RELU6)
            if lo == 0.0 and hi == float("inf"):
                return int(_ACT.RELU)
        return None

    def clip_bounds(self, node: Any) -> tuple[float, float]:
        attrs = _attrs(node)
        lo = float(attrs.get("min", -np.inf))
        hi = float(attrs.get("max", np.inf))
        if len(node.input) > 1 and node.input[1]:
            lo = float(self.consts[node.input[1]])
        if len(node.input) > 2 and node.input[2]:
            hi = float(self.consts[node.input[2]])
        return lo, hi

    def padding(
        self, node: Any, in_hw: list[int], kernel: tuple[int, int], stride: tuple[int, int]
    ) -> int:
        attrs = _attrs(node)
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto == "SAME_UPPER":
            return int(tflite.Padding.SAME)
        if auto == "VALID" or not any(pads):
            return int(tflite.Padding.VALID)
        same = []
        for size, k, s in zip(in_hw, kernel, stride, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            same.append((total // 2, total - total // 2))
        same_pads = [same[0][0], same[1][0], same[0][1], same[1][1]]
        if same_pads == pads:
            return int(tflite.Padding.SAME)
        raise ModelError(
            f"node {node.name!r}: pads {pads} are neither VALID nor TFLite SAME "
            f"({same_pads}); the int8 lowering supports those two"
        )

    # ---------------------------------------------------------------- graph edges

    def add_input(self, inp: Any, pinned: list[int] | None) -> None:
        name = str(inp.name)
        shape = list(pinned or [d.dim_value for d in inp.type.tensor_type.shape.dim])
        if not all(d > 0 for d in shape):
            raise ModelError(f"input {name!r} has a dynamic shape {shape}; pin it (--input-shape)")
        q = self.qp(name, name)
        self.input_qparams.append(q)
        f = self.m.tensor(name, shape, "float32")
        self.m.inputs.append(f)
        qi = self.m.tensor(f"{name}/quantized", shape, "int8", q)
        self.emit(_OP.QUANTIZE, [f], [qi], None, onnx_node=name)
        if len(shape) != 4:
            self.values[name] = _Value(qi, shape, nhwc=False)
            return
        nhwc = [shape[0], shape[2], shape[3], shape[1]]
        t = self.m.tensor(f"{name}/nhwc", nhwc, "int8", q)
        if shape[1] == 1:
            self.emit(_OP.RESHAPE, [qi], [t], tw.reshape_options(nhwc), onnx_node=name)
        else:
            perm = self.m.const(f"{name}/perm", np.array([0, 2, 3, 1], np.int32))
            self.emit(_OP.TRANSPOSE, [qi, perm], [t], None, onnx_node=name)
        self.values[name] = _Value(t, nhwc, nhwc=True)

    def add_output(self, name: str) -> None:
        v = self.value(name, name)
        q = self.m.tensors[v.index].qparams
        assert q is not None
        self.output_qparams.append(q)
        src = v.index
        shape = v.shape
        if v.nhwc:
            nchw = [shape[0], shape[3], shape[1], shape[2]]
            perm = self.m.const(f"{name}/perm_out", np.array([0, 3, 1, 2], np.int32))
            src = self.m.tensor(f"{name}/nchw", nchw, "int8", q)
            self.emit(_OP.TRANSPOSE, [v.index, perm], [src], None, onnx_node=name)
            shape = nchw
        # The signature keeps the ONNX output name on the float tensor.
        self.m.tensors[v.index].name = f"{name}/int8"
        self.layers = [
            replace(layer, output=f"{name}/int8") if layer.output == name else layer
            for layer in self.layers
        ]
        out = self.m.tensor(name, shape, "float32")
        self.emit(_OP.DEQUANTIZE, [src], [out], None, onnx_node=name)
        self.m.outputs.append(out)

    # ---------------------------------------------------------------- nodes

    def node(self, node: Any) -> None:
        getattr(self, f"_op_{node.op_type}")(node)

    def _op_Conv(self, node: Any) -> None:  # noqa: N802
        attrs = _attrs(node)
        x = self.value(node.input[0], node.name)
        w = np.asarray(self.consts[node.input[1]], np.float32)  # OIHW
        cout, cin_g, kh, kw = w.shape
        group = int(attrs.get("group", 1))
        bias = (
            np.asarray(self.consts[node.input[2]], np.float32)
            if len(node.input) > 2 and node.input[2]
            else np.zeros(cout, np.float32)
        )
        if list(attrs.get("dilations", [1, 1])) != [1, 1]:
            raise ModelError(f"node {node.name!r}: dilated Conv is not supported by the lowering")
        stride = _pair(attrs.get("strides", [1, 1]))
        kernel = (kh, kw)
        cin = x.shape[3]
        depthwise = group > 1
        if depthwise and not (group == cin and cin_g == 1):
            raise ModelError(
                f"node {node.name!r}: grouped Conv with group={group} is neither a plain nor "
                "a depthwise convolution"
            )
        padding = self.padding(node, x.shape[1:3], kernel, stride)
        act, out_name = self.fusable_activation(node.output[0])
        q_out = self.qp(out_name, node.name)
        q_in = self.m.tensors[x.index].qparams
        assert q_in is not None
        if depthwise:
            w_t = w.transpose(1, 2, 3, 0)  # [1, kh, kw, cout]
            wq, wqp = quantize_weights(w_t, axis=3)
        else:
            w_t = w.transpose(0, 2, 3, 1)  # OHWI
            wq, wqp = quantize_weights(w_t, axis=0)
        bq, bqp = quantize_bias(bias, input_scale=q_in.scale[0], weight=wqp)
        wi = self.m.const(f"{node.name}/weights", wq, wqp)
        bi = self.m.const(f"{node.name}/bias", bq, bqp)
        oh, ow = _out_hw(x.shape[1:3], kernel, stride, padding)
        shape = [x.shape[0], oh, ow, cout]
        out = self.m.tensor(out_name, shape, "int8", q_out)
        macs = oh * ow * cout * kh * kw * (1 if depthwise else cin) * x.shape[0]
        options = tw.conv_options(
            stride=stride,
            padding=padding,
            activation=act,
            depth_multiplier=cout // cin if depthwise else None,
        )
        code = _OP.DEPTHWISE_CONV_2D if depthwise else _OP.CONV_2D
        self.emit(code, [x.index, wi, bi], [out], options, onnx_node=node.name, macs=macs)
        self.values[out_name] = _Value(out, shape, nhwc=True)

    def _op_Gemm(self, node: Any) -> None:  # noqa: N802
        attrs = _attrs(node)
        if float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0:
            raise ModelError(f"node {node.name!r}: Gemm with alpha/beta != 1 is not supported")
        if int(attrs.get("transA", 0)):
            raise ModelError(f"node {node.name!r}: Gemm with transA=1 is not supported")
        x = self.value(node.input[0], node.name)
        w = np.asarray(self.consts[node.input[1]], np.float32)
        if not int(attrs.get("transB", 0)):
            w = w.T
        w = np.ascontiguousarray(w)  # [out, in]
        if x.flat_from is not None:
            n, h, wd, c = x.flat_from
            # Columns are in NCHW flatten order; the int8 tensor is NHWC-flattened.
            w = w.reshape(w.shape[0], c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        cout = w.shape[0]
        bias = (
            np.asarray(self.consts[node.input[2]], np.float32).reshape(-1)
            if len(node.input) > 2 and node.input[2]
            else np.zeros(cout, np.float32)
        )
        if bias.size != cout:
            raise ModelError(f"node {node.name!r}: Gemm bias must have one value per output")
        act, out_name = self.fusable_activation(node.output[0])
        q_in = self.m.tensors[x.index].qparams
        assert q_in is not None
        wq, wqp = quantize_weights(w, axis=0)
        bq, bqp = quantize_bias(bias, input_scale=q_in.scale[0], weight=wqp)
        wi = self.m.const(f"{node.name}/weights", wq, wqp)
        bi = self.m.const(f"{node.name}/bias", bq, bqp)
        shape = [x.shape[0], cout]
        out = self.m.tensor(out_name, shape, "int8", self.qp(out_name, node.name))
        macs = x.shape[0] * cout * w.shape[1]
        self.emit(
            _OP.FULLY_CONNECTED,
            [x.index, wi, bi],
            [out],
            tw.fc_options(activation=act),
            onnx_node=node.name,
            macs=macs,
        )
        self.values[out_name] = _Value(out, shape, nhwc=False)

    def _pool(self, node: Any, code: int) -> None:
        attrs = _attrs(node)
        x = self.value(node.input[0], node.name)
        kernel = _pair(attrs["kernel_shape"])
        stride = _pair(attrs.get("strides", [1, 1]))
        if int(attrs.get("ceil_mode", 0)):
            raise ModelError(f"node {node.name!r}: ceil_mode pooling is not supported")
        padding = self.padding(node, x.shape[1:3], kernel, stride)
        oh, ow = _out_hw(x.shape[1:3], kernel, stride, padding)
        shape = [x.shape[0], oh, ow, x.shape[3]]
        # TFLite's int8 spec: both pools keep the input's scale and zero point.
        q = self.m.tensors[x.index].qparams
        out = self.m.tensor(node.output[0], shape, "int8", q)
        options = tw.pool_options(kernel=kernel, stride=stride, padding=padding)
        self.emit(code, [x.index], [out], options, onnx_node=node.name)
        self.values[node.output[0]] = _Value(out, shape, nhwc=True)

    def _op_MaxPool(self, node: Any) -> None:  # noqa: N802
        self._pool(node, _OP.MAX_POOL_2D)

    def _op_AveragePool(self, node: Any) -> None:  # noqa: N802
        self._pool(node, _OP.AVERAGE_POOL_2D)

    def _op_GlobalAveragePool(self, node: Any) -> None:  # noqa: N802
        x = self.value(node.input[0], node.name)
        axes = self.m.const(f"{node.name}/axes", np.array([1, 2], np.int32))
        shape = [x.shape[0], 1, 1, x.shape[3]]
        out = self.m.tensor(node.output[0], shape, "int8", self.qp(node.output[0], node.name))
        self.emit(_OP.MEAN, [x.index, axes], [out], tw.mean_options, onnx_node=node.name)
        self.values[node.output[0]] = _Value(out, shape, nhwc=True)

    def _flatten_to(self, node: Any, x: _Value, shape: list[int]) -> None:
        out = self.m.tensor(node.output[0], shape, "int8", self.m.tensors[x.index].qparams)
        self.emit(_OP.RESHAPE, [x.index], [out], tw.reshape_options(shape), onnx_node=node.name)
        spatial = x.nhwc and (x.shape[1] * x.shape[2] > 1 and x.shape[3] > 1)
        if spatial:
            users = self.consumers.get(node.output[0], [])
            if any(u.op_type != "Gemm" for u in users):
                raise ModelError(
                    f"node {node.name!r}: flattening a {x.shape} feature map is only supported "
                    "when Gemm consumes it"
                )
        self.values[node.output[0]] = _Value(
            out, shape, nhwc=False, flat_from=list(x.shape) if spatial else None
        )

    def _op_Flatten(self, node: Any) -> None:  # noqa: N802
        x = self.value(node.input[0], node.name)
        if int(_attrs(node).get("axis", 1)) != 1:
            raise ModelError(f"node {node.name!r}: Flatten is supported with axis=1 only")
        self._flatten_to(node, x, [x.shape[0], int(np.prod(x.shape[1:]))])

    def _op_Reshape(self, node: Any) -> None:  # noqa: N802
        x = self.value(node.input[0], node.name)
        target = [int(d) for d in self.consts[node.input[1]]]
        if len(target) != 2:
            raise ModelError(f"node {node.name!r}: Reshape is supported to 2-D [N, -1] only")
        self._flatten_to(node, x, [x.shape[0], int(np.prod(x.shape[1:]))])

    def _activation(self, node: Any, act: int | None) -> None:
        x = self.value(node.input[0], node.name)
        if act is None:
            raise ModelError(f"node {node.name!r}: only Clip(0, 6) and Clip(0, inf) are supported")
        code = _OP.RELU6 if act == _ACT.RELU6 else _OP.RELU
        out = self.m.tensor(node.output[0], x.shape, "int8", self.qp(node.output[0], node.name))
        self.emit(code, [x.index], [out], None, onnx_node=node.name)
        self.values[node.output[0]] = _Value(out, x.shape, x.nhwc, x.flat_from)

    def _op_Relu(self, node: Any) -> None:  # noqa: N802
        self._activation(node, int(_ACT.RELU))

    def _op_Clip(self, node: Any) -> None:  # noqa: N802
        self._activation(node, self.activation_of(node))

    def _op_Add(self, node: Any) -> None:  # noqa: N802
        operands = []
        for name in node.input[:2]:
            if name in self.consts:
                const = np.asarray(self.consts[name], np.float32)
                q = activation_qparams(float(const.min()), float(const.max()))
                operands.append(self.m.const(f"{node.name}/{name}", quantize_tensor(const, q), q))
            else:
                operands.append(self.value(name, node.name).index)
        ref = next(self.values[n] for n in node.input[:2] if n in self.values)
        act, out_name = self.fusable_activation(node.output[0])
        out = self.m.tensor(out_name, ref.shape, "int8", self.qp(out_name, node.name))
        options = tw.add_options(activation=act)
        self.emit(_OP.ADD, operands, [out], options, onnx_node=node.name)
        self.values[out_name] = _Value(out, ref.shape, ref.nhwc, ref.flat_from)

    def _softmax(self, node: Any, code: int, q: QParams) -> None:
        x = self.value(node.input[0], node.name)
        axis = int(_attrs(node).get("axis", -1))
        if x.nhwc or axis not in (-1, len(x.shape) - 1):
            raise ModelError(f"node {node.name!r}: softmax is supported on the last axis of 2-D")
        out = self.m.tensor(node.output[0], x.shape, "int8", q)
        options = tw.softmax_options if code == _OP.SOFTMAX else None
        self.emit(code, [x.index], [out], options, onnx_node=node.name)
        self.values[node.output[0]] = _Value(out, x.shape, nhwc=False)

    def _op_Softmax(self, node: Any) -> None:  # noqa: N802
        self._softmax(node, _OP.SOFTMAX, fixed_qparams(1.0 / 256.0, -128))

    def _op_LogSoftmax(self, node: Any) -> None:  # noqa: N802
        self._softmax(node, _OP.LOG_SOFTMAX, fixed_qparams(16.0 / 256.0, 127))


def _pair(values: Any) -> tuple[int, int]:
    items = [int(v) for v in values]
    if len(items) != 2:
        raise ModelError(f"expected 2-D kernel/stride values, got {items}")
    return items[0], items[1]


def _out_hw(
    in_hw: list[int], kernel: tuple[int, int], stride: tuple[int, int], padding: int
) -> tuple[int, int]:
    if padding == tflite.Padding.SAME:
        return (-(-in_hw[0] // stride[0]), -(-in_hw[1] // stride[1]))
    return (
        (in_hw[0] - kernel[0]) // stride[0] + 1,
        (in_hw[1] - kernel[1]) // stride[1] + 1,
    )
