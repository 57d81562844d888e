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
from compiler.tvm_bf16 import activate, pack_pair, round_bf16

# The micro-kernel: for 32 output channels (weights ``w``: per step of 32 input channels one
# contiguous 32x32 bf16 block, ``fusion_plan.amx_weights``, so that the weights stream in
# order) and image rows [row0, row_end) of ``height`` rows of ``width`` <= 16 positions, per
# pair of rows a 2x2 block of fp32 tiles (tmm0-3: 16 channels x one row each) summed over
# ``steps`` (weight tiles tmm4, 5; activation tiles tmm6, 7: 16 channel pairs x one row, from
# ``x``, the group's pairs at pitch ``ldx`` bytes), stored into the NCHW output ``out``
# (pitch ``ld``: one channel's map) row by row; the last pair of an odd height computes its
# row twice. Tiles are ``width`` columns wide, so no store crosses a row.
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

define linkonce_odr void @edgeloop_amx_rows(ptr %out, ptr %w, ptr %x, i64 %ld, i64 %ldx,
                                           i64 %steps, i64 %width, i64 %row0,
                                           i64 %row_end, i64 %height) #0 {
entry:
  %cfg = alloca [64 x i8], align 64
  call void @llvm.memset.p0.i64(ptr %cfg, i8 0, i64 64, i1 false)
  store i8 1, ptr %cfg
  %rowb = mul i64 %width, 4
  %rowb16 = trunc i64 %rowb to i16
  %narrow = insertelement <8 x i16> <i16 0, i16 0, i16 0, i16 0, i16 64, i16 64, i16 0, i16 0>,
                          i16 %rowb16, i64 0
  %n1 = insertelement <8 x i16> %narrow, i16 %rowb16, i64 1
  %n2 = insertelement <8 x i16> %n1, i16 %rowb16, i64 2
  %n3 = insertelement <8 x i16> %n2, i16 %rowb16, i64 3
  %n6 = insertelement <8 x i16> %n3, i16 %rowb16, i64 6
  %n7 = insertelement <8 x i16> %n6, i16 %rowb16, i64 7
  %colsb = getelementptr i8, ptr %cfg, i64 16
  store <8 x i16> %n7, ptr %colsb
  %rows = getelementptr i8, ptr %cfg, i64 48
  store <8 x i8> <i8 16, i8 16, i8 16, i8 16, i8 16, i8 16, i8 16, i8 16>, ptr %rows
  call void @llvm.x86.ldtilecfg(ptr %cfg)
  %c16 = mul i64 %ld, 16
  %x16 = mul i64 %ldx, 16
  %last = sub i64 %height, 1
  %any = icmp slt i64 %row0, %row_end
  br i1 %any, label %pair, label %exit
pair:
  %r = phi i64 [ %row0, %entry ], [ %rnext, %stored ]
  %rr = add i64 %r, 1
  %ris = icmp slt i64 %rr, %last
  %r1 = select i1 %ris, i64 %rr, i64 %last
  %off0 = mul i64 %r, %rowb
  %off1 = mul i64 %r1, %rowb
  %xr0 = sub i64 %r, %row0
  %xr1 = sub i64 %r1, %row0
  %xoff0 = mul i64 %xr0, %rowb
  %xoff1 = mul i64 %xr1, %rowb
  call void @llvm.x86.tilezero(i8 0)
  call void @llvm.x86.tilezero(i8 1)
  call void @llvm.x86.tilezero(i8 2)
  call void @llvm.x86.tilezero(i8 3)
  br label %step
step:
  %k = phi i64 [ 0, %pair ], [ %k1, %step ]
  %wk = mul i64 %k, 2048
  %a0 = getelementptr i8, ptr %w, i64 %wk
  %a1 = getelementptr i8, ptr %a0, i64 1024
  %xk = mul i64 %k, %x16
  %xb = getelementptr i8, ptr %x, i64 %xk
  %b0 = getelementptr i8, ptr %xb, i64 %xoff0
  %b1 = getelementptr i8, ptr %xb, i64 %xoff1
  call void @llvm.x86.tileloadd64(i8 4, ptr %a0, i64 64)
  call void @llvm.x86.tileloadd64(i8 5, ptr %a1, i64 64)
  call void @llvm.x86.tileloadd64(i8 6, ptr %b0, i64 %ldx)
  call void @llvm.x86.tileloadd64(i8 7, ptr %b1, i64 %ldx)
  call void @llvm.x86.tdpbf16ps(i8 0, i8 4, i8 6)
  call void @llvm.x86.tdpbf16ps(i8 1, i8 4, i8 7)
  call void @llvm.x86.tdpbf16ps(i8 2, i8 5, i8 6)
  call void @llvm.x86.tdpbf16ps(i8 3, i8 5, i8 7)
  %k1 = add i64 %k, 1
  %more = icmp ult i64 %k1, %steps
  br i1 %more, label %step, label %store
store:
  %c0 = getelementptr i8, ptr %out, i64 %off0
  %c1 = getelementptr i8, ptr %out, i64 %off1
  %c2 = getelementptr i8, ptr %c0, i64 %c16
  %c3 = getelementptr i8, ptr %c1, i64 %c16
  call void @llvm.x86.tilestored64(i8 0, ptr %c0, i64 %ld)
  call void @llvm.x86.tilestored64(i8 1, ptr %c1, i64 %ld)
  call void @llvm.x86.tilestored64(i8 2, ptr %c2, i64 %ld)
  call void @llvm.x86.tilestored64(i8 3, ptr %c3, i64 %ld)
  br label %stored
stored:
  %rnext = add i64 %r, 2
  %again = icmp slt i64 %rnext, %row_end
  br i1 %again, label %pair, label %exit
exit:
  call void @llvm.x86.tilerelease()
  ret void
}

declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tilezero(i8 immarg)
declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)
declare void @llvm.x86.tdpbf16ps(i8 immarg, i8 immarg, i8 immarg)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
declare void @llvm.x86.tilerelease()

attributes #0 = { nounwind "target-features"="+amx-tile,+amx-bf16" }
"""


def pointwise_amx_func(shape: PointwiseShape) -> Any:
    """A 1x1 stride-1 convolution with bf16 products and fp32 sums on AMX tiles, scheduled;
    the PrimFunc. Arguments X (1, C, H, W) float32, W ``fusion_plan.amx_weights``' (Co, C')
    uint16, b (Co,) float32 [, R (1, Co, H, W) float32]; output (1, Co, H, W) float32, the
    activation after bias and residual. Raises ValueError for a shape
    ``fusion_plan.plan_pointwise_amx`` does not take."""
    from tvm.script import tirx as T

    plan = plan_pointwise_amx(shape)
    if plan is None:
        raise ValueError(f"the AMX kernel does not compute {shape.describe()}")
    c, co, h, w = shape.in_channels, shape.out_channels, shape.height, shape.width
    n_pos, whole, pairs = h * w, c // 2, -(-c // 2)
    c_pad, rows = plan.in_channels, plan.rows
    pairs_pad = c_pad // 2
    groups = -(-h // rows)
    # A group's activation pairs: rows x w positions per pair, padded to whole cache lines so
    # that no line is written by two cores.
    pitch = -(-rows * w // 16) * 16
    blocks = co // AMX_TILE
    jobs = blocks * groups
    activation = shape.activation

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
            # tvm_bf16.pointwise_bf16_func.
            # Packed by the groups of rows the GEMM's jobs take (group-major), so that each
            # core multiplies the rows it packed (fusion_plan.plan_pointwise_amx); with one
            # group by channel pairs, each a whole number of cache lines.
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
                    T.evaluate(
                        T.call_extern(
                            "void",
                            "edgeloop_amx_rows",
                            Out.access_ptr("w", offset=job % blocks * AMX_TILE * n_pos),
                            Wt.access_ptr("r", offset=job % blocks * AMX_TILE * c_pad),
                            Xp.access_ptr("r", offset=job // blocks * pairs_pad * pitch),
                            T.int64(n_pos * 4),
                            T.int64(pitch * 4),
                            T.int64(c_pad // AMX_TILE),
                            T.int64(w),
                            T.int64(job // blocks * rows),
                            T.int64(T.min(h, job // blocks * rows + rows)),
                            T.int64(h),
                        )
                    )
                    # Bias, residual and activation over the rows just stored (in L1).
                    for o in range(AMX_TILE):
                        for i in range(rows):
                            if job // blocks * rows + i < h:
                                for j in T.vectorized(w):
                                    with T.sblock("out"):
                                        if shape.residual:
                                            Out[
                                                0,
                                                job % blocks * AMX_TILE + o,
                                                job // blocks * rows + i,
                                                j,
                                            ] = activate(
                                                activation,
                                                Out[
                                                    0,
                                                    job % blocks * AMX_TILE + o,
                                                    job // blocks * rows + i,
                                                    j,
                                                ]
                                                + bias[job % blocks * AMX_TILE + o]
                                                + R[
                                                    0,
                                                    job % blocks * AMX_TILE + o,
                                                    job // blocks * rows + i,
                                                    j,
                                                ],
                                            )
                                        else:
                                            Out[
                                                0,
                                                job % blocks * AMX_TILE + o,
                                                job // blocks * rows + i,
                                                j,
                                            ] = activate(
                                                activation,
                                                Out[
                                                    0,
                                                    job % blocks * AMX_TILE + o,
                                                    job // blocks * rows + i,
                                                    j,
                                                ]
                                                + bias[job % blocks * AMX_TILE + o],
                                            )

    # s_tir: the body goes in a root block (weight prepacking's layout rewrite requires one).
    if shape.residual:

        @T.prim_func(private=True, s_tir=True)
        def with_residual(
            X: T.Buffer((1, c, h, w), "float32"),
            Wt: T.Buffer((blocks, c_pad // AMX_TILE, AMX_TILE, AMX_TILE), "uint16"),
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
            Wt: T.Buffer((blocks, c_pad // AMX_TILE, AMX_TILE, AMX_TILE), "uint16"),
            bias: T.Buffer((co,), "float32"),
            Out: T.Buffer((1, co, h, w), "float32"),
        ) -> None:
            T.func_attr({"tirx.noalias": True})
            with T.sblock("root"):
                body(X, Wt, bias, None, Out)

        func = plain
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})
