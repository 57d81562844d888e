"""One MobileNetV2 inverted-residual block: the compiler's fused kernel against ONNX Runtime.

``compiler.tvm_fusion`` computes a block (1x1 expand + ReLU6, 3x3 depthwise + ReLU6 of
stride 1 or 2, 1x1 project, residual add) as one hand-scheduled TIR kernel in strips of
rows kept in L2 (``compiler.fusion_plan``); ``edgeloop compile`` uses it by default on
AVX-512 x86-64. This bench times that kernel alone, for the configuration the compiler
plans and for others, against ORT's ``session.run`` on the same subgraph (Conv+Clip,
depthwise Conv+Clip, Conv, Add) in the same process, in alternating rounds, and compares
the outputs.

    python -m bench.fused_block                                   # the default shapes
    python -m bench.fused_block --shape 24,144,24,56 --config plan --config 8,4,2,4

Shapes are ``C,M,Co,H[,S]`` (input, expanded and output channels, square input side, the
depthwise stride, 1 unless given); M ``-`` for a block without an expand stage (expansion
1, MobileNetV2's first block: ``32,-,16,112``). Configurations are ``plan``
(``fusion_plan.plan_block``) or ``R,cre,crd,crp``: output rows per strip and the channels
of each accumulator block of the expand, depthwise and project stages, and optionally V, the
vectors of 16 positions of each (default 4; at stride 2 at most what the plane's pitch
allows, ``fusion_plan.strided_vectors``). Results: docs/benchmarks.md, "Fused
inverted-residual blocks".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

from compiler.fusion_plan import (
    VECTOR_UNITS,
    BlockConfig,
    BlockShape,
    VectorUnit,
    block_mask,
    plan_block,
    strided_vectors,
)

DEFAULT_SHAPES = (
    "32,-,16,112",
    "16,96,16,112",
    "24,144,24,56",
    "32,192,32,28",
    "16,96,24,112,2",
    "24,144,32,56,2",
)
DEFAULT_CONFIGS = ("plan", "7,4,2,4")


def onnx_block(c: int, m: int, co: int, h: int, weights: list[np.ndarray], stride: int = 1) -> Any:
    """The same block as an ONNX graph (what the exporter emits once BatchNorm is folded).

    ``weights``: We, be, Wd, bd, Wp, bp, or without expansion Wd, bd, Wp, bp.
    """
    from onnx import TensorProto, helper, numpy_helper

    *expand, wd, bd, wp, bp = weights
    consts = [
        *([(expand[0].reshape(m, c, 1, 1), "We"), (expand[1], "be")] if expand else []),
        (wd.reshape(m, 1, 3, 3), "Wd"),
        (bd, "bd"),
        (wp.reshape(co, m, 1, 1), "Wp"),
        (bp, "bp"),
        (np.array(0, "float32"), "lo"),
        (np.array(6, "float32"), "hi"),
    ]
    residual = stride == 1 and c == co
    last = "p0" if residual else "y"
    nodes = [
        helper.make_node("Conv", ["x", "We", "be"], ["e0"], kernel_shape=[1, 1]),
        helper.make_node("Clip", ["e0", "lo", "hi"], ["e1"]),
    ]
    if not expand:
        nodes = []
    nodes += [
        helper.make_node(
            "Conv",
            ["e1" if expand else "x", "Wd", "bd"],
            ["d0"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[stride, stride],
            group=m,
        ),
        helper.make_node("Clip", ["d0", "lo", "hi"], ["d1"]),
        helper.make_node("Conv", ["d1", "Wp", "bp"], [last], kernel_shape=[1, 1]),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["p0", "x"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "inverted_residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, h])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, co, h // stride, h // stride])],
        [numpy_helper.from_array(a, n) for a, n in consts],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def parse_ints(text: str, count: int, what: str) -> list[int]:
    """``"a,b,c"`` as ``count`` positive integers; ValueError naming the value otherwise."""
    parts = text.split(",")
    if len(parts) != count or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        example = DEFAULT_SHAPES[0] if what == "--shape" else DEFAULT_CONFIGS[1]
        raise ValueError(
            f"{what} {text!r}: expected {count} positive integers separated by commas, "
            f"e.g. {example}"
        )
    return [int(p) for p in parts]


def parse_shape(text: str) -> list[int]:
    """``C,M,Co,H`` or ``C,M,Co,H,S`` as [C, M, Co, H, S]; ValueError naming the value.

    M ``-``: no expand stage (expansion 1), returned as M = 0.
    """
    parts = text.split(",")
    no_expand = len(parts) > 1 and parts[1] == "-"
    if no_expand:
        parts[1] = parts[0]
    fields = parse_ints(",".join(parts), 5 if text.count(",") == 4 else 4, "--shape")
    if len(fields) == 4:
        fields.append(1)
    if fields[4] not in (1, 2) or (fields[4] == 2 and fields[3] % 2):
        raise ValueError(f"--shape {text!r}: the stride must be 1 or 2, and 2 needs an even side H")
    if no_expand:
        fields[1] = 0
    return fields


def parse_config(text: str) -> BlockConfig | None:
    """``plan`` (None: the compiler's choice) or ``R,cre,crd,crp[,V]``."""
    if text == "plan":
        return None
    if text.count(",") == 4:
        rows, expand, depthwise, project, vectors = parse_ints(text, 5, "--config")
        return BlockConfig(rows, expand, depthwise, project, vectors)
    rows, expand, depthwise, project = parse_ints(text, 4, "--config")
    return BlockConfig(rows, expand, depthwise, project)


def run_shape(
    shape: list[int],
    configs: list[BlockConfig | None],
    *,
    threads: int,
    rounds: int,
    repeat: int,
    unit: VectorUnit | None = None,
) -> list[dict[str, Any]]:
    """Time and check the kernel for each config (None: ``plan_block``'s for ``unit``, by
    default this CPU's, ``host_unit``) on ``shape``."""
    import onnxruntime as ort
    import tvm

    from compiler.tvm_fusion import scheduled_block

    c, m, co, h, stride = shape
    expand = m != 0
    m = m or c
    block = BlockShape(c, m, co, h, h, stride, expand=expand)
    ho = block.out_height
    rng = np.random.default_rng(0)
    weights = [
        (rng.standard_normal(s) * scale).astype("float32")
        for s, scale in (
            *((((m, c), 0.2), ((m,), 0.5)) if expand else ()),
            ((m, 3, 3), 0.3),
            ((m,), 0.5),
            ((co, m), 0.1),
            ((co,), 0.5),
        )
    ]
    x = rng.standard_normal((1, c, h, h)).astype("float32")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        onnx_block(c, m, co, h, weights, stride).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    expected = session.run(None, {"x": x})[0]
    target = tvm.target.Target(host_target(threads))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x, *weights)]
    out = tvm.runtime.tensor(np.zeros((1, co, ho, ho), "float32"), dev)
    results = []
    for requested in configs:
        config = requested or plan_block(block, unit=unit or host_unit())
        label = "plan" if requested is None else ""
        if config is None:
            print(f"  plan: the compiler does not fuse {block.describe()}")
            continue
        if requested is not None and stride == 2:
            vectors = min(config.vectors, strided_vectors(block.out_width))
            config = replace(config, vectors=vectors)
        label += (" " if label else "") + (
            f"R={config.rows} cre={config.expand_channels} crd={config.depthwise_channels} "
            f"crp={config.project_channels} V={config.vectors}"
        )
        if (
            ho % config.rows
            or m % config.expand_channels
            or m % config.depthwise_channels
            or co % config.project_channels
        ):
            print(f"  skip {label}: R, cre, crd, crp must divide H/S, M, M, Co of {shape}")
            continue
        func = scheduled_block(block, config).with_attr("global_symbol", "main")
        lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
        masks = [tvm.runtime.tensor(block_mask(block, config), dev)] if expand else []
        call_args = [*args, *masks, out]
        lib["main"](*call_args)
        err = float(np.abs(out.numpy() - expected).max())
        # Two blocks per round, the first discarded: each runtime's worker threads spin for
        # a while after its last call and would steal the other's first calls' CPU time.
        timer = lib.mod.time_evaluator("main", dev, number=repeat, repeat=2)
        tvm_us, ort_us = alternate_with_ort(timer, call_args, session, {"x": x}, rounds, repeat)
        ratios = [t / o for t, o in zip(tvm_us, ort_us, strict=True)]
        row = {
            "shape": shape,
            "config": [
                config.rows,
                config.expand_channels,
                config.depthwise_channels,
                config.project_channels,
                config.vectors,
            ],
            "tvm_us": statistics.median(tvm_us),
            "ort_us": statistics.median(ort_us),
            "ratio": statistics.median(ratios),
            "max_abs_err": err,
        }
        print(
            f"  {label}: TVM {row['tvm_us']:.0f} us, ORT {row['ort_us']:.0f} us, "
            f"TVM/ORT {row['ratio']:.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f}), "
            f"max abs err {err:.1e}",
            flush=True,
        )
        results.append(row)
    return results


def alternate_with_ort(
    timer: Any, args: list[Any], session: Any, feed: dict[str, Any], rounds: int, repeat: int
) -> tuple[list[float], list[float]]:
    """``rounds`` rounds of the TVM ``timer`` (its last of 2 blocks of ``repeat`` calls)
    then ``repeat`` ORT calls (after ``repeat // 2`` untimed ones: TVM's worker threads
    spin for a while after its last call); the per-round medians in us, (TVM, ORT)."""
    tvm_us, ort_us = [], []
    for _ in range(rounds):
        tvm_us.append(float(timer(*args).results[-1]) * 1e6)
        for _ in range(repeat // 2):
            session.run(None, feed)
        ts = []
        for _ in range(repeat):
            start = time.perf_counter()
            session.run(None, feed)
            ts.append(time.perf_counter() - start)
        ort_us.append(statistics.median(ts) * 1e6)
    return tvm_us, ort_us


def host_unit() -> VectorUnit:
    """This CPU's vector unit as the compiler sizes its kernels for it (AVX2's if none)."""
    from compiler.execution import detect_host
    from compiler.fusion_plan import AVX2, vector_unit

    host = detect_host()
    return vector_unit(host.isa, sorted(host.cpu_features)) or AVX2


def unit_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unit",
        choices=sorted(VECTOR_UNITS),
        help="vector unit the planned configurations are sized for (default: this CPU's)",
    )


def host_mcpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


# /proc/cpuinfo flags of the instructions the bf16 kernels use, as LLVM spells the features.
# A VM may mask the CPU model while CPUID still lists its features: an AMX Xeon reported as
# model 167, which LLVM names rocketlake (no BF16, no AMX), failed "LLVM ERROR: Do not know
# how to split this operator's operand!" on the bf16 kernels with only the name.
_LLVM_FEATURES = {"avx512_bf16": "+avx512bf16", "amx_tile": "+amx-tile", "amx_bf16": "+amx-bf16"}
# ... and the other way: a VM may hide features of the CPU it names. A Zen 4 VM without
# AVX-512 (family 25 model 17, which LLVM names znver4) ran the benches' kernels into
# "Illegal instruction"; each vector ISA level the flags lack is turned off.
_LLVM_ABSENT = {"avx2": "-avx2", "fma": "-fma", "avx512f": "-avx512f"}


def host_target(threads: int) -> dict[str, Any]:
    """A TVM target dict for this CPU: LLVM's name for it, plus the features of
    ``_LLVM_FEATURES`` the host lists and minus the vector ISA levels of ``_LLVM_ABSENT`` it
    does not (``compiler.execution.detect_host``)."""
    from compiler.execution import detect_host

    features = detect_host().cpu_features
    target: dict[str, Any] = {"kind": "llvm", "mcpu": host_mcpu(), "num-cores": threads}
    mattr = [attr for flag, attr in _LLVM_FEATURES.items() if flag in features]
    mattr += [attr for flag, attr in _LLVM_ABSENT.items() if flag not in features]
    if mattr:
        target["mattr"] = mattr
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="C,M,Co,H[,S] (repeatable)")
    parser.add_argument("--config", action="append", help="plan or R,cre,crd,crp[,V] (repeatable)")
    unit_option(parser)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=100)
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    try:
        shapes = [parse_shape(s) for s in args.shape or DEFAULT_SHAPES]
        configs = [parse_config(s) for s in args.config or DEFAULT_CONFIGS]
    except ValueError as err:
        parser.error(str(err))  # exit 2
    for shape in shapes:
        c, m, co, h, stride = shape
        block = BlockShape(c, m or c, co, h, h, stride, expand=m != 0)
        print(f"{block.describe()}, {args.threads} threads:", flush=True)
        run_shape(
            shape,
            configs,
            threads=args.threads,
            rounds=args.rounds,
            repeat=args.repeat,
            unit=VECTOR_UNITS[args.unit] if args.unit else None,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
