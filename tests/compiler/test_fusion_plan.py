"""compiler.fusion_plan: strip geometry, block plans and when blocks are fused (pure)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from compiler.fusion_plan import (
    AVX2,
    AVX512,
    LANES,
    MIN_WIDTH,
    STRIP_BUDGET_BYTES,
    VECTOR_UNITS,
    VECTORS,
    BlockConfig,
    BlockShape,
    MaxPoolShape,
    PointwiseConfig,
    PointwiseShape,
    StemBlockShape,
    StridedConvShape,
    VectorUnit,
    WinogradConfig,
    block_mask,
    blocked_weights,
    choose_block_fusion,
    edge_mask,
    plan_block,
    plan_max_pool,
    plan_pointwise,
    plan_stem_block,
    plan_strided_conv,
    plan_winograd,
    stem_plane_positions,
    strided_conv_dims,
    strided_edge_mask,
    strided_strip_dims,
    strided_vectors,
    strip_bytes,
    strip_dims,
    vector_unit,
    winograd_matrices,
    winograd_weights,
)


@pytest.mark.parametrize("width", [7, 14, 28, 30, 56, 112])
@pytest.mark.parametrize("rows", [1, 4, 7, 14])
def test_strips_are_whole_accumulator_blocks_with_room_for_the_taps(width: int, rows: int) -> None:
    pitch, fd, fe = strip_dims(width, rows)
    block = VECTORS * LANES
    assert pitch == width + 2  # the row and its two padding columns, nothing more
    assert rows * pitch <= fd < rows * pitch + block and fd % block == 0
    # the depthwise taps of the last position reach into the last block of expand positions
    assert fd + 2 * pitch + 2 <= fe < fd + 2 * pitch + 2 + block and fe % block == 0


@pytest.mark.parametrize("out_width", [7, 14, 28, 56, 63, 64])
@pytest.mark.parametrize("rows", [1, 4, 7, 14])
@pytest.mark.parametrize("vectors", [1, 2, 4])
def test_strided_strips_are_whole_blocks_with_room_for_the_taps(
    out_width: int, rows: int, vectors: int
) -> None:
    pitch, fd, fe = strided_strip_dims(out_width, rows, vectors)
    block = vectors * LANES
    # the even-column planes hold out_width + 1 columns: the padding column on the left
    assert pitch == out_width + 1
    assert rows * pitch <= fd < rows * pitch + block and fd % block == 0
    # tap (2, 2) of the last position reads plane (0, 0) at fd - 1 + pitch + 1
    assert fd + pitch + 1 <= fe < fd + pitch + 1 + block and fe % block == 0


@pytest.mark.parametrize(("out_width", "vectors"), [(56, 4), (28, 2), (14, 1), (112, 4)])
def test_strided_vectors_keep_the_pitch_within_a_quarter(out_width: int, vectors: int) -> None:
    assert strided_vectors(out_width) == vectors


def test_strided_edge_mask_marks_exactly_the_image() -> None:
    height, width, rows, vectors = 8, 6, 2, 1
    pitch, _, fe = strided_strip_dims(width // 2, rows, vectors)
    mask = strided_edge_mask(height, width, rows, vectors)
    assert mask.shape == (2, 4, fe) and mask.dtype == np.float32
    for strip in range(2):
        for plane in range(4):
            for pos in range(fe):
                # plane (row parity, column parity) of the padded image: padded row
                # 2 * (pos // pitch) + row parity of the strip's 2 * rows + 1, padded column
                # 2 * (pos % pitch) + column parity; the image starts at padded (1, 1)
                row = strip * 2 * rows + 2 * (pos // pitch) + plane // 2 - 1
                col = 2 * (pos % pitch) + plane % 2 - 1
                inside = 0 <= row < height and 0 <= col < width
                assert mask[strip, plane, pos] == (1.0 if inside else 0.0)
    # the rows the taps read (2 * rows + 1 from the padding row above each strip) hold every
    # image pixel once, the row shared by two strips twice
    plane_rows = np.arange(fe) // pitch
    read = [(plane_rows <= rows - plane // 2)[None, :] for plane in range(4)]
    assert sum(float((mask[:, p] * read[p]).sum()) for p in range(4)) == height * width + width


@pytest.mark.parametrize(
    ("height", "width", "rows", "message"),
    [
        (7, 6, 1, "a stride-2 block needs an even height and width, not 7x6"),
        (8, 5, 1, "a stride-2 block needs an even height and width, not 8x5"),
        (8, 6, 3, "rows 3 must divide the output height 4"),
    ],
)
def test_strided_edge_mask_refuses_what_the_kernel_cannot_do(
    height: int, width: int, rows: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        strided_edge_mask(height, width, rows, 1)


def test_block_mask_follows_the_stride() -> None:
    one = BlockShape(8, 16, 8, 6, 5)
    two = BlockShape(8, 16, 8, 8, 6, 2)
    config = BlockConfig(3, 4, 2, 4, vectors=1)
    assert np.array_equal(block_mask(one, config), edge_mask(6, 5, 3))
    assert np.array_equal(block_mask(two, replace(config, rows=2)), strided_edge_mask(8, 6, 2, 1))


def test_a_stride_2_block_has_no_residual_and_halves_its_input() -> None:
    block = BlockShape(24, 144, 24, 56, 56, 2)
    assert not block.residual and (block.out_height, block.out_width) == (28, 28)
    assert block.describe() == "24->144->24 at 56x56, stride 2"
    assert BlockShape(24, 144, 24, 56, 56).residual


def test_strip_dims_refuses_empty_strips() -> None:
    with pytest.raises(ValueError, match="width 0 and rows 3 must be at least 1"):
        strip_dims(0, 3)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # MobileNetV2's stride-1 blocks at 56 and 28: 4 and 2 strips of 14 rows
        (BlockShape(24, 144, 24, 56, 56), BlockConfig(14, 4, 2, 4)),
        (BlockShape(32, 192, 32, 28, 28), BlockConfig(14, 4, 2, 4)),
        # channel counts without a factor 4 get narrower accumulator blocks: 3, 2 or 1
        (BlockShape(24, 150, 3, 56, 56), BlockConfig(14, 3, 2, 3)),
        (BlockShape(24, 146, 3, 56, 56), BlockConfig(14, 2, 2, 3)),
        (BlockShape(16, 95, 16, 28, 28), BlockConfig(14, 1, 1, 4)),
        # too narrow: the padded pitch would waste more than it saves
        (BlockShape(64, 384, 64, 14, 14), None),
        (BlockShape(160, 960, 160, 7, 7), None),
        # a prime height leaves strips of 1 row: expanding 3 rows per row is no gain
        (BlockShape(24, 144, 24, 31, 56), None),
        (BlockShape(24, 144, 24, 30, 56), BlockConfig(15, 4, 2, 4)),
        # stride 2 (MobileNetV2's features.2 and .4): planes of pitch 57 at 56 wide, 4
        # vectors; 29 at 28 wide, 2 vectors and twice the channels per accumulator block
        (BlockShape(16, 96, 24, 112, 112, 2), BlockConfig(7, 4, 2, 4, vectors=4)),
        (BlockShape(24, 144, 32, 56, 56, 2), BlockConfig(14, 8, 4, 8, vectors=2)),
        # 14 wide: pitch 15 with 1 vector per block, 4x the channels
        (BlockShape(32, 192, 64, 28, 28, 2), BlockConfig(7, 16, 8, 16, vectors=1)),
        # stride 2 to 7 wide, an odd input, a stride the kernel does not have: not fused
        (BlockShape(96, 576, 160, 14, 14, 2), None),
        (BlockShape(16, 96, 24, 112, 111, 2), None),
        (BlockShape(16, 96, 24, 112, 112, 3), None),
    ],
)
def test_plan_block(shape: BlockShape, expected: BlockConfig | None) -> None:
    assert plan_block(shape) == expected


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # AVX2's 16 registers of 8 lanes: 1 vector of 16 positions (2 registers) x 6
        # channels for the 1x1 stages, 3 for the depthwise one, whatever the stride
        (BlockShape(24, 144, 24, 56, 56), BlockConfig(14, 6, 3, 6, vectors=1)),
        # 32 outputs: 4 channels per block
        (BlockShape(32, 192, 32, 28, 28), BlockConfig(14, 6, 3, 4, vectors=1)),
        (BlockShape(16, 96, 24, 112, 112, 2), BlockConfig(7, 6, 3, 6, vectors=1)),
        (BlockShape(24, 144, 32, 56, 56, 2), BlockConfig(14, 6, 3, 4, vectors=1)),
        (BlockShape(32, 192, 64, 28, 28, 2), BlockConfig(7, 6, 3, 4, vectors=1)),
        (BlockShape(96, 576, 160, 14, 14, 2), None),
    ],
)
def test_plan_block_for_avx2(shape: BlockShape, expected: BlockConfig | None) -> None:
    config = plan_block(shape, unit=AVX2)
    assert config == expected
    if config is not None:  # the stages' positions are whole blocks of its vectors
        block = config.vectors * LANES
        if shape.stride == 1:
            _, fd, fe = strip_dims(shape.width, config.rows)
        else:
            _, fd, fe = strided_strip_dims(shape.out_width, config.rows, config.vectors)
        assert fd % block == 0 and fe % block == 0


def test_channel_vectorized_kernels_for_avx2_hold_one_vector_of_channels() -> None:
    relu6 = "relu6"
    assert plan_pointwise(PointwiseShape(160, 960, 7, 7, relu6), unit=AVX2) == PointwiseConfig(7, 1)
    projection = PointwiseShape(576, 96, 14, 14)
    assert plan_pointwise(projection, unit=AVX2) == PointwiseConfig(7, 1, position_major=True)
    # short reductions at 14x14 too: MetaSchedule's AVX2 kernels for them are slower
    expansion = PointwiseShape(64, 384, 14, 14, relu6)
    assert plan_pointwise(expansion, unit=AVX2) == PointwiseConfig(7, 1)
    assert plan_pointwise(expansion) is None
    # 3x3 and stride 2: 4 positions where the width allows (7 x 2 registers spilled)
    conv3x3 = PointwiseShape(64, 64, 56, 56, "relu", kernel=3)
    assert plan_pointwise(conv3x3, unit=AVX2) == PointwiseConfig(4, 1)
    assert plan_winograd(conv3x3, unit=AVX2) == WinogradConfig(4, 4, 1, group=28)
    shortcut = PointwiseShape(256, 512, 14, 14, "relu", stride=2)
    assert plan_pointwise(shortcut, unit=AVX2) == PointwiseConfig(7, 1)  # 7 wide
    conv7x7 = PointwiseShape(512, 512, 7, 7, kernel=3)
    assert plan_pointwise(conv7x7, unit=AVX2) == PointwiseConfig(7, 1)
    assert plan_winograd(PointwiseShape(128, 128, 28, 28, kernel=3), unit=AVX2) == (
        WinogradConfig(4, 7, 1, group=7)  # 7 x 7 tiles
    )
    first = StridedConvShape(3, 32, 224, 224, 3, relu6)
    assert plan_strided_conv(first, unit=AVX2) == BlockConfig(56, 1, 1, 4, vectors=1)
    stem = StemBlockShape(first, BlockShape(32, 32, 16, 112, 112, expand=False))
    assert plan_stem_block(stem, unit=AVX2) == BlockConfig(28, 4, 2, 4, vectors=1)


@pytest.mark.parametrize(
    ("isa", "features", "expected"),
    [
        ("x86_64", ("avx512f", "avx2", "fma"), AVX512),
        ("x86_64", ("avx2", "fma", "bmi2"), AVX2),
        ("x86_64", ("avx2",), None),  # the kernels' multiply-adds are FMAs
        ("x86_64", ("sse4_2",), None),
        ("aarch64", ("neon", "avx512f"), None),
    ],
)
def test_vector_unit(isa: str, features: tuple[str, ...], expected: VectorUnit | None) -> None:
    assert vector_unit(isa, features) == expected


def test_avx2_accumulators_leave_registers_for_the_operands() -> None:
    for unit in VECTOR_UNITS.values():
        registers_per_vector = LANES // unit.lanes
        assert unit.accumulators * registers_per_vector <= unit.registers - 4
        assert unit.accumulators % unit.block_vectors == 0


def test_plan_prefers_an_even_number_of_strips_within_the_budget() -> None:
    shape = BlockShape(24, 144, 24, 56, 56)
    config = plan_block(shape)
    assert config is not None
    assert strip_bytes(shape, config.rows) <= STRIP_BUDGET_BYTES
    assert (shape.height // config.rows) % 2 == 0
    # 28 rows (2 strips) would not fit; 8 rows (7 strips) would, but cannot be split evenly
    assert strip_bytes(shape, 28) > STRIP_BUDGET_BYTES
    assert plan_block(shape, budget_bytes=strip_bytes(shape, 8)) == BlockConfig(7, 4, 2, 4)


def test_no_plan_when_no_strip_fits_or_one_strip_is_all() -> None:
    assert plan_block(BlockShape(24, 144, 24, 56, 56), budget_bytes=1024) is None
    assert plan_block(BlockShape(8, 16, 8, 1, MIN_WIDTH)) is None  # a single row


def test_edge_mask_marks_exactly_the_image() -> None:
    height, width, rows = 6, 5, 3
    pitch, _, fe = strip_dims(width, rows)
    mask = edge_mask(height, width, rows)
    assert mask.shape == (2, fe) and mask.dtype == np.float32
    for strip in range(2):
        for pos in range(fe):
            # position pos of a strip is image row strip*rows - 1 + pos // pitch (one halo
            # row above), column pos % pitch - 1 (one padding column on the left)
            row, col = strip * rows - 1 + pos // pitch, pos % pitch - 1
            inside = 0 <= row < height and 0 <= col < width
            assert mask[strip, pos] == (1.0 if inside else 0.0), (strip, pos)
    assert mask[0, : pitch + 1].sum() == 0  # the padding row above the image, and a column
    assert mask[0, pitch + 1 : pitch + 1 + width].tolist() == [1.0] * width


def test_edge_mask_refuses_rows_that_do_not_divide_the_height() -> None:
    with pytest.raises(ValueError, match="rows 4 must divide the height 6"):
        edge_mask(6, 5, 4)


AVX512 = ("avx512f", "avx512bw", "fma")


@pytest.mark.parametrize(
    ("requested", "gpu", "isa", "features", "expected"),
    [
        (None, False, "x86_64", AVX512, True),  # the default where it was measured
        (None, False, "x86_64", ("avx2", "fma"), True),  # AVX2: blocks sized for 16 registers
        (None, False, "x86_64", ("sse4_2",), False),  # no unit the kernels are sized for
        (True, False, "x86_64", ("avx2", "fma"), True),
        (None, False, "aarch64", ("neon",), False),  # untimed on ARM: by request only
        (True, False, "aarch64", ("neon",), True),
        (True, False, "armv7", ("neon",), True),
        (False, False, "x86_64", AVX512, False),
        (None, True, "x86_64", AVX512, False),  # CPU kernels; GPU builds never
        (True, True, "aarch64", ("neon",), False),
    ],
)
def test_choose_block_fusion(
    requested: bool | None, gpu: bool, isa: str, features: tuple[str, ...], expected: bool
) -> None:
    assert choose_block_fusion(requested, gpu=gpu, isa=isa, features=features) is expected


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # MobileNetV2's 7x7 layers: 7 positions x 2 vectors of 16 channels
        (PointwiseShape(160, 960, 7, 7, activation="relu6"), PointwiseConfig(7, 2)),
        (PointwiseShape(960, 160, 7, 7, residual=True), PointwiseConfig(7, 2)),
        (PointwiseShape(576, 160, 7, 7), PointwiseConfig(7, 2)),
        (PointwiseShape(320, 1280, 7, 7, activation="relu6"), PointwiseConfig(7, 2)),
        # an odd number of channel vectors: one vector per block
        (PointwiseShape(576, 80, 7, 7), PointwiseConfig(7, 1)),
        # 14x14: only long reductions (the projections) beat MetaSchedule's kernels; more
        # positions than output channels (the input outweighs the weight): position-major
        (PointwiseShape(576, 96, 14, 14, residual=True), PointwiseConfig(7, 2, True)),
        (PointwiseShape(384, 64, 14, 14), PointwiseConfig(7, 2, position_major=True)),
        (PointwiseShape(320, 48, 7, 7), PointwiseConfig(7, 1, position_major=True)),
        (PointwiseShape(320, 64, 7, 7), PointwiseConfig(7, 2)),  # 49 positions < 64
        (PointwiseShape(64, 384, 14, 14, activation="relu6"), None),
        # 4x4: 16 positions, blocks of 8
        (PointwiseShape(64, 32, 4, 4), PointwiseConfig(8, 2)),
        # channels that are not whole vectors, maps too large, no position block divides
        (PointwiseShape(64, 100, 7, 7), None),
        (PointwiseShape(64, 8, 7, 7), None),
        (PointwiseShape(256, 256, 28, 28), None),
        (PointwiseShape(256, 64, 11, 11), None),
        # 3x3 (ResNet): any map whose width a block of positions divides
        (PointwiseShape(64, 64, 56, 56, activation="relu", kernel=3), PointwiseConfig(7, 2)),
        (PointwiseShape(256, 256, 14, 14, "relu", residual=True, kernel=3), PointwiseConfig(7, 2)),
        (PointwiseShape(32, 48, 32, 32, kernel=3), PointwiseConfig(8, 1)),
        # stride 2 (ResNet's downsampling): blocks of positions divide the output width
        (PointwiseShape(64, 128, 56, 56, "relu", kernel=3, stride=2), PointwiseConfig(7, 2)),
        (PointwiseShape(256, 512, 14, 14, "relu", True, stride=2), PointwiseConfig(7, 2)),
        (PointwiseShape(32, 48, 30, 30, kernel=3, stride=2), PointwiseConfig(5, 1)),
        (PointwiseShape(8, 32, 56, 56, kernel=3, stride=2), None),  # the stem kernel's
        (PointwiseShape(64, 64, 56, 56, kernel=3, stride=3), None),
        # a first layer's 3 channels, a width no block divides, a kernel the kernel lacks
        (PointwiseShape(3, 32, 56, 56, kernel=3), None),
        (PointwiseShape(64, 64, 11, 11, kernel=3), None),
        (PointwiseShape(64, 64, 14, 14, kernel=5), None),
    ],
)
def test_plan_pointwise(shape: PointwiseShape, expected: PointwiseConfig | None) -> None:
    assert plan_pointwise(shape) == expected


def test_pointwise_descriptions_name_what_the_kernel_adds() -> None:
    assert (
        PointwiseShape(160, 960, 7, 7, activation="relu6").describe()
        == "1x1 160->960 at 7x7 + ReLU6"
    )
    assert PointwiseShape(960, 160, 7, 7, residual=True).describe() == (
        "1x1 960->160 at 7x7 + residual"
    )
    assert PointwiseShape(576, 160, 7, 7).describe() == "1x1 576->160 at 7x7"
    resnet = PointwiseShape(64, 64, 56, 56, "relu", residual=True, kernel=3)
    assert resnet.describe() == "3x3 64->64 at 56x56 + residual + ReLU"
    down = PointwiseShape(64, 128, 56, 56, kernel=1, stride=2)
    assert down.describe() == "1x1 64->128 stride 2 at 56x56"
    assert (down.out_height, down.out_width) == (28, 28)
    assert PointwiseShape(32, 48, 15, 15, stride=2).out_width == 8  # padding 0, floor


@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("out_width", [7, 56, 112])
@pytest.mark.parametrize("vectors", [1, 2, 4])
def test_strided_conv_strips_reach_every_tap_in_whole_blocks(
    kernel: int, out_width: int, vectors: int
) -> None:
    shape = StridedConvShape(3, 32, 2 * out_width, 2 * out_width, kernel)
    pitch, fd, fe = strided_conv_dims(shape, 4, vectors)
    block, reach = vectors * LANES, kernel // 2
    assert pitch >= out_width + reach and pitch % block == block - 1
    assert fd >= 4 * pitch and fd % block == 0
    # the last tap (row reach, column reach of its plane) of the last position
    assert fe == fd - 1 + reach * pitch + reach + 1 and fe % block == 0


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # MobileNetV2's first convolution: pitch 127 for 113 plane columns, 2 strips
        (StridedConvShape(3, 32, 224, 224, 3, "relu6"), BlockConfig(56, 1, 1, 4, vectors=4)),
        # ResNet-18's: 7x7, 3 plane columns more
        (StridedConvShape(3, 64, 224, 224, 7, "relu"), BlockConfig(28, 1, 1, 4, vectors=4)),
        # too many input channels (a GEMM of its own), an even kernel, an odd input
        (StridedConvShape(16, 32, 224, 224, 3), None),
        (StridedConvShape(3, 32, 224, 224, 2), None),
        (StridedConvShape(3, 32, 225, 225, 3), None),
        # a small map: 63 positions of pitch for 35 plane columns
        (StridedConvShape(3, 8, 64, 64, 7), None),
    ],
)
def test_plan_strided_conv(shape: StridedConvShape, expected: BlockConfig | None) -> None:
    assert plan_strided_conv(shape) == expected
    if expected is not None:
        assert shape.describe().startswith(f"{shape.kernel}x{shape.kernel} 3->")


_MOBILENET_STEM = StridedConvShape(3, 32, 224, 224, 3, "relu6")
_FEATURES_1 = BlockShape(32, 32, 16, 112, 112, expand=False)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # MobileNetV2's features.0 and .1: 4 strips of 28 rows (1.37 MB each)
        (StemBlockShape(_MOBILENET_STEM, _FEATURES_1), BlockConfig(28, 4, 2, 4)),
        # a block with an expand stage, a residual, stride 2, or sizes that do not chain
        (StemBlockShape(_MOBILENET_STEM, replace(_FEATURES_1, expand=True)), None),
        (StemBlockShape(_MOBILENET_STEM, replace(_FEATURES_1, out_channels=32)), None),
        (StemBlockShape(_MOBILENET_STEM, replace(_FEATURES_1, stride=2)), None),
        (StemBlockShape(_MOBILENET_STEM, replace(_FEATURES_1, width=56)), None),
        (StemBlockShape(_MOBILENET_STEM, BlockShape(16, 16, 16, 112, 112, expand=False)), None),
        # a convolution the first-convolution kernel would not take (16 input channels)
        (StemBlockShape(replace(_MOBILENET_STEM, in_channels=16), _FEATURES_1), None),
    ],
)
def test_plan_stem_block(shape: StemBlockShape, expected: BlockConfig | None) -> None:
    assert plan_stem_block(shape) == expected


def test_stem_planes_reach_the_last_tap_of_the_last_expand_position() -> None:
    shape = StemBlockShape(replace(_MOBILENET_STEM, kernel=5), _FEATURES_1)
    pitch, fd, fe, fx = stem_plane_positions(shape, 28)
    assert (pitch, fd, fe) == strip_dims(112, 28)
    assert fx == fe - 1 + 2 * pitch + 2 + 1  # plane row + 2, column + 2
    assert shape.expanded_view == BlockShape(32, 32, 16, 112, 112)
    assert shape.describe() == (
        "5x5 3->32 stride 2 at 224x224 + relu6, then 32->32->16 at 112x112, no expansion"
    )


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_tiles_compute_the_correlation(tile: int) -> None:
    """A^T [(G g) * (B^T d)] is the 3-tap correlation of d with g (one dimension; the 2-D
    transform is this applied along rows and columns)."""
    at, g, bt = winograd_matrices(tile)
    rng = np.random.default_rng(tile)
    d, w = rng.standard_normal(tile + 2), rng.standard_normal(3)
    direct = [d[i : i + 3] @ w for i in range(tile)]
    np.testing.assert_allclose(at @ ((g @ w) * (bt @ d)), direct, rtol=1e-12, atol=1e-12)


def test_winograd_weights_transform_each_channel_pair() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    u = winograd_weights(weight, 4)
    assert u.shape == (6, 6, 16, 32) and u.dtype == np.float32 and u.flags.c_contiguous
    _, g, _ = winograd_matrices(4)
    np.testing.assert_allclose(u[:, :, 5, 7], g @ weight[7, 5].astype(np.float64) @ g.T, rtol=1e-6)


def test_winograd_refuses_a_tile_it_has_no_transform_for() -> None:
    with pytest.raises(ValueError, match=r"no Winograd transform for 3x3 tiles; have \(2, 4\)"):
        winograd_matrices(3)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # ResNet-18's stride-1 3x3 layers at 56, 28 and 14: 196, 49 and 16 tiles of 4x4, in
        # groups of a row of tiles (two half maps at 14: a group is whole position blocks)
        (PointwiseShape(64, 64, 56, 56, "relu", kernel=3), WinogradConfig(4, 7, 2, 14)),
        (PointwiseShape(128, 128, 28, 28, "relu", True, kernel=3), WinogradConfig(4, 7, 2, 7)),
        (PointwiseShape(256, 256, 14, 14, kernel=3), WinogradConfig(4, 8, 2, 8)),
        # a ragged edge: 30x30 in 8x8 tiles; an odd number of channel vectors
        (PointwiseShape(32, 48, 30, 30, kernel=3), WinogradConfig(4, 8, 1, 8)),
        # 8x8: 4 tiles, too few for two groups: stage by stage
        (PointwiseShape(64, 128, 8, 8, kernel=3), WinogradConfig(4, 4, 2, 0)),
        (PointwiseShape(64, 128, 56, 56, kernel=3, stride=2), None),
        # 512->512 at 7x7: 36 MiB of transformed weights, the direct kernel stays
        (PointwiseShape(512, 512, 7, 7, kernel=3), None),
        # too few input channels, channels that are not whole vectors, 3x3 tiles, 1x1
        (PointwiseShape(16, 32, 56, 56, kernel=3), None),
        (PointwiseShape(64, 40, 56, 56, kernel=3), None),
        (PointwiseShape(64, 64, 11, 11, kernel=3), None),
        (PointwiseShape(64, 64, 56, 56), None),
    ],
)
def test_plan_winograd(shape: PointwiseShape, expected: WinogradConfig | None) -> None:
    assert plan_winograd(shape) == expected
    if expected is not None:
        rows, cols = expected.tiles(shape.height, shape.width)
        assert (rows, cols) == (-(-shape.height // 4),) * 2
        assert (
            expected.group % expected.positions == 0 and (rows * cols) % (expected.group or 1) == 0
        )


def test_blocked_weights_make_each_accumulator_blocks_weights_one_run() -> None:
    weight = np.arange(3 * 2 * 64, dtype=np.float32).reshape(3, 2, 64)  # (C, taps, Co)
    blocked = blocked_weights(weight, 2)
    assert blocked.shape == (2, 3, 2, 32) and blocked.flags.c_contiguous
    np.testing.assert_array_equal(blocked[1, 2, 1], weight[2, 1, 32:])
    with pytest.raises(ValueError, match="48 output channels are not whole blocks of 32"):
        blocked_weights(np.zeros((3, 48), np.float32), 2)


@pytest.mark.parametrize(
    ("shape", "expected", "out"),
    [
        (MaxPoolShape(64, 112, 112, 3, 2, 1), True, 56),  # ResNet's
        (MaxPoolShape(32, 30, 30, 2, 2, 0), True, 15),
        (MaxPoolShape(8, 7, 7, 3, 2, 0), True, 3),
        (MaxPoolShape(8, 7, 7, 3, 1, 2), True, 9),  # padding 2 < kernel 3: windows overlap
        # a window entirely in the padding, a pool larger than its input, empty maps
        (MaxPoolShape(8, 7, 7, 3, 1, 3), False, 11),
        (MaxPoolShape(8, 2, 2, 3, 1, 0), False, 0),
        (MaxPoolShape(0, 7, 7, 3, 1, 0), False, 5),
    ],
)
def test_plan_max_pool(shape: MaxPoolShape, expected: bool, out: int) -> None:
    assert plan_max_pool(shape) is expected
    assert shape.out_height == shape.out_width == out


def test_max_pool_description() -> None:
    assert MaxPoolShape(64, 112, 112, 3, 2, 1).describe() == "max pool 3x3/2 pad 1, 64 at 112x112"
