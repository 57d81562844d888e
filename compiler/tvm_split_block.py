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

from compiler.fusion_plan import BlockShape, SplitBlockConfig
from compiler.tvm_bf16 import activate
from compiler.tvm_tiles import position_gemm


def split_block_func(shape: BlockShape, config: SplitBlockConfig) -> Any:
    """An inverted-residual block (1x1 expansion + bias + ReLU6, 3x3 depthwise of stride 1
    or 2 + bias + ReLU6, 1x1 projection + bias [+ the input, where the block has a
    residual]), scheduled; the PrimFunc.

    Arguments: X (1, C, H, W); the expansion's weight in blocks of its accumulator block's
    channels (``fusion_plan.blocked_weights``: (M / Be, C, Be), Be = ``expand_vectors`` x
    ``lanes``) and bias (M,); the depthwise weight channels-last (3, 3, M) and bias (M,);
    the projection's weight in blocks ((Co / Bp, M, Bp)) and bias (Co,); output (1, Co,
    Ho, Wo).

    Job g of ``config.groups`` (one per core, in parallel) takes expanded channels
    [g M / G, (g + 1) M / G): their expansion at every position into a channels-last map
    with a zero border (the depthwise convolution's padding), the depthwise convolution
    into a channels-last buffer (``lanes`` channels a vector, the 9 taps' weights the same
    for every position), and the projection of those channels alone (``positions`` x
    ``vectors`` of ``lanes`` output channels of accumulators, positions broadcast; the
    positions left over by whole blocks in one smaller block) into its part of the sum.
    Then, parallel over vectors of output channels and rows, the NCHW output is the bias
    [+ the input] plus every part.

    Why not strips of rows, to keep a 56x56 share's buffers in L2: the same kernel with
    a loop over strips around the three stages (each copying the rows the one before
    expanded to its top) ran 1.2-1.7x slower than over the whole map on a Zen 4 without
    AVX-512, at any strip height: LLVM kept values across the strip loop in 5 of the 16
    registers and spilled the projection's weights inside its accumulator loop.

    Marked like ``tvm_fusion.scheduled_block``."""
    from tvm.script import tirx as T

    c, m, co = shape.in_channels, shape.expanded, shape.out_channels
    h, w, s = shape.height, shape.width, shape.stride
    ho, wo = shape.out_height, shape.out_width
    groups, lanes = config.groups, config.lanes
    share = m // groups
    ep, ev = config.expand_positions, config.expand_vectors
    pp, pv = config.project_positions, config.project_vectors
    ech, pch = ev * lanes, pv * lanes
    if (
        not shape.expand
        or m % groups
        or share % ech
        or share % lanes
        or co % pch
        or min(ep, pp) < 1
        or s not in (1, 2)
        or (s == 2 and h != 2 * ho)
    ):
        raise ValueError(
            f"the split-block kernel does not take {shape.describe()} in {groups} shares, "
            f"accumulators {ep} x {ev} and {pp} x {pv} vectors of {lanes} lanes"
        )
    pitch = w + 2  # an expanded row, zero-padded on both sides
    outputs = ho * wo
    residual = shape.residual

    expand = position_gemm(h * w, ep, ev, lanes)
    project = position_gemm(outputs, pp, pv, lanes)

    @T.macro
    def store_expanded(  # noqa: N803 (TIR buffer names)
        E: Any, acc: Any, be: Any, g: Any, b: Any, first: Any, n: int
    ) -> None:
        for i in T.unroll(n):
            for v in T.unroll(ev):
                for lane in T.vectorized(lanes):
                    with T.sblock("expand_out"):
                        E[
                            ((first + i) // w + 1) * pitch + (first + i) % w + 1,
                            b * ech + v * lanes + lane,
                        ] = activate(
                            "relu6",
                            acc[i, v * lanes + lane] + be[g * share + b * ech + v * lanes + lane],
                        )

    @T.macro
    def store_part(parts: Any, acc: Any, g: Any, b: Any, first: Any, n: int) -> None:
        for i in T.unroll(n):
            for v in T.unroll(pv):
                for lane in T.vectorized(lanes):
                    with T.sblock("part"):
                        parts[g, first + i, b * pch + v * lanes + lane] = acc[i, v * lanes + lane]

    @T.macro
    def zero_row(E: Any, e_row: Any) -> None:  # noqa: N803 (TIR buffer names)
        for q, k in T.grid(pitch, share // lanes):
            for lane in T.vectorized(lanes):
                with T.sblock("zero_row"):
                    E[e_row * pitch + q, k * lanes + lane] = T.float32(0.0)

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
                E = T.sblock_alloc_buffer(((h + 2) * pitch, share), "float32")
                D = T.sblock_alloc_buffer((outputs, share), "float32")
                acc = T.sblock_alloc_buffer((max(ep, pp), max(ech, pch)), "float32", scope="local")
                dacc = T.sblock_alloc_buffer((lanes,), "float32", scope="local")
                # The zero border: the padded rows above and below, each row's ends.
                zero_row(E, 0)
                zero_row(E, h + 1)
                for r, k in T.grid(h, share // lanes):
                    for lane in T.vectorized(lanes):
                        with T.sblock("zero_ends"):
                            E[(r + 1) * pitch, k * lanes + lane] = T.float32(0.0)
                            E[(r + 1) * pitch + w + 1, k * lanes + lane] = T.float32(0.0)
                for b in range(share // ech):
                    expand(
                        acc,
                        c,
                        lambda k, v: We[g * (share // ech) + b, k, T.ramp(v * lanes, 1, lanes)],
                        lambda k, q: X[0, k, q // w, q % w],
                        lambda first, n: store_expanded(E, acc, be, g, b, first, n),
                    )
                for k, p in T.grid(share // lanes, outputs):
                    for lane in T.vectorized(lanes):
                        with T.sblock("dw_init"):
                            dacc[lane] = T.float32(0.0)
                    for kh in T.unroll(3):
                        for kw in T.unroll(3):
                            for lane in T.vectorized(lanes):
                                with T.sblock("tap"):
                                    dacc[lane] = (
                                        dacc[lane]
                                        + E[
                                            (p // wo * s + kh) * pitch + p % wo * s + kw,
                                            k * lanes + lane,
                                        ]
                                        * Wd[kh, kw, g * share + k * lanes + lane]
                                    )
                    for lane in T.vectorized(lanes):
                        with T.sblock("dw_out"):
                            D[p, k * lanes + lane] = activate(
                                "relu6", dacc[lane] + bd[g * share + k * lanes + lane]
                            )
                for b in range(co // pch):
                    project(
                        acc,
                        share,
                        lambda k, v: Wp[b, g * share + k, T.ramp(v * lanes, 1, lanes)],
                        lambda k, q: D[q, k],
                        lambda first, n: store_part(parts, acc, g, b, first, n),
                    )
        for q in T.parallel(co // lanes * ho):
            for lane in T.unroll(lanes):
                for jj in T.vectorized(wo):
                    with T.sblock("out"):
                        if residual:
                            Out[0, q // ho * lanes + lane, q % ho, jj] = (
                                bp[q // ho * lanes + lane]
                                + X[0, q // ho * lanes + lane, q % ho, jj]
                            )
                        else:
                            Out[0, q // ho * lanes + lane, q % ho, jj] = bp[q // ho * lanes + lane]
                for g in range(groups):
                    for jj in T.vectorized(wo):
                        with T.sblock("sum"):
                            Out[0, q // ho * lanes + lane, q % ho, jj] = (
                                Out[0, q // ho * lanes + lane, q % ho, jj]
                                + parts[g, q % ho * wo + jj, q // ho * lanes + lane]
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
