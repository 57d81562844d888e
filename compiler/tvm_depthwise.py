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

from compiler.fusion_plan import DepthwiseConfig, DepthwiseShape
from compiler.tvm_bf16 import activate

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
