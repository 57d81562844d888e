"""One convolution layer: the compiler's direct and Winograd kernels against ONNX Runtime.

``compiler.tvm_fusion`` computes a 3x3 (or 1x1) convolution + bias + ReLU with a direct
kernel vectorized along output channels (``pointwise_func``, stride 1 or 2) and a 3x3
stride-1 one by Winograd F(4x4, 3x3) tiles (``winograd_func``) where
``fusion_plan.plan_winograd`` says it pays; ``edgeloop compile`` uses them by default on
AVX-512 x86-64. This bench times each kernel alone against ORT's ``session.run`` on the
same Conv + Relu graph in the same process, in alternating rounds, and compares outputs.

    python -m bench.conv_kernels                                  # ResNet-18's layers
    python -m bench.conv_kernels --shape 64,64,56 --shape 128,256,28,2 --group 0

Shapes are ``C,Co,H[,S[,K]]``: input and output channels, square input side, stride (1
unless given) and kernel side (3 unless given). Winograd runs where its plan takes the
shape, or on any 3x3 stride-1 shape with ``--winograd`` (the planned configuration with
its weight limit lifted); ``--group N`` sets its tiles per group (0: stage by stage).
Results: docs/benchmarks.md, "Winograd, blocked weights, stride-2 convolutions, max pool".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import replace
from typing import Any

import numpy as np

from bench.fused_block import alternate_with_ort, host_target, host_unit, unit_option
from compiler.execution import detect_host
from compiler.fusion_plan import (
    VECTOR_UNITS,
    DepthwiseShape,
    PointwiseShape,
    VectorUnit,
    WinogradConfig,
    amx_weights,
    blocked_weights,
    has_amx,
    paired_bf16_weights,
    plan_depthwise,
    plan_pointwise,
    plan_pointwise_amx,
    plan_pointwise_bf16,
    plan_winograd,
    winograd_weights,
)

# ResNet-18's stride-1 3x3 layers, one stride-2 one and a stride-2 shortcut.
DEFAULT_SHAPES = ("64,64,56", "128,128,28", "256,256,14", "512,512,7", "64,128,56,2")


def parse_shape(text: str) -> list[int]:
    """``C,Co,H[,S[,K]]`` as [C, Co, H, S, K]; ValueError naming the value otherwise."""
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not 3 <= len(values) <= 5 or min(values) < 1:
        raise ValueError(f"--shape {text!r}: expected 3 to 5 positive integers C,Co,H[,S[,K]]")
    c, co, h, *rest = values
    stride, kernel = (rest + [1, 3][len(rest) :])[:2]
    if stride not in (1, 2) or kernel not in (1, 3):
        raise ValueError(f"--shape {text!r}: the stride must be 1 or 2 and the kernel 1 or 3")
    return [c, co, h, stride, kernel]


def onnx_conv(
    shape: PointwiseShape, weight: np.ndarray, bias: np.ndarray, *, group: int = 1
) -> Any:
    """Conv (padding kernel // 2, ``group`` groups) + Relu as an ONNX model."""
    from onnx import TensorProto, helper, numpy_helper

    k, pad = shape.kernel, shape.kernel // 2
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "W", "B"],
            ["y0"],
            kernel_shape=[k, k],
            pads=[pad] * 4,
            strides=[shape.stride] * 2,
            group=group,
        ),
        helper.make_node("Relu", ["y0"], ["y"]),
    ]
    x_info = [1, shape.in_channels, shape.height, shape.width]
    y_info = [1, shape.out_channels, shape.out_height, shape.out_width]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_info)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_info)],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _kernels(
    shape: PointwiseShape,
    weight: np.ndarray,
    *,
    winograd: bool,
    group: int | None,
    unit: VectorUnit,
    bf16: frozenset[str] = frozenset(),
    depthwise: bool = False,
) -> list[tuple[str, Any, np.ndarray]]:
    """(label, scheduled PrimFunc, weight argument) for each kernel that takes ``shape``;
    ``bf16``: the host's features, for the bf16 kernels it can run ("avx512_bf16": the
    vdpbf16ps kernel, "amx_bf16": the AMX one); ``depthwise``: ``shape`` as a depthwise
    convolution (one group per channel), the depthwise kernel."""
    from compiler.tvm_depthwise import depthwise_func
    from compiler.tvm_fusion import pointwise_func, winograd_func

    c, co = shape.in_channels, shape.out_channels
    kernels = []
    if depthwise:
        dw_shape = DepthwiseShape(c, shape.height, shape.width, shape.stride, shape.activation)
        dw = plan_depthwise(dw_shape, unit=unit)
        if dw is not None:
            label = f"depthwise ({dw.rows} rows x {dw.columns} columns per block)"
            kernels.append((label, depthwise_func(dw_shape, dw), weight.reshape(c, 3, 3)))
        return kernels
    flat = weight.reshape(co, c * shape.kernel * shape.kernel)
    pairs = plan_pointwise_bf16(shape) if "avx512_bf16" in bf16 else None
    if pairs is not None:
        from compiler.tvm_bf16 import pointwise_bf16_func

        label = f"bf16 vdpbf16ps ({pairs.positions} positions x {pairs.vectors} vectors)"
        weights = paired_bf16_weights(flat, pairs.vectors)
        kernels.append((label, pointwise_bf16_func(shape, pairs), weights))
    amx = plan_pointwise_amx(shape) if has_amx("x86_64", sorted(bf16)) else None
    if amx is not None:
        from compiler.tvm_amx import pointwise_amx_func

        label = f"bf16 AMX (runs of {amx.columns}, {amx.positions} positions per job)"
        kernels.append((label, pointwise_amx_func(shape), amx_weights(flat, amx)))
    direct = plan_pointwise(shape, unit=unit)
    if direct is not None:
        taps = np.moveaxis(weight.reshape(co, c, -1), 0, -1)
        blocked = blocked_weights(taps, direct.vectors)
        blocked = blocked.reshape(blocked.shape[0], c, *((3, 3) if shape.kernel == 3 else ()), -1)
        label = f"direct ({direct.positions} positions x {direct.vectors} vectors)"
        kernels.append((label, pointwise_func(shape, direct), blocked))
    config: WinogradConfig | None = plan_winograd(shape, unit=unit)
    if config is None and winograd:
        config = plan_winograd(shape, unit=unit, max_weight_bytes=1 << 62)
    if config is not None:
        if group is not None:
            rows, cols = config.tiles(shape.height, shape.width)
            if group and ((rows * cols) % group or group % config.positions):
                raise ValueError(
                    f"--group {group}: {shape.describe()} has {rows * cols} tiles in blocks of "
                    f"{config.positions}; a group must be a multiple of {config.positions} "
                    f"that divides {rows * cols}, or 0"
                )
            config = replace(config, group=group)
        transformed = blocked_weights(winograd_weights(weight, config.tile), config.vectors)
        label = f"Winograd F({config.tile}x{config.tile}, 3x3), groups of {config.group} tiles"
        kernels.append((label, winograd_func(shape, config), transformed))
    return kernels


def run_shape(
    values: list[int],
    *,
    threads: int,
    rounds: int,
    repeat: int,
    winograd: bool = False,
    group: int | None = None,
    unit: VectorUnit | None = None,
    bf16: bool = False,
    depthwise: bool = False,
) -> list[dict[str, Any]]:
    """Time and check each kernel that takes the shape against ORT, planned for ``unit``
    (default: this CPU's, ``host_unit``), with ``bf16`` also the bf16 kernels this CPU can
    run, with ``depthwise`` the shape as a depthwise convolution (C == Co, 3x3); one row
    per kernel."""
    import onnxruntime as ort
    import tvm

    c, co, h, stride, kernel = values
    shape = PointwiseShape(c, co, h, h, activation="relu", kernel=kernel, stride=stride)
    groups = c if depthwise else 1
    rng = np.random.default_rng(0)
    fan_in = kernel**2 * c // groups
    weight = (rng.standard_normal((co, c // groups, kernel, kernel)) * (2 / fan_in) ** 0.5).astype(
        "float32"
    )
    bias = (rng.standard_normal(co) * 0.1).astype("float32")
    x = rng.standard_normal((1, c, h, h)).astype("float32")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        onnx_conv(shape, weight, bias, group=groups).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    expected = session.run(None, {"x": x})[0]
    target = tvm.target.Target(host_target(threads))
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(expected.shape, "float32"), dev)
    macs = c * co // groups * shape.out_height * shape.out_width * kernel * kernel
    features = detect_host().cpu_features if bf16 else frozenset()
    kernels = _kernels(
        shape,
        weight,
        winograd=winograd,
        group=group,
        unit=unit or host_unit(),
        bf16=features,
        depthwise=depthwise,
    )
    if not kernels:
        print(f"  no kernel of the compiler takes {shape.describe()}")
    results = []
    for label, func, weight_arg in kernels:
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
        args = [tvm.runtime.tensor(a, dev) for a in (x, weight_arg, bias)] + [out]
        lib["main"](*args)
        got = out.numpy()
        rel_err = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-30))
        timer = lib.mod.time_evaluator("main", dev, number=repeat, repeat=2)
        tvm_us, ort_us = alternate_with_ort(timer, args, session, {"x": x}, rounds, repeat)
        ratios = [t / o for t, o in zip(tvm_us, ort_us, strict=True)]
        row = {
            "shape": values,
            "kernel": label,
            "tvm_us": statistics.median(tvm_us),
            "ort_us": statistics.median(ort_us),
            "ratio": statistics.median(ratios),
            "gmacs": macs / statistics.median(tvm_us) / 1e3,
            "rel_err": rel_err,
        }
        print(
            f"  {label}: TVM {row['tvm_us']:.0f} us ({row['gmacs']:.0f} GMAC/s of direct "
            f"multiply-adds), ORT {row['ort_us']:.0f} us, TVM/ORT {row['ratio']:.2f} "
            f"(rounds {min(ratios):.2f}-{max(ratios):.2f}), relative error {rel_err:.1e}",
            flush=True,
        )
        results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="C,Co,H[,S[,K]] (repeatable)")
    parser.add_argument("--winograd", action="store_true", help="Winograd on any 3x3 stride 1")
    parser.add_argument("--group", type=int, help="Winograd tiles per group (0: stage by stage)")
    unit_option(parser)
    parser.add_argument(
        "--bf16", action="store_true", help="also the bf16 kernels (vdpbf16ps, AMX) this CPU runs"
    )
    parser.add_argument(
        "--depthwise",
        action="store_true",
        help="the shapes as depthwise convolutions (C == Co, 3x3): the depthwise kernel",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    try:
        shapes = [parse_shape(s) for s in args.shape or DEFAULT_SHAPES]
    except ValueError as err:
        parser.error(str(err))  # exit 2
    if args.group is not None and args.group < 0:
        parser.error(f"--group {args.group}: expected 0 or a positive number of tiles")
    for values in shapes:
        c, co, h, stride, kernel = values
        described = PointwiseShape(c, co, h, h, "relu", kernel=kernel, stride=stride).describe()
        if args.depthwise:
            if c != co or kernel != 3:
                parser.error(
                    f"--depthwise --shape {','.join(map(str, values))}: a depthwise convolution "
                    "needs C == Co and a 3x3 kernel"
                )
            described = DepthwiseShape(c, h, h, stride, "relu").describe()
        print(f"{described}, {args.threads} threads:", flush=True)
        try:
            run_shape(
                values,
                threads=args.threads,
                rounds=args.rounds,
                repeat=args.repeat,
                winograd=args.winograd,
                group=args.group,
                unit=VECTOR_UNITS[args.unit] if args.unit else None,
                bf16=args.bf16,
                depthwise=args.depthwise,
            )
        except ValueError as err:
            parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
