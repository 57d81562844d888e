"""bf16 1x1 convolution kernel on Intel AMX tiles (``--precision bf16`` on AMX profiles).

Sapphire Rapids and later Xeons multiply bf16 matrices in tile registers: one
``tdpbf16ps`` adds a 16x32 by 32x16 bf16 product into a 16x16 fp32 tile, 8,192
multiply-adds, against 16 x 2 for an AVX-512 FMA or ``vdpbf16ps`` (measured on a Xeon of
family 6 model 207: ~1.1 TMAC/s on one core, against ~75 GMAC/s of fp32 FMAs). The
convolution is a GEMM with the output channels as the tile rows and positions as its
columns: the weights are the natural (Co, C) matrix in bf16 (``fusion_plan.amx_weights``),
the activations channel pairs per position (``Xp``: uint32, the even channel in the low
half), the layout ``tdpbf16ps`` wants for its second operand, and which the NCHW input
packs into along its rows. The fp32 tiles land in a position-major scratch (``Acc``) that
the write-back turns into NCHW with bias, residual and activation.

Why an LLVM function: TVM 0.27 has no AMX tensor intrinsics (the int8 ones of earlier
releases are gone), and AMX state is not plain data flow (a tile configuration per thread,
tile numbers as immediates), so the 32x32 micro-kernel is written in LLVM IR, linked into
the module through ``pragma_import_llvm`` (as ``tvm_bf16``'s dot product) and called per
parallel job. Linux hands AMX's tile data to a process only on request
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``); ``edgeloop_amx_ready`` makes it
once per process, and the kernel fails with a TVM error, not SIGILL, where it is refused.
"""

# TVMScript's buffer annotations are TVM IR, not Python types; its decorator is untyped.
# mypy: disable-error-code="valid-type,untyped-decorator,misc"

from __future__ import annotations

from typing import Any

from compiler.fusion_plan import AMX_TILE, PointwiseShape, plan_pointwise_amx
from compiler.tvm_bf16 import pack_pair, pointwise_prim_func, round_bf16

# The micro-kernel, per job: 32 output channels (weights ``w``: per step of 32 input channels
# one contiguous 32x32 bf16 block, ``fusion_plan.amx_weights``, so that they stream in order)
# by ``tiles`` consecutive runs of ``cols`` positions (the last one ``last`` wide): per pair
# of runs a 2x2 block of fp32 tiles (tmm0-3: 16 channels x one run each) summed over
# ``steps`` (weight tiles tmm4, 5; activation tiles tmm6, 7: 16 channel pairs x one run, from
# ``x``, pitch ``ldx`` bytes per pair), stored into the NCHW output ``out`` (pitch ``ld``:
# one channel's map; a run never crosses the end of a channel's map), then, once every run
# is stored (the stores have landed by then: finishing each pair right after its stores was
# 15 % slower on 96->576 at 14x14), bias, residual (``res``, null for none) and activation
# (``act``: 0 none, 1 ReLU, 2 ReLU6) over what was stored, while it is in L1 or L2. An odd
# count computes its last run twice.
# A run is an image row where the map is wider than 8 (a tile's 16 columns hold one), 16
# positions of the flattened map where it is narrower (7x7: 3 runs and 1 position instead
# of 7 rows); the tile configuration changes with the runs' widths.
# syscall 158 = arch_prctl, 0x1023 = ARCH_REQ_XCOMP_PERM, 18 = XFEATURE_XTILEDATA.
_AMX = r"""
@edgeloop_amx_granted = linkonce_odr global i32 0

declare i64 @syscall(i64, ...)

define linkonce_odr i32 @edgeloop_amx_ready() {
entry:
  %s = load atomic i32, ptr @edgeloop_amx_granted acquire, align 4
  %ok = icmp eq i32 %s, 1
  br i1 %ok, label %yes, label %ask
ask:
  %r = call i64 (i64, ...) @syscall(i64 158, i64 4131, i64 18)
  %granted = icmp eq i64 %r, 0
  br i1 %granted, label %grant, label %no
grant:
  store atomic i32 1, ptr @edgeloop_amx_granted release, align 4
  br label %yes
yes:
  ret i32 0
no:
  ret i32 1
}

define linkonce_odr void @edgeloop_amx_finish(ptr %out, ptr %res, ptr %bias, i64 %ld,
                                             i64 %off, i64 %width, i64 %act,
                                             i64 %chans) #1 {
entry:
  %hasres = icmp ne ptr %res, null
  %wi = trunc i64 %width to i32
  %ws = insertelement <16 x i32> poison, i32 %wi, i64 0
  %wv = shufflevector <16 x i32> %ws, <16 x i32> poison, <16 x i32> zeroinitializer
  %mask = icmp ult <16 x i32> <i32 0, i32 1, i32 2, i32 3, i32 4, i32 5, i32 6, i32 7,
                               i32 8, i32 9, i32 10, i32 11, i32 12, i32 13, i32 14, i32 15>,
                  %wv
  %isr = icmp eq i64 %act, 1
  %is6 = icmp eq i64 %act, 2
  br label %chan
chan:
  %ch = phi i64 [ 0, %entry ], [ %ch1, %chan ]
  %rowoff = mul i64 %ch, %ld
  %base = add i64 %rowoff, %off
  %orow = getelementptr i8, ptr %out, i64 %base
  %rres = getelementptr i8, ptr %res, i64 %base
  %rrow = select i1 %hasres, ptr %rres, ptr %orow
  %bp = getelementptr float, ptr %bias, i64 %ch
  %b = load float, ptr %bp, align 4
  %bs = insertelement <16 x float> poison, float %b, i64 0
  %bv = shufflevector <16 x float> %bs, <16 x float> poison, <16 x i32> zeroinitializer
  %v = call <16 x float> @llvm.masked.load.v16f32.p0(ptr %orow, i32 4, <16 x i1> %mask,
                                                    <16 x float> zeroinitializer)
  %vb = fadd <16 x float> %v, %bv
  %rv = call <16 x float> @llvm.masked.load.v16f32.p0(ptr %rrow, i32 4, <16 x i1> %mask,
                                                     <16 x float> zeroinitializer)
  %vr = fadd <16 x float> %vb, %rv
  %v1 = select i1 %hasres, <16 x float> %vr, <16 x float> %vb
  %relu = call <16 x float> @llvm.maxnum.v16f32(<16 x float> %v1, <16 x float> zeroinitializer)
  %six = call <16 x float> @llvm.minnum.v16f32(<16 x float> %relu, <16 x float> splat (float 6.0))
  %v2 = select i1 %isr, <16 x float> %relu, <16 x float> %v1
  %v3 = select i1 %is6, <16 x float> %six, <16 x float> %v2
  call void @llvm.masked.store.v16f32.p0(<16 x float> %v3, ptr %orow, i32 4, <16 x i1> %mask)
  %ch1 = add i64 %ch, 1
  %more = icmp ult i64 %ch1, %chans
  br i1 %more, label %chan, label %done
done:
  ret void
}

define linkonce_odr void @edgeloop_amx_tiles(ptr %out, ptr %res, ptr %bias, ptr %w, ptr %x,
                                            i64 %ld, i64 %ldx, i64 %steps, i64 %cols,
                                            i64 %tiles, i64 %last, i64 %act,
                                            i64 %chans) #0 {
entry:
  %cfg = alloca [64 x i8], align 64
  call void @llvm.memset.p0.i64(ptr %cfg, i8 0, i64 64, i1 false)
  store i8 1, ptr %cfg
  %rows = getelementptr i8, ptr %cfg, i64 48
  ; rows of the tiles of the first 16 channels (0, 1; weights 4) and of the rest (2, 3; 5):
  ; min(chans, 16) and clamp(chans - 16, 1, 16) (a block of at most 16 channels still
  ; multiplies tiles 2 and 3, over zero weights, and does not store them)
  %lo = call i64 @llvm.umin.i64(i64 %chans, i64 16)
  %hi0 = sub i64 %chans, 16
  %hi1 = call i64 @llvm.smax.i64(i64 %hi0, i64 1)
  %hi = call i64 @llvm.smin.i64(i64 %hi1, i64 16)
  %lob = trunc i64 %lo to i8
  %hib = trunc i64 %hi to i8
  %rw0 = insertelement <8 x i8> <i8 0, i8 0, i8 0, i8 0, i8 0, i8 0, i8 16, i8 16>, i8 %lob, i64 0
  %rw1 = insertelement <8 x i8> %rw0, i8 %lob, i64 1
  %rw2 = insertelement <8 x i8> %rw1, i8 %hib, i64 2
  %rw3 = insertelement <8 x i8> %rw2, i8 %hib, i64 3
  %rw4 = insertelement <8 x i8> %rw3, i8 %lob, i64 4
  %rw5 = insertelement <8 x i8> %rw4, i8 %hib, i64 5
  store <8 x i8> %rw5, ptr %rows
  %upper = icmp ugt i64 %chans, 16
  %colsb = getelementptr i8, ptr %cfg, i64 16
  %c16 = mul i64 %ld, 16
  %x16 = mul i64 %ldx, 16
  %lastt = sub i64 %tiles, 1
  br label %pair
pair:
  %t = phi i64 [ 0, %entry ], [ %tnext, %finish ]
  %pw0 = phi i64 [ 0, %entry ], [ %w0, %finish ]
  %pw1 = phi i64 [ 0, %entry ], [ %w1, %finish ]
  %ta = add i64 %t, 1
  %two = icmp ult i64 %ta, %tiles
  %t1 = select i1 %two, i64 %ta, i64 %t
  %l0 = icmp eq i64 %t, %lastt
  %l1 = icmp eq i64 %t1, %lastt
  %w0 = select i1 %l0, i64 %last, i64 %cols
  %w1 = select i1 %l1, i64 %last, i64 %cols
  %s0 = icmp eq i64 %w0, %pw0
  %s1 = icmp eq i64 %w1, %pw1
  %same = and i1 %s0, %s1
  br i1 %same, label %zero, label %configure
configure:
  %b0w = mul i64 %w0, 4
  %b1w = mul i64 %w1, 4
  %b0 = trunc i64 %b0w to i16
  %b1 = trunc i64 %b1w to i16
  %v0 = insertelement <8 x i16> <i16 0, i16 0, i16 0, i16 0, i16 64, i16 64, i16 0, i16 0>,
                      i16 %b0, i64 0
  %v1 = insertelement <8 x i16> %v0, i16 %b1, i64 1
  %v2 = insertelement <8 x i16> %v1, i16 %b0, i64 2
  %v3 = insertelement <8 x i16> %v2, i16 %b1, i64 3
  %v6 = insertelement <8 x i16> %v3, i16 %b0, i64 6
  %v7 = insertelement <8 x i16> %v6, i16 %b1, i64 7
  store <8 x i16> %v7, ptr %colsb
  call void @llvm.x86.ldtilecfg(ptr %cfg)
  br label %zero
zero:
  %off0p = mul i64 %t, %cols
  %off0 = mul i64 %off0p, 4
  %off1p = mul i64 %t1, %cols
  %off1 = mul i64 %off1p, 4
  call void @llvm.x86.tilezero(i8 0)
  call void @llvm.x86.tilezero(i8 1)
  call void @llvm.x86.tilezero(i8 2)
  call void @llvm.x86.tilezero(i8 3)
  br label %step
step:
  %k = phi i64 [ 0, %zero ], [ %k1, %step ]
  %wk = mul i64 %k, 2048
  %a0 = getelementptr i8, ptr %w, i64 %wk
  %a1 = getelementptr i8, ptr %a0, i64 1024
  %xk = mul i64 %k, %x16
  %xb = getelementptr i8, ptr %x, i64 %xk
  %bp0 = getelementptr i8, ptr %xb, i64 %off0
  %bp1 = getelementptr i8, ptr %xb, i64 %off1
  call void @llvm.x86.tileloadd64(i8 4, ptr %a0, i64 64)
  call void @llvm.x86.tileloadd64(i8 5, ptr %a1, i64 64)
  call void @llvm.x86.tileloadd64(i8 6, ptr %bp0, i64 %ldx)
  call void @llvm.x86.tileloadd64(i8 7, ptr %bp1, i64 %ldx)
  call void @llvm.x86.tdpbf16ps(i8 0, i8 4, i8 6)
  call void @llvm.x86.tdpbf16ps(i8 1, i8 4, i8 7)
  call void @llvm.x86.tdpbf16ps(i8 2, i8 5, i8 6)
  call void @llvm.x86.tdpbf16ps(i8 3, i8 5, i8 7)
  %k1 = add i64 %k, 1
  %more = icmp ult i64 %k1, %steps
  br i1 %more, label %step, label %store
store:
  %o0 = getelementptr i8, ptr %out, i64 %off0
  %o1 = getelementptr i8, ptr %out, i64 %off1
  %o2 = getelementptr i8, ptr %o0, i64 %c16
  %o3 = getelementptr i8, ptr %o1, i64 %c16
  call void @llvm.x86.tilestored64(i8 0, ptr %o0, i64 %ld)
  call void @llvm.x86.tilestored64(i8 1, ptr %o1, i64 %ld)
  br i1 %upper, label %store_upper, label %finish
store_upper:
  call void @llvm.x86.tilestored64(i8 2, ptr %o2, i64 %ld)
  call void @llvm.x86.tilestored64(i8 3, ptr %o3, i64 %ld)
  br label %finish
finish:
  %tnext = add i64 %t, 2
  %again = icmp ult i64 %tnext, %tiles
  br i1 %again, label %pair, label %release
release:
  call void @llvm.x86.tilerelease()
  br label %run
run:
  %r = phi i64 [ 0, %release ], [ %r1, %run ]
  %rl = icmp eq i64 %r, %lastt
  %rw = select i1 %rl, i64 %last, i64 %cols
  %roffp = mul i64 %r, %cols
  %roff = mul i64 %roffp, 4
  call void @edgeloop_amx_finish(ptr %out, ptr %res, ptr %bias, i64 %ld, i64 %roff,
                                 i64 %rw, i64 %act, i64 %chans)
  %r1 = add i64 %r, 1
  %runs = icmp ult i64 %r1, %tiles
  br i1 %runs, label %run, label %exit
exit:
  ret void
}

declare i64 @llvm.umin.i64(i64, i64)
declare i64 @llvm.smax.i64(i64, i64)
declare i64 @llvm.smin.i64(i64, i64)
declare <16 x float> @llvm.maxnum.v16f32(<16 x float>, <16 x float>)
declare <16 x float> @llvm.minnum.v16f32(<16 x float>, <16 x float>)
declare <16 x float> @llvm.masked.load.v16f32.p0(ptr, i32, <16 x i1>, <16 x float>)
declare void @llvm.masked.store.v16f32.p0(<16 x float>, ptr, i32, <16 x i1>)
declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tilezero(i8 immarg)
declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)
declare void @llvm.x86.tdpbf16ps(i8 immarg, i8 immarg, i8 immarg)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
declare void @llvm.x86.tilerelease()

attributes #0 = { nounwind "target-features"="+amx-tile,+amx-bf16" }
attributes #1 = { nounwind "target-features"="+avx512f" }
"""


def pointwise_amx_func(shape: PointwiseShape) -> Any:
    """A 1x1 stride-1 convolution with bf16 products and fp32 sums on AMX tiles, scheduled;
    the PrimFunc. Arguments X (1, C, H, W) float32, W ``fusion_plan.amx_weights``' (Co / 32,
    C' / 32, 32, 32) uint16, b (Co,) float32 [, R (1, Co, H, W) float32]; output (1, Co, H,
    W) float32, the activation after bias and residual. Raises ValueError for a shape
    ``fusion_plan.plan_pointwise_amx`` does not take."""
    from tvm.script import tirx as T

    plan = plan_pointwise_amx(shape)
    if plan is None:
        raise ValueError(f"the AMX kernel does not compute {shape.describe()}")
    c, co, h, w = shape.in_channels, shape.out_channels, shape.height, shape.width
    n_pos, whole, pairs = h * w, c // 2, -(-c // 2)
    c_pad, cols, span = plan.in_channels, plan.columns, plan.positions
    pairs_pad = c_pad // 2
    groups = -(-n_pos // span)
    rows = span // w  # image rows per group (groups of whole rows: see AmxPlan)
    # A group's activation pairs: its positions per pair, padded to whole cache lines so that
    # no line is written by two cores.
    pitch = -(-span // 16) * 16
    blocks = -(-co // AMX_TILE)
    jobs = blocks * groups
    act = {None: 0, "relu": 1, "relu6": 2}[shape.activation]

    @T.macro
    def body(X: Any, Wt: Any, bias: Any, R: Any, Out: Any) -> None:  # noqa: N803 (TIR names)
        Xp = T.sblock_alloc_buffer((groups, pairs_pad, pitch), "uint32")
        with T.attr(0, "pragma_import_llvm", _AMX):
            assert T.call_extern("int32", "edgeloop_amx_ready") == 0, (
                "the kernel multiplies on AMX tiles, which this process may not use: "
                "Linux refused arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) (a kernel older "
                "than 5.16, or a CPU without AMX)"
            )
            # Every store in an opaque block of its own (weight prepacking's passes build a
            # schedule of each kernel); rows vectorized along their columns, as in
            # tvm_bf16.pointwise_bf16_func. Packed by the groups of rows the GEMM's jobs
            # take (group-major), so that each core multiplies the rows it packed
            # (fusion_plan.plan_pointwise_amx); with one group by channel pairs, each a
            # whole number of cache lines.
            if groups > 1:
                for g in T.parallel(groups):
                    for k in range(whole):
                        for i in range(rows):
                            if g * rows + i < h:
                                for j in T.vectorized(w):
                                    with T.sblock("pack"):
                                        Xp[g, k, i * w + j] = pack_pair(
                                            X[0, 2 * k, g * rows + i, j],
                                            X[0, 2 * k + 1, g * rows + i, j],
                                        )
            else:
                for k in T.parallel(whole):
                    for i in range(h):
                        for j in T.vectorized(w):
                            with T.sblock("pack"):
                                Xp[0, k, i * w + j] = pack_pair(
                                    X[0, 2 * k, i, j], X[0, 2 * k + 1, i, j]
                                )
            if whole < pairs:  # an odd channel count: the last pair's high half is 0
                for i in range(h):
                    for j in T.vectorized(w):
                        with T.sblock("pack_odd"):
                            Xp[i // rows, whole, i % rows * w + j] = round_bf16(
                                T.reinterpret("uint32", X[0, 2 * whole, i, j])
                            )
            for g in T.parallel(groups):  # the padding up to a whole step
                for k in range(pairs_pad - pairs):
                    for p in T.vectorized(pitch):
                        with T.sblock("pack_zero"):
                            Xp[g, pairs + k, p] = T.uint32(0)
            for job in T.parallel(jobs):
                with T.sblock("gemm"):
                    # The residual, where there is one, is read through its pointer too.
                    T.reads(
                        Wt[0:blocks, 0 : c_pad // AMX_TILE, 0:AMX_TILE, 0:AMX_TILE],
                        Xp[0:groups, 0:pairs_pad, 0:pitch],
                        bias[0:co],
                    )
                    T.writes(Out[0, 0:co, 0:h, 0:w])
                    T.evaluate(
                        T.call_extern(
                            "void",
                            "edgeloop_amx_tiles",
                            Out.access_ptr(
                                "rw", offset=job % blocks * AMX_TILE * n_pos + job // blocks * span
                            ),
                            R.access_ptr(
                                "r", offset=job % blocks * AMX_TILE * n_pos + job // blocks * span
                            )
                            if shape.residual
                            else T.reinterpret("handle", T.uint64(0)),
                            bias.access_ptr("r", offset=job % blocks * AMX_TILE),
                            Wt.access_ptr("r", offset=job % blocks * AMX_TILE * c_pad),
                            Xp.access_ptr("r", offset=job // blocks * pairs_pad * pitch),
                            T.int64(n_pos * 4),
                            T.int64(pitch * 4),
                            T.int64(c_pad // AMX_TILE),
                            T.int64(cols),
                            T.int64((T.min(span, n_pos - job // blocks * span) + cols - 1) // cols),
                            T.int64(
                                T.min(span, n_pos - job // blocks * span)
                                - (T.min(span, n_pos - job // blocks * span) + cols - 1)
                                // cols
                                * cols
                                + cols
                            ),
                            T.int64(act),
                            T.int64(T.min(AMX_TILE, co - job % blocks * AMX_TILE)),
                        )
                    )

    return pointwise_prim_func(shape, body, (blocks, c_pad // AMX_TILE, AMX_TILE, AMX_TILE))
