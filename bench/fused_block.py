"""One MobileNetV2 inverted-residual block as one hand-scheduled TVM kernel, against ONNX Runtime.

A prototype, not in the compiler (docs/benchmarks.md, "Fusing a whole inverted-residual
block"): MobileNetV2's layers at 112x112 and 56x56 are bound by memory traffic, not by
multiply-adds (the 6x expanded activations, 1.8-4.8 MB each, go out to L3 and back between
the 1x1 expand, the 3x3 depthwise and the 1x1 projection). ONNX Runtime runs the three
convolutions as separate kernels, and Relax's ``FuseOps`` does not fuse one convolution into
another either. Here the block is one TIR function computed in strips of ``R`` output rows,
in parallel over strips, each strip's expanded and depthwise activations (its rows plus a
halo) living in the core's L2 (``strip_dims``: positions at a padded row pitch, so that every
stage is a register-blocked GEMM or a sum of shifted vectors along positions).

    python -m bench.fused_block                                   # the default shapes
    python -m bench.fused_block --shape 24,144,24,56 --config 8,4,4,2,4,4,4 --rounds 5

Shapes are ``C,M,Co,H`` (input, expanded and output channels, square side; stride 1, a
residual add when ``C == Co``). Configurations ``R,cre,ne,crd,nd,crp,np``: rows per strip,
then for the expand, depthwise and project stages the channels and vectors (of 16 fp32) of
each accumulator block. Printed: the TVM kernel (``time_evaluator``, inputs bound) and ORT's
``session.run`` on the same subgraph (Conv+Clip, depthwise Conv+Clip, Conv, Add) in the same
process, alternating rounds, their ratio, and the largest output difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

DEFAULT_SHAPES = ("16,96,16,112", "24,144,24,56", "32,192,32,28")
DEFAULT_CONFIGS = ("14,4,4,2,4,4,4", "7,4,4,2,4,4,4")
LANES = 16  # fp32 lanes of an AVX-512 register; LLVM splits them on narrower ISAs


def _relu6(x: Any) -> Any:
    from tvm import tirx

    return tirx.max(tirx.min(x, tirx.const(6.0, "float32")), tirx.const(0.0, "float32"))


def _round_up(x: int, k: int) -> int:
    return (x + k - 1) // k * k


def strip_dims(w: int, r: int, lanes: int = LANES) -> tuple[int, int, int]:
    """Row pitch, depthwise/project positions and expand positions of one strip of ``r`` rows.

    Inside a strip every activation is a [channels, positions] matrix, positions running
    along rows of pitch ``pitch`` >= ``w + 2`` (the image row, its zero-padding columns): the
    1x1 convolutions are then plain GEMMs over contiguous positions and each depthwise tap
    a constant offset (``kh * pitch + kw``), so every stage is vectorized along positions
    whatever the image width. Padding columns are computed and thrown away; both lengths
    are rounded up to whole accumulator blocks (4 vectors).
    """
    # pitch = 31 mod 32: the depthwise stage then reads exactly fd + 2 * pitch + 2 = fe
    # expand positions, whole accumulator blocks: a ragged region would put a predicate in
    # the vector loops (LLVM scalarizes them: 2x slower) and keep the elementwise stages from
    # being folded into the write-back of the stage before.
    pitch = w + 2 + (2 * lanes - 1 - (w + 2)) % (2 * lanes)
    fd = _round_up(r * pitch, 4 * lanes)
    fe = fd + 2 * pitch + 2
    return pitch, fd, fe


def edge_mask(h: int, w: int, r: int) -> np.ndarray:
    """1.0 where a strip's expand position is inside the image, 0.0 on the padding."""
    pitch, _, fe = strip_dims(w, r)
    f = np.arange(fe)
    rows = np.arange(h // r)[:, None] * r - 1 + f // pitch
    cols = f % pitch - 1
    return ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).astype("float32")


def block_func(c: int, m: int, co: int, h: int, w: int, r: int) -> Any:
    """The block in TE, strip by strip: expand 1x1 + ReLU6, depthwise 3x3 + ReLU6, 1x1 (+ x)."""
    from tvm import te, tirx

    strips = h // r
    pitch, fd, fe = strip_dims(w, r)
    x = te.placeholder((1, c, h, w), name="X")
    we, be = te.placeholder((m, c), name="We"), te.placeholder((m,), name="be")
    wd, bd = te.placeholder((m, 3, 3), name="Wd"), te.placeholder((m,), name="bd")
    wp, bp = te.placeholder((co, m), name="Wp"), te.placeholder((co,), name="bp")
    mask = te.placeholder((strips, fe), name="mask")
    zero = tirx.const(0.0, "float32")

    def padded_input(s: Any, k: Any, row: Any, col: Any) -> Any:
        i = s * r - 1 + row
        return tirx.if_then_else(
            te.all(i >= 0, i < h, col >= 1, col <= w),
            x[0, k, tirx.max(tirx.min(i, h - 1), 0), col - 1],
            zero,
        )

    # The strip's input rows (halo included) at the padded pitch: rows x pitch, so that the
    # expand stage reads it as contiguous positions (f // pitch, f % pitch flattens to f).
    xp = te.compute((strips, c, (fe + pitch - 1) // pitch, pitch), padded_input, name="Xp")
    rc = te.reduce_axis((0, c), name="c")
    e = te.compute(
        (strips, m, fe),
        lambda s, k, f: te.sum(we[k, rc] * xp[s, rc, f // pitch, f % pitch], axis=rc),
        name="E",
    )
    ep = te.compute(
        (strips, m, fe), lambda s, k, f: _relu6(e[s, k, f] + be[k]) * mask[s, f], name="Ep"
    )
    kh, kw = te.reduce_axis((0, 3), name="kh"), te.reduce_axis((0, 3), name="kw")
    d = te.compute(
        (strips, m, fd),
        lambda s, k, g: te.sum(wd[k, kh, kw] * ep[s, k, g + kh * pitch + kw], axis=[kh, kw]),
        name="D",
    )
    d1 = te.compute((strips, m, fd), lambda s, k, g: _relu6(d[s, k, g] + bd[k]), name="D1")
    rm = te.reduce_axis((0, m), name="r")
    p = te.compute(
        (strips, co, fd), lambda s, o, g: te.sum(wp[o, rm] * d1[s, rm, g], axis=rm), name="P"
    )
    # Whole strips (padding columns too) so that no stage is cut to a ragged region.
    q = te.compute((strips, co, fd), lambda s, o, g: p[s, o, g] + bp[o], name="Q")

    def output(n: Any, o: Any, i: Any, j: Any) -> Any:
        value = q[i // r, o, i % r * pitch + j]
        return value + x[n, o, i, j] if c == co else value

    out = te.compute((1, co, h, w), output, name="Out")
    return te.create_prim_func([x, we, be, wd, bd, wp, bp, mask, out])


def _gemm_stage(sch: Any, name: str, strip: Any, rows: int, vectors: int) -> None:
    """Stage ``name`` (strip, channel, position, reductions...) register-blocked.

    ``rows`` channels x ``vectors`` vectors of positions of accumulators in a local buffer
    (LLVM keeps it in registers once the loops are unrolled), the reduction outside them.
    """
    block = sch.get_sblock(name)
    sch.compute_at(block, strip)
    chan, pos, *red = sch.get_loops(block)[1:]
    chan_o, chan_i = sch.split(chan, [None, rows])
    pos_o, pos_m, pos_v = sch.split(pos, [None, vectors, LANES])
    sch.reorder(chan_o, pos_o, *red, chan_i, pos_m, pos_v)
    sch.unroll(chan_i)
    sch.unroll(pos_m)
    sch.vectorize(pos_v)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, pos_o)
    sch.decompose_reduction(block, red[0])
    _, inner = sch.split(sch.get_loops(acc)[-1], [None, LANES])
    sch.vectorize(inner)


def schedule(func: Any, config: list[int]) -> Any:
    """Strips in parallel, each computing all stages for its rows; ``config`` as in --config."""
    import tvm.s_tir as tir

    _, cre, ne, crd, nd, crp, np_ = config
    sch = tir.Schedule(func)
    out = sch.get_sblock("Out")
    n, co, h, w = sch.get_loops(out)
    sch.parallel(sch.fuse(n, co, h))
    if int(sch.get(w).extent) % 8 == 0:
        _, inner = sch.split(w, [None, 8])
        sch.vectorize(inner)
    strip, _, pos = sch.get_loops(sch.get_sblock("Q"))
    sch.parallel(strip)
    _, inner = sch.split(pos, [None, LANES])
    sch.vectorize(inner)
    # Consumers first: compute_at gives each producer the region its consumer reads. The
    # bias + ReLU6 (and edge mask) stages go into the write-back of the accumulators.
    _gemm_stage(sch, "P", strip, crp, np_)
    sch.compute_at(sch.get_sblock("D1"), strip)
    _gemm_stage(sch, "D", strip, crd, nd)
    sch.reverse_compute_inline(sch.get_sblock("D1"))
    sch.compute_at(sch.get_sblock("Ep"), strip)
    _gemm_stage(sch, "E", strip, cre, ne)
    sch.reverse_compute_inline(sch.get_sblock("Ep"))
    xp = sch.get_sblock("Xp")
    sch.compute_at(xp, strip)
    sch.vectorize(sch.get_loops(xp)[-1])
    return sch


def onnx_block(c: int, m: int, co: int, h: int, weights: list[np.ndarray]) -> Any:
    """The same block as an ONNX graph (what the exporter emits once BatchNorm is folded)."""
    from onnx import TensorProto, helper, numpy_helper

    we, be, wd, bd, wp, bp = weights
    consts = [
        (we.reshape(m, c, 1, 1), "We"),
        (be, "be"),
        (wd.reshape(m, 1, 3, 3), "Wd"),
        (bd, "bd"),
        (wp.reshape(co, m, 1, 1), "Wp"),
        (bp, "bp"),
        (np.array(0, "float32"), "lo"),
        (np.array(6, "float32"), "hi"),
    ]
    last = "p0" if c == co else "y"
    nodes = [
        helper.make_node("Conv", ["x", "We", "be"], ["e0"], kernel_shape=[1, 1]),
        helper.make_node("Clip", ["e0", "lo", "hi"], ["e1"]),
        helper.make_node(
            "Conv", ["e1", "Wd", "bd"], ["d0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=m
        ),
        helper.make_node("Clip", ["d0", "lo", "hi"], ["d1"]),
        helper.make_node("Conv", ["d1", "Wp", "bp"], [last], kernel_shape=[1, 1]),
    ]
    if c == co:
        nodes.append(helper.make_node("Add", ["p0", "x"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "inverted_residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, h])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, co, h, h])],
        [numpy_helper.from_array(a, n) for a, n in consts],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def parse_ints(text: str, count: int, what: str) -> list[int]:
    """``"a,b,c"`` as ``count`` positive integers; ValueError naming the value otherwise."""
    parts = text.split(",")
    if len(parts) != count or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        example = DEFAULT_SHAPES[0] if what == "--shape" else DEFAULT_CONFIGS[0]
        raise ValueError(
            f"{what} {text!r}: expected {count} positive integers separated by commas, "
            f"e.g. {example}"
        )
    return [int(p) for p in parts]


def run_shape(
    shape: list[int], configs: list[list[int]], *, threads: int, rounds: int, repeat: int
) -> list[dict[str, Any]]:
    import onnxruntime as ort
    import tvm

    c, m, co, h = shape
    rng = np.random.default_rng(0)
    weights = [
        (rng.standard_normal(s) * scale).astype("float32")
        for s, scale in (
            ((m, c), 0.2),
            ((m,), 0.5),
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
        onnx_block(c, m, co, h, weights).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    expected = session.run(None, {"x": x})[0]
    target = tvm.target.Target({"kind": "llvm", "mcpu": _host_mcpu(), "num-cores": threads})
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x, *weights)]
    args.append(tvm.runtime.tensor(np.zeros((1, co, h, h), "float32"), dev))
    results = []
    for config in configs:
        r, cre, ne, crd, nd, crp, np_ = config
        label = ",".join(map(str, config))
        if (
            h % r
            or m % cre
            or m % crd
            or co % crp
            or any(v not in (1, 2, 4) for v in (ne, nd, np_))
        ):
            print(
                f"  skip {label}: R, cre, crd, crp must divide H, M, M, Co of {shape}; "
                "ne, nd, np must be 1, 2 or 4"
            )
            continue
        lib = tvm.compile(schedule(block_func(c, m, co, h, h, r), config).mod, target=target)
        mask = tvm.runtime.tensor(edge_mask(h, h, r), dev)
        call_args = [*args[:-1], mask, args[-1]]
        lib["main"](*call_args)
        err = float(np.abs(args[-1].numpy() - expected).max())
        # Two blocks per round, the first discarded: each runtime's worker threads spin for
        # a while after its last call and would steal the other's first calls' CPU time.
        timer = lib.mod.time_evaluator("main", dev, number=repeat, repeat=2)
        tvm_us, ort_us = [], []
        for _ in range(rounds):
            tvm_us.append(float(timer(*call_args).results[-1]) * 1e6)
            ts = []
            for _ in range(repeat // 2):
                session.run(None, {"x": x})
            for _ in range(repeat):
                start = time.perf_counter()
                session.run(None, {"x": x})
                ts.append(time.perf_counter() - start)
            ort_us.append(statistics.median(ts) * 1e6)
        ratios = [t / o for t, o in zip(tvm_us, ort_us, strict=True)]
        row = {
            "shape": shape,
            "config": config,
            "tvm_us": statistics.median(tvm_us),
            "ort_us": statistics.median(ort_us),
            "ratio": statistics.median(ratios),
            "max_abs_err": err,
        }
        print(
            f"  R,cre,ne,crd,nd,crp,np={label}: "
            f"TVM {row['tvm_us']:.0f} us, ORT {row['ort_us']:.0f} us, "
            f"TVM/ORT {row['ratio']:.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f}), "
            f"max abs err {err:.1e}",
            flush=True,
        )
        results.append(row)
    return results


def _host_mcpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="C,M,Co,H (repeatable)")
    parser.add_argument("--config", action="append", help="R,cre,ne,crd,nd,crp,np (repeatable)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=100)
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    try:
        shapes = [parse_ints(s, 4, "--shape") for s in args.shape or DEFAULT_SHAPES]
        configs = [parse_ints(s, 7, "--config") for s in args.config or DEFAULT_CONFIGS]
    except ValueError as err:
        parser.error(str(err))  # exit 2
    for shape in shapes:
        c, m, co, h = shape
        print(f"{c}->{m}->{co} at {h}x{h}, stride 1, {args.threads} threads:", flush=True)
        run_shape(shape, configs, threads=args.threads, rounds=args.rounds, repeat=args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
