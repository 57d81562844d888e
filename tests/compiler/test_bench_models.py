"""bench's throughput context: multiply-add counts and the GMAC/s a target ratio needs."""

from __future__ import annotations

import pytest
from torch import nn

from bench.compile_vs_ort import TARGET_RATIO, Measurement, ModelResult
from bench.models import ModelSpec, model_specs, multiply_adds


@pytest.mark.parametrize(
    ("factory", "shape", "expected"),
    [
        (lambda: nn.Linear(4, 3), (1, 4), 4 * 3),
        # 5x5 output (padding 1), 4 output channels, 2 input channels, 3x3 kernel
        (lambda: nn.Conv2d(2, 4, 3, padding=1), (1, 2, 5, 5), 25 * 4 * 2 * 9),
        # depthwise: one input channel per output channel
        (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (1, 8, 4, 4), 16 * 8 * 1 * 9),
        # pools and activations are not counted
        (lambda: nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), (1, 3, 8, 8), 0),
    ],
)
def test_multiply_adds_counts_convolutions_and_linear_layers(
    factory: object, shape: tuple[int, ...], expected: int
) -> None:
    assert multiply_adds(ModelSpec("m", "m", factory, shape)) == expected  # type: ignore[arg-type]


def test_the_imagenet_networks_have_their_published_multiply_adds() -> None:
    specs = model_specs(image_size=224)
    assert multiply_adds(specs["resnet18"]) == pytest.approx(1.81e9, rel=0.01)
    assert multiply_adds(specs["mobilenet_v2"]) == pytest.approx(0.30e9, rel=0.02)


def test_gmacs_and_the_throughput_the_target_needs() -> None:
    result = ModelResult("m", "m", [1], "p", 0, multiply_adds=2_000_000)
    result.tvm_tuned = Measurement([0.02, 0.02, 0.03])  # ms
    result.ort = Measurement([0.01])
    assert result.gmacs(result.tvm_tuned) == pytest.approx(100.0)  # 2e6 / 20 us
    assert result.gmacs(result.ort) == pytest.approx(200.0)
    assert result.target_gmacs == pytest.approx(200.0 / TARGET_RATIO)
    assert result.to_dict()["gmacs_per_s"] == {
        "tvm_tuned": 100.0,
        "ort": 200.0,
        "needed_for_target": 250.0,
    }
    unknown = ModelResult("m", "m", [1], "p", 0)
    assert unknown.gmacs(unknown.ort) is None and unknown.target_gmacs is None
