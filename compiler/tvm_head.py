"""A network's head as one kernel: a 1x1 convolution + bias [+ activation] whose output
only a global average pool reads (MobileNetV2's 320->1280 at 7x7, then the mean over the
map), ``tvm_fusion.fuse_pointwise_means``.

Written in TVMScript like ``tvm_split_block``: the GEMM is ``tvm_fusion.pointwise_func``'s
(positions x vectors of 16 output channels of accumulators, positions broadcast), but each
parallel job takes one block of output channels over the whole map and adds its activated
sums into a vector, so the (Co, H, W) map is never written back to NCHW and read again.
"""

# TVMScript's buffer annotations are TVM IR, not Python types; its decorator is untyped.
# mypy: disable-error-code="valid-type,untyped-decorator,misc"

from __future__ import annotations

from typing import Any

from compiler.fusion_plan import PointwiseConfig, PointwiseShape
from compiler.tvm_bf16 import activate
from compiler.tvm_tiles import position_gemm


def pointwise_mean_func(
    shape: PointwiseShape, config: PointwiseConfig, *, keepdims: bool = True
) -> Any:
    """The mean over the map of a 1x1 stride-1 convolution + bias [+ activation], scheduled;
    the PrimFunc. Arguments: X (1, C, H, W), the weight in blocks of B = ``config.vectors``
    x ``config.lanes`` output channels (``fusion_plan.blocked_weights``: (Co / B, C, B)),
    the bias (Co,); output (1, Co, 1, 1), or (1, Co) without ``keepdims``. Parallel over
    blocks of B output channels (``position_major`` does not apply); the positions that do
    not fill a block of ``config.positions`` in one smaller block. Marked like
    ``tvm_fusion.scheduled_block``."""
    from tvm.script import tirx as T

    c, co, h, w = shape.in_channels, shape.out_channels, shape.height, shape.width
    positions, vectors, lanes = config.positions, config.vectors, config.lanes
    chans = vectors * lanes
    if shape.kernel != 1 or shape.stride != 1 or shape.residual:
        raise ValueError(f"the mean kernel takes 1x1 stride-1 convolutions, not {shape.describe()}")
    if positions < 1 or co % chans:
        raise ValueError(
            f"{shape.describe()} is not whole blocks of {chans} channels "
            f"({vectors} vectors of {lanes}), or {positions} positions a block is not positive"
        )
    gemm = position_gemm(h * w, positions, vectors, lanes)
    scale = 1.0 / (h * w)
    out_shape = (1, co, 1, 1) if keepdims else (1, co)

    @T.macro
    def add_up(total: Any, acc: Any, bias: Any, b: Any, count: int) -> None:
        for i in T.unroll(count):
            for lane in T.vectorized(chans):
                with T.sblock("sum"):
                    total[lane] = total[lane] + activate(
                        shape.activation, acc[i, lane] + bias[b * chans + lane]
                    )

    @T.prim_func(private=True, s_tir=True)
    def head(
        X: T.Buffer((1, c, h, w), "float32"),
        Wt: T.Buffer((co // chans, c, chans), "float32"),
        bias: T.Buffer((co,), "float32"),
        Out: T.Buffer(out_shape, "float32"),
    ) -> None:
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for b in T.parallel(co // chans):
                with T.sblock("channels"):  # the sums are this job's
                    T.reads(X[0, 0:c, 0:h, 0:w], Wt[b, 0:c, 0:chans], bias[0:co])
                    T.writes(Out[0, b * chans : b * chans + chans])
                    acc = T.sblock_alloc_buffer((positions, chans), "float32", scope="local")
                    total = T.sblock_alloc_buffer((chans,), "float32", scope="local")
                    for lane in T.vectorized(chans):
                        with T.sblock("total_init"):
                            total[lane] = T.float32(0.0)
                    gemm(
                        acc,
                        c,
                        lambda k, v: Wt[b, k, T.ramp(v * lanes, 1, lanes)],
                        lambda k, q: X[0, k, q // w, q % w],
                        lambda first, n: add_up(total, acc, bias, b, n),
                    )
                    for lane in T.vectorized(chans):
                        with T.sblock("mean"):
                            if keepdims:
                                Out[0, b * chans + lane, 0, 0] = total[lane] * T.float32(scale)
                            else:
                                Out[0, b * chans + lane] = total[lane] * T.float32(scale)

    return head.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})
