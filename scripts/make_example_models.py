"""Regenerate the example models shipped in examples/models/ (needs torch).

The demo and the README compile these; tests build their own models. Weights are seeded,
not trained: the examples exist to exercise the compiler, not to classify digits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "examples" / "models"


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 inputs (the shape of scikit-learn's digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def main() -> int:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    model = DigitsCNN().eval()
    torch.onnx.export(
        model,
        (torch.randn(1, 1, 8, 8),),
        str(OUT / "digits_cnn.onnx"),
        input_names=["image"],
        output_names=["logits"],
        dynamo=False,
        opset_version=17,
    )
    print(f"wrote {OUT / 'digits_cnn.onnx'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
