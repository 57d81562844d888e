"""Inverted-residual blocks on maps of up to 28x28 as one kernel, their expanded channels
split over the cores (``fusion_plan.plan_split_block``; ``tvm_fusion.fuse_inverted_residuals``
puts it in a model ahead of the strip kernel).

Written in TVMScript like ``tvm_depthwise``: every stage is vectorized along channels
(channels-last buffers of the job's own), which te's compute + schedule form would express
as four functions with transposes between them.
"""

# TVMScript's buffer annotations are TVM IR, not Python types; its decorator is untyped.
# mypy: disable-error-code="valid-type,untyped-decorator,misc"

from __future__ import annotations

from typing import Any

from compiler.fusion_plan import LANES, BlockShape, SplitBlockConfig
from compiler.tvm_bf16 import activate
from compiler.tvm_tiles import gemm_tile


def split_block_func(shape: BlockShape, config: SplitBlockConfig) -> Any:
    """An inverted-residual block (1x1 expansion + bias + ReLU6, 3x3 depthwise of stride 1
    or 2 + bias + ReLU6, 1x1 projection + bias [+ the input, where the block has a
    residual]), scheduled; the PrimFunc.

    Arguments: X (1, C, H, W); the expansion's weight in blocks of its accumulator block's
    channels (``fusion_plan.blocked_weights``: (M / Be, C, Be), Be = ``expand_vectors`` x
    16) and bias (M,); the depthwise weight channels-last (3, 3, M) and bias (M,); the
    projection's weight in blocks ((Co / Bp, M, Bp)) and bias (Co,); output (1, Co, Ho, Wo).

    Job g of ``config.groups`` (one per core, in parallel) takes expanded channels
    [g M / G, (g + 1) M / G): their expansion at every position into a channels-last map
    with a zero border (the depthwise convolution's padding), the depthwise convolution
    into a channels-last buffer (16 channels a vector, the 9 taps' weights the same for
    every position), and the projection of those channels alone (``positions`` x
    ``vectors`` of 16 output channels of accumulators, positions broadcast) into its part
    of the sum. Then, parallel over blocks of 16 output channels, the NCHW output is the
    bias [+ the input] plus every part, row by row.

    Marked like ``tvm_fusion.scheduled_block``."""
    from tvm.script import tirx as T

    c, m, co = shape.in_channels, shape.expanded, shape.out_channels
    h, w, s = shape.height, shape.width, shape.stride
    ho, wo = shape.out_height, shape.out_width
    groups = config.groups
    share = m // groups
    ep, ev = config.expand_positions, config.expand_vectors
    pp, pv = config.project_positions, config.project_vectors
    ech, pch = ev * LANES, pv * LANES
    if (
        not shape.expand
        or m % groups
        or share % ech
        or share % LANES
        or co % pch
        or (h * w) % ep
        or (ho * wo) % pp
        or s not in (1, 2)
    ):
        raise ValueError(
            f"the split-block kernel does not take {shape.describe()} in {groups} shares, "
            f"accumulators {ep} x {ev} and {pp} x {pv}"
        )
    expand, project = gemm_tile(ep, ev), gemm_tile(pp, pv)
    pitch = w + 2  # the expanded map's row, zero-padded on both sides
    padded = (h + 2) * pitch
    outputs = ho * wo
    residual = shape.residual

    @T.macro
    def body(  # noqa: N803 (TIR buffer names)
        X: Any, We: Any, be: Any, Wd: Any, bd: Any, Wp: Any, bp: Any, Out: Any
    ) -> None:
        parts = T.sblock_alloc_buffer((groups, outputs, co), "float32")
        for g in T.parallel(groups):
            with T.sblock("share"):  # the buffers and the sums are this job's
                T.reads(
                    X[0, 0:c, 0:h, 0:w],
                    We[0 : m // ech, 0:c, 0:ech],
                    be[0:m],
                    Wd[0:3, 0:3, 0:m],
                    bd[0:m],
                    Wp[0 : co // pch, 0:m, 0:pch],
                )
                T.writes(parts[g, 0:outputs, 0:co])
                E = T.sblock_alloc_buffer((padded, share), "float32")
                D = T.sblock_alloc_buffer((outputs, share), "float32")
                acc = T.sblock_alloc_buffer((max(ep, pp), max(ech, pch)), "float32", scope="local")
                dacc = T.sblock_alloc_buffer((LANES,), "float32", scope="local")
                # The zero border: the first and last padded rows, and each row's ends.
                for q, k in T.grid(pitch, share // LANES):
                    for lane in T.vectorized(LANES):
                        with T.sblock("zero_rows"):
                            E[q, k * LANES + lane] = T.float32(0.0)
                            E[(h + 1) * pitch + q, k * LANES + lane] = T.float32(0.0)
                for r, k in T.grid(h, share // LANES):
                    for lane in T.vectorized(LANES):
                        with T.sblock("zero_ends"):
                            E[(r + 1) * pitch, k * LANES + lane] = T.float32(0.0)
                            E[(r + 1) * pitch + w + 1, k * LANES + lane] = T.float32(0.0)
                for b, t in T.grid(share // ech, h * w // ep):
                    expand(
                        acc,
                        c,
                        lambda k, v: We[g * (share // ech) + b, k, T.ramp(v * LANES, 1, LANES)],
                        lambda k, i: X[0, k, (t * ep + i) // w, (t * ep + i) % w],
                    )
                    for i in T.unroll(ep):
                        for v in T.unroll(ev):
                            for lane in T.vectorized(LANES):
                                with T.sblock("expand_out"):
                                    E[
                                        ((t * ep + i) // w + 1) * pitch + (t * ep + i) % w + 1,
                                        b * ech + v * LANES + lane,
                                    ] = activate(
                                        "relu6",
                                        acc[i, v * LANES + lane]
                                        + be[g * share + b * ech + v * LANES + lane],
                                    )
                for k, p in T.grid(share // LANES, outputs):
                    for lane in T.vectorized(LANES):
                        with T.sblock("dw_init"):
                            dacc[lane] = T.float32(0.0)
                    for kh in T.unroll(3):
                        for kw in T.unroll(3):
                            for lane in T.vectorized(LANES):
                                with T.sblock("tap"):
                                    dacc[lane] = (
                                        dacc[lane]
                                        + E[
                                            (p // wo * s + kh) * pitch + p % wo * s + kw,
                                            k * LANES + lane,
                                        ]
                                        * Wd[kh, kw, g * share + k * LANES + lane]
                                    )
                    for lane in T.vectorized(LANES):
                        with T.sblock("dw_out"):
                            D[p, k * LANES + lane] = activate(
                                "relu6", dacc[lane] + bd[g * share + k * LANES + lane]
                            )
                for b, t in T.grid(co // pch, outputs // pp):
                    project(
                        acc,
                        share,
                        lambda k, v: Wp[b, g * share + k, T.ramp(v * LANES, 1, LANES)],
                        lambda k, i: D[t * pp + i, k],
                    )
                    for i in T.unroll(pp):
                        for v in T.unroll(pv):
                            for lane in T.vectorized(LANES):
                                with T.sblock("part"):
                                    parts[g, t * pp + i, b * pch + v * LANES + lane] = acc[
                                        i, v * LANES + lane
                                    ]
        for o in T.parallel(co // LANES):
            for r in range(ho):
                for lane in T.unroll(LANES):
                    for j in T.vectorized(wo):
                        with T.sblock("out"):
                            if residual:
                                Out[0, o * LANES + lane, r, j] = (
                                    bp[o * LANES + lane] + X[0, o * LANES + lane, r, j]
                                )
                            else:
                                Out[0, o * LANES + lane, r, j] = bp[o * LANES + lane]
                    for g in range(groups):
                        for j in T.vectorized(wo):
                            with T.sblock("sum"):
                                Out[0, o * LANES + lane, r, j] = (
                                    Out[0, o * LANES + lane, r, j]
                                    + parts[g, r * wo + j, o * LANES + lane]
                                )

    @T.prim_func(private=True, s_tir=True)
    def block(
        X: T.Buffer((1, c, h, w), "float32"),
        We: T.Buffer((m // ech, c, ech), "float32"),
        be: T.Buffer((m,), "float32"),
        Wd: T.Buffer((3, 3, m), "float32"),
        bd: T.Buffer((m,), "float32"),
        Wp: T.Buffer((co // pch, m, pch), "float32"),
        bp: T.Buffer((co,), "float32"),
        Out: T.Buffer((1, co, ho, wo), "float32"),
    ) -> None:
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            body(X, We, be, Wd, bd, Wp, bp, Out)

    return block.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})
