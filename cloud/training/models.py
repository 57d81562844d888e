"""Torch modules of the built-in architectures, user modules, and saved-model loading.

Every model takes ``(N, *input_shape)`` float32 and returns ``(N, num_classes)`` logits, and
uses only operators the compiler's ONNX path handles (Gemm/MatMul, Conv, BatchNorm, Relu,
Clip, MaxPool, GlobalAveragePool, Flatten, Add).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cloud.errors import DatasetError, SpecError
from cloud.training.architectures import (
    ARCHITECTURES,
    USER_PREFIX,
    HParamValue,
    is_user_architecture,
    resolve_hparams,
)

#: Format version of model.pt.
CHECKPOINT_FORMAT = 1


def _make_divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class MLP(nn.Module):
    """Flatten, hidden Linear+ReLU(+Dropout) layers, a Linear classifier."""

    def __init__(
        self, in_features: int, num_classes: int, sizes: list[int], dropout: float
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks (max-pooling while the image is at least 2x2), global pooling,
    a Linear classifier."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        channels: int,
        blocks: int,
        kernel_size: int,
        dropout: float,
    ) -> None:
        super().__init__()
        c_in, h, w = input_shape
        layers: list[nn.Module] = []
        for i in range(blocks):
            c_out = channels * 2**i
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(c_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ residual)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn(c_in, hidden, 1, 1))
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y  # type: ignore[no-any-return]


#: (expand ratio or None for the spec's, channels, repeats, stride): a MobileNetV2 table cut
#: to four stages, which suits the small images trained here; strides stop at 1x1.
_MOBILENET_STAGES = ((1, 16, 1, 1), (None, 24, 2, 2), (None, 32, 2, 2), (None, 64, 2, 2))


class MobileNetV2Small(nn.Module):
    """MobileNetV2-style network with a width multiplier."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        width_mult: float,
        expand_ratio: int,
        stem_stride: int,
        dropout: float,
    ) -> None:
        super().__init__()
        c_in, h, w = input_shape
        stem = _make_divisible(32 * width_mult)
        layers: list[nn.Module] = [_conv_bn(c_in, stem, 3, stem_stride)]
        size = math.ceil(min(h, w) / stem_stride)
        width = stem
        for t, c, n, s in _MOBILENET_STAGES:
            c_out = _make_divisible(c * width_mult)
            for i in range(n):
                stride = s if i == 0 and size >= 2 else 1
                size = math.ceil(size / stride)
                layers.append(InvertedResidual(width, c_out, stride, t or expand_ratio))
                width = c_out
        last = _make_divisible(256 * max(1.0, width_mult))
        layers.append(_conv_bn(width, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = [nn.Flatten()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(last, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))  # type: ignore[no-any-return]


def _image_shape(architecture: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) == 2:
        return (1, input_shape[0], input_shape[1])
    if len(input_shape) == 3:
        return (input_shape[0], input_shape[1], input_shape[2])
    raise DatasetError(
        f"architecture {architecture!r} needs image inputs (C, H, W) or (H, W), but the "
        f"dataset's input shape is {list(input_shape)}; use 'mlp' for flat features"
    )


class _AddChannel(nn.Module):
    """(N, H, W) -> (N, 1, H, W) for image models on channel-less datasets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


def _load_user_module(architecture: str) -> Any:
    path = Path(architecture[len(USER_PREFIX) :]).expanduser()
    if not path.is_file():
        raise SpecError(f"architecture {architecture!r}: module file {str(path)!r} does not exist")
    name = f"edgeloop_user_model_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise SpecError(f"architecture {architecture!r}: cannot import {str(path)!r}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:  # user code: report whatever it raised
        sys.modules.pop(name, None)
        raise SpecError(
            f"architecture {architecture!r}: importing {str(path)!r} failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    if not callable(getattr(module, "build_model", None)):
        raise SpecError(
            f"architecture {architecture!r}: {str(path)!r} has no function build_model(**hparams)"
        )
    return module.build_model


def _build_user(
    architecture: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    hparams: Mapping[str, HParamValue],
) -> nn.Module:
    fn = _load_user_module(architecture)
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = sorted(set(params) - {"input_shape", "num_classes"})
        unknown = sorted(set(hparams) - set(allowed))
        if unknown:
            raise SpecError(
                f"unknown hyperparameter(s) {', '.join(repr(u) for u in unknown)} for "
                f"architecture {architecture!r}; allowed: {', '.join(allowed) or 'none'}"
            )
    kwargs: dict[str, Any] = dict(hparams)
    if "input_shape" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    ):
        kwargs["input_shape"] = tuple(input_shape)
    if "num_classes" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    ):
        kwargs["num_classes"] = num_classes
    try:
        model = fn(**kwargs)
    except Exception as err:  # user code
        raise SpecError(
            f"architecture {architecture!r}: build_model({', '.join(sorted(kwargs))}) raised "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, nn.Module):
        raise SpecError(
            f"architecture {architecture!r}: build_model returned {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    return model


def build_model(
    architecture: str,
    hparams: Mapping[str, HParamValue],
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
) -> nn.Module:
    """A fresh (seed it first) model for inputs ``(N, *input_shape)`` and ``num_classes``.

    The model is checked with one forward pass of zeros.

    Raises:
        SpecError: unknown architecture or hyperparameter; a user module that cannot be
            loaded.
        DatasetError: the model does not fit the input shape or class count (both named).
    """
    resolved = resolve_hparams(architecture, hparams)
    shape = tuple(int(d) for d in input_shape)
    model: nn.Module
    if is_user_architecture(architecture):
        model = _build_user(architecture, shape, num_classes, resolved)
    elif architecture == "mlp":
        sizes_text = str(resolved["hidden_sizes"])
        if sizes_text:
            sizes = [int(s) for s in sizes_text.split(",")]
        else:
            sizes = [int(resolved["hidden"])] * int(resolved["layers"])
        model = MLP(math.prod(shape), num_classes, sizes, float(resolved["dropout"]))
    else:
        image = _image_shape(architecture, shape)
        body: nn.Module
        if architecture == "cnn":
            body = SmallCNN(
                image,
                num_classes,
                channels=int(resolved["channels"]),
                blocks=int(resolved["blocks"]),
                kernel_size=int(resolved["kernel_size"]),
                dropout=float(resolved["dropout"]),
            )
        else:
            assert architecture in ARCHITECTURES
            body = MobileNetV2Small(
                image,
                num_classes,
                width_mult=float(resolved["width_mult"]),
                expand_ratio=int(resolved["expand_ratio"]),
                stem_stride=int(resolved["stem_stride"]),
                dropout=float(resolved["dropout"]),
            )
        model = nn.Sequential(_AddChannel(), body) if len(shape) == 2 else body
    check_fits(model, architecture, shape, num_classes)
    return model


def check_fits(
    model: nn.Module, architecture: str, input_shape: tuple[int, ...], num_classes: int
) -> None:
    """One eval-mode forward pass of zeros ``(2, *input_shape)``; outputs must be
    ``(2, num_classes)``.

    Raises:
        DatasetError: naming the input shape, the expected and the actual output shape.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape), dtype=torch.float32))
    except Exception as err:  # a shape mismatch surfaces as RuntimeError/ValueError/...
        first = str(err).splitlines()[0] if str(err) else ""
        raise DatasetError(
            f"model {architecture!r} does not accept the dataset's input shape "
            f"{list(input_shape)} (batches of (N, {', '.join(map(str, input_shape))})): "
            f"{type(err).__name__}: {first}"
        ) from err
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DatasetError(
            f"model {architecture!r} maps input shape {list(input_shape)} to output {got} "
            f"(batch 2); the dataset needs [2, {num_classes}] ({num_classes} classes)"
        )


def load_trained(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`cloud.training.train` (``model.pt``); eval mode.

    Returns:
        The model and the checkpoint's metadata (spec, input_shape, classes).

    Raises:
        SpecError: not a checkpoint of this format.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SpecError(f"cannot load checkpoint {str(path)!r}: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SpecError(f"{str(path)!r} is not an EdgeLoop checkpoint (format {CHECKPOINT_FORMAT})")
    spec = ckpt["spec"]
    model = build_model(
        spec["architecture"],
        spec["hparams"],
        input_shape=tuple(ckpt["input_shape"]),
        num_classes=len(ckpt["classes"]),
    )
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta
