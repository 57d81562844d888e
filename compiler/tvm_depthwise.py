"""Depthwise 3x3 convolution kernel for the depthwise layers the fused blocks leave
(``fusion_plan.plan_depthwise``; ``tvm_fusion.fuse_depthwise`` puts it in a model).

Written in TVMScript, not te + a schedule as ``tvm_fusion``'s kernels: from te, the zero
border of the padded plane was an if_then_else per element, which TVM's vectorizer turned
into a branch per element. A plane allocated per channel inside the parallel loop cost two
workspace allocations and a memset per channel (576 channels at 14x14: 169 us on one
thread); each parallel job now takes a group of channels, zeroes its plane once with whole
vectors and copies each channel's rows into the interior (99 us).
"""

# TVMScript's buffer annotations are TVM IR, not Python types; its decorator is untyped.
# mypy: disable-error-code="valid-type,untyped-decorator,misc"

from __future__ import annotations

from typing import Any

from compiler.fusion_plan import (
    LANES,
    DepthwiseConfig,
    DepthwiseProjectConfig,
    DepthwiseShape,
    PointwiseShape,
)
from compiler.tvm_bf16 import activate
from compiler.tvm_tiles import gemm_tile

# Channels per parallel job: each job allocates and zeroes its plane once.
CHANNELS_PER_JOB = 8


def depthwise_func(shape: DepthwiseShape, config: DepthwiseConfig) -> Any:
    """A 3x3 depthwise convolution + bias [+ activation] (``fusion_plan.plan_depthwise``),
    scheduled; the PrimFunc. Arguments: X (1, C, H, W), the weight (C, 3, 3), the bias (C,);
    output (1, C, Ho, Wo). Channels run in parallel; per channel, the plane P is the
    zero-padded input with its columns split into ``stride`` phases (P[row, phase, q] = the
    padded input's column stride * q + phase), so that each tap of a row of outputs is one
    contiguous run at either stride; ``config.rows`` output rows of ``config.columns`` are
    summed in registers at a time, the taps outside them (one weight broadcast per tap and
    block); the bias and the activation go into the write to NCHW.

    Marked like ``tvm_fusion.scheduled_block``."""
    from tvm.script import tirx as T

    c, h, w, s = shape.channels, shape.height, shape.width, shape.stride
    ho, wo = shape.out_height, shape.out_width
    rows, columns = config.rows, config.columns
    plane_rows = s * (config.padded_rows - 1) + 3
    plane_cols = config.plane_columns(s)
    act = shape.activation
    jobs = -(-c // CHANNELS_PER_JOB)
    # Input column j sits at padded column j + 1: phase (j + 1) % s, position (j + 1) // s.
    # Per phase, the first position holding an input column and how many there are.
    firsts = [(1 - ph + s - 1) // s for ph in range(2)]  # smallest q with s * q + ph >= 1
    counts = [len(range(s * q0 + ph - 1, w, s)) for ph, q0 in enumerate(firsts)]
    (first0, first1), (count0, count1) = firsts, counts

    @T.macro
    def channel(X: Any, Wd: Any, bias: Any, Out: Any, P: Any, acc: Any, k: Any) -> None:  # noqa: N803
        for i in range(h):
            for q in T.vectorized(count0):
                with T.sblock("copy"):
                    P[i + 1, 0, first0 + q] = X[0, k, i, s * (first0 + q) - 1]
            if s == 2:
                for q in T.vectorized(count1):
                    with T.sblock("copy_odd"):
                        P[i + 1, 1, first1 + q] = X[0, k, i, 2 * (first1 + q)]
        for block in range(config.padded_rows // rows):
            for r in T.unroll(rows):
                for j in T.vectorized(columns):
                    with T.sblock("init"):
                        acc[r, j] = T.float32(0.0)
            for kh in T.unroll(3):
                for kw in T.unroll(3):
                    for r in T.unroll(rows):
                        for j in T.vectorized(columns):
                            with T.sblock("tap"):
                                acc[r, j] = (
                                    acc[r, j]
                                    + P[
                                        (block * rows + r) * s + kh,
                                        kw % s,
                                        j + kw // s,
                                    ]
                                    * Wd[k, kh, kw]
                                )
            for r in T.unroll(rows):
                for j in T.vectorized(wo):
                    with T.sblock("out"):
                        if block * rows + r < ho:
                            Out[0, k, block * rows + r, j] = activate(act, acc[r, j] + bias[k])

    @T.prim_func(private=True, s_tir=True)
    def depthwise(
        X: T.Buffer((1, c, h, w), "float32"),
        Wd: T.Buffer((c, 3, 3), "float32"),
        bias: T.Buffer((c,), "float32"),
        Out: T.Buffer((1, c, ho, wo), "float32"),
    ) -> None:
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for job in T.parallel(jobs):
                with T.sblock("channels"):  # the plane and the sums are this job's
                    T.reads(X[0, 0:c, 0:h, 0:w], Wd[0:c, 0:3, 0:3], bias[0:c])
                    T.writes(Out[0, 0:c, 0:ho, 0:wo])
                    P = T.sblock_alloc_buffer((plane_rows, s, plane_cols), "float32")
                    acc = T.sblock_alloc_buffer((rows, columns), "float32", scope="local")
                    # The border is zeroed once per job: each channel's copy overwrites
                    # the same interior.
                    for i, ph in T.grid(plane_rows, s):
                        for q in T.vectorized(plane_cols):
                            with T.sblock("zero"):
                                P[i, ph, q] = T.float32(0.0)
                    for kk in range(CHANNELS_PER_JOB):
                        if job * CHANNELS_PER_JOB + kk < c:
                            channel(X, Wd, bias, Out, P, acc, job * CHANNELS_PER_JOB + kk)

    return depthwise.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


def depthwise_project_func(
    depthwise: DepthwiseShape, project: PointwiseShape, config: DepthwiseProjectConfig
) -> Any:
    """A 3x3 stride-1 depthwise convolution + bias [+ activation] and the 1x1 projection of
    its output + bias [+ residual] [+ activation] as one kernel
    (``fusion_plan.plan_depthwise_project``), scheduled; the PrimFunc. Arguments: X (1, M,
    H, W), the depthwise weight (M, 3, 3) and bias (M,), the projection's weight in blocks
    (``fusion_plan.blocked_weights``: (Co / B, M, B), B = ``config.vectors`` x 16) and bias
    (Co,), the residual (1, Co, H, W) if any; output (1, Co, H, W).

    Each parallel job takes ``config.rows`` output rows: per channel, the zero-padded rows
    it reads (its rows and one on each side) in a plane of one vector's width, the rows
    summed in registers (one per row) as in ``depthwise_func``, the result into the job's
    own (M, rows x W) buffer; then the projection of that buffer as ``tvm_fusion``'s
    pointwise kernel does it (``config.positions`` positions x vectors of 16 channels of
    accumulators, positions broadcast), written back to NCHW by rows. The depthwise output
    never leaves the core that computed it.

    Marked like ``tvm_fusion.scheduled_block``."""
    from tvm.script import tirx as T

    m, h, w = depthwise.channels, depthwise.height, depthwise.width
    co = project.out_channels
    rows, positions, vectors = config.rows, config.positions, config.vectors
    if (
        depthwise.stride != 1
        or w > LANES
        or h % rows
        or project.in_channels != m
        or (rows * w) % positions
        or co % (vectors * LANES)
    ):
        raise ValueError(
            f"the depthwise + projection kernel does not take {depthwise.describe()} then "
            f"{project.describe()} in jobs of {rows} rows x {positions} positions"
        )
    chans = vectors * LANES
    blocks, band = co // chans, rows * w
    tiles = band // positions
    tile = gemm_tile(positions, vectors)
    early = None if project.residual else project.activation  # as in pointwise_func
    late = project.activation if project.residual else None

    @T.macro
    def body(X: Any, Wd: Any, bd: Any, Wt: Any, bias: Any, R: Any, Out: Any) -> None:  # noqa: N803
        for job in T.parallel(h // rows):
            with T.sblock("band"):  # the plane, the buffers and the sums are this job's
                T.reads(
                    X[0, 0:m, 0:h, 0:w],
                    Wd[0:m, 0:3, 0:3],
                    bd[0:m],
                    Wt[0:blocks, 0:m, 0:chans],
                    bias[0:co],
                )
                T.writes(Out[0, 0:co, 0:h, 0:w])
                P = T.sblock_alloc_buffer((rows + 2, LANES + 2), "float32")
                D = T.sblock_alloc_buffer((m, band), "float32")
                A = T.sblock_alloc_buffer((band, co), "float32")
                dacc = T.sblock_alloc_buffer((rows, LANES), "float32", scope="local")
                acc = T.sblock_alloc_buffer((positions, chans), "float32", scope="local")
                # The border is zeroed once per job: each channel's rows overwrite the same
                # interior (the first and last band have one padding row zero throughout).
                for i in range(rows + 2):
                    for q in T.vectorized(LANES + 2):
                        with T.sblock("zero"):
                            P[i, q] = T.float32(0.0)
                for k in range(m):
                    for i in range(T.max(job * rows - 1, 0), T.min(job * rows + rows + 1, h)):
                        for q in T.vectorized(w):
                            with T.sblock("copy"):
                                P[i - job * rows + 1, q + 1] = X[0, k, i, q]
                    for r in T.unroll(rows):
                        for j in T.vectorized(LANES):
                            with T.sblock("dw_init"):
                                dacc[r, j] = T.float32(0.0)
                    for kh in T.unroll(3):
                        for kw in T.unroll(3):
                            for r in T.unroll(rows):
                                for j in T.vectorized(LANES):
                                    with T.sblock("tap"):
                                        dacc[r, j] = dacc[r, j] + P[r + kh, j + kw] * Wd[k, kh, kw]
                    for r in T.unroll(rows):
                        for j in T.vectorized(w):
                            with T.sblock("dw_out"):
                                D[k, r * w + j] = activate(depthwise.activation, dacc[r, j] + bd[k])
                for t in range(tiles):
                    for b in range(blocks):
                        tile(
                            acc,
                            m,
                            lambda k, v: Wt[b, k, T.ramp(v * LANES, 1, LANES)],
                            lambda k, i: D[k, t * positions + i],
                        )
                        for i in T.unroll(positions):
                            for v in T.unroll(vectors):
                                for lane in T.vectorized(LANES):
                                    with T.sblock("bias"):
                                        A[t * positions + i, b * chans + v * LANES + lane] = (
                                            activate(
                                                early,
                                                acc[i, v * LANES + lane]
                                                + bias[b * chans + v * LANES + lane],
                                            )
                                        )
                # NCHW write-back by rows, as the pointwise kernels' (tvm_bf16's comment).
                for o in range(co // LANES):
                    for r in range(rows):
                        for lane in T.unroll(LANES):
                            for j in T.vectorized(w):
                                with T.sblock("out"):
                                    if project.residual:
                                        Out[0, o * LANES + lane, job * rows + r, j] = activate(
                                            late,
                                            A[r * w + j, o * LANES + lane]
                                            + R[0, o * LANES + lane, job * rows + r, j],
                                        )
                                    else:
                                        Out[0, o * LANES + lane, job * rows + r, j] = A[
                                            r * w + j, o * LANES + lane
                                        ]

    weights = (blocks, m, chans)
    if project.residual:

        @T.prim_func(private=True, s_tir=True)
        def with_residual(
            X: T.Buffer((1, m, h, w), "float32"),
            Wd: T.Buffer((m, 3, 3), "float32"),
            bd: T.Buffer((m,), "float32"),
            Wt: T.Buffer(weights, "float32"),
            bias: T.Buffer((co,), "float32"),
            R: T.Buffer((1, co, h, w), "float32"),
            Out: T.Buffer((1, co, h, w), "float32"),
        ) -> None:
            T.func_attr({"tirx.noalias": True})
            with T.sblock("root"):
                body(X, Wd, bd, Wt, bias, R, Out)

        func = with_residual
    else:

        @T.prim_func(private=True, s_tir=True)
        def plain(
            X: T.Buffer((1, m, h, w), "float32"),
            Wd: T.Buffer((m, 3, 3), "float32"),
            bd: T.Buffer((m,), "float32"),
            Wt: T.Buffer(weights, "float32"),
            bias: T.Buffer((co,), "float32"),
            Out: T.Buffer((1, co, h, w), "float32"),
        ) -> None:
            T.func_attr({"tirx.noalias": True})
            with T.sblock("root"):
                body(X, Wd, bd, Wt, bias, None, Out)

        func = plain
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})
