"""Small real models for compiler tests, built with torch and exported to ONNX / torch.export."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU-pool twice, then a linear classifier, for 1x3x16x16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class MLP(nn.Module):
    """Two hidden layers, 32 -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


EXAMPLE_INPUTS = {"cnn": (1, 3, 16, 16), "mlp": (1, 32)}


def build(kind: str) -> nn.Module:
    """A seeded, eval-mode model of ``kind`` ('cnn' or 'mlp')."""
    torch.manual_seed(0)
    model = SmallCNN() if kind == "cnn" else MLP()
    if kind == "cnn":  # non-trivial batch-norm statistics
        bn = model.body[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export_onnx(kind: str, path: Path, *, dynamic_batch: bool = False) -> Path:
    """Export model ``kind`` to ONNX at ``path`` (input 'input', output 'logits')."""
    model = build(kind)
    example = torch.randn(*EXAMPLE_INPUTS[kind])
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes=axes,
        dynamo=False,
        opset_version=17,
    )
    return path


def export_program(kind: str, path: Path) -> Path:
    """Save a torch.export program of model ``kind`` at ``path`` (.pt2)."""
    model = build(kind)
    program = torch.export.export(model, (torch.randn(*EXAMPLE_INPUTS[kind]),))
    torch.export.save(program, str(path))
    return path
