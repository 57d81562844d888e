"""Plain-torch model definitions for the benchmarks (no torchvision).

The two ImageNet networks follow the published architectures layer for layer (same
channels, strides and block counts as torchvision's ``mobilenet_v2`` and ``resnet18``), so
their operators and tensor shapes are the real ones; weights are seeded, not trained, which
does not change latency. ``BatchNorm`` follows every convolution as in the originals; the
ONNX exporter folds it into the convolution in eval mode, as it would for a trained model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _conv_bn(
    cin: int,
    cout: int,
    kernel: int,
    stride: int,
    *,
    groups: int = 1,
    act: bool = True,
    relu6: bool = False,
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6() if relu6 else nn.ReLU())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, 1, relu6=True))
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden, relu6=True),
            _conv_bn(hidden, cout, 1, 1, act=False),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0, 3.5 M parameters), ImageNet head."""

    # (expansion t, channels c, repeats n, first stride s), Sandler et al. 2018, table 2.
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2, relu6=True)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1, 1, relu6=True))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(torch.flatten(self.pool(self.features(x)), 1))
        return out


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(cin, cout, 3, stride), _conv_bn(cout, cout, 3, 1, act=False)
        )
        projected = stride != 1 or cin != cout
        self.shortcut: nn.Module = (
            _conv_bn(cin, cout, 1, stride, act=False) if projected else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu(self.body(x) + self.shortcut(x))
        return out


class ResNet18(nn.Module):
    """ResNet-18 (11.7 M parameters), ImageNet stem and head."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, padding=1))
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))
        return out


class SmallCNN(nn.Module):
    """A CIFAR-sized test CNN: three conv+ReLU+pool stages and a two-layer head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


class MLP(nn.Module):
    """An MNIST-sized multilayer perceptron: 784-512-512-10."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and the input it is exported for."""

    name: str
    description: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


def image_shape(size: int) -> tuple[int, int, int, int]:
    """Batch-1 NCHW RGB input of ``size`` x ``size`` pixels."""
    return (1, 3, size, size)


def model_specs(*, image_size: int) -> dict[str, ModelSpec]:
    """The benchmark models by name; the ImageNet networks get ``image_size`` inputs."""
    image = image_shape(image_size)
    return {
        "mobilenet_v2": ModelSpec("mobilenet_v2", "MobileNetV2 1.0", MobileNetV2, image),
        "resnet18": ModelSpec("resnet18", "ResNet-18", ResNet18, image),
        "small_cnn": ModelSpec("small_cnn", "3-conv CNN", SmallCNN, (1, 3, 32, 32)),
        "mlp": ModelSpec("mlp", "MLP 784-512-512-10", MLP, (1, 784)),
    }


def export_onnx(spec: ModelSpec, path: str, *, seed: int = 0) -> None:
    """Export ``spec``'s model (seeded weights, eval mode) to ONNX opset 17 with static shapes."""
    torch.manual_seed(seed)
    model = spec.factory().eval()
    example = torch.randn(*spec.input_shape)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            path,
            input_names=["input"],
            output_names=["output"],
            dynamo=False,
            opset_version=17,
        )


def multiply_adds(spec: ModelSpec) -> int:
    """Multiply-adds of one forward pass of ``spec``'s model: its convolutions and linear layers.

    Counted from the output shapes that forward hooks see (a convolution: output elements x
    input channels per group x kernel area; a linear layer: output elements x input
    features); pools, activations and additions are left out, as they are in the usual
    "GMACs" of these networks (ResNet-18 at 224: 1.8 G).
    """
    total = 0

    def count(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    model = spec.factory().eval()
    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros(*spec.input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def sgemm_gmacs(threads: int, *, size: int = 2048, runs: int = 5) -> float:
    """This machine's fp32 matrix-multiply throughput (G multiply-adds/s) with ``threads``.

    torch's ``size`` x ``size`` SGEMM, best of ``runs`` after one warm-up: a practical
    ceiling for fp32 convolutions and dense layers on this CPU, to read a runtime's GMAC/s
    against (a model's layers are smaller GEMMs and rarely get closer to the peak).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.rand(size, size)
        b = torch.rand(size, size)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return size**3 / best / 1e9
