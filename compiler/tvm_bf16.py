"""bf16 1x1 convolution kernel for AVX-512 BF16 CPUs (``--precision bf16``).

The kernel is ``tvm_fusion.pointwise_func``'s GEMM (positions x vectors of 16 output
channels of fp32 accumulators, a position broadcast against a vector of weights) with
vdpbf16ps in place of the fp32 FMA: each instruction adds, per output channel, the products
of two input channels, so the reduction runs over channel pairs. Activations are rounded to
bf16 pairs once per call (one uint32 per position and channel pair, ``Xp``), weights at
build time (``fusion_plan.paired_bf16_weights``).

Why TVMScript and an imported LLVM function rather than TVM's bfloat16 dtype: TVM's TIR
pipeline legalizes bfloat16 arithmetic to float32 on CPU targets (``BF16ComputeLegalize``)
and its LLVM code generator stores bfloat16 as i16, while LLVM's vdpbf16ps intrinsic takes
``<32 x bfloat>``. So the operands stay uint16/uint32 in TIR and a four-line LLVM function,
linked in through TVM's ``pragma_import_llvm`` and inlined, bitcasts them
(docs/toolchain.md). LLVM folds the activation broadcast into the instruction's memory
operand.
"""

# TVMScript's buffer annotations are TVM IR, not Python types; its decorator is untyped.
# mypy: disable-error-code="valid-type,untyped-decorator,misc"

from __future__ import annotations

from typing import Any

from compiler.fusion_plan import LANES, PointwiseConfig, PointwiseShape

# Linked into every module that calls it (linkonce_odr: one copy however many kernels do).
_DPBF16 = r"""
define linkonce_odr <16 x float> @edgeloop_dpbf16ps(<16 x float> %acc, <32 x i16> %a,
                                                    <32 x i16> %b) alwaysinline {
  %1 = bitcast <32 x i16> %a to <32 x bfloat>
  %2 = bitcast <32 x i16> %b to <32 x bfloat>
  %3 = tail call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc,
                                                                <32 x bfloat> %1,
                                                                <32 x bfloat> %2)
  ret <16 x float> %3
}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
"""


def round_bf16(bits: Any) -> Any:
    """The bf16 nearest to the float32 whose bits are ``bits`` (uint32), ties to even, in the
    low 16 bits (``fusion_plan.bf16_bits`` computes the same)."""
    from tvm.script import tirx as T

    return (bits + T.uint32(0x7FFF) + ((bits >> T.uint32(16)) & T.uint32(1))) >> T.uint32(16)


def activate(kind: str | None, value: Any) -> Any:
    from tvm.script import tirx as T

    if kind == "relu6":
        return T.max(T.min(value, T.float32(6.0)), T.float32(0.0))
    if kind == "relu":
        return T.max(value, T.float32(0.0))
    return value


def pointwise_bf16_func(shape: PointwiseShape, config: PointwiseConfig) -> Any:
    """A 1x1 stride-1 convolution with bf16 products and fp32 sums, scheduled; the PrimFunc.

    Arguments as ``pointwise_func``'s, but the weight is ``paired_bf16_weights``' (Co / B,
    ceil(C / 2), 2 B) uint16 for blocks of B = ``config.vectors`` x 16 output channels.
    Bias, residual and activation are added in fp32 as there: the activation into the
    GEMM's write-back without a residual, after the residual add with one.
    """
    from tvm.script import tirx as T

    c, co, h, w = shape.in_channels, shape.out_channels, shape.height, shape.width
    if shape.kernel != 1 or shape.stride != 1:
        raise ValueError(
            f"the bf16 kernel computes 1x1 stride-1 convolutions, not {shape.describe()}"
        )
    positions, vectors = config.positions, config.vectors
    n_pos = h * w
    pairs, whole = -(-c // 2), c // 2
    chans = vectors * LANES
    blocks, pos_blocks = co // chans, n_pos // positions
    early = None if shape.residual else shape.activation
    late = shape.activation if shape.residual else None

    @T.macro
    def body(X: Any, Wt: Any, bias: Any, R: Any, Out: Any) -> None:  # noqa: N803 (TIR names)
        Xp = T.sblock_alloc_buffer((pairs, n_pos), "uint32")
        A = T.sblock_alloc_buffer((n_pos, co), "float32")
        # Every store in an opaque block of its own: weight prepacking's passes build a
        # schedule of each kernel, which wants a block under every loop.
        # Rows vectorized along their columns: a loop over flat positions reading
        # X[0, k, p // w, p % w] vectorized to wrong values (TVM 0.27), and a flat
        # (C, H * W) view (T.decl_buffer) breaks weight prepacking's passes.
        for k in T.parallel(whole):
            for i in range(h):
                for j in T.vectorized(w):
                    with T.sblock("pack"):
                        Xp[k, i * w + j] = round_bf16(
                            T.reinterpret("uint32", X[0, 2 * k, i, j])
                        ) | (
                            round_bf16(T.reinterpret("uint32", X[0, 2 * k + 1, i, j]))
                            << T.uint32(16)
                        )
        if whole < pairs:  # an odd channel count: the last pair's high half is 0
            for i in range(h):
                for j in T.vectorized(w):
                    with T.sblock("pack_odd"):
                        Xp[whole, i * w + j] = round_bf16(
                            T.reinterpret("uint32", X[0, 2 * whole, i, j])
                        )
        for job in T.parallel(blocks * pos_blocks):
            with T.sblock("gemm"):  # acc is this block's: one per parallel job
                T.reads(Wt[0:blocks, 0:pairs, 0 : 2 * chans], Xp[0:pairs, 0:n_pos], bias[0:co])
                T.writes(A[0:n_pos, 0:co])
                acc = T.sblock_alloc_buffer((positions, chans), "float32", scope="local")
                for i in T.unroll(positions):
                    for v in T.unroll(vectors):
                        with T.sblock("init"):
                            acc[i, T.ramp(v * LANES, 1, LANES)] = T.broadcast(T.float32(0.0), LANES)
                with T.attr(0, "pragma_import_llvm", _DPBF16):
                    for k in range(pairs):
                        for i in T.unroll(positions):
                            for v in T.unroll(vectors):
                                with T.sblock("dot"):
                                    acc[i, T.ramp(v * LANES, 1, LANES)] = T.call_pure_extern(
                                        "float32x16",
                                        "edgeloop_dpbf16ps",
                                        acc[i, T.ramp(v * LANES, 1, LANES)],
                                        Wt[
                                            job // pos_blocks,
                                            k,
                                            T.ramp(v * 2 * LANES, 1, 2 * LANES),
                                        ],
                                        T.reinterpret(
                                            "uint16x32",
                                            T.broadcast(
                                                Xp[k, job % pos_blocks * positions + i], LANES
                                            ),
                                        ),
                                    )
                for i in T.unroll(positions):
                    for v in T.unroll(vectors):
                        for lane in T.vectorized(LANES):
                            with T.sblock("bias"):
                                A[
                                    job % pos_blocks * positions + i,
                                    job // pos_blocks * chans + v * LANES + lane,
                                ] = activate(
                                    early,
                                    acc[i, v * LANES + lane]
                                    + bias[job // pos_blocks * chans + v * LANES + lane],
                                )
        # NCHW write-back: per image row and block of 16 channels, each channel's row as one
        # vector store, its values gathered from the row's positions of A (which stay in
        # L1 across the 16 channels); one scalar store per value took 1.07-1.14x the time
        # of the whole kernel at 14x14 (tvm_fusion._transposing_write).
        for o in T.parallel(co // LANES):
            for i in range(h):
                for lane in T.unroll(LANES):
                    for j in T.vectorized(w):
                        with T.sblock("out"):
                            if shape.residual:
                                Out[0, o * LANES + lane, i, j] = activate(
                                    late,
                                    A[i * w + j, o * LANES + lane] + R[0, o * LANES + lane, i, j],
                                )
                            else:
                                Out[0, o * LANES + lane, i, j] = A[i * w + j, o * LANES + lane]

    return pointwise_prim_func(shape, body, (blocks, pairs, 2 * chans))


def pointwise_prim_func(shape: PointwiseShape, body: Any, weights: tuple[int, ...]) -> Any:
    """The prim_func around a 1x1 kernel's ``body(X, Wt, bias, R, Out)`` macro.

    ``weights`` is the shape of the prepacked uint16 weights; R (the residual) is an argument
    only where the shape has one (``body`` gets None otherwise). The body goes in a root
    block, as in te's functions: weight prepacking's layout rewrite
    (tvm_builder._fold_prepacked) requires one.
    """
    from tvm.script import tirx as T

    c, h, w, co = shape.in_channels, shape.height, shape.width, shape.out_channels
    if shape.residual:

        @T.prim_func(private=True, s_tir=True)
        def with_residual(
            X: T.Buffer((1, c, h, w), "float32"),
            Wt: T.Buffer(weights, "uint16"),
            bias: T.Buffer((co,), "float32"),
            R: T.Buffer((1, co, h, w), "float32"),
            Out: T.Buffer((1, co, h, w), "float32"),
        ) -> None:
            T.func_attr({"tirx.noalias": True})
            with T.sblock("root"):
                body(X, Wt, bias, R, Out)

        func = with_residual
    else:

        @T.prim_func(private=True, s_tir=True)
        def plain(
            X: T.Buffer((1, c, h, w), "float32"),
            Wt: T.Buffer(weights, "uint16"),
            bias: T.Buffer((co,), "float32"),
            Out: T.Buffer((1, co, h, w), "float32"),
        ) -> None:
            T.func_attr({"tirx.noalias": True})
            with T.sblock("root"):
                body(X, Wt, bias, None, Out)

        func = plain
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


# The fused blocks' GEMMs (``tvm_fusion``, te-scheduled) reach vdpbf16ps through tensorize:
# 16 positions of one output channel, one pair of input channels. Activations and weights
# are uint32 pairs there (low half the even channel), so that the activation pairs of 16
# positions are one contiguous 64-byte run and the packing stage vectorizes along positions.
PAIR_INTRIN = "edgeloop_dpbf16_pairs16"


def pair_low(pair: Any) -> Any:
    """The float32 value of the bf16 in the low half of a uint32 pair (te/TIR expression)."""
    from tvm import tirx

    return tirx.reinterpret("float32", pair << tirx.const(16, "uint32"))


def pair_high(pair: Any) -> Any:
    """The float32 value of the bf16 in the high half of a uint32 pair."""
    from tvm import tirx

    return tirx.reinterpret("float32", pair & tirx.const(0xFFFF0000, "uint32"))


def pack_pair(low: Any, high: Any) -> Any:
    """Two float32 values rounded to bf16 (``round_bf16``) as one uint32 pair."""
    from tvm import tirx

    def bits(value: Any) -> Any:
        return round_bf16(tirx.reinterpret("uint32", value))

    return bits(low) | (bits(high) << tirx.const(16, "uint32"))


def register_pair_intrin() -> str:
    """Register ``PAIR_INTRIN`` with TVM once per process; returns its name. Description:
    16 lanes of ``acc += low(w) * low(d) + high(w) * high(d)`` (the form of the blocks'
    pair GEMMs, matched structurally by tensorize; its ``T.reads`` in the order the blocks
    read: accumulator, weight, activations); implementation: one vdpbf16ps."""
    import tvm.s_tir as s_tir
    from tvm.script import tirx as T

    if s_tir.TensorIntrin.get(PAIR_INTRIN, allow_missing=True) is not None:
        return PAIR_INTRIN

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((LANES,), "float32", offset_factor=1, scope="local"),
        w: T.Buffer((1,), "uint32", offset_factor=1),
        d: T.Buffer((LANES,), "uint32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(a[0:LANES], w[0:1], d[0:LANES])
            T.writes(a[0:LANES])
            for i in range(LANES):
                with T.sblock("update"):
                    vi = T.axis.remap("S", [i])
                    a[vi] = a[vi] + (
                        pair_low(w[0]) * pair_low(d[vi]) + pair_high(w[0]) * pair_high(d[vi])
                    )

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((LANES,), "float32", offset_factor=1, scope="local"),
        w: T.Buffer((1,), "uint32", offset_factor=1),
        d: T.Buffer((LANES,), "uint32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(a[0:LANES], w[0:1], d[0:LANES])
            T.writes(a[0:LANES])
            with T.attr(0, "pragma_import_llvm", _DPBF16):
                a[T.ramp(0, 1, LANES)] = T.call_pure_extern(
                    "float32x16",
                    "edgeloop_dpbf16ps",
                    a[T.ramp(0, 1, LANES)],
                    T.reinterpret("uint16x32", d[T.ramp(0, 1, LANES)]),
                    T.reinterpret("uint16x32", T.broadcast(w[0], LANES)),
                )

    s_tir.TensorIntrin.register(PAIR_INTRIN, desc, impl)
    return PAIR_INTRIN
