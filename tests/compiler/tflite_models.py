"""Small float .tflite models for tests, written by ``compiler.npu.tflite_writer``.

TensorFlow is not needed: a model is a list of tensors (constant ones carry their data) and
a list of operators, serialized by the same flatbuffers writer the NPU path uses (schema
version 3, identifier ``TFL3``). Weights come from a seeded RNG so every run builds the
same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import tflite

from compiler.npu import tflite_writer as tw

_NONE = tflite.ActivationFunctionType.NONE


class GraphBuilder(tw.Model):
    """One-subgraph float TFLite model under construction (``tensors``, ``operators``, ...)."""

    def serialize(self) -> bytes:
        """The .tflite flatbuffer."""
        return tw.serialize(self, description="edgeloop test model")

    def save(self, path: Path) -> Path:
        """Write the model to ``path``; returns it."""
        path.write_bytes(self.serialize())
        return path


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
    g.op(op.FULLY_CONNECTED, [x, w1, b1], [h], tw.fc_options(activation=_NONE))
    g.op(op.RELU, [h], [r])
    g.op(op.FULLY_CONNECTED, [r, w2, b2], [logits], tw.fc_options(activation=_NONE))
    g.op(op.ADD, [logits, shift], [shifted], tw.add_options(activation=_NONE))
    g.op(op.SOFTMAX, [shifted], [probs], tw.softmax_options)
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
    relu = tflite.ActivationFunctionType.RELU
    conv_opts = tw.conv_options(stride=(1, 1), padding=tflite.Padding.SAME, activation=relu)
    pool_opts = tw.pool_options(kernel=(2, 2), stride=(2, 2), padding=tflite.Padding.VALID)
    g.op(op.CONV_2D, [x, w, bias], [c], conv_opts)
    g.op(op.AVERAGE_POOL_2D, [c], [p], pool_opts)
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
    g.op(op.FULLY_CONNECTED, [x, w, -1], [h], tw.fc_options(activation=_NONE))
    g.op(code, [h], [out], custom_code=custom_code)
    g.inputs, g.outputs = [x], [out]
    return g


def dynamic_batch(seed: int = 0) -> GraphBuilder:
    """The MLP with its batch dimension declared dynamic (shape_signature [-1, 16])."""
    g = mlp(seed)
    g.tensors[g.inputs[0]].shape_signature = [-1, 16]
    return g
