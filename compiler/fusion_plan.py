"""Which MobileNetV2-style blocks to compute as one fused kernel, and how (pure, no TVM).

An inverted-residual block (1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 project, an
optional residual add) moves its 6x expanded activations through memory twice when its
three convolutions are separate kernels, as in ONNX Runtime and in Relax's own fusion. The
fused kernel (``compiler.tvm_fusion``) computes the block in strips of output rows whose
activations stay in the core's L2. Inside a strip each activation is a [channels,
positions] matrix with positions along rows of a padded pitch, so that every stage is a
register-blocked GEMM (or a sum of shifted vectors, the depthwise taps) along contiguous
positions. A stride-2 block's expanded activations are kept as four planes, the even and
odd rows by the even and odd columns of the padded image, so that each of the depthwise
stride-2 taps is again a contiguous run of one plane (``strided_strip_dims``). This module
sizes those strips and accumulator blocks; docs/benchmarks.md has the measurements behind
the numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

LANES = 16  # fp32 lanes of an AVX-512 register; LLVM splits them on narrower vector ISAs
VECTORS = 4  # vectors of positions per accumulator block
# Per-strip activations (input rows, expanded, depthwise, projected) must fit in L2 next to
# the weights: 2 MiB per core on the AVX-512 boxes measured.
STRIP_BUDGET_BYTES = 1536 * 1024
# Positions per block of the 1x1 kernels (the first that divides the output width), and of
# AVX-512's 3x3 / stride-2 direct kernels and Winograd GEMM (``VectorUnit.conv_positions``).
POSITION_BLOCKS = (7, 8, 6, 5, 4)


@dataclass(frozen=True)
class VectorUnit:
    """The fp32 vector registers the hand-scheduled kernels size their accumulator blocks
    for, and which kernels pay on them. The kernels compute in vectors of ``LANES`` fp32
    lanes, which LLVM splits into ``LANES // lanes`` registers on a narrower unit, so each
    field counts such 16-lane vectors: ``accumulators`` in a 1x1 stage's block (the rest of
    the ``registers`` hold its operands), ``block_vectors`` of positions per block of a
    fused block's stages at stride 1 (at most, at stride 2), ``channel_vectors`` of output
    channels (at most) per block of the kernels vectorized along channels;
    ``pointwise_min_reduction``: input channels a 1x1 convolution on a map larger than 7x7
    needs for the pointwise kernel to take it over MetaSchedule's; ``conv_positions``:
    positions per block of the 3x3 and stride-2 direct kernels and of the Winograd GEMM,
    the first that divides the output width (tile count); ``depthwise``: whether the
    depthwise kernel (``plan_depthwise``) replaces MetaSchedule's depthwise convolutions
    (``tvm_fusion.fuse_depthwise``; measured faster on AVX2; on AVX-512 mobilenet_v2 took
    0.93-0.94x the time with it on Zen 5, in fp32 and bf16, and on Emerald Rapids its
    depthwise layers 0.93x, the network tied); ``depthwise_width``: the widest map it takes
    (on AVX-512 also the 56- and 112-wide maps of the blocks ``splits_for_amx`` splits; not
    measured on AVX2); ``depthwise_project``: whether a depthwise convolution and the
    projection after it run as one kernel (``plan_depthwise_project``; measured on AVX-512
    only); ``split_blocks``: whether blocks on small maps run as one kernel with their
    expanded channels split over the cores (``plan_split_block``; AVX2's code measured on
    an AVX-512 CPU, not on an AVX2-only one); ``pointwise_mean``: whether a 1x1
    convolution that only a global average pool reads and the pool run as one kernel
    (``plan_pointwise_mean``; likewise). Measured in
    docs/benchmarks.md: with AVX-512's blocks AVX2's 16 registers spill (a 28x28 block took
    2.2x as long as with AVX2's; a 3x3 convolution at 7 positions x 2 registers 41-43
    GMAC/s, at 4 positions 67-79)."""

    name: str
    lanes: int
    registers: int
    accumulators: int
    block_vectors: int
    channel_vectors: int
    pointwise_min_reduction: int
    conv_positions: tuple[int, ...]
    depthwise: bool = False
    depthwise_width: int = 28
    depthwise_project: bool = False
    split_blocks: bool = False
    pointwise_mean: bool = False


AVX512 = VectorUnit(
    "avx512",
    lanes=16,
    registers=32,
    accumulators=16,
    block_vectors=4,
    channel_vectors=2,
    pointwise_min_reduction=256,
    conv_positions=POSITION_BLOCKS,
    depthwise=True,
    depthwise_width=112,
    depthwise_project=True,
    split_blocks=True,
    pointwise_mean=True,
)
AVX2 = VectorUnit(
    "avx2",
    lanes=8,
    registers=16,
    accumulators=6,
    block_vectors=1,
    channel_vectors=1,
    pointwise_min_reduction=0,
    conv_positions=(4, 7, 8, 6, 5),
    depthwise=True,
    split_blocks=True,
    pointwise_mean=True,
)
VECTOR_UNITS = {unit.name: unit for unit in (AVX512, AVX2)}


def vector_unit(isa: str, features: Sequence[str]) -> VectorUnit | None:
    """The vector unit of an x86-64 CPU with ``features`` (a profile's ``cpu_features``):
    AVX-512 with avx512f, AVX2 with avx2 and fma; None for others (ARM: the kernels run
    there by request only, sized as for AVX2, NEON's 32 registers of 4 lanes holding
    fewer 16-lane vectors still)."""
    if isa != "x86_64":
        return None
    if "avx512f" in features:
        return AVX512
    if "avx2" in features and "fma" in features:
        return AVX2
    return None


# Narrower stride-1 images waste too much on the padded pitch (a 14-wide row takes 31
# positions; stride 2 has its own rule, see plan_block).
MIN_WIDTH = 28
# Fewer rows per strip recompute too much of the expand stage: each strip also expands the
# row above and the row below it (1.5x at 4 rows).
MIN_ROWS = 4


@dataclass(frozen=True)
class BlockShape:
    """An inverted-residual block, batch 1, NCHW float32; the depthwise stride 1 or 2.

    ``height`` and ``width`` are the input's; a stride-2 block halves them (even sizes only).
    ``expand`` False: a block of expansion 1, whose depthwise convolution reads the input
    itself (``expanded == in_channels``), as MobileNetV2's first block.
    """

    in_channels: int
    expanded: int
    out_channels: int
    height: int
    width: int
    stride: int = 1
    expand: bool = True

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels

    @property
    def out_height(self) -> int:
        return self.height // self.stride

    @property
    def out_width(self) -> int:
        return self.width // self.stride

    def describe(self) -> str:
        c, m, co = self.in_channels, self.expanded, self.out_channels
        text = f"{c}->{m}->{co} at {self.height}x{self.width}"
        if self.stride != 1:
            text += f", stride {self.stride}"
        return text if self.expand else f"{text}, no expansion"


@dataclass(frozen=True)
class BlockConfig:
    """Rows per strip, and channels x vectors of each stage's accumulator block."""

    rows: int
    expand_channels: int
    depthwise_channels: int
    project_channels: int
    vectors: int = VECTORS


def strip_dims(width: int, rows: int) -> tuple[int, int, int]:
    """Row pitch, depthwise/project positions and expand positions of a strip of ``rows``.

    The pitch is ``width + 2`` (the row and its zero-padding columns); both counts are
    whole accumulator blocks, fe at least the ``fd + 2 * pitch + 2`` positions the
    depthwise stage reads: a ragged region would put a predicate in the vector loops,
    which LLVM scalarizes (2x slower when measured). Positions past the image (padding
    columns, rounding) are computed and thrown away. (The pitch was once the next that is
    31 mod 32, which made ``fd + 2 * pitch + 2`` whole blocks by itself: 127 for 112
    columns, 13 % more positions in every stage.)
    """
    if width < 1 or rows < 1:
        raise ValueError(f"width {width} and rows {rows} must be at least 1")
    block = VECTORS * LANES
    pitch = width + 2
    fd = -(-rows * pitch // block) * block
    return pitch, fd, -(-(fd + 2 * pitch + 2) // block) * block


def strided_strip_dims(out_width: int, rows: int, vectors: int) -> tuple[int, int, int]:
    """Stride 2: plane pitch, depthwise/project positions and positions of each expand plane.

    Output position ``g = y * pitch + x`` (``rows`` output rows) reads, for tap (dy, dx),
    padded-image row ``2y + dy`` and column ``2x + dx``: plane (dy % 2, dx % 2) at
    ``g + (dy // 2) * pitch + dx // 2``. The pitch is ``out_width + 1`` (the even-column
    plane has one column more); fd and fe are whole accumulator blocks of ``vectors``
    vectors, fe at least the ``fd + pitch + 1`` positions the last tap reads: a ragged
    region would put a predicate in the vector loops (see ``strip_dims``).
    """
    if out_width < 1 or rows < 1 or vectors < 1:
        raise ValueError(f"width {out_width}, rows {rows} and vectors {vectors} must be at least 1")
    block = vectors * LANES
    pitch = out_width + 1
    fd = -(-rows * pitch // block) * block
    return pitch, fd, -(-(fd + pitch + 1) // block) * block


def _strided_blocks_fit(out_width: int, vectors: int) -> bool:
    """Whether the next pitch that is -1 modulo a block of ``vectors`` vectors wastes at
    most a quarter of a stride-2 plane: the rule for a block's vectors, and for taking the
    block at all, from when the pitch was that; kept as measured."""
    block = vectors * LANES
    pitch = out_width + 1 + (block - 1 - (out_width + 1)) % block
    return 4 * pitch <= 5 * (out_width + 1)


def strided_vectors(out_width: int) -> int:
    """Vectors per accumulator block for a stride-2 block: the most for which
    ``_strided_blocks_fit`` holds (4 at 56 wide, 2 at 28, 1 at 14)."""
    return next((v for v in (VECTORS, 2) if _strided_blocks_fit(out_width, v)), 1)


def strip_bytes(shape: BlockShape, rows: int, vectors: int = VECTORS) -> int:
    """Bytes of one strip's buffers: input rows, expanded (if any), depthwise and projected.

    ``vectors`` matters for stride-2 blocks only (``strided_strip_dims``).
    """
    c, m, co = shape.in_channels, shape.expanded, shape.out_channels
    planes = 4 if shape.stride == 2 else 1
    if shape.stride == 2:
        pitch, fd, fe = strided_strip_dims(shape.out_width, rows, vectors)
    else:
        pitch, fd, fe = strip_dims(shape.width, rows)
    input_rows = -(-fe // pitch) * pitch
    expanded = m * planes * fe if shape.expand else 0
    return 4 * (planes * c * input_rows + expanded + m * fd + co * fd)


def _channel_block(channels: int, widest: int) -> int:
    """Channels per accumulator block: ``widest`` if it divides ``channels``, else the
    largest of 4, 3, 2, 1 below it that does."""
    return next(b for b in (widest, 4, 3, 2, 1) if b <= widest and channels % b == 0)


def _strip_rows(height: int, bytes_of: Callable[[int], int], budget_bytes: int) -> int | None:
    """Rows per strip: the most that divide ``height`` into at least two strips whose
    buffers (``bytes_of(rows)``) fit ``budget_bytes``, at least ``MIN_ROWS``, an even number
    of strips where one fits (they are split evenly over the cores); None if none fits."""
    fitting = [
        r
        for r in range(MIN_ROWS, height // 2 + 1)
        if height % r == 0 and bytes_of(r) <= budget_bytes
    ]
    even = [r for r in fitting if (height // r) % 2 == 0]
    return max(even or fitting) if fitting else None


def plan_block(
    shape: BlockShape, *, unit: VectorUnit = AVX512, budget_bytes: int = STRIP_BUDGET_BYTES
) -> BlockConfig | None:
    """The fused kernel's configuration for ``shape``, or None where it should not be used.

    Strips: the most rows whose buffers fit ``budget_bytes``, at least ``MIN_ROWS`` rows and
    two strips (two cores), an even number of them where one fits (they are split evenly
    over the cores).
    Accumulators (``unit``): 4 channels x 4 vectors for the 1x1 stages on AVX-512 (16 of the
    32 vector registers), 2 x 4 for the depthwise one, whose taps need registers of their
    own; a stride-2 block with fewer vectors per block (``strided_vectors``) gets as many
    more channels. AVX2: 3 channels x 2 vectors (12 of 16 registers) and 1 x 2.
    Stride 2 needs an even input (the output is then exactly half of it) and a plane pitch
    at most a quarter wider than the plane (``strided_vectors``: 14 wide and more); stride
    1 an output at least ``MIN_WIDTH`` wide.
    """
    if shape.stride not in (1, 2) or min(shape.in_channels, shape.expanded, shape.out_channels) < 1:
        return None
    if not shape.expand and shape.expanded != shape.in_channels:
        return None
    if shape.stride == 2:
        if shape.height % 2 or shape.width % 2:
            return None
        vectors = min(strided_vectors(shape.out_width), unit.block_vectors)
        if not _strided_blocks_fit(shape.out_width, vectors):
            return None  # 7 wide: a pitch of 15 for 8 columns
    elif shape.out_width < MIN_WIDTH:
        return None
    else:
        vectors = unit.block_vectors
    rows = _strip_rows(shape.out_height, lambda r: strip_bytes(shape, r, vectors), budget_bytes)
    if rows is None:
        return None
    return BlockConfig(
        rows=rows,
        expand_channels=_channel_block(shape.expanded, unit.accumulators // vectors),
        depthwise_channels=_channel_block(shape.expanded, _depthwise_block(unit, vectors)),
        project_channels=_channel_block(shape.out_channels, unit.accumulators // vectors),
        vectors=vectors,
    )


def _depthwise_block(unit: VectorUnit, vectors: int) -> int:
    """Widest channel block of a depthwise stage: half a 1x1 stage's accumulators, the taps'
    operands need the other registers."""
    return max(1, unit.accumulators // 2 // vectors)


def edge_mask(height: int, width: int, rows: int) -> npt.NDArray[np.float32]:
    """Per strip and expand position: 1.0 inside the image, 0.0 on its zero padding.

    The expand stage computes every position of a strip's padded rows; multiplying by this
    mask after the ReLU6 gives the depthwise convolution its zero padding.
    """
    if height % rows:
        raise ValueError(f"rows {rows} must divide the height {height}")
    pitch, _, fe = strip_dims(width, rows)
    f = np.arange(fe)
    image_rows = np.arange(height // rows)[:, None] * rows - 1 + f // pitch
    cols = f % pitch - 1
    inside = (image_rows >= 0) & (image_rows < height) & (cols >= 0) & (cols < width)
    return inside.astype(np.float32)


def strided_edge_mask(height: int, width: int, rows: int, vectors: int) -> npt.NDArray[np.float32]:
    """``edge_mask`` of a stride-2 block (input ``height`` x ``width``): per strip, plane and
    position, 1.0 inside the image; the planes as in ``strided_strip_dims``, plane
    ``2 * (row parity) + column parity`` of the padded image."""
    if height % 2 or width % 2:
        raise ValueError(f"a stride-2 block needs an even height and width, not {height}x{width}")
    if (height // 2) % rows:
        raise ValueError(f"rows {rows} must divide the output height {height // 2}")
    pitch, _, fe = strided_strip_dims(width // 2, rows, vectors)
    strip = np.arange(height // 2 // rows)[:, None, None]
    plane = np.arange(4)[None, :, None]
    f = np.arange(fe)[None, None, :]
    image_rows = strip * 2 * rows - 1 + 2 * (f // pitch) + plane // 2
    cols = 2 * (f % pitch) + plane % 2 - 1
    inside = (image_rows >= 0) & (image_rows < height) & (cols >= 0) & (cols < width)
    return inside.astype(np.float32)


def block_mask(shape: BlockShape, config: BlockConfig) -> npt.NDArray[np.float32]:
    """The fused kernel's mask argument for ``shape`` planned as ``config``."""
    if shape.stride == 2:
        return strided_edge_mask(shape.height, shape.width, config.rows, config.vectors)
    return edge_mask(shape.height, shape.width, config.rows)


def choose_block_fusion(
    requested: bool | None, *, gpu: bool, isa: str, features: Sequence[str] = ()
) -> bool:
    """Whether a build computes inverted-residual blocks (and small-map 1x1 convolutions) as
    hand-scheduled kernels (``--fuse-blocks``).

    ``requested`` True / False is the user's choice; None (the default) turns it on for
    x86-64 CPU targets with a ``vector_unit`` the kernels are sized for (AVX-512, AVX2 with
    FMA; ``features``: the profile's ``cpu_features``), where it was measured
    (docs/benchmarks.md); ARM targets run them by request only (unmeasured there). GPU
    targets never (CPU kernels; the caller refuses an explicit request).
    """
    if gpu:
        return False
    if requested is not None:
        return requested
    return vector_unit(isa, features) is not None


# Pointwise (1x1) convolutions on small feature maps: MetaSchedule vectorizes NCHW
# convolutions along positions, which 49 or 196 of them fill badly, and its tuned kernels
# for MobileNetV2's 7x7 layers ran at 16-48 GMAC/s where the same GEMM vectorized along
# output channels runs at 80-100 (docs/benchmarks.md, eleventh session).
MAX_POINTWISE_POSITIONS = 14 * 14
# Above 7x7 the kernel pays off only with a long reduction on AVX-512 (``VectorUnit``'s
# pointwise_min_reduction): its transposing write-back costs per output, the GEMM per output
# and input channel. At 14x14, 64->384 and 96->576 measured 1.2-1.25x MetaSchedule's tuned
# kernels, 384->96 and 576->96 0.6-0.73x, 384->64 even. On AVX2, MetaSchedule's kernels for
# 64->384 and 96->576 took 1.2-1.4x the pointwise kernel's time.
# 3x3 convolutions with a reduction of 9 x 16 or more (a network's first layer, 3 channels,
# is left to MetaSchedule or the stride-2 kernel below).
MIN_CONV3X3_IN_CHANNELS = 16


@dataclass(frozen=True)
class PointwiseShape:
    """A 1x1 (padding 0) or 3x3 (padding 1) convolution of stride 1 or 2, batch 1, NCHW
    float32, bias added, then an optional residual add (of a tensor of the output's shape),
    then an optional activation ("relu6" or "relu")."""

    in_channels: int
    out_channels: int
    height: int
    width: int
    activation: str | None = None
    residual: bool = False
    kernel: int = 1
    stride: int = 1

    @property
    def out_height(self) -> int:
        return (self.height - 1) // self.stride + 1  # padding kernel // 2

    @property
    def out_width(self) -> int:
        return (self.width - 1) // self.stride + 1

    def describe(self) -> str:
        k = self.kernel
        text = f"{k}x{k} {self.in_channels}->{self.out_channels}"
        text += f" stride {self.stride}" if self.stride != 1 else ""
        text += f" at {self.height}x{self.width}"
        text += " + residual" if self.residual else ""
        names = {"relu6": "ReLU6", "relu": "ReLU"}
        return text + (f" + {names[self.activation]}" if self.activation else "")


@dataclass(frozen=True)
class PointwiseConfig:
    """Positions x vectors of ``lanes`` output channels per accumulator block;
    ``position_major``: the parallel jobs (one block of positions x one block of channels
    each) in order of positions first, so that each thread takes a range of positions with
    every channel block, instead of a range of channel blocks with every position."""

    positions: int
    vectors: int
    position_major: bool = False
    lanes: int = LANES


def blocked_weights(
    weight: npt.NDArray[np.float32], vectors: int, lanes: int = LANES
) -> npt.NDArray[np.float32]:
    """A weight with output channels last, (*lead, Co), as (Co / block, *lead, block) for
    blocks of ``vectors`` x ``lanes`` output channels: what one accumulator block of the pointwise,
    3x3 and Winograd kernels reads is then one contiguous run. With output channels
    innermost across the whole weight, each reduction step jumped Co x 4 bytes, which
    defeated the prefetcher on weights that stream from memory (ResNet's 7x7 layers ran
    1.5x slower in the network than alone)."""
    block = vectors * lanes
    co = weight.shape[-1]
    if co % block:
        raise ValueError(f"{co} output channels are not whole blocks of {block}")
    blocked = weight.reshape(*weight.shape[:-1], co // block, block)
    return np.ascontiguousarray(np.moveaxis(blocked, -2, 0))


def plan_pointwise(shape: PointwiseShape, *, unit: VectorUnit = AVX512) -> PointwiseConfig | None:
    """The kernel's accumulator block for ``shape``, None where it is not used.

    1x1: used on maps of at most ``MAX_POINTWISE_POSITIONS`` (larger ones vectorize well
    along positions, and MetaSchedule's kernels do) whose output channels are whole
    vectors; the positions per block divide the map (7 at 7x7 and 14x14), 2 vectors where
    the channels allow (7 x 2 = 14 accumulators measured best; 3 was slower). Maps larger
    than 7x7 need ``unit.pointwise_min_reduction`` input channels. Jobs position-major
    where the map has at least as many positions as output channels.

    3x3: any map whose width a position block divides (so that a block stays in one row of
    the zero-padded input) with at least ``MIN_CONV3X3_IN_CHANNELS`` input channels: ResNet's
    convolutions at 56, 28, 14 and 7 ran at 100-106 GMAC/s, 0.9x ORT's MLAS kernels.
    Stride 2 (3x3, and 1x1 as ResNet's downsampling shortcuts), any output width a
    position block divides: the positions are broadcast one at a time, so every other
    column costs nothing; MetaSchedule's tuned kernels for them ran at 45-80 GMAC/s.
    AVX2 (``unit``): 1 vector of channels per block, 7 x 2 registers.
    """
    positions = shape.out_height * shape.out_width
    if positions < 1 or shape.in_channels < 1 or shape.kernel not in (1, 3):
        return None
    if shape.stride not in (1, 2) or shape.out_channels < LANES or shape.out_channels % LANES:
        return None
    vectors = _channel_vectors(shape.out_channels, unit)
    if shape.kernel == 3 or shape.stride == 2:
        if shape.kernel == 3 and shape.in_channels < MIN_CONV3X3_IN_CHANNELS:
            return None
        block = next((b for b in unit.conv_positions if shape.out_width % b == 0), None)
        return None if block is None else PointwiseConfig(positions=block, vectors=vectors)
    if positions > MAX_POINTWISE_POSITIONS:
        return None
    if positions > 49 and shape.in_channels < unit.pointwise_min_reduction:
        return None
    block = next((b for b in POSITION_BLOCKS if positions % b == 0), None)
    if block is None:
        return None
    # Job order: each job reads C x its positions of the input and C x its channels of the
    # weight. Channel-major, every thread reads the whole input; position-major, the whole
    # weight. So positions first where the input is the larger (positions >= Co): on Zen 5,
    # with caches flushed between calls, 384->64 at 14x14 took 57 against 74 us, 576->96
    # 90 against 104; at 7x7, where the weights are larger, 960->320 took 132 against 110.
    return PointwiseConfig(
        positions=block, vectors=vectors, position_major=positions >= shape.out_channels
    )


def plan_pointwise_mean(
    shape: PointwiseShape, *, unit: VectorUnit = AVX512
) -> PointwiseConfig | None:
    """The accumulator block of the kernel for a 1x1 convolution whose output only a global
    average pool reads, and the pool (``tvm_head.pointwise_mean_func``), None where it is
    not used: 1x1 stride 1 without a residual, output channels whole vectors, a map of at
    most ``MAX_POINTWISE_POSITIONS`` that a position block divides. The map is never
    written back to NCHW and read again: MobileNetV2's 320->1280 at 7x7 and its mean took
    138 us against 175 as two kernels, 162 against 200 after a cache flush (Intel Xeon with
    AMX, 2 threads). Units with ``unit.pointwise_mean`` only (AVX-512, AVX2). On units
    narrower than 16 lanes the block is ``register_tile``'s in the unit's own vectors, the
    positions that do not fill one in a smaller last block: 320->1280 at 7x7 on a Zen 4
    without AVX-512 362 us against 521 in 7 positions x 16 channels (14 registers of
    accumulators and 2 of sums: spilled)."""
    if not unit.pointwise_mean or shape.residual:
        return None
    if unit.lanes < LANES:
        if not _small_map(shape, unit.lanes):
            return None
        positions, vectors = register_tile(shape.out_channels // unit.lanes, unit)
        return PointwiseConfig(positions=positions, vectors=vectors, lanes=unit.lanes)
    block = _small_map_positions(shape)
    if block is None:
        return None
    return PointwiseConfig(positions=block, vectors=_channel_vectors(shape.out_channels, unit))


def _small_map(shape: PointwiseShape, lanes: int) -> bool:
    """Whether ``shape`` is a 1x1 stride-1 convolution on a map of at most
    ``MAX_POINTWISE_POSITIONS`` whose output channels are whole vectors of ``lanes``."""
    if shape.kernel != 1 or shape.stride != 1 or shape.in_channels < 1:
        return False
    positions = shape.out_height * shape.out_width
    if not 0 < positions <= MAX_POINTWISE_POSITIONS:
        return False
    return shape.out_channels >= lanes and shape.out_channels % lanes == 0


def _small_map_positions(shape: PointwiseShape) -> int | None:
    """Positions per accumulator block of a ``_small_map`` convolution with 16-lane vectors
    (the first of ``POSITION_BLOCKS`` that divides the map), None for any other one."""
    if not _small_map(shape, LANES):
        return None
    positions = shape.out_height * shape.out_width
    return next((b for b in POSITION_BLOCKS if positions % b == 0), None)


def _channel_vectors(channels: int, unit: VectorUnit) -> int:
    """Vectors of 16 output channels per accumulator block: 2 where the channels are an even
    number of vectors and the unit holds them, else 1."""
    return 2 if (channels // LANES) % 2 == 0 and unit.channel_vectors >= 2 else 1


# bf16 dot products (``--precision bf16``): AVX-512 BF16's vdpbf16ps adds two bf16 products
# into each fp32 lane, twice the multiply-adds of an fp32 FMA per instruction. Activations and
# weights are rounded to bf16 (8 significant bits) and accumulated in fp32.
PRECISIONS = ("fp32", "bf16")
BF16_FEATURE = "avx512_bf16"
# CPUs (LLVM's names, a profile's mcpu) whose vdpbf16ps adds its 32 products at the rate of
# an FMA's 16: AMD Zen 4 and later. Intel's runs at a quarter of its FMA rate (Emerald Rapids:
# 1.25 instructions per ns against 4.8, i.e. 40 against 76 GMAC/s per core; mobilenet_v2's
# fused blocks took 1.23x their fp32 time with it), so there bf16 builds keep the vector
# kernels fp32 and multiply on AMX tiles.
FAST_DPBF16_CPUS = ("znver4", "znver5")
# What a CPU needs for the AMX kernel (``tvm_amx``): bf16 tiles.
AMX_FEATURES = ("amx_tile", "amx_bf16")


def has_amx(isa: str, features: Sequence[str]) -> bool:
    """Whether a profile (``isa``, ``cpu_features``) has AMX's bf16 tiles."""
    return isa == "x86_64" and all(feature in features for feature in AMX_FEATURES)


@dataclass(frozen=True)
class Bf16Kernels:
    """The bf16 kernels a profile's bf16 build uses: ``dot``, vdpbf16ps (the 1x1 kernel on
    small maps, the fused blocks' 1x1 stages); ``amx``, AMX tiles (1x1 on small maps)."""

    dot: bool
    amx: bool


def bf16_kernels(isa: str, features: Sequence[str], mcpu: str | None) -> Bf16Kernels:
    """Which bf16 kernels pay on a profile (``isa``, ``cpu_features``, its target's mcpu)."""
    dot = isa == "x86_64" and BF16_FEATURE in features and mcpu in FAST_DPBF16_CPUS
    return Bf16Kernels(dot=dot, amx=has_amx(isa, features))


def precision_refusal(
    precision: str, *, isa: str, features: Sequence[str], mcpu: str | None, fused: bool
) -> str | None:
    """Why a build for a profile (``isa``, ``features``: its ``cpu_features``, ``mcpu``: its
    target's CPU) cannot use ``precision``, with ``fused``: whether the hand-scheduled kernels
    are on; None if it can."""
    if precision not in PRECISIONS:
        return f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}"
    if precision == "fp32":
        return None
    if isa != "x86_64" or BF16_FEATURE not in features:
        return (
            f"--precision bf16 needs an x86-64 profile whose cpu_features list {BF16_FEATURE} "
            "(its dot-product instruction); this one is "
            f"{isa} with {', '.join(features) or 'no features listed'}"
        )
    if not fused:
        return (
            "--precision bf16 runs in the hand-scheduled 1x1 kernels; it cannot be combined "
            "with --no-fuse-blocks"
        )
    kernels = bf16_kernels(isa, features, mcpu)
    if not (kernels.dot or kernels.amx):
        return (
            f"--precision bf16 would compute nothing in bf16 for CPU {mcpu or 'unnamed'}: its "
            f"vdpbf16ps is slower than fp32 FMAs (fast on {', '.join(FAST_DPBF16_CPUS)}) and "
            f"the profile lists no AMX tiles ({', '.join(AMX_FEATURES)})"
        )
    return None


def plan_pointwise_bf16(shape: PointwiseShape) -> PointwiseConfig | None:
    """The bf16 kernel's accumulator block for ``shape``, None where it is not used.

    1x1 stride-1 convolutions on maps of at most ``MAX_POINTWISE_POSITIONS`` whose output
    channels are whole vectors, positions per block as in ``plan_pointwise``; without its
    minimum reduction: with half the multiply-add instructions the GEMM outruns
    MetaSchedule's fp32 kernels for 64 and 96 input channels at 14x14 too.
    """
    block = _small_map_positions(shape)
    if block is None:
        return None
    vectors = 2 if (shape.out_channels // LANES) % 2 == 0 else 1
    return PointwiseConfig(positions=block, vectors=vectors)


def bf16_bits(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """float32 values rounded to the nearest bf16 (ties to even), as their 16 bits: what the
    kernel computes for its activations (finite values; NaN payloads are not preserved)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def paired_bf16_weights(weight: npt.NDArray[np.float32], vectors: int) -> npt.NDArray[np.uint16]:
    """A 1x1 weight (Co, C) as bf16 bits (Co / B, ceil(C / 2), 2 B) for blocks of B =
    ``vectors`` x 16 output channels: per pair of input channels, each output channel's two
    weights side by side, the operand layout of vdpbf16ps. An odd C gets a zero channel."""
    co, c = weight.shape
    block = vectors * LANES
    if co % block:
        raise ValueError(f"{co} output channels are not whole blocks of {block}")
    pairs = -(-c // 2)
    padded = np.zeros((co, 2 * pairs), np.float32)
    padded[:, :c] = weight
    blocked = padded.reshape(co // block, block, pairs, 2).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(bf16_bits(blocked).reshape(co // block, pairs, 2 * block))


def bf16_stages(shape: BlockShape | StemBlockShape) -> tuple[bool, bool]:
    """(expand, project): the stages of a fused block that a bf16 build computes with bf16
    products, the 1x1 stages whose reduction pairs up (an even channel count). A first
    convolution's expand stage (``StemBlockShape``, a k x k convolution) pairs its input
    channels, an odd count with a zero channel (``bf16_conv_pairs``)."""
    if isinstance(shape, StemBlockShape):
        return True, shape.expanded_view.expanded % 2 == 0
    expand = shape.expand and shape.in_channels % 2 == 0
    return expand, shape.expanded % 2 == 0


def bf16_conv_pairs(weight: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    """A k x k weight (Co, C, k, k) as (Co, ceil(C / 2), k, k) uint32 pairs of bf16 bits of
    consecutive input channels, the even one in the low half; an odd C gets a zero channel
    (a first convolution's 3 input channels: 2 pairs per tap, 18 dot products of 27 taps)."""
    co, c, kh, kw = weight.shape
    padded = np.zeros((co, c + c % 2, kh, kw), np.float32)
    padded[:, :c] = weight
    return _channel_pairs(padded)


def bf16_pairs(weight: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    """A (Co, M) weight as (Co, M / 2) uint32 pairs of bf16 bits, the even input channel in
    the low half: the fused blocks' bf16 projection broadcasts one pair per output channel."""
    m = weight.shape[1]
    if m % 2:
        raise ValueError(f"{m} input channels do not pair up")
    return _channel_pairs(weight)


def _channel_pairs(weight: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    """Input channels (axis 1, an even count) pairwise as uint32 bf16 bits, even low."""
    low = bf16_bits(weight[:, 0::2]).astype(np.uint32)
    high = bf16_bits(weight[:, 1::2]).astype(np.uint32)
    return np.ascontiguousarray(low | (high << 16))


# Intel AMX (``compiler.tvm_amx``): a bf16 build for a profile listing these features computes
# 1x1 convolutions on tiles: 32 output channels by two runs of at most 16 positions per block
# of four 16x16 fp32 tiles, 32 input channels per step (zero-padded up to a whole step). A
# run is an image row on maps 9 to 16 wide, else 16 positions of the flattened map (a 7-wide
# row would fill 7 of a tile's 16 columns, a 28-wide one does not fit). Jobs: where the input is
# the larger side, groups of rows (2, 4, ...: at least ``AMX_MIN_JOBS`` jobs where the map
# allows) by blocks of 32 channels, group-major, so that with 2 threads each core multiplies
# the rows it packed itself (tile loads of activation rows another core had just written
# made a 576->96 convolution at 14x14 slower on 2 threads than on 1: 88 against 54 us);
# where the output is, and on flattened maps, blocks of 32 channels with all positions, so
# that no output row is written by two cores (96->576: 43 us against 72-92 by row groups).
AMX_TILE = 32
AMX_MAX_WIDTH = 16
AMX_FLAT_WIDTH = 8
AMX_MIN_JOBS = 8


@dataclass(frozen=True)
class AmxPlan:
    """The AMX kernel's input channels padded to whole steps of ``AMX_TILE``, the positions
    of a run (a tile's columns) and of a job's group (whole rows, a multiple of the run's)."""

    in_channels: int
    columns: int
    positions: int


def plan_pointwise_amx(shape: PointwiseShape) -> AmxPlan | None:
    """The AMX kernel's plan for ``shape``, None where it is not used: 1x1 stride-1
    convolutions of at least 16 output channels (blocks of 32; a last block of fewer
    configures its tiles with fewer rows, as the tiles are stored into the NCHW output
    directly and its channels are not padded), on maps of any size: runs are image
    rows where a row fills most of a tile's 16 columns (9 to 16 wide), else 16 positions of
    the flattened map (which a block that ``splits_for_amx`` leaves on maps up to 28x28)."""
    c, co, h, w = shape.in_channels, shape.out_channels, shape.height, shape.width
    if shape.kernel != 1 or shape.stride != 1 or c < 1 or co < AMX_TILE // 2:
        return None
    if h < 1 or w < 1:
        return None
    c_pad = -(-c // AMX_TILE) * AMX_TILE
    columns = w if AMX_FLAT_WIDTH < w <= AMX_MAX_WIDTH else AMX_MAX_WIDTH
    if c_pad < co or w <= AMX_FLAT_WIDTH:
        # More output than input, or a map of few positions: jobs by channel blocks, all rows
        return AmxPlan(c_pad, columns, h * w)
    blocks, groups = -(-co // AMX_TILE), 2
    while blocks * groups < AMX_MIN_JOBS and 2 * groups <= -(-h // 2):
        groups *= 2
    return AmxPlan(c_pad, columns, -(-h // groups) * w)


def amx_weights(weight: npt.NDArray[np.float32], plan: AmxPlan) -> npt.NDArray[np.uint16]:
    """A 1x1 weight (Co, C) as bf16 bits in blocks of ``AMX_TILE`` x ``AMX_TILE`` (Co' / 32,
    C' / 32, 32, 32), input channels zero-padded to the plan's C', output channels to whole
    blocks (Co'): per block of 32 output channels and step of 32 input channels one
    contiguous 2 KiB block, the kernel's two 16x32 weight tiles, so that a job's weights
    stream in order (read in rows of the (Co, C') matrix, the tile loads of 960->320 at 7x7
    took 118 us a call in mobilenet_v2)."""
    co, c = weight.shape
    if c > plan.in_channels:
        raise ValueError(f"{c} input channels do not fit the plan's {plan.in_channels}")
    co_pad = -(-co // AMX_TILE) * AMX_TILE
    padded = np.zeros((co_pad, plan.in_channels), np.float32)
    padded[:co, :c] = weight
    blocked = padded.reshape(co_pad // AMX_TILE, AMX_TILE, plan.in_channels // AMX_TILE, AMX_TILE)
    return np.ascontiguousarray(bf16_bits(blocked.transpose(0, 2, 1, 3)))


# First layers: a k x k convolution of stride 2 over few input channels (MobileNet's 3x3
# 3->32 at 224, ResNet's 7x7 3->64) reads every other column; MetaSchedule's tuned kernel
# for MobileNetV2's ran at 30-35 GMAC/s. The planes of the stride-2 blocks make every tap
# a contiguous run here too.
MAX_STRIDED_CONV_IN_CHANNELS = 8


@dataclass(frozen=True)
class StridedConvShape:
    """A k x k convolution, stride 2, padding k // 2, batch 1, NCHW float32, bias added,
    then an optional activation ("relu6", "relu" or None). ``height``/``width``: input."""

    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: int
    activation: str | None = None

    @property
    def out_height(self) -> int:
        return self.height // 2

    @property
    def out_width(self) -> int:
        return self.width // 2

    def describe(self) -> str:
        k, c, co = self.kernel, self.in_channels, self.out_channels
        text = f"{k}x{k} {c}->{co} stride 2 at {self.height}x{self.width}"
        return text + (f" + {self.activation}" if self.activation else "")


def strided_conv_dims(shape: StridedConvShape, rows: int, vectors: int) -> tuple[int, int, int]:
    """Plane pitch, output positions and positions per input plane of a strip of ``rows``.

    As ``strided_strip_dims`` with taps reaching ``k // 2`` plane rows and columns further:
    ``fe = fd + (k // 2) * (pitch + 1)``, still whole blocks since ``pitch + 1`` is one.
    The pitch holds ``out_width + k // 2`` plane columns.
    """
    reach = shape.kernel // 2
    block = vectors * LANES
    need = shape.out_width + reach
    pitch = need + (block - 1 - need) % block
    fd = -(-rows * pitch // block) * block
    return pitch, fd, fd + reach * (pitch + 1)


def plan_strided_conv(
    shape: StridedConvShape, *, unit: VectorUnit = AVX512, budget_bytes: int = STRIP_BUDGET_BYTES
) -> BlockConfig | None:
    """Strips and accumulator blocks for ``shape`` (``BlockConfig``'s depthwise field
    unused), None where the kernel is not used: more than ``MAX_STRIDED_CONV_IN_CHANNELS``
    inputs, an even kernel, an odd input size, or a pitch wasting more than a quarter."""
    if shape.kernel % 2 == 0 or shape.kernel < 3 or shape.height % 2 or shape.width % 2:
        return None
    if not 1 <= shape.in_channels <= MAX_STRIDED_CONV_IN_CHANNELS or shape.out_channels < 1:
        return None
    reach = shape.kernel // 2
    for vectors in (v for v in (VECTORS, 2, 1) if v <= unit.block_vectors):
        pitch, _, _ = strided_conv_dims(shape, 1, vectors)
        if 4 * pitch <= 5 * (shape.out_width + reach):
            break
    else:
        return None

    def strip_bytes(rows: int) -> int:
        pitch, fd, fe = strided_conv_dims(shape, rows, vectors)
        return 4 * (4 * shape.in_channels * -(-fe // pitch) * pitch + shape.out_channels * fd)

    rows = _strip_rows(shape.out_height, strip_bytes, budget_bytes)
    if rows is None:
        return None
    channels = _channel_block(shape.out_channels, unit.accumulators // vectors)
    return BlockConfig(rows, 1, 1, channels, vectors=vectors)


# A first convolution whose output only an expansion-1 block reads (MobileNetV2's 3x3 3->32
# at 224, then features.1's depthwise and projection at 112x112): as two kernels the
# convolution writes 1.6 MB that the block reads back, and it ran 1.6x slower in the network
# (cold output lines) than alone. As one kernel the convolution is the block's expand stage.
@dataclass(frozen=True)
class StemBlockShape:
    """``conv`` (stride 2) feeding ``block`` (stride 1, no expand stage, no residual)."""

    conv: StridedConvShape
    block: BlockShape

    @property
    def expanded_view(self) -> BlockShape:
        """The block as the fused kernel computes it: the convolution as its expand stage."""
        b = self.block
        return BlockShape(b.in_channels, b.expanded, b.out_channels, b.height, b.width)

    def describe(self) -> str:
        return f"{self.conv.describe()}, then {self.block.describe()}"


def stem_plane_positions(shape: StemBlockShape, rows: int) -> tuple[int, int, int, int]:
    """Pitch, depthwise/project positions, expand positions and positions per input plane
    of a strip of ``rows``: the expand stage's positions (``strip_dims``) plus the reach of
    the convolution's taps into the planes (``strided_conv_dims``)."""
    pitch, fd, fe = strip_dims(shape.block.width, rows)
    reach = shape.conv.kernel // 2
    return pitch, fd, fe, fe + reach * (pitch + 1)


def plan_stem_block(
    shape: StemBlockShape, *, unit: VectorUnit = AVX512, budget_bytes: int = STRIP_BUDGET_BYTES
) -> BlockConfig | None:
    """The fused kernel's configuration for ``shape`` (as ``plan_block``'s for the block
    with the convolution as its expand stage), None where it is not used: a convolution
    ``plan_strided_conv`` would not take, a block with an expand stage, a residual or
    stride 2, or sizes that do not chain."""
    conv, block = shape.conv, shape.block
    if plan_strided_conv(conv, unit=unit, budget_bytes=budget_bytes) is None:
        return None
    if block.expand or block.stride != 1 or block.residual or block.out_width < MIN_WIDTH:
        return None
    if (block.in_channels, block.height, block.width) != (
        conv.out_channels,
        conv.out_height,
        conv.out_width,
    ):
        return None
    c, m, co = conv.in_channels, block.expanded, block.out_channels

    def strip_bytes(rows: int) -> int:
        pitch, fd, fe, fx = stem_plane_positions(shape, rows)
        return 4 * (4 * c * -(-fx // pitch) * pitch + m * fe + m * fd + co * fd)

    rows = _strip_rows(block.height, strip_bytes, budget_bytes)
    if rows is None:
        return None
    vectors = unit.block_vectors
    return BlockConfig(
        rows=rows,
        expand_channels=_channel_block(m, unit.accumulators // vectors),
        depthwise_channels=_channel_block(m, _depthwise_block(unit, vectors)),
        project_channels=_channel_block(co, unit.accumulators // vectors),
        vectors=vectors,
    )


# Winograd convolutions (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
# 2016): an m x m output tile of a 3x3 convolution from the (m + 2) x (m + 2) input tile
# around it takes (m + 2)^2 multiplies per channel pair instead of 9 m^2, after a transform
# of the input tile (B^T d B), of the weights (G g G^T, done once at compile time) and back
# (A^T M A). ResNet's 3x3 convolutions run near the CPU's peak in the direct kernel and in
# ONNX Runtime's MLAS, so fewer multiplies are the way past them. F(4x4, 3x3) does 4x
# fewer; its transformed weights are 4x the direct ones, which is what limits it on small
# maps with many channels (read from memory once per inference, see plan_winograd).
# Interpolation points 0, +-1, +-2 and infinity, as in the paper and cuDNN.
_WINOGRAD_MATRICES: dict[int, tuple[list[list[float]], list[list[float]], list[list[float]]]] = {
    2: (
        [[1, 1, 1, 0], [0, 1, -1, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    ),
    4: (
        [
            [1, 1, 1, 1, 1, 0],
            [0, 1, -1, 2, -2, 0],
            [0, 1, 1, 4, 4, 0],
            [0, 1, -1, 8, -8, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
    ),
}
WINOGRAD_TILES = tuple(sorted(_WINOGRAD_MATRICES))


def winograd_matrices(
    tile: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(A^T, G, B^T) of F(tile x tile, 3x3); shapes (m, m+2), (m+2, 3), (m+2, m+2)."""
    if tile not in _WINOGRAD_MATRICES:
        raise ValueError(f"no Winograd transform for {tile}x{tile} tiles; have {WINOGRAD_TILES}")
    at, g, bt = _WINOGRAD_MATRICES[tile]
    return np.array(at), np.array(g), np.array(bt)


def winograd_weights(weight: npt.NDArray[np.float32], tile: int) -> npt.NDArray[np.float32]:
    """The transformed weights U[e1, e2, c, o] = (G g[o, c] G^T)[e1, e2] of a (Co, C, 3, 3)
    weight, computed in float64 and stored as float32: ((m+2), (m+2), C, Co)."""
    _, g, _ = winograd_matrices(tile)
    u = np.einsum("ak,ockl,bl->abco", g, weight.astype(np.float64), g)
    return np.ascontiguousarray(u, dtype=np.float32)


@dataclass(frozen=True)
class WinogradConfig:
    """Output tile size, and tiles x vectors of 16 output channels per GEMM accumulator block."""

    tile: int
    positions: int
    vectors: int
    # Tiles per group, the groups in parallel, each computed through every stage; 0: one
    # stage after the other over all tiles, each stage in parallel.
    group: int = 0

    def tiles(self, height: int, width: int) -> tuple[int, int]:
        return -(-height // self.tile), -(-width // self.tile)


# The transformed weights of a layer are read once per inference; above this size the
# extra memory traffic (4x the direct kernel's weights) eats what the multiplies save:
# ResNet's 256->256 at 14x14 (9 MiB) ran at 0.45x ORT's time, 512->512 at 7x7 (36 MiB)
# at 1.48x (F(2x2, 3x3) there: 1.22x; the direct kernel 1.11x).
WINOGRAD_MAX_WEIGHT_BYTES = 16 * 1024 * 1024
# Fewer input channels than this leave the transforms dominant.
MIN_WINOGRAD_IN_CHANNELS = 32


def plan_winograd(
    shape: PointwiseShape,
    *,
    unit: VectorUnit = AVX512,
    max_weight_bytes: int = WINOGRAD_MAX_WEIGHT_BYTES,
) -> WinogradConfig | None:
    """F(4x4, 3x3) for a 3x3 stride-1 convolution where it pays, None where the direct
    kernel (``plan_pointwise``) stays: few input channels, transformed weights over
    ``max_weight_bytes``, output channels not whole vectors, or tile counts no position
    block divides."""
    if shape.kernel != 3 or shape.stride != 1 or shape.in_channels < MIN_WINOGRAD_IN_CHANNELS:
        return None
    if shape.out_channels < LANES or shape.out_channels % LANES:
        return None
    tile = 4
    if (tile + 2) ** 2 * shape.in_channels * shape.out_channels * 4 > max_weight_bytes:
        return None
    rows, cols = -(-shape.height // tile), -(-shape.width // tile)
    block = next((b for b in unit.conv_positions if (rows * cols) % b == 0), None)
    if block is None:
        return None
    vectors = _channel_vectors(shape.out_channels, unit)
    # Groups of about a row of tiles, each through every stage in L2: on the box's slow
    # mode (a neighbour in L3?) stage-by-stage passes over the whole map took 1.8x as long
    # at 56x56 (1,002 against 557 us) and 1.3x at 28x28; the same at 14x14. Fewer than two
    # groups would leave a core idle: then stage by stage, each stage in parallel.
    tiles = rows * cols
    group = next(
        (g for g in range(block, tiles // 2 + 1, block) if g >= cols and tiles % g == 0), 0
    )
    return WinogradConfig(tile=tile, positions=block, vectors=vectors, group=group)


# Depthwise 3x3 convolutions outside the fused blocks (maps narrower than ``MIN_WIDTH``:
# MobileNetV2's at 14x14 and 7x7, its stride-2 one from 14x14 to 7x7). MetaSchedule's tuned
# kernels for them materialize a padded copy of the whole input and vectorize along a width
# of 14 or 7; ``tvm_fusion.depthwise_func`` pads one channel at a time into a plane whose
# rows are whole vectors (stride 2: even and odd columns apart, so that every tap is a
# contiguous run) and keeps a block of output rows in registers. The widest map it takes
# is the vector unit's ``depthwise_width``.
DEPTHWISE_TAPS = 9  # weights of a 3x3 depthwise convolution, one register each


@dataclass(frozen=True)
class DepthwiseShape:
    """A 3x3 depthwise convolution (padding 1, stride 1 or 2, batch 1, NCHW float32), bias
    added, then an optional activation ("relu6" or "relu")."""

    channels: int
    height: int
    width: int
    stride: int = 1
    activation: str | None = None

    @property
    def out_height(self) -> int:
        return (self.height - 1) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width - 1) // self.stride + 1

    def describe(self) -> str:
        text = f"depthwise 3x3 {self.channels}"
        text += f" stride {self.stride}" if self.stride != 1 else ""
        text += f" at {self.height}x{self.width}"
        names = {"relu6": "ReLU6", "relu": "ReLU"}
        return text + (f" + {names[self.activation]}" if self.activation else "")


@dataclass(frozen=True)
class DepthwiseConfig:
    """Output columns computed per row (the width in whole registers of the unit), output
    rows per accumulator block, and the rows computed (the height in whole blocks)."""

    columns: int
    rows: int
    padded_rows: int

    @property
    def plane_rows(self) -> int:
        """Rows of a channel's zero-padded input plane the blocks read (at stride 1; the
        kernel scales by the stride)."""
        return self.padded_rows + 2

    def plane_columns(self, stride: int) -> int:
        """Columns of each of the plane's ``stride`` column phases: tap ``kw`` of output
        column j reads phase ``kw % stride`` at ``j + kw // stride``."""
        return self.columns + 2 // stride


def plan_depthwise(shape: DepthwiseShape, *, unit: VectorUnit = AVX512) -> DepthwiseConfig | None:
    """The depthwise kernel's blocks for ``shape``, None where it is not used (wider maps
    are in fused blocks or vectorize well along their width). Accumulators: ``rows`` rows of
    ``columns / unit.lanes`` registers; the 9 weights stay in registers too (the taps are
    the FMAs' memory operands), so at most ``unit.registers - 9`` (AVX2, 576 channels at
    14x14 on 1 thread: 4 rows of 2 registers spilled, 125 us a call against 99 for 2 rows;
    at 7x7, 960 channels, 7 rows of 1 took 50 us, 1 row 67). Of the row counts that fit,
    the largest that divides the output height (each block loads its taps once; the
    kernel also computes padding rows, which no plan needs then)."""
    if min(shape.channels, shape.height, shape.width) < 1 or shape.stride not in (1, 2):
        return None
    if shape.width > unit.depthwise_width:
        return None
    lanes = unit.lanes
    columns = -(-shape.out_width // lanes) * lanes
    per_row = columns // lanes
    budget = unit.registers - DEPTHWISE_TAPS
    if per_row > budget:
        return None
    ho = shape.out_height
    rows = max(r for r in range(1, min(budget // per_row, ho) + 1) if ho % r == 0)
    return DepthwiseConfig(columns=columns, rows=rows, padded_rows=ho)


# Output rows per job of the depthwise + projection kernel, at least: every job reads the
# projection's whole weight (Intel Xeon with AMX, 2 threads, 576 -> 96 at 14x14: jobs of 7
# rows 127 us against 164 for the depthwise and pointwise kernels one after the other; jobs
# of 2 rows 1.2x slower than the two kernels, of 1 row at 7x7 1.6x; docs/benchmarks.md).
DEPTHWISE_PROJECT_MIN_ROWS = 7


@dataclass(frozen=True)
class DepthwiseProjectConfig:
    """The depthwise + projection kernel's jobs of ``rows`` output rows (one per core), and
    its projection's accumulator block of ``positions`` x ``vectors`` of 16 channels."""

    rows: int
    positions: int
    vectors: int


def plan_depthwise_project(
    depthwise: DepthwiseShape,
    project: PointwiseShape,
    *,
    cores: int,
    unit: VectorUnit = AVX512,
) -> DepthwiseProjectConfig | None:
    """The kernel for a 3x3 depthwise convolution followed by the 1x1 projection that
    reads only its output (``tvm_depthwise.depthwise_project_func``), None where it is not
    used. Why: the depthwise output (576 x 14 x 14 floats in MobileNetV2) written by one
    kernel split over channels and read by the next split over positions crosses between
    the cores' caches both ways; in one kernel, each job (a band of rows, one per core)
    computes the depthwise output of its rows into a buffer of its own and projects it.
    Stride 1, maps at most one vector wide (``unit.lanes``), whose height splits into
    ``cores`` bands of at least ``DEPTHWISE_PROJECT_MIN_ROWS`` rows: on 2 cores MobileNetV2's
    14x14 blocks, not its 7x7 ones. Units with ``unit.depthwise_project`` only (measured on
    AVX-512)."""
    if not unit.depthwise_project or cores < 1:
        return None
    h, w = depthwise.height, depthwise.width
    if depthwise.stride != 1 or w > unit.lanes or h % cores:
        return None
    if (project.kernel, project.stride, project.in_channels) != (1, 1, depthwise.channels):
        return None
    if (project.height, project.width) != (h, w) or project.out_channels % LANES:
        return None
    rows = h // cores
    if rows < DEPTHWISE_PROJECT_MIN_ROWS:
        return None
    positions = next((b for b in unit.conv_positions if rows * w % b == 0), None)
    if positions is None:
        return None
    return DepthwiseProjectConfig(rows, positions, _channel_vectors(project.out_channels, unit))


# Bytes of one split-block job's buffers (its share of the expanded map, zero-padded, and of
# the depthwise output), at most: mostly in the core's L2 cache. On a Zen 4 without AVX-512
# (1 MiB of L2) MobileNetV2's 24->144->32 at 56x56, stride 2 (1.19 MB a share) took 0.7x
# the strip kernel's time; 24->144->24 at 56x56 (1.87 MB) was no faster than it. On a Zen 4
# with AVX-512 (shares in 8-lane vectors, ``HALF_LANES``), in the network: 195 us against
# 248 for the first, 399 against 362 for the second, and 16->96->24 at 112x112, stride 2
# (3.1 MB) 571 against 531, although alone, warm, the split kernel took 0.88x and 0.78-0.98x
# the strip kernel's time for those two.
SPLIT_BLOCK_BUDGET_BYTES = 1536 * 1024
# fp32 lanes of the vectors AVX-512 computes a split block in when its shares are not whole
# 16-lane vectors (AVX-512VL's 256-bit forms, 32 registers of them), and the accumulators of
# their register blocks then (``register_tile``): on a Zen 4, which executes 512-bit
# operations as two 256-bit halves, as fast as 16 lanes would be.
HALF_LANES = 8
HALF_LANE_ACCUMULATORS = 12


@dataclass(frozen=True)
class SplitBlockConfig:
    """The split-block kernel's jobs: ``groups`` shares of the expanded channels (one per
    core); accumulator blocks of ``expand_positions`` x ``expand_vectors`` vectors of
    ``lanes`` channels for the expansion, ``project_positions`` x ``project_vectors`` for
    the projection (a last, smaller block takes the positions that do not fill one)."""

    groups: int
    expand_positions: int
    expand_vectors: int
    project_positions: int
    project_vectors: int
    lanes: int = LANES


def plan_split_block(
    shape: BlockShape,
    *,
    cores: int,
    unit: VectorUnit = AVX512,
    budget_bytes: int = SPLIT_BLOCK_BUDGET_BYTES,
) -> SplitBlockConfig | None:
    """The kernel for an inverted-residual block on a small map
    (``tvm_split_block.split_block_func``), None where it is not used.

    Why: on maps of up to 14x14 the block's three convolutions ran as three kernels, each
    split over the cores its own way (MetaSchedule's expansion, the depthwise kernel by
    channels, the pointwise kernel by positions), so the two 6x expanded maps crossed
    between the cores' caches; each kernel took 1.3-1.6x its time on warm operands. Here
    each core takes a share of the expanded channels through all three stages: its
    expansion, depthwise convolution and its part of the projection's sum (all positions,
    channels-last, in buffers of its own), then one pass adds the parts, the bias and the
    residual into the NCHW output. Each core reads its share of every weight, and no
    expanded value leaves it. Intel Xeon with AMX, 2 threads: 160->960->160 at 7x7 104 us
    against 171 as three kernels, 96->576->96 at 14x14 158 against 264; at 28x28 it also
    beats the strip kernel (``plan_block``, which recomputes each strip's edge rows):
    32->192->32 87 against 122 us, stride 2 58 against 87 (docs/benchmarks.md).

    Blocks with an expansion, stride 1 or 2, whose expanded channels split into ``cores``
    shares of whole vectors and whose output channels are whole vectors; a share's
    buffers (its expanded map with a zero border and its depthwise output) within
    ``budget_bytes``: MobileNetV2's blocks from 28x28 down, on 2 cores, and the stride-2
    block at 56x56. Units with
    ``unit.split_blocks`` only (AVX-512; AVX2, whose code took mobilenet_v2 in 0.87x the
    time with them on the same Xeon).

    On units narrower than 16 lanes (AVX2) the kernel computes in the unit's own vectors
    (``register_tile``: 6 positions x 2 vectors of 8 channels, or 4 x 3, 12 x 1), the
    positions that do not fill a block in one smaller block: on a Zen 4 without AVX-512
    96->576->96 at 14x14 took 286 us against 330 in 4 positions x 16 channels (2 registers
    a vector, 8 accumulators), 32->192->32 at 28x28 164 against 204. AVX-512 computes
    shares that are not whole 16-lane vectors (MobileNetV2's 144 and 96 expanded channels
    on 2 cores) in 8-lane vectors (``HALF_LANES``): on a Zen 4 24->144->32 at 56x56,
    stride 2, 174 us against the strip kernel's 235-251 alone, 195 against 248 in the
    network."""
    if not unit.split_blocks or cores < 1 or not shape.expand or shape.stride not in (1, 2):
        return None
    h, w, m = shape.height, shape.width, shape.expanded
    if min(h, w, shape.in_channels) < 1:
        return None
    if shape.stride == 2 and (h % 2 or w % 2):
        return None
    share, co = m // cores, shape.out_channels
    lanes = min(unit.lanes, LANES)
    if lanes == LANES and (share % lanes or co % lanes):
        lanes = HALF_LANES
    if m % cores or share % lanes or co % lanes:
        return None
    if 4 * share * ((h + 2) * (w + 2) + shape.out_height * shape.out_width) > budget_bytes:
        return None
    if lanes < LANES:
        expand_positions, expand_vectors = register_tile(share // lanes, unit, lanes)
        project_positions, project_vectors = register_tile(co // lanes, unit, lanes)
        return SplitBlockConfig(
            cores, expand_positions, expand_vectors, project_positions, project_vectors, lanes
        )
    expand = next((b for b in unit.conv_positions if h * w % b == 0), None)
    outputs = shape.out_height * shape.out_width
    project = next((b for b in unit.conv_positions if outputs % b == 0), None)
    if expand is None or project is None:
        return None
    return SplitBlockConfig(
        groups=cores,
        expand_positions=expand,
        expand_vectors=_channel_vectors(share, unit),
        project_positions=project,
        project_vectors=_channel_vectors(shape.out_channels, unit),
    )


def register_tile(vectors: int, unit: VectorUnit, lanes: int | None = None) -> tuple[int, int]:
    """Positions x vectors of an accumulator block of output channels that are ``vectors``
    vectors of ``lanes`` (None: the unit's own; fewer than 16): its accumulator registers
    (12 on AVX2) as 2 vectors x 6 positions, else 3 x 4, else 1 x 12, the first whose
    vectors divide ``vectors``. Each step then loads one weight register per vector and
    broadcasts one value per position; 12 FMAs in flight cover AVX2's latency.

    AVX-512 in 8-lane vectors (``HALF_LANES``): ``HALF_LANE_ACCUMULATORS`` registers, 3
    vectors x 4 positions first: on a Zen 4 an expansion to 48 channels a share took 0.9x
    the time of 2 x 6 (16->96->24 at 112x112, stride 2), and 4 x 3 was faster than 8 x 3
    or 12 x 1."""
    lanes = unit.lanes if lanes is None else lanes
    if unit.lanes > lanes:
        registers, order = HALF_LANE_ACCUMULATORS, (3, 2, 1)
    else:
        registers, order = unit.accumulators * LANES // unit.lanes, (2, 3, 1)
    per_block = next(v for v in order if vectors % v == 0)
    return max(1, registers // per_block), per_block


def split_block_weights(
    weights: Sequence[npt.NDArray[np.float32]], config: SplitBlockConfig
) -> list[npt.NDArray[np.float32]]:
    """A block's weights and biases (expansion (M, C), (M,); depthwise (M, 3, 3), (M,);
    projection (Co, M), (Co,)) in the split-block kernel's layouts: the 1x1 weights in
    blocks of their accumulator blocks' channels (``blocked_weights``), the depthwise one
    channels-last (3, 3, M)."""
    we, be, wd, bd, wp, bp = weights
    return [
        blocked_weights(np.ascontiguousarray(we.T), config.expand_vectors, config.lanes),
        be,
        np.ascontiguousarray(np.moveaxis(wd, 0, -1)),
        bd,
        blocked_weights(np.ascontiguousarray(wp.T), config.project_vectors, config.lanes),
        bp,
    ]


@dataclass(frozen=True)
class MaxPoolShape:
    """A k x k max pool of stride s and padding p (batch 1, NCHW float32, floor mode, no
    dilation), as ResNet's 3x3/2 after its first convolution."""

    channels: int
    height: int
    width: int
    kernel: int
    stride: int
    padding: int

    @property
    def out_height(self) -> int:
        return (self.height + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width + 2 * self.padding - self.kernel) // self.stride + 1

    def describe(self) -> str:
        k, s, p = self.kernel, self.stride, self.padding
        return f"max pool {k}x{k}/{s} pad {p}, {self.channels} at {self.height}x{self.width}"


def plan_max_pool(shape: MaxPoolShape) -> bool:
    """Whether the max-pool kernel computes ``shape``. It clamps each tap's row and column
    into the image instead of padding with -inf: a clamped tap repeats a pixel of the same
    window, which holds while every window overlaps the image (padding < kernel, a positive
    output size). MetaSchedule has no schedule rule for pooling on CPU ("pool_max" is
    GPU-only), so without this kernel ResNet-18's pool ran unscheduled, serial: 650 us."""
    if min(shape.channels, shape.height, shape.width, shape.kernel, shape.stride) < 1:
        return False
    if not 0 <= shape.padding < shape.kernel:
        return False
    return shape.out_height >= 1 and shape.out_width >= 1


def splits_for_amx(shape: BlockShape, *, unit: VectorUnit = AVX512) -> bool:
    """Whether a bf16 build on AMX tiles computes ``shape`` as three kernels instead of the
    fused one: its two 1x1 stages on tiles (``plan_pointwise_amx`` takes both) and the
    depthwise stage in the depthwise kernel (``plan_depthwise``), where the expansion's
    input fills at least 3/4 of its steps of 32 channels. The fused kernel's fp32 1x1
    stages are most of its time; on tiles they take a fraction of it, which pays for the
    expanded activations going through memory (MobileNetV2's blocks at 56x56 and 28x28:
    the network 0.90x the fused build's time on an Emerald Rapids Xeon,
    docs/benchmarks.md)."""
    if not shape.expand:
        return False
    expand = plan_pointwise_amx(
        PointwiseShape(shape.in_channels, shape.expanded, shape.height, shape.width, "relu6")
    )
    # An expansion from 16 channels fills half of each 32-channel step: MobileNetV2's 16->96
    # at 112x112 took 364-510 us on tiles, and splitting that block too made the network
    # 1.05x slower.
    if expand is None or 4 * shape.in_channels < 3 * expand.in_channels:
        return False
    project = PointwiseShape(
        shape.expanded,
        shape.out_channels,
        shape.out_height,
        shape.out_width,
        residual=shape.residual,
    )
    depthwise = DepthwiseShape(shape.expanded, shape.height, shape.width, shape.stride, "relu6")
    return (
        plan_pointwise_amx(project) is not None and plan_depthwise(depthwise, unit=unit) is not None
    )
