"""Fused inverted-residual kernels for CPU targets: the TIR kernel and the Relax rewrite.

``fuse_inverted_residuals`` finds MobileNetV2-style blocks in a Relax module (as the ONNX
frontend imports them: a 1x1 convolution, bias add and ReLU6, a 3x3 depthwise convolution,
bias add and ReLU6, a 1x1 convolution and bias add, optionally the residual add) and
replaces each with one call to a hand-scheduled TIR kernel (``block_func`` + ``schedule``,
sized by ``compiler.fusion_plan``). The kernel is marked scheduled, so MetaSchedule
neither tunes it nor applies records to it. Written by hand because no TVM schedule rule or
fusion pass computes one convolution inside another's loops (Relax's ``FuseOps`` puts at
most one convolution in a kernel); docs/toolchain.md and docs/benchmarks.md say more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from compiler.fusion_plan import (
    AVX512,
    LANES,
    BlockConfig,
    BlockShape,
    DepthwiseShape,
    MaxPoolShape,
    PointwiseConfig,
    PointwiseShape,
    SplitBlockConfig,
    StemBlockShape,
    StridedConvShape,
    VectorUnit,
    WinogradConfig,
    amx_weights,
    bf16_conv_pairs,
    bf16_pairs,
    bf16_stages,
    block_mask,
    blocked_weights,
    paired_bf16_weights,
    plan_block,
    plan_depthwise,
    plan_depthwise_project,
    plan_max_pool,
    plan_pointwise,
    plan_pointwise_amx,
    plan_pointwise_bf16,
    plan_pointwise_mean,
    plan_split_block,
    plan_stem_block,
    plan_strided_conv,
    plan_winograd,
    split_block_weights,
    splits_for_amx,
    stem_plane_positions,
    strided_conv_dims,
    strided_strip_dims,
    strip_dims,
    winograd_matrices,
    winograd_weights,
)

log = logging.getLogger(__name__)

# The ONNX frontend lowers Clip(0, 6) to calls of TIR functions it names maximum*/minimum*.
_CLIP_LOW, _CLIP_HIGH = "maximum", "minimum"


def _relu6(x: Any) -> Any:
    from tvm import tirx

    return tirx.max(tirx.min(x, tirx.const(6.0, "float32")), tirx.const(0.0, "float32"))


def _inputs(shape: BlockShape, mask_shape: tuple[int, ...]) -> tuple[Any, list[Any]]:
    """X and the weight placeholders; (X, [We, be,] Wd, bd, Wp, bp[, mask])."""
    from tvm import te

    c, m, co = shape.in_channels, shape.expanded, shape.out_channels
    x = te.placeholder((1, c, shape.height, shape.width), name="X")
    weights = [
        te.placeholder((m, 3, 3), name="Wd"),
        te.placeholder((m,), name="bd"),
        te.placeholder((co, m), name="Wp"),
        te.placeholder((co,), name="bp"),
    ]
    if shape.expand:
        weights[:0] = [te.placeholder((m, c), name="We"), te.placeholder((m,), name="be")]
        weights.append(te.placeholder(mask_shape, name="mask"))
    return x, weights


def block_func(
    shape: BlockShape, rows: int, *, bf16: bool = False, bf16_expand: bool = False
) -> Any:
    """The block in TE, strip by strip (``rows`` output rows each); see ``fusion_plan``.

    Arguments: X (1, C, H, W), We (M, C), be (M,), Wd (M, 3, 3), bd (M,), Wp (Co, M),
    bp (Co,), the edge mask (strips, fe); output (1, Co, H, W). Without expansion: X, Wd,
    bd, Wp, bp and the output (the depthwise stage reads the zero-padded input rows).
    """
    from tvm import te, tirx

    c, m = shape.in_channels, shape.expanded
    h, w = shape.height, shape.width
    strips = h // rows
    pitch, fd, fe = strip_dims(w, rows)
    x, weights = _inputs(shape, (strips, fe))
    zero = tirx.const(0.0, "float32")

    def padded_input(s: Any, k: Any, row: Any, col: Any) -> Any:
        i = s * rows - 1 + row
        return tirx.if_then_else(
            te.all(i >= 0, i < h, col >= 1, col <= w),
            x[0, k, tirx.max(tirx.min(i, h - 1), 0), col - 1],
            zero,
        )

    # The strip's input rows (halo included) at the padded pitch, read by the expand stage
    # as contiguous positions (f // pitch, f % pitch flattens back to f).
    if bf16_expand:
        from compiler.tvm_bf16 import pack_pair

        xp = te.compute(
            (strips, c // 2, -(-fe // pitch), pitch),
            lambda s, r, row, col: pack_pair(
                padded_input(s, 2 * r, row, col), padded_input(s, 2 * r + 1, row, col)
            ),
            name="Xp",
        )
    else:
        xp = te.compute((strips, c, -(-fe // pitch), pitch), padded_input, name="Xp")
    if shape.expand:
        we, be, _, _, _, _, mask = weights
        if bf16_expand:
            we = weights[0] = te.placeholder((m, c // 2), "uint32", name="We")
            e = _pair_gemm(we, lambda s, r, f: xp[s, r, f // pitch, f % pitch], (strips, m, fe))
        else:
            rc = te.reduce_axis((0, c), name="c")
            e = te.compute(
                (strips, m, fe),
                lambda s, k, f: te.sum(we[k, rc] * xp[s, rc, f // pitch, f % pitch], axis=rc),
                name="E",
            )
        ep = te.compute(
            (strips, m, fe), lambda s, k, f: _relu6(e[s, k, f] + be[k]) * mask[s, f], name="Ep"
        )

        def expanded(s: Any, k: Any, f: Any) -> Any:
            return ep[s, k, f]

    else:

        def expanded(s: Any, k: Any, f: Any) -> Any:
            return xp[s, k, f // pitch, f % pitch]

    wd = weights[-5] if shape.expand else weights[0]
    d = _depthwise(wd, expanded, (strips, m, fd), pitch, fe)
    config = BlockConfig(rows, 1, 1, 1)  # only the rows matter to the stages after D
    return _project_and_write(shape, config, pitch, fd, x, weights, d, bf16=bf16)


def _pair_gemm(weight: Any, source: Any, dims: tuple[int, ...], name: str = "E") -> Any:
    """Stage ``name`` (*lead, channel, position): the 1x1 convolution with bf16 pairs,
    ``weight`` (Co, C / 2) uint32 and ``source(*lead, pair, position)`` the activation pairs
    (``compiler.tvm_bf16``): the form ``tvm_bf16.PAIR_INTRIN`` tensorizes."""
    from tvm import te

    from compiler.tvm_bf16 import pair_high, pair_low

    r = te.reduce_axis((0, int(weight.shape[1])), name="c")

    def value(*index: Any) -> Any:
        *lead, o, f = index
        pair = source(*lead, r, f)
        return te.sum(
            pair_low(weight[o, r]) * pair_low(pair) + pair_high(weight[o, r]) * pair_high(pair),
            axis=r,
        )

    return te.compute(dims, value, name=name)


def _also_reading(never: Any, last: Any, value: Any) -> Any:
    """``value``, with a read of ``last`` behind ``never``, a condition false at every
    iteration (a loop variable below 0): the region ``compute_at`` derives for the
    producer then reaches ``last`` too, so it stays whole accumulator blocks (a ragged one
    puts a predicate in the vector loops, which LLVM scalarizes). The branch is simplified
    away before codegen."""
    from tvm import tirx

    return tirx.if_then_else(never, last, value)


def _depthwise(
    wd: Any, expanded: Any, dims: tuple[int, int, int], pitch: int, positions: int
) -> Any:
    """Stage "D" of a stride-1 block: the 3x3 taps as shifted runs of ``expanded``, whose
    stage computes ``positions`` (``fusion_plan.strip_dims``' fe)."""
    from tvm import te

    kh, kw = te.reduce_axis((0, 3), name="kh"), te.reduce_axis((0, 3), name="kw")

    def tap(s: Any, k: Any, g: Any) -> Any:
        return _also_reading(
            g < 0, expanded(s, k, positions - 1), expanded(s, k, g + kh * pitch + kw)
        )

    return te.compute(
        dims, lambda s, k, g: te.sum(wd[k, kh, kw] * tap(s, k, g), axis=[kh, kw]), name="D"
    )


def _input_planes(
    x: Any,
    dims: tuple[int, int, int, int, int],
    rows: int,
    reach: int,
    shift: int = 0,
    *,
    pairs: bool = False,
) -> Any:
    """Stage "Xp" of a stride-2 kernel: per strip of ``rows`` output rows, four planes of
    the zero-padded input X (1, C, H, W), even/odd rows by even/odd columns, ``dims`` =
    (strips, 4, C, plane rows, pitch). Plane (a, b) at (row, col) holds input row
    2 (s rows + row - shift) + a - reach and column 2 (col - shift) + b - reach, so that tap
    (kh, kw) of output position (row - shift, col - shift) of strip s is plane (kh % 2,
    kw % 2) at (row + kh // 2, col + kw // 2) (``_planes_conv``): a contiguous run of it for
    contiguous positions. ``shift`` 1: the positions are a padded layout's, whose first row
    and column are the padding (``stem_block_func``)."""
    from tvm import te, tirx

    c, h, w = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    zero = tirx.const(0.0, "float32")

    def plane_input(s: Any, plane: Any, ch: Any, row: Any, col: Any) -> Any:
        i = 2 * (s * rows + row - shift) + plane // 2 - reach
        j = 2 * (col - shift) + plane % 2 - reach
        inside = [i >= 0, i < h, j >= 0, j < w]
        if pairs and c % 2:  # the last pair's high half is a zero channel
            inside.append(ch < c)
            ch = tirx.min(ch, c - 1)
        return tirx.if_then_else(
            te.all(*inside),
            x[0, ch, tirx.max(tirx.min(i, h - 1), 0), tirx.max(tirx.min(j, w - 1), 0)],
            zero,
        )

    if pairs:  # dims[2] is ceil(C / 2): channel pairs as uint32 (compiler.tvm_bf16)
        from compiler.tvm_bf16 import pack_pair

        return te.compute(
            dims,
            lambda s, plane, r, row, col: pack_pair(
                plane_input(s, plane, 2 * r, row, col), plane_input(s, plane, 2 * r + 1, row, col)
            ),
            name="Xp",
        )
    return te.compute(dims, plane_input, name="Xp")


def _planes_conv(
    xp: Any, weight: Any, dims: tuple[int, int, int], pitch: int, name: str, *, pairs: bool = False
) -> Any:
    """Stage ``name`` (strips, Co, positions): the k x k convolution with ``weight`` (Co, C,
    k, k) of ``_input_planes``' stage ``xp``, tap (kh, kw) of flat position f read from plane
    (kh % 2, kw % 2) at f + (kh // 2) pitch + kw // 2. ``pairs``: ``xp`` and ``weight`` (Co,
    ceil(C / 2), k, k) hold uint32 pairs of bf16 channels (``fusion_plan.bf16_conv_pairs``),
    summed as ``_pair_gemm`` does, in the form ``tvm_bf16.PAIR_INTRIN`` tensorizes."""
    from tvm import te

    from compiler.tvm_bf16 import pair_high, pair_low

    c, k = int(weight.shape[1]), int(weight.shape[2])
    rc = te.reduce_axis((0, c), name="c")
    kh, kw = te.reduce_axis((0, k), name="kh"), te.reduce_axis((0, k), name="kw")

    def tap(s: Any, f: Any) -> Any:
        g = f + kh // 2 * pitch + kw // 2
        return xp[s, kh % 2 * 2 + kw % 2, rc, g // pitch, g % pitch]

    def value(s: Any, o: Any, f: Any) -> Any:
        w = weight[o, rc, kh, kw]
        if pairs:
            d = tap(s, f)
            return pair_low(w) * pair_low(d) + pair_high(w) * pair_high(d)
        return w * tap(s, f)

    return te.compute(dims, lambda s, o, f: te.sum(value(s, o, f), axis=[rc, kh, kw]), name=name)


def stem_block_func(
    shape: StemBlockShape, config: BlockConfig, *, bf16: bool = False, bf16_expand: bool = False
) -> Any:
    """``block_func`` of a first convolution and the expansion-1 block after it
    (``fusion_plan.StemBlockShape``): the convolution is the expand stage.

    Per strip it computes the convolution's output at the block's padded positions
    (``strip_dims``) from four planes of the input (even/odd rows by even/odd columns, as
    ``strided_conv_func``: every tap a contiguous run), masked to zero outside the image
    like an expand stage. Arguments: X (1, C, H, W), We (M, C, k, k), be (M,), Wd (M, 3, 3),
    bd (M,), Wp (Co, M), bp (Co,), the edge mask (strips, fe); output (1, Co, H/2, W/2).
    ``bf16_expand``: the planes hold pairs of bf16 channels and We is
    ``fusion_plan.bf16_conv_pairs``' (M, ceil(C / 2), k, k) uint32.
    """
    from tvm import te

    conv, view = shape.conv, shape.expanded_view
    c, m, co, k = conv.in_channels, view.expanded, view.out_channels, conv.kernel
    rows, reach = config.rows, conv.kernel // 2
    strips = view.height // rows
    pitch, fd, fe, fx = stem_plane_positions(shape, rows)
    x = te.placeholder((1, c, conv.height, conv.width), name="X")
    cp = -(-c // 2) if bf16_expand else c  # channels (pairs) of the planes and We
    weights = [
        te.placeholder((m, cp, k, k), "uint32" if bf16_expand else "float32", name="We"),
        te.placeholder((m,), name="be"),
        te.placeholder((m, 3, 3), name="Wd"),
        te.placeholder((m,), name="bd"),
        te.placeholder((co, m), name="Wp"),
        te.placeholder((co,), name="bp"),
        te.placeholder((strips, fe), name="mask"),
    ]
    we, be, wd, mask = weights[0], weights[1], weights[2], weights[6]
    # Expand position (row, col) is the convolution's output (s * rows - 1 + row, col - 1).
    planes = (strips, 4, cp, -(-fx // pitch), pitch)
    xp = _input_planes(x, planes, rows, reach, shift=1, pairs=bf16_expand)
    e = _planes_conv(xp, we, (strips, m, fe), pitch, "E", pairs=bf16_expand)
    ep = te.compute(
        (strips, m, fe),
        lambda s, o, f: _activation(conv.activation, e[s, o, f] + be[o]) * mask[s, f],
        name="Ep",
    )
    d = _depthwise(wd, lambda s, o, f: ep[s, o, f], (strips, m, fd), pitch, fe)
    return _project_and_write(view, config, pitch, fd, x, weights, d, bf16=bf16)


def strided_block_func(
    shape: BlockShape, config: BlockConfig, *, bf16: bool = False, bf16_expand: bool = False
) -> Any:
    """``block_func`` of a stride-2 block: the expand stage computes four planes of the
    padded image (even/odd rows by even/odd columns, ``fusion_plan.strided_strip_dims``)
    so that every depthwise tap reads a contiguous run of one plane.

    Arguments as ``block_func``'s, the mask (strips, 4, fe); output (1, Co, H/2, W/2).
    """
    from tvm import te

    c, m, rows = shape.in_channels, shape.expanded, config.rows
    strips = shape.out_height // rows
    pitch, fd, fe = strided_strip_dims(shape.out_width, rows, config.vectors)
    x, weights = _inputs(shape, (strips, 4, fe))
    planes = (strips, 4, c // 2 if bf16_expand else c, -(-fe // pitch), pitch)
    xp = _input_planes(x, planes, rows, reach=1, pairs=bf16_expand)
    if shape.expand:
        we, be, _, _, _, _, mask = weights
        if bf16_expand:
            we = weights[0] = te.placeholder((m, c // 2), "uint32", name="We")
            e = _pair_gemm(
                we, lambda s, q, r, f: xp[s, q, r, f // pitch, f % pitch], (strips, 4, m, fe)
            )
        else:
            rc = te.reduce_axis((0, c), name="c")
            e = te.compute(
                (strips, 4, m, fe),
                lambda s, q, k, f: te.sum(we[k, rc] * xp[s, q, rc, f // pitch, f % pitch], axis=rc),
                name="E",
            )
        ep = te.compute(
            (strips, 4, m, fe),
            lambda s, q, k, f: _relu6(e[s, q, k, f] + be[k]) * mask[s, q, f],
            name="Ep",
        )

        def expanded(s: Any, q: Any, k: Any, f: Any) -> Any:
            return ep[s, q, k, f]

    else:

        def expanded(s: Any, q: Any, k: Any, f: Any) -> Any:
            return xp[s, q, k, f // pitch, f % pitch]

    wd = weights[-5] if shape.expand else weights[0]
    kh, kw = te.reduce_axis((0, 3), name="kh"), te.reduce_axis((0, 3), name="kw")

    def tap(s: Any, k: Any, g: Any) -> Any:
        return _also_reading(
            g < 0,
            expanded(s, 3, k, fe - 1),
            expanded(s, kh % 2 * 2 + kw % 2, k, g + kh // 2 * pitch + kw // 2),
        )

    d = te.compute(
        (strips, m, fd),
        lambda s, k, g: te.sum(wd[k, kh, kw] * tap(s, k, g), axis=[kh, kw]),
        name="D",
    )
    return _project_and_write(shape, config, pitch, fd, x, weights, d, bf16=bf16)


def _project_and_write(
    shape: BlockShape,
    config: BlockConfig,
    pitch: int,
    fd: int,
    x: Any,
    weights: list[Any],
    d: Any,
    *,
    bf16: bool = False,
) -> Any:
    """The stages after the depthwise sum ``d``, shared by all block kinds; the PrimFunc.

    ``bf16``: the projection multiplies bf16 pairs (``compiler.tvm_bf16``): "D1" packs the
    activated depthwise output as uint32 pairs of channels, and the weight argument is
    ``fusion_plan.bf16_pairs``' (Co, M / 2) uint32 instead of (Co, M) float32.
    """
    from tvm import te

    co, m, rows = shape.out_channels, shape.expanded, config.rows
    strips = shape.out_height // rows
    bd, wp, bp = weights[-4:-1] if shape.expand else weights[1:4]
    if bf16:
        from compiler.tvm_bf16 import pack_pair, pair_high, pair_low

        weights = list(weights)
        wp = te.placeholder((co, m // 2), "uint32", name="Wp")
        weights[len(weights) - 3 if shape.expand else 2] = wp
        d1 = te.compute(
            (strips, m // 2, fd),
            lambda s, r, g: pack_pair(
                _relu6(d[s, 2 * r, g] + bd[2 * r]), _relu6(d[s, 2 * r + 1, g] + bd[2 * r + 1])
            ),
            name="D1",
        )
        rp = te.reduce_axis((0, m // 2), name="r")
        p = te.compute(
            (strips, co, fd),
            lambda s, o, g: te.sum(
                pair_low(wp[o, rp]) * pair_low(d1[s, rp, g])
                + pair_high(wp[o, rp]) * pair_high(d1[s, rp, g]),
                axis=rp,
            ),
            name="P",
        )
    else:
        d1 = te.compute((strips, m, fd), lambda s, k, g: _relu6(d[s, k, g] + bd[k]), name="D1")
        rm = te.reduce_axis((0, m), name="r")
        p = te.compute(
            (strips, co, fd), lambda s, o, g: te.sum(wp[o, rm] * d1[s, rm, g], axis=rm), name="P"
        )
    # Whole strips (padding columns too) so that no stage is cut to a ragged region.
    q = te.compute((strips, co, fd), lambda s, o, g: p[s, o, g] + bp[o], name="Q")

    def output(n: Any, o: Any, i: Any, j: Any) -> Any:
        # Q, and every stage before it, computed for whole strips at Out's strip loop
        # (``schedule``).
        value = _also_reading(j < 0, q[i // rows, o, fd - 1], q[i // rows, o, i % rows * pitch + j])
        return value + x[n, o, i, j] if shape.residual else value

    out = te.compute((1, co, shape.out_height, shape.out_width), output, name="Out")
    return te.create_prim_func([x, *weights, out])


def _gemm_stage(
    sch: Any,
    name: str,
    strip: Any,
    channels: int,
    vectors: int,
    *,
    planes: bool = False,
    pairs: bool = False,
) -> Any:
    """Stage ``name`` (strip, [plane,] channel, position, reductions...) register-blocked.

    ``channels`` x ``vectors`` vectors of positions of accumulators in a local buffer (LLVM
    keeps it in registers once the loops are unrolled), the reduction outside them.
    Returns the loop of each accumulator vector's 16 positions. ``pairs``: a bf16 pair GEMM
    (``_pair_gemm``), that loop left for the caller to tensorize to one vdpbf16ps
    (``tvm_bf16.PAIR_INTRIN``) once the producers are placed: ``compute_at`` cannot follow
    a tensorized consumer.
    """
    block = sch.get_sblock(name)
    sch.compute_at(block, strip)
    chan, pos, *red = sch.get_loops(block)[2 if planes else 1 :]
    chan_o, chan_i = sch.split(chan, [None, channels])
    pos_o, pos_m, pos_v = sch.split(pos, [None, vectors, LANES])
    sch.reorder(chan_o, pos_o, *red, chan_i, pos_m, pos_v)
    sch.unroll(chan_i)
    sch.unroll(pos_m)
    if not pairs:
        sch.vectorize(pos_v)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, pos_o)
    sch.decompose_reduction(block, red[0])
    _, inner = sch.split(sch.get_loops(acc)[-1], [None, LANES])
    sch.vectorize(inner)
    return pos_v


def schedule(
    func: Any,
    config: BlockConfig,
    *,
    strided: bool = False,
    expand: bool = True,
    bf16: bool = False,
    bf16_expand: bool = False,
) -> Any:
    """Strips in parallel, each computing every stage for its rows and writing its rows of
    the output; returns the Schedule. (The output was once a second parallel pass over
    all strips' Q: 0.95-1.0x the time alone on a Zen 4, the stem's 16 channels at 112x112
    most.)

    ``strided``: ``func`` is a ``strided_block_func`` (its expand stage has a plane axis);
    ``expand`` False: it has no expand stage.
    """
    import tvm.s_tir as tir

    sch = tir.Schedule(func)
    out = sch.get_sblock("Out")
    n, co, i, w = sch.get_loops(out)
    strip, row = sch.split(i, [None, config.rows])
    sch.reorder(strip, n, co, row, w)
    sch.parallel(strip)
    if int(sch.get(w).extent) % 8 == 0:
        _, inner = sch.split(w, [None, 8])
        sch.vectorize(inner)
    q = sch.get_sblock("Q")
    sch.compute_at(q, strip)
    _, pos = sch.get_loops(q)[-2:]
    _, inner = sch.split(pos, [None, LANES])
    sch.vectorize(inner)
    # Consumers first: compute_at gives each producer the region its consumer reads. The
    # bias + ReLU6 (and edge mask) stages go into the write-back of the accumulators.
    pair_loops = []
    if bf16:
        pair_loops.append(
            _gemm_stage(sch, "P", strip, config.project_channels, config.vectors, pairs=True)
        )
        # The pairs' packing reads two rows of D: its own stage, vectorized along positions.
        d1 = sch.get_sblock("D1")
        sch.compute_at(d1, strip)
        _, inner = sch.split(sch.get_loops(d1)[-1], [None, LANES])
        sch.vectorize(inner)
        _gemm_stage(sch, "D", strip, config.depthwise_channels, config.vectors)
    else:
        _gemm_stage(sch, "P", strip, config.project_channels, config.vectors)
        sch.compute_at(sch.get_sblock("D1"), strip)
        _gemm_stage(sch, "D", strip, config.depthwise_channels, config.vectors)
        sch.reverse_compute_inline(sch.get_sblock("D1"))
    if expand:
        sch.compute_at(sch.get_sblock("Ep"), strip)
        loop = _gemm_stage(
            sch,
            "E",
            strip,
            config.expand_channels,
            config.vectors,
            planes=strided,
            pairs=bf16_expand,
        )
        pair_loops += [loop] if bf16_expand else []
        sch.reverse_compute_inline(sch.get_sblock("Ep"))
    xp = sch.get_sblock("Xp")
    sch.compute_at(xp, strip)
    sch.vectorize(sch.get_loops(xp)[-1])
    if bf16_expand:
        # The pairs' rows of the padded pitch as one run of positions, so that 16 of them
        # are one contiguous region for tensorize (f // pitch, f % pitch folds back to f).
        # After compute_at: its region inference cannot invert the flat index (it computed
        # 16 of 31 columns per row).
        pitch = int(sch.get(xp).writes[0].source.shape[-1])
        sch.transform_layout(xp, ("write", 0), lambda *i: (*i[:-2], i[-2] * pitch + i[-1]))
    if pair_loops:
        from compiler.tvm_bf16 import register_pair_intrin

        for loop in pair_loops:
            sch.tensorize(loop, register_pair_intrin())
    return sch


def scheduled_block(
    shape: BlockShape | StemBlockShape, config: BlockConfig, *, bf16: bool = False
) -> Any:
    """The scheduled PrimFunc, marked so that MetaSchedule and ``FuseOps`` leave it alone.

    ``op_pattern`` 8 is kOpaque: fusing a following elementwise op into it would make a
    new, unscheduled function of it.
    """
    expand_b, project_b = bf16_stages(shape) if bf16 else (False, False)
    if isinstance(shape, StemBlockShape):
        te_func = stem_block_func(shape, config, bf16=project_b, bf16_expand=expand_b)
    elif shape.stride == 2:
        te_func = strided_block_func(shape, config, bf16=project_b, bf16_expand=expand_b)
    else:
        te_func = block_func(shape, config.rows, bf16=project_b, bf16_expand=expand_b)
    strided = isinstance(shape, BlockShape) and shape.stride == 2
    expand = not isinstance(shape, BlockShape) or shape.expand
    func = schedule(
        te_func, config, strided=strided, expand=expand, bf16=project_b, bf16_expand=expand_b
    ).mod["main"]
    # Its symbol comes from the name the module gives it (te names every function "main").
    func = func.without_attr("global_symbol")
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


@dataclass
class _Match:
    """One block found in ``main``: its input, its weights (numpy) and its last binding."""

    x: Any
    end: Any
    shape: BlockShape
    weights: list[np.ndarray]


def _op_name(value: Any) -> str | None:
    from tvm import relax

    if isinstance(value, relax.Call) and hasattr(value.op, "name"):
        return str(value.op.name)
    return None


def _const(expr: Any) -> np.ndarray | None:
    """A float32 constant's value (0.27 names Relax constants ``ir.GenericConst``)."""
    from tvm.ir.expr import GenericConst

    if not isinstance(expr, GenericConst):
        return None
    value = expr.value
    if getattr(value, "dtype", None) != "float32" or not hasattr(value, "numpy"):
        return None
    return np.asarray(value.numpy())


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


def _conv(
    value: Any, *, kernel: int, strides: tuple[int, ...] = (1,)
) -> tuple[Any, np.ndarray, int, int] | None:
    """``conv2d(var, constant weight)``, one of ``strides`` both ways, padding ``kernel // 2``:
    (input, weight, groups, stride)."""
    if _op_name(value) != "relax.nn.conv2d":
        return None
    attrs = value.attrs
    weight = _const(value.args[1])
    pad = kernel // 2
    stride = _ints(attrs.strides)
    if (
        weight is None
        or weight.shape[2:] != (kernel, kernel)
        or stride[0] not in strides
        or stride[1] != stride[0]
        or _ints(attrs.dilation) != [1, 1]
        or _ints(attrs.padding) != [pad] * 4
        or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW")
        or (attrs.out_dtype is not None and str(attrs.out_dtype) not in ("", "float32", "void"))
    ):
        return None
    return value.args[0], weight, int(attrs.groups), stride[0]


def _bias_add(value: Any, channels: int) -> tuple[Any, np.ndarray] | None:
    """``add(var, constant of shape (1, channels, 1, 1))``: (input, bias as (channels,))."""
    if _op_name(value) != "relax.add":
        return None
    bias = _const(value.args[1])
    if bias is None or bias.shape != (1, channels, 1, 1):
        return None
    return value.args[0], bias.reshape(channels)


def _clip_call(value: Any, prefix: str, bound: float) -> Any | None:
    """``call_tir(<prefix>*, (var, constant bound))``: the var."""
    from tvm import relax

    if _op_name(value) != "relax.call_tir":
        return None
    callee, args = value.args[0], value.args[1]
    if not str(callee.name_hint).startswith(prefix) or not isinstance(args, relax.Tuple):
        return None
    if len(args.fields) != 2:
        return None
    limit = _const(args.fields[1])
    if limit is None or limit.shape != () or float(limit) != bound:
        return None
    return args.fields[0]


def _bindings(func: Any) -> tuple[dict[Any, Any], dict[Any, int]]:
    """``func``'s bound values by variable, and how often each variable is used."""
    from tvm import relax

    values: dict[Any, Any] = {}
    uses: dict[Any, int] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                continue
            values[binding.var] = binding.value
            for var in relax.analysis.free_vars(binding.value):
                uses[var] = uses.get(var, 0) + 1
    for var in relax.analysis.free_vars(func.body.body):
        uses[var] = uses.get(var, 0) + 1
    return values, uses


def _find_blocks(func: Any) -> list[_Match]:
    """Every fusable block of ``func``, matched backwards from its projection's bias add."""
    from tvm import relax

    values, uses = _bindings(func)

    def single_use_value(var: Any) -> Any | None:
        return values.get(var) if uses.get(var, 0) == 1 else None

    def relu6_input(var: Any, channels: int) -> tuple[Any, np.ndarray] | None:
        """Single-use var = clip(bias_add(v, b), 0, 6), single-use intermediates: (v, b)."""
        low = _clip_call(single_use_value(var), _CLIP_HIGH, 6.0)
        biased = _clip_call(single_use_value(low), _CLIP_LOW, 0.0) if low is not None else None
        if biased is None:
            return None
        return _bias_add(single_use_value(biased), channels)

    matches = []
    for end, value in values.items():
        residual = None
        projected_var = end
        if _op_name(value) == "relax.add":
            # x + block(x): the residual add, either operand order.
            for a, b in ((value.args[0], value.args[1]), (value.args[1], value.args[0])):
                if isinstance(a, relax.Var) and isinstance(b, relax.Var):
                    if _bias_add(single_use_value(b), _channels(b)) is not None:
                        residual, projected_var = a, b
                        break
        co = _channels(projected_var)
        project_bias = _bias_add(values.get(projected_var), co) if co else None
        if project_bias is None:
            continue
        project = _conv(single_use_value(project_bias[0]), kernel=1)
        if project is None or project[2] != 1:
            continue
        m = int(project[1].shape[1])
        dw_out = relu6_input(project[0], m)
        if dw_out is None:
            continue
        depthwise = _conv(single_use_value(dw_out[0]), kernel=3, strides=(1, 2))
        if depthwise is None or depthwise[2] != m or depthwise[1].shape[:2] != (m, 1):
            continue
        ex_out = relu6_input(depthwise[0], m)
        expand = _conv(single_use_value(ex_out[0]), kernel=1) if ex_out is not None else None
        weights = [
            depthwise[1].reshape(m, 3, 3),
            dw_out[1],
            project[1].reshape(co, m),
            project_bias[1],
        ]
        has_expand = ex_out is not None and expand is not None and expand[2] == 1
        if ex_out is not None and expand is not None and has_expand:
            x = expand[0]
            weights[:0] = [expand[1].reshape(m, -1), ex_out[1]]
        else:
            # No expand stage of its own (expansion 1, or one that cannot be fused with
            # it): the depthwise convolution and the projection still make a block.
            x = depthwise[0]
        x_shape = _static_shape(x)
        if x_shape is None or len(x_shape) != 4:
            continue
        n, c, h, w = x_shape
        shape = BlockShape(c, m, co, h, w, stride=depthwise[3], expand=has_expand)
        if n != 1 or (residual is not None and (not residual.same_as(x) or not shape.residual)):
            continue
        if residual is None and shape.residual:
            continue  # the kernel adds x to a stride-1 block with C == Co; this one has no add
        if shape.stride == 2 and (h % 2 or w % 2):
            continue  # an odd size rounds the output up; the kernel halves exactly
        matches.append(
            _Match(
                x=x,
                end=end if residual is not None else projected_var,
                shape=shape,
                weights=weights,
            )
        )
    return matches


def _static_shape(var: Any) -> list[int] | None:
    """A float32 tensor variable's static shape, None for anything else."""
    ty = getattr(var, "ty", None)
    shape = getattr(ty, "shape", None)
    if getattr(ty, "dtype", None) != "float32" or shape is None:
        return None
    try:
        return [int(d) for d in shape.values]
    except (AttributeError, TypeError, ValueError):  # no shape, or a symbolic dimension
        return None


def _channels(var: Any) -> int:
    """Channel count of a 4-d NCHW float32 tensor variable, 0 when it is not one."""
    shape = _static_shape(var)
    return shape[1] if shape is not None and len(shape) == 4 else 0


@dataclass
class _Replacement:
    """A binding's new value: ``kernel`` called on ``args`` (relax variables, or arrays
    that become constants), output of ``out_shape``."""

    kernel: Any
    name: str
    args: list[Any]
    out_shape: tuple[int, ...]


def _replace(mod: Any, plans: dict[Any, _Replacement]) -> Any:
    """``mod`` with each planned binding of ``main`` replaced by its kernel call; the
    bindings only the replaced ones used are removed."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):  # type: ignore[misc]
        def visit_var_binding_(self, binding: Any) -> None:
            planned = plans.get(binding.var)
            if planned is None:
                super().visit_var_binding_(binding)
                return
            kernel = self.builder_.add_func(planned.kernel, planned.name)
            args = [
                # float32, or the bf16 kernels' weight bits (uint16, uint32 pairs) as they are
                relax.const(
                    np.ascontiguousarray(
                        a, dtype=a.dtype if a.dtype in (np.uint16, np.uint32) else "float32"
                    )
                )
                if isinstance(a, np.ndarray)
                else self.visit_expr(a)
                for a in planned.args
            ]
            call = relax.call_tir(
                kernel, args, out_ty=relax.TensorType(planned.out_shape, "float32")
            )
            if isinstance(binding.var, relax.DataflowVar):
                new_var = self.builder_.emit(call)
            else:
                new_var = self.builder_.emit_output(call)
            self.set_var_remap(binding.var, new_var)

    rewriter = Rewriter(mod)
    new_main = rewriter.visit_expr(mod["main"])
    rewriter.builder_.update_func(mod.get_global_var("main"), new_main)
    return relax.transform.DeadCodeElimination(["main"])(rewriter.builder_.get())


def _replaced(
    mod: Any, plans: dict[Any, _Replacement], fused: list[str], what: str
) -> tuple[Any, list[str]]:
    """A rewrite pass's result: ``mod`` with ``plans`` applied (``_replace``) and the
    descriptions of the kernels, logged as ``what`` (unchanged where nothing was planned)."""
    if not plans:
        return mod, []
    log.info("%d %s: %s", len(fused), what, "; ".join(fused))
    return _replace(mod, plans), fused


def fuse_inverted_residuals(
    mod: Any,
    *,
    precision: str = "fp32",
    unit: VectorUnit = AVX512,
    amx: bool = False,
    cores: int = 1,
    split: bool = True,
) -> tuple[Any, list[str]]:
    """Replace ``main``'s fusable blocks with fused kernels; returns (module, descriptions).

    Run on the imported module after ``FoldConstant`` (the ReLU6 bounds must be constants)
    and before legalization. With ``split`` (fp32 builds: the kernel is fp32), blocks
    ``fusion_plan.plan_split_block`` takes for ``cores`` cores get the split-block kernel
    (``tvm_split_block``); the others the strip kernel where ``fusion_plan.plan_block``
    takes them; the rest stay as they are.
    A block without an expand stage whose input only a first convolution computes
    (``fusion_plan.plan_stem_block``) takes that convolution in as its expand stage.
    ``precision`` "bf16": blocks with an even number of expanded channels project with
    bf16 products (``_project_and_write``); the caller checks the target has them.
    ``unit``: the vector registers the accumulator blocks are sized for. ``amx`` (a bf16
    build for AMX tiles): blocks ``fusion_plan.splits_for_amx`` takes are left to
    ``fuse_pointwise`` and ``fuse_depthwise``.
    """
    plans = {}
    fused = []

    def weights_for(
        block: BlockShape | StemBlockShape, weights: list[Any]
    ) -> tuple[list[Any], bool, str]:
        """The kernel's weights, whether it has bf16 stages, and the description's note."""
        expand, project = bf16_stages(block) if precision == "bf16" else (False, False)
        weights = list(weights)
        if expand:  # We is first: a 1x1 weight, or a first convolution's k x k one
            stem = isinstance(block, StemBlockShape)
            weights[0] = (bf16_conv_pairs if stem else bf16_pairs)(weights[0])
        if project:  # Wp is second to last
            weights[-2] = bf16_pairs(weights[-2])
        stages = " and ".join(n for n, b in (("expansion", expand), ("projection", project)) if b)
        return weights, expand or project, f", bf16 {stages}" if stages else ""

    _, uses = _bindings(mod["main"])
    convs = {m.end: m for m in _find_strided_convs(mod["main"])}
    for match in _find_blocks(mod["main"]):
        conv = convs.get(match.x) if uses.get(match.x, 0) == 1 else None
        stem = StemBlockShape(conv.shape, match.shape) if conv is not None else None
        stem_config = plan_stem_block(stem, unit=unit) if stem is not None else None
        if conv is not None and stem is not None and stem_config is not None:
            # The first convolution becomes the block's expand stage; its own bindings,
            # used by the block alone, go with the block's.
            weights, bf16, note = weights_for(stem, [conv.weight, conv.bias, *match.weights])
            plans[match.end] = _Replacement(
                scheduled_block(stem, stem_config, bf16=bf16),
                "fused_stem_block",
                [conv.x, *weights, block_mask(stem.expanded_view, stem_config)],
                (1, stem.block.out_channels, stem.block.out_height, stem.block.out_width),
            )
            fused.append(f"{stem.describe()} (strips of {stem_config.rows} rows{note})")
            continue
        shares = (
            plan_split_block(match.shape, cores=cores, unit=unit)
            if split and precision == "fp32"
            else None
        )
        if shares is not None:
            plans[match.end] = _split_block(match, shares)
            fused.append(f"{match.shape.describe()} (expanded channels in {shares.groups} shares)")
            continue
        config = plan_block(match.shape, unit=unit)
        if config is None or (amx and splits_for_amx(match.shape, unit=unit)):
            continue
        shape = match.shape
        masks = [block_mask(shape, config)] if shape.expand else []
        weights, bf16, note = weights_for(shape, match.weights)
        plans[match.end] = _Replacement(
            scheduled_block(shape, config, bf16=bf16),
            "fused_inverted_residual",
            [match.x, *weights, *masks],
            (1, shape.out_channels, shape.out_height, shape.out_width),
        )
        fused.append(f"{shape.describe()} (strips of {config.rows} rows{note})")
    return _replaced(mod, plans, fused, "inverted-residual block kernel(s)")


def _split_block(match: _Match, config: SplitBlockConfig) -> _Replacement:
    """The split-block kernel's call for ``match``: its weights in the kernel's layouts."""
    from compiler.tvm_split_block import split_block_func

    shape = match.shape
    return _Replacement(
        split_block_func(shape, config),
        "fused_split_block",
        [match.x, *split_block_weights(match.weights, config)],
        (1, shape.out_channels, shape.out_height, shape.out_width),
    )


# Widest output rows the pointwise kernel writes back by rows (``_transposing_write``):
# measured at 14 and 7; wider maps (ResNet's 3x3 convolutions at 56 and 28) keep the write
# that was measured there.
BY_ROWS_MAX_WIDTH = 14


def _transposing_write(sch: Any, channels: int, *, by_rows: bool = False) -> None:
    """Schedule the "Out" stage that writes a channels-last buffer to NCHW: each 16
    channels of a pixel (one cache line) read once and written to 16 output rows, each
    row in order. Channel-outermost, every pixel's line was fetched once per channel
    (the Winograd kernel's write took 9 % less time at 56x56 this way). ``by_rows``: per
    image row and block of 16 channels, each channel's row as one vector store (its
    values gathered from the row's pixels, which stay in L1 across the 16 channels)
    instead of one scalar store per value: the 1x1 kernels at 14x14 and 7x7 took 0.88-0.98x
    the time on Zen 5, fp32 and bf16 (docs/benchmarks.md)."""
    n, o, i, j = sch.get_loops(sch.get_sblock("Out"))
    if channels % LANES:
        sch.parallel(sch.fuse(n, o))
        return
    o_o, o_v = sch.split(o, [None, LANES])
    sch.reorder(n, o_o, i, *((o_v, j) if by_rows else (j, o_v)))
    sch.parallel(sch.fuse(n, o_o, i))
    sch.unroll(o_v)
    if by_rows:
        sch.vectorize(j)


def _channel_gemm(
    sch: Any,
    block: Any,
    lead: list[Any],
    pos: Any,
    chan: Any,
    red: list[Any],
    config: PointwiseConfig | WinogradConfig,
    *,
    parallel: bool,
) -> None:
    """Register-block the GEMM ``block`` (loops ``lead``, ``pos``, ``chan``, ``red``) along
    output channels: ``config.positions`` positions x ``config.vectors`` vectors of 16
    channels of accumulators in a local buffer (registers once unrolled), the reduction
    outside them, the positions broadcast; ``parallel``: the loops above the reduction
    fused into one parallel loop, channel blocks outermost unless the config is
    ``position_major``."""
    lanes = config.lanes if isinstance(config, PointwiseConfig) else LANES
    pos_o, pos_i = sch.split(pos, [None, config.positions])
    chan_o, chan_m, chan_v = sch.split(chan, [None, config.vectors, lanes])
    jobs = (
        [pos_o, chan_o]
        if isinstance(config, PointwiseConfig) and config.position_major
        else [chan_o, pos_o]
    )
    sch.reorder(*lead, *jobs, *red, pos_i, chan_m, chan_v)
    outer = jobs[-1]
    if parallel:
        outer = sch.fuse(*lead, *jobs)
        sch.parallel(outer)
    sch.unroll(pos_i)
    sch.unroll(chan_m)
    sch.vectorize(chan_v)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, outer)
    sch.decompose_reduction(block, red[0])
    _, inner = sch.split(sch.get_loops(local)[-1], [None, lanes])
    sch.vectorize(inner)


def pointwise_func(shape: PointwiseShape, config: PointwiseConfig) -> Any:
    """A 1x1 or 3x3 convolution vectorized along output channels, scheduled; the PrimFunc.

    Arguments: X (1, C, H, W), the weight in blocks of B = ``config.vectors`` x
    ``config.lanes`` output channels (``fusion_plan.blocked_weights``: (Co / B, C, B) for
    1x1, (Co / B, C, 3, 3, B) for 3x3), the bias (Co,), the residual (1, Co, Ho, Wo) if any;
    output (1, Co, Ho, Wo), Ho x Wo the input's size at stride 1, half of it at stride 2.
    Accumulators: ``config.positions`` positions x ``config.vectors`` vectors of
    ``config.lanes`` channels, the input broadcast from memory (a 3x3 convolution reads a
    zero-padded copy of X, so that no tap needs a bounds check); the bias (and the
    activation, without a residual) go into their write-back to a [positions, Co] buffer,
    which the last stage transposes to NCHW, adding the residual and then the activation.
    Blocks of positions x channel vectors run in parallel. Marked like ``scheduled_block``.
    """
    import tvm.s_tir as tir
    from tvm import te, tirx

    c, co, h, w = shape.in_channels, shape.out_channels, shape.height, shape.width
    s, ho, wo = shape.stride, shape.out_height, shape.out_width
    chans = config.vectors * config.lanes  # output channels per accumulator block
    x = te.placeholder((1, c, h, w), name="X")
    bias = te.placeholder((co,), name="b")
    rc = te.reduce_axis((0, c), name="c")
    if shape.kernel == 3:
        wt = te.placeholder((co // chans, c, 3, 3, chans), name="Wt")
        zero = tirx.const(0.0, "float32")
        xp = te.compute(
            (c, h + 2, w + 2),
            lambda k, i, j: tirx.if_then_else(
                te.all(i >= 1, i <= h, j >= 1, j <= w),
                x[0, k, tirx.max(tirx.min(i - 1, h - 1), 0), tirx.max(tirx.min(j - 1, w - 1), 0)],
                zero,
            ),
            name="Xp",
        )
        kh, kw = te.reduce_axis((0, 3), name="kh"), te.reduce_axis((0, 3), name="kw")
        acc = te.compute(
            (ho * wo, co),
            lambda p, o: te.sum(
                xp[rc, p // wo * s + kh, p % wo * s + kw] * wt[o // chans, rc, kh, kw, o % chans],
                axis=[rc, kh, kw],
            ),
            name="A",
        )
    else:
        wt = te.placeholder((co // chans, c, chans), name="Wt")
        acc = te.compute(
            (ho * wo, co),
            lambda p, o: te.sum(
                x[0, rc, p // wo * s, p % wo * s] * wt[o // chans, rc, o % chans], axis=rc
            ),
            name="A",
        )
    late = shape.activation if shape.residual else None  # after the residual add
    act = te.compute(
        (ho * wo, co),
        lambda p, o: _activation(None if late else shape.activation, acc[p, o] + bias[o]),
        name="A2",
    )
    params = [x, wt, bias]
    if shape.residual:
        res = te.placeholder((1, co, ho, wo), name="R")
        params.append(res)
        out = te.compute(
            (1, co, ho, wo),
            lambda n, o, i, j: _activation(late, act[i * wo + j, o] + res[n, o, i, j]),
            name="Out",
        )
    else:
        out = te.compute((1, co, ho, wo), lambda n, o, i, j: act[i * wo + j, o], name="Out")
    sch = tir.Schedule(te.create_prim_func([*params, out]))
    block = sch.get_sblock("A")
    pos, chan, *red = sch.get_loops(block)
    _channel_gemm(sch, block, [], pos, chan, red, config, parallel=True)
    sch.reverse_compute_inline(sch.get_sblock("A2"))
    _transposing_write(sch, shape.out_channels, by_rows=shape.out_width <= BY_ROWS_MAX_WIDTH)
    if shape.kernel == 3:
        sch.parallel(sch.get_loops(sch.get_sblock("Xp"))[0])
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


def _combination(row: Any, term: Any) -> Any:
    """sum_k row[k] * term(k) over the nonzero entries of one transform-matrix row, with
    +-1 as adds and subtracts (the TIR simplifier keeps x * 0.0 and x * 1.0 in floats)."""
    from tvm import tirx

    total = None
    for k, coef in enumerate(row):
        if coef == 0:
            continue
        value = term(k)
        if total is None:
            # The first term carries its sign (the rows of B^T start with -4 and -2).
            total = value if coef == 1 else value * tirx.const(float(coef), "float32")
            continue
        if abs(coef) != 1:
            value = value * tirx.const(abs(float(coef)), "float32")
        total = total + value if coef > 0 else total - value
    return total


def _by_row(matrix: np.ndarray, index: Any, term: Any) -> Any:
    """``_combination`` of row ``index`` of ``matrix``: a Select chain that unrolling the
    loop of ``index`` folds to one combination per iteration."""
    from tvm import tirx

    rows = [_combination(row, term) for row in matrix]
    expr = rows[-1]
    for i in range(len(rows) - 2, -1, -1):
        expr = tirx.Select(index == i, rows[i], expr)
    return expr


def _winograd_input_transform(sch: Any, loops: list[Any]) -> Any:
    """Schedule V (its loops e1, e2, tiles, channels) 16 channels at a time through T1, the
    transform matrix's rows unrolled; returns V's tile loop."""
    e1, e2, t, k = loops
    k_o, k_v = sch.split(k, [None, LANES])
    sch.reorder(t, k_o, e1, e2, k_v)
    sch.unroll(e1)
    sch.unroll(e2)
    sch.vectorize(k_v)
    t1b = sch.get_sblock("T1")
    sch.compute_at(t1b, k_o)
    _, e1, j, k = sch.get_loops(t1b)[-4:]
    sch.unroll(e1)
    sch.unroll(j)
    sch.vectorize(k)
    sch.parallel(sch.get_loops(sch.get_sblock("Xt"))[0])
    return t


def _winograd_output_transform(sch: Any, tile_loops: list[Any]) -> None:
    """Schedule Z (after its tile loop, split into ``tile_loops``) 16 output channels at a
    time through Z1, the transform matrix's rows unrolled."""
    _, i, j, o = sch.get_loops(sch.get_sblock("Z"))[-4:]
    o_o, o_v = sch.split(o, [None, LANES])
    sch.reorder(*tile_loops, o_o, i, j, o_v)
    sch.unroll(i)
    sch.unroll(j)
    sch.vectorize(o_v)
    z1b = sch.get_sblock("Z1")
    sch.compute_at(z1b, o_o)
    _, i, e2, o = sch.get_loops(z1b)[-4:]
    sch.unroll(i)
    sch.unroll(e2)
    sch.vectorize(o)


def _schedule_winograd(sch: Any, config: WinogradConfig) -> None:
    """``config.group`` tiles per group: the groups in parallel, each through every stage
    (V, M, Z) in buffers of its own that stay in L2. 0: stage after stage over all tiles,
    each in parallel (tiles for the transforms, GEMM blocks for M)."""
    if config.group:
        t = sch.get_loops(sch.get_sblock("Z"))[0]
        g, t_in = sch.split(t, [None, config.group])
        sch.parallel(g)
        _winograd_output_transform(sch, [g, t_in])
        block = sch.get_sblock("M")
        sch.compute_at(block, g)
        e1, e2, t, o, red = sch.get_loops(block)[-5:]
        _channel_gemm(sch, block, [e1, e2], t, o, [red], config, parallel=False)
        vb = sch.get_sblock("V")
        sch.compute_at(vb, g)
        _winograd_input_transform(sch, sch.get_loops(vb)[-4:])
        return
    sch.parallel(_winograd_input_transform(sch, sch.get_loops(sch.get_sblock("V"))))
    block = sch.get_sblock("M")
    e1, e2, t, o, red = sch.get_loops(block)
    _channel_gemm(sch, block, [e1, e2], t, o, [red], config, parallel=True)
    t = sch.get_loops(sch.get_sblock("Z"))[0]
    sch.parallel(t)
    _winograd_output_transform(sch, [t])


def winograd_func(shape: PointwiseShape, config: WinogradConfig) -> Any:
    """A 3x3 stride-1 convolution by F(m x m, 3x3) Winograd tiles, scheduled; the PrimFunc.

    Arguments: X (1, C, H, W), the transformed weights U from
    ``fusion_plan.winograd_weights`` in blocks of B = ``config.vectors`` x 16 output channels
    (``fusion_plan.blocked_weights``: (Co / B, m+2, m+2, C, B)), the bias (Co,), the
    residual (1, Co, H, W) if any; output (1, Co, H, W). Stages, channels last so that each
    vectorizes along channels: Xt, a zero-padded channels-last copy of X; V = B^T d B per
    tile and input channel (two one-dimensional passes, T1 then V); M, (m+2)^2 GEMMs of
    tiles x C by C x Co, register-blocked like ``pointwise_func``; Z = A^T M A per tile and
    output channel (Z1 then Z); Out adds the bias (and residual), applies the activation
    and writes NCHW. Scheduled by ``_schedule_winograd``.
    """
    import tvm.s_tir as tir
    from tvm import te, tirx

    at, _, bt = winograd_matrices(config.tile)
    m, a = config.tile, config.tile + 2
    c, co, h, w = shape.in_channels, shape.out_channels, shape.height, shape.width
    th, tw = config.tiles(h, w)
    tiles = th * tw
    x = te.placeholder((1, c, h, w), name="X")
    block = config.vectors * LANES
    u = te.placeholder((co // block, a, a, c, block), name="U")
    bias = te.placeholder((co,), name="b")
    zero = tirx.const(0.0, "float32")
    xt = te.compute(
        (th * m + 2, tw * m + 2, c),
        lambda i, j, k: tirx.if_then_else(
            te.all(i >= 1, i <= h, j >= 1, j <= w),
            x[0, k, tirx.max(tirx.min(i - 1, h - 1), 0), tirx.max(tirx.min(j - 1, w - 1), 0)],
            zero,
        ),
        name="Xt",
    )
    t1 = te.compute(
        (tiles, a, a, c),
        lambda t, e1, j, k: _by_row(bt, e1, lambda r: xt[t // tw * m + r, t % tw * m + j, k]),
        name="T1",
    )
    v = te.compute(
        (a, a, tiles, c),
        lambda e1, e2, t, k: _by_row(bt, e2, lambda j: t1[t, e1, j, k]),
        name="V",
    )
    rc = te.reduce_axis((0, c), name="c")
    mm = te.compute(
        (a, a, tiles, co),
        lambda e1, e2, t, o: te.sum(
            v[e1, e2, t, rc] * u[o // block, e1, e2, rc, o % block], axis=rc
        ),
        name="M",
    )
    z1 = te.compute(
        (tiles, m, a, co),
        lambda t, i, e2, o: _by_row(at, i, lambda e1: mm[e1, e2, t, o]),
        name="Z1",
    )
    z = te.compute(
        (tiles, m, m, co),
        lambda t, i, j, o: _by_row(at, j, lambda e2: z1[t, i, e2, o]) + bias[o],
        name="Z",
    )
    params = [x, u, bias]
    act = shape.activation

    def output(n: Any, o: Any, i: Any, j: Any) -> Any:
        value = z[i // m * tw + j // m, i % m, j % m, o]
        return _activation(act, value + res[n, o, i, j] if shape.residual else value)

    if shape.residual:
        res = te.placeholder((1, co, h, w), name="R")
        params.append(res)
    out = te.compute((1, co, h, w), output, name="Out")
    sch = tir.Schedule(te.create_prim_func([*params, out]))
    _schedule_winograd(sch, config)
    _transposing_write(sch, co)
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


def _split_activation(
    var: Any, value: Any, single_use_value: Any
) -> tuple[str | None, Any, Any, list[Any]]:
    """``value`` (bound to ``var``) as ReLU6(core), ReLU(core) or core, the intermediates
    single-use: (activation, core variable, core value, the intermediate variables)."""
    low = _clip_call(value, _CLIP_HIGH, 6.0)
    clipped = _clip_call(single_use_value(low), _CLIP_LOW, 0.0) if low is not None else None
    clipped_value = single_use_value(clipped) if clipped is not None else None
    if clipped_value is not None:
        return "relu6", clipped, clipped_value, [low, clipped]
    if _op_name(value) == "relax.nn.relu":
        relu_value = single_use_value(value.args[0])
        if relu_value is not None:
            return "relu", value.args[0], relu_value, [value.args[0]]
    return None, var, value, []


@dataclass
class _ConvChain:
    """``conv2d(x, weight) + bias [+ residual] [+ ReLU6 | ReLU]`` ending at binding ``end``,
    the intermediates single-use and listed in ``inner``; ``x`` is (1, C, H, W)."""

    x: Any
    x_shape: list[int]
    end: Any
    inner: list[Any]
    activation: str | None
    residual: Any | None
    weight: np.ndarray
    bias: np.ndarray
    groups: int
    stride: int


_ConvOf = Callable[[Any], "tuple[Any, np.ndarray, int, int] | None"]


def _conv_chains(func: Any, conv_of: _ConvOf, *, residual: bool = False) -> list[_ConvChain]:
    """Every convolution + bias add [+ residual add, with ``residual``] [+ activation] of
    ``func`` whose convolution ``conv_of`` takes (it returns ``_conv``'s tuple), matched
    from its last binding; the kernels' finders filter these and keep ``_outermost``."""
    from tvm import relax

    values, uses = _bindings(func)

    def single_use_value(var: Any) -> Any | None:
        return values.get(var) if uses.get(var, 0) == 1 else None

    def conv_bias(var: Any, value: Any) -> tuple[tuple[Any, np.ndarray, int, int], Any] | None:
        co = _channels(var)
        biased = _bias_add(value, co) if co else None
        conv = conv_of(single_use_value(biased[0])) if biased is not None else None
        return (conv, biased[1]) if conv is not None and biased is not None else None

    chains = []
    for end, value in values.items():
        added = None
        activation, core_var, core, inner = _split_activation(end, value, single_use_value)
        if residual and _op_name(core) == "relax.add":
            for a, b in ((core.args[0], core.args[1]), (core.args[1], core.args[0])):
                if isinstance(a, relax.Var) and isinstance(b, relax.Var):
                    b_value = single_use_value(b)
                    if b_value is not None and conv_bias(b, b_value) is not None:
                        added, core_var, core = a, b, b_value
                        inner = [*inner, b]
                        break
        found = conv_bias(core_var, core)
        if found is None:
            continue
        (x, weight, groups, stride), bias = found
        x_shape = _static_shape(x)
        if x_shape is None or len(x_shape) != 4 or x_shape[0] != 1:
            continue
        chains.append(
            _ConvChain(x, x_shape, end, inner, activation, added, weight, bias, groups, stride)
        )
    return chains


_Found = TypeVar("_Found", "_PointwiseMatch", "_StridedConvMatch", "_DepthwiseMatch")


def _outermost(matches: list[_Found]) -> list[_Found]:
    """``matches`` less those that a larger match (activation, residual) also covers."""
    inner_vars = [v for m in matches for v in m.inner]
    return [m for m in matches if not any(m.end.same_as(v) for v in inner_vars)]


@dataclass
class _PointwiseMatch:
    x: Any
    residual: Any | None
    end: Any
    inner: list[Any]  # the bindings the kernel computes besides ``end``
    shape: PointwiseShape
    weight: np.ndarray  # (Co, C) or (Co, C, 3, 3)
    bias: np.ndarray


def _find_pointwise(func: Any) -> list[_PointwiseMatch]:
    """Every 1x1 or 3x3 (stride 1 or 2) convolution + bias add [+ residual add] [+ ReLU6 |
    ReLU] of ``func``, matched from its last binding."""

    def dense(value: Any) -> tuple[Any, np.ndarray, int, int] | None:
        for kernel in (1, 3):
            conv = _conv(value, kernel=kernel, strides=(1, 2))
            if conv is not None and conv[2] == 1:
                return conv
        return None

    matches = []
    for chain in _conv_chains(func, dense, residual=True):
        _, c, h, w = chain.x_shape
        weight = chain.weight
        shape = PointwiseShape(
            c,
            int(weight.shape[0]),
            h,
            w,
            activation=chain.activation,
            residual=chain.residual is not None,
            kernel=int(weight.shape[2]),
            stride=chain.stride,
        )
        out_shape = [1, shape.out_channels, shape.out_height, shape.out_width]
        if chain.residual is not None and _static_shape(chain.residual) != out_shape:
            continue
        matches.append(
            _PointwiseMatch(
                chain.x, chain.residual, chain.end, chain.inner, shape, weight, chain.bias
            )
        )
    return _outermost(matches)


def fuse_pointwise(
    mod: Any,
    *,
    precision: str = "fp32",
    unit: VectorUnit = AVX512,
    amx: bool = False,
    dot: bool = True,
) -> tuple[Any, list[str]]:
    """Replace ``main``'s 1x1 convolutions on small maps and 3x3 convolutions of stride 1
    with ``winograd_func`` kernels (``fusion_plan.plan_winograd``) or else ``pointwise_func``
    kernels (``fusion_plan.plan_pointwise``); returns (module, descriptions). Run after
    ``fuse_inverted_residuals``, on what it left. ``precision`` "bf16": 1x1 stride-1
    convolutions that ``fusion_plan.plan_pointwise_amx`` takes get the AMX kernel
    (``tvm_amx.pointwise_amx_func``) with ``amx``, and else those that
    ``fusion_plan.plan_pointwise_bf16`` takes the vdpbf16ps kernel
    (``tvm_bf16.pointwise_bf16_func``) with ``dot``; the caller checks the target has them."""
    from compiler.tvm_amx import pointwise_amx_func
    from compiler.tvm_bf16 import pointwise_bf16_func

    plans = {}
    fused = []
    for match in _find_pointwise(mod["main"]):
        shape = match.shape
        weight: np.ndarray
        winograd = plan_winograd(shape, unit=unit)
        config = plan_pointwise(shape, unit=unit)
        bf16 = plan_pointwise_bf16(shape) if precision == "bf16" and dot else None
        on_tiles = plan_pointwise_amx(shape) if precision == "bf16" and amx else None
        if on_tiles is not None:
            func = pointwise_amx_func(shape)
            weight = amx_weights(
                match.weight.reshape(shape.out_channels, shape.in_channels), on_tiles
            )
            fused.append(f"{shape.describe()} (bf16, AMX)")
        elif bf16 is not None:
            func = pointwise_bf16_func(shape, bf16)
            weight = paired_bf16_weights(
                match.weight.reshape(shape.out_channels, shape.in_channels), bf16.vectors
            )
            fused.append(f"{shape.describe()} (bf16)")
        elif winograd is not None:
            func = winograd_func(shape, winograd)
            weight = blocked_weights(
                winograd_weights(match.weight, winograd.tile), winograd.vectors
            )
            fused.append(f"{shape.describe()} (Winograd F({winograd.tile}x{winograd.tile}, 3x3))")
        elif config is not None:
            c, co, k = shape.in_channels, shape.out_channels, shape.kernel
            taps = np.moveaxis(match.weight.reshape(co, c, -1), 0, -1)  # (C, k * k, Co)
            weight = blocked_weights(taps, config.vectors, config.lanes)  # (Co / B, C, k * k, B)
            weight = weight.reshape(weight.shape[0], c, *((k, k) if k == 3 else ()), -1)
            func = pointwise_func(shape, config)
            fused.append(shape.describe())
        else:
            continue
        args = [match.x, np.ascontiguousarray(weight), match.bias]
        plans[match.end] = _Replacement(
            func,
            "fused_pointwise",
            [*args, *([match.residual] if match.residual is not None else [])],
            (1, shape.out_channels, shape.out_height, shape.out_width),
        )
    return _replaced(mod, plans, fused, "pointwise convolution kernel(s)")


def _activation(kind: str | None, value: Any) -> Any:
    from tvm import tirx

    if kind == "relu6":
        return _relu6(value)
    if kind == "relu":
        return tirx.max(value, tirx.const(0.0, "float32"))
    return value


def strided_conv_func(shape: StridedConvShape, config: BlockConfig) -> Any:
    """A k x k stride-2 convolution over few channels + bias [+ activation], scheduled.

    The input is copied per strip into the four planes of ``strided_block_func`` (with the
    convolution's own padding); every tap is then a contiguous run of one plane and the
    convolution a register-blocked GEMM along output positions (``config.project_channels``
    channels x ``config.vectors`` vectors), reduction over channels and taps. Arguments: X
    (1, C, H, W), W (Co, C, k, k), b (Co,); output (1, Co, H/2, W/2). Marked like
    ``scheduled_block``.
    """
    import tvm.s_tir as tir
    from tvm import te

    c, co, h, w, k = (
        shape.in_channels,
        shape.out_channels,
        shape.height,
        shape.width,
        shape.kernel,
    )
    reach, rows = k // 2, config.rows
    strips = shape.out_height // rows
    pitch, fd, fe = strided_conv_dims(shape, rows, config.vectors)
    x = te.placeholder((1, c, h, w), name="X")
    weight, bias = te.placeholder((co, c, k, k), name="W"), te.placeholder((co,), name="b")
    xp = _input_planes(x, (strips, 4, c, -(-fe // pitch), pitch), rows, reach)
    d = _planes_conv(xp, weight, (strips, co, fd), pitch, "D")
    q = te.compute(
        (strips, co, fd),
        lambda s, o, g: _activation(shape.activation, d[s, o, g] + bias[o]),
        name="Q",
    )
    out = te.compute(
        (1, co, shape.out_height, shape.out_width),
        lambda n, o, i, j: q[i // rows, o, i % rows * pitch + j],
        name="Out",
    )
    sch = tir.Schedule(te.create_prim_func([x, weight, bias, out]))
    n, o, i, j = sch.get_loops(sch.get_sblock("Out"))
    sch.parallel(sch.fuse(n, o, i))
    if shape.out_width % 8 == 0:
        _, inner = sch.split(j, [None, 8])
        sch.vectorize(inner)
    strip, _, pos = sch.get_loops(sch.get_sblock("Q"))
    sch.parallel(strip)
    _, inner = sch.split(pos, [None, LANES])
    sch.vectorize(inner)
    _gemm_stage(sch, "D", strip, config.project_channels, config.vectors)
    xp_block = sch.get_sblock("Xp")
    sch.compute_at(xp_block, strip)
    sch.vectorize(sch.get_loops(xp_block)[-1])
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


@dataclass
class _StridedConvMatch:
    x: Any
    end: Any
    inner: list[Any]
    shape: StridedConvShape
    weight: np.ndarray
    bias: np.ndarray


def _find_strided_convs(func: Any) -> list[_StridedConvMatch]:
    """Every k x k stride-2 convolution + bias [+ ReLU6 | ReLU] of ``func`` with few input
    channels, matched from its last binding."""

    def strided(value: Any) -> tuple[Any, np.ndarray, int, int] | None:
        is_conv = value is not None and _op_name(value) == "relax.nn.conv2d"
        weight = _const(value.args[1]) if is_conv else None
        if weight is None or weight.ndim != 4:
            return None
        conv = _conv(value, kernel=int(weight.shape[2]), strides=(2,))
        return conv if conv is not None and conv[2] == 1 else None

    matches = []
    for chain in _conv_chains(func, strided):
        _, c, h, w = chain.x_shape
        co, k = int(chain.weight.shape[0]), int(chain.weight.shape[2])
        shape = StridedConvShape(c, co, h, w, k, chain.activation)
        matches.append(
            _StridedConvMatch(chain.x, chain.end, chain.inner, shape, chain.weight, chain.bias)
        )
    return _outermost(matches)


def fuse_strided_convs(mod: Any, *, unit: VectorUnit = AVX512) -> tuple[Any, list[str]]:
    """Replace ``main``'s stride-2 convolutions over few channels (``plan_strided_conv``)
    with ``strided_conv_func`` kernels; returns (module, descriptions)."""
    plans = {}
    fused = []
    for match in _find_strided_convs(mod["main"]):
        config = plan_strided_conv(match.shape, unit=unit)
        if config is None:
            continue
        shape = match.shape
        plans[match.end] = _Replacement(
            strided_conv_func(shape, config),
            "fused_strided_conv",
            [match.x, match.weight, match.bias],
            (1, shape.out_channels, shape.out_height, shape.out_width),
        )
        fused.append(f"{shape.describe()} (strips of {config.rows} rows)")
    return _replaced(mod, plans, fused, "strided convolution kernel(s)")


@dataclass
class _DepthwiseMatch:
    x: Any
    end: Any
    inner: list[Any]
    shape: DepthwiseShape
    weight: np.ndarray  # (C, 3, 3)
    bias: np.ndarray


def _find_depthwise(func: Any) -> list[_DepthwiseMatch]:
    """Every 3x3 depthwise convolution (stride 1 or 2) + bias [+ ReLU6 | ReLU] of ``func``
    (what the fused blocks left), matched from its last binding."""

    def depthwise(value: Any) -> tuple[Any, np.ndarray, int, int] | None:
        conv = _conv(value, kernel=3, strides=(1, 2))
        if conv is None or conv[1].shape[:2] != (conv[2], 1):
            return None
        return conv

    matches = []
    for chain in _conv_chains(func, depthwise):
        c = chain.groups
        if chain.x_shape[1] != c or chain.bias.shape != (c,):
            continue
        shape = DepthwiseShape(
            c, chain.x_shape[2], chain.x_shape[3], chain.stride, chain.activation
        )
        weight = chain.weight.reshape(c, 3, 3)
        matches.append(_DepthwiseMatch(chain.x, chain.end, chain.inner, shape, weight, chain.bias))
    return _outermost(matches)


def fuse_depthwise(mod: Any, *, unit: VectorUnit = AVX512) -> tuple[Any, list[str]]:
    """Replace ``main``'s depthwise convolutions that ``plan_depthwise`` takes (run after
    ``fuse_inverted_residuals``, on what it left, also the depthwise stage of the blocks a
    bf16 build on AMX tiles splits) with ``depthwise_func`` kernels, on units where that
    pays (``VectorUnit.depthwise``); returns (module, descriptions)."""
    from compiler.tvm_depthwise import depthwise_func

    if not unit.depthwise:
        return mod, []
    plans = {}
    fused = []
    for match in _find_depthwise(mod["main"]):
        config = plan_depthwise(match.shape, unit=unit)
        if config is None:
            continue
        shape = match.shape
        plans[match.end] = _Replacement(
            depthwise_func(shape, config),
            "fused_depthwise",
            [match.x, np.ascontiguousarray(match.weight), match.bias],
            (1, shape.channels, shape.out_height, shape.out_width),
        )
        fused.append(f"{shape.describe()} ({config.rows} rows x {config.columns} columns)")
    return _replaced(mod, plans, fused, "depthwise convolution kernel(s)")


def fuse_depthwise_projections(
    mod: Any, *, unit: VectorUnit = AVX512, cores: int = 1
) -> tuple[Any, list[str]]:
    """Replace each 3x3 depthwise convolution (+ bias [+ activation]) of ``main`` whose
    output only a 1x1 projection (+ bias [+ residual] [+ activation]) reads, where
    ``plan_depthwise_project`` takes the pair for ``cores`` cores, with one
    ``depthwise_project_func`` kernel; returns (module, descriptions). Run after
    ``fuse_inverted_residuals`` and before ``fuse_pointwise`` and ``fuse_depthwise``, which
    would take the two apart; fp32 builds only (a bf16 build's projections go to its bf16
    kernels)."""
    from compiler.tvm_depthwise import depthwise_project_func

    if not unit.depthwise_project:
        return mod, []
    func = mod["main"]
    _, uses = _bindings(func)
    depthwise = _find_depthwise(func)
    plans = {}
    fused = []
    for match in _find_pointwise(func):
        dw = next((d for d in depthwise if d.end.same_as(match.x)), None)
        if dw is None or uses.get(dw.end, 0) != 1:
            continue
        config = plan_depthwise_project(dw.shape, match.shape, cores=cores, unit=unit)
        if config is None:
            continue
        shape = match.shape
        co, m = shape.out_channels, shape.in_channels
        weight = blocked_weights(match.weight.reshape(co, m).T, config.vectors)
        args = [dw.x, np.ascontiguousarray(dw.weight), dw.bias, weight, match.bias]
        plans[match.end] = _Replacement(
            depthwise_project_func(dw.shape, shape, config),
            "fused_depthwise_project",
            [*args, *([match.residual] if match.residual is not None else [])],
            (1, co, shape.out_height, shape.out_width),
        )
        fused.append(f"{dw.shape.describe()}, then {shape.describe()} ({config.rows} rows a job)")
    return _replaced(mod, plans, fused, "depthwise + projection kernel(s)")


def _global_mean_of(value: Any) -> bool:
    """Whether ``value`` is a mean over a 4-d tensor's two spatial axes."""
    if _op_name(value) != "relax.mean" or value.attrs.axis is None:
        return False
    return sorted(int(a) for a in value.attrs.axis) == [2, 3]


def fuse_pointwise_means(mod: Any, *, unit: VectorUnit = AVX512) -> tuple[Any, list[str]]:
    """Replace each global average pool (``mean`` over H and W) of ``main``
    whose input only a 1x1 convolution + bias [+ activation] computes, where
    ``plan_pointwise_mean`` takes it, by one ``pointwise_mean_func`` kernel; returns
    (module, descriptions). Run before ``fuse_pointwise``, which would take the convolution;
    fp32 builds only (a bf16 build's 1x1 convolutions go to its bf16 kernels)."""
    from compiler.tvm_head import pointwise_mean_func

    func = mod["main"]
    values, uses = _bindings(func)
    pointwise = _find_pointwise(func)
    plans = {}
    fused = []
    for var, value in values.items():
        if not _global_mean_of(value):
            continue
        match = next((p for p in pointwise if p.end.same_as(value.args[0])), None)
        if match is None or uses.get(match.end, 0) != 1:
            continue
        config = plan_pointwise_mean(match.shape, unit=unit)
        if config is None:
            continue
        shape = match.shape
        weight = match.weight.reshape(shape.out_channels, shape.in_channels)
        keepdims = bool(value.attrs.keepdims)
        plans[var] = _Replacement(
            pointwise_mean_func(shape, config, keepdims=keepdims),
            "fused_pointwise_mean",
            [
                match.x,
                blocked_weights(np.ascontiguousarray(weight.T), config.vectors, config.lanes),
                match.bias,
            ],
            (1, shape.out_channels, 1, 1) if keepdims else (1, shape.out_channels),
        )
        fused.append(f"{shape.describe()}, then the mean over the map")
    return _replaced(mod, plans, fused, "pointwise + mean kernel(s)")


def max_pool_func(shape: MaxPoolShape) -> Any:
    """A max pool (``fusion_plan.plan_max_pool``), scheduled; the PrimFunc. Two passes per
    output row: the maximum over the window's rows (R, vectorized along the input row: its
    row index is one clamped scalar), then over each window's columns. Rows in parallel."""
    import tvm.s_tir as tir
    from tvm import te, tirx

    c, h, w = shape.channels, shape.height, shape.width
    k, s, p = shape.kernel, shape.stride, shape.padding
    x = te.placeholder((1, c, h, w), name="X")

    def clamp(index: Any, size: int) -> Any:
        return tirx.max(tirx.min(index, size - 1), 0)

    def window_max(term: Any) -> Any:
        value = term(0)
        for tap in range(1, k):
            value = tirx.max(value, term(tap))
        return value

    rows = te.compute(
        (c, shape.out_height, w),
        lambda ch, i, j: window_max(lambda d: x[0, ch, clamp(i * s + d - p, h), j]),
        name="R",
    )
    out = te.compute(
        (1, c, shape.out_height, shape.out_width),
        lambda n, ch, i, j: window_max(lambda d: rows[ch, i, clamp(j * s + d - p, w)]),
        name="Out",
    )
    sch = tir.Schedule(te.create_prim_func([x, out]))
    n, ch, i, _ = sch.get_loops(sch.get_sblock("Out"))
    outer = sch.fuse(n, ch, i)
    sch.parallel(outer)
    r = sch.get_sblock("R")
    sch.compute_at(r, outer)
    col = sch.get_loops(r)[-1]
    if w >= LANES:
        _, inner = sch.split(col, [None, LANES])
        sch.vectorize(inner)
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


def fuse_max_pools(mod: Any) -> tuple[Any, list[str]]:
    """Replace ``main``'s max pools (``fusion_plan.plan_max_pool``) with ``max_pool_func``
    kernels; returns (module, descriptions)."""
    values, _ = _bindings(mod["main"])
    plans = {}
    fused = []
    for end, value in values.items():
        if _op_name(value) != "relax.nn.max_pool2d":
            continue
        attrs = value.attrs
        x_shape = _static_shape(value.args[0])
        size, strides = _ints(attrs.pool_size), _ints(attrs.strides)
        padding, dilation = _ints(attrs.padding), _ints(attrs.dilation)
        if (
            x_shape is None
            or len(x_shape) != 4
            or x_shape[0] != 1
            or str(attrs.layout) != "NCHW"
            or str(attrs.out_layout) != "NCHW"
            or bool(attrs.ceil_mode)
            or len(set(size)) != 1
            or len(set(strides)) != 1
            or len(set(padding)) != 1
            or set(dilation) != {1}
        ):
            continue
        _, c, h, w = x_shape
        shape = MaxPoolShape(c, h, w, size[0], strides[0], padding[0])
        if not plan_max_pool(shape) or _static_shape(end) != [
            1,
            c,
            shape.out_height,
            shape.out_width,
        ]:
            continue
        plans[end] = _Replacement(
            max_pool_func(shape),
            "fused_max_pool",
            [value.args[0]],
            (1, c, shape.out_height, shape.out_width),
        )
        fused.append(shape.describe())
    return _replaced(mod, plans, fused, "max-pool kernel(s)")
