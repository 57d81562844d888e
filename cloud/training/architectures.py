"""Built-in architectures as data: their hyperparameters, defaults and checks (no torch).

:func:`resolve_hparams` is what a spec, a search space and the model builder all call, so an
unknown or out-of-range hyperparameter is refused with the same message everywhere, before
any training starts. The torch modules themselves live in :mod:`cloud.training.models`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cloud.errors import SpecError

HParamValue = int | float | str | bool
USER_PREFIX = "python:"


def _int(low: int, high: int | None = None) -> Callable[[str, HParamValue], HParamValue]:
    def check(name: str, value: HParamValue) -> HParamValue:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"hyperparameter {name!r} must be an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise SpecError(f"hyperparameter {name!r} must be {allowed}, got {value}")
        return value

    return check


def _float(low: float, high: float, *, high_open: bool = False) -> Callable[..., HParamValue]:
    def check(name: str, value: HParamValue) -> HParamValue:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"hyperparameter {name!r} must be a number, got {value!r}")
        if value < low or value > high or (high_open and value == high):
            bracket = ")" if high_open else "]"
            raise SpecError(
                f"hyperparameter {name!r} must be in [{low}, {high}{bracket}, got {value}"
            )
        return float(value)

    return check


def _sizes(name: str, value: HParamValue) -> HParamValue:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(
            f"hyperparameter {name!r} must be comma-separated layer widths such as '128,64', "
            f"got {value!r}"
        )
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise SpecError(
            f"hyperparameter {name!r} must be comma-separated positive integers, got {value!r}"
        )
    return ",".join(parts)


@dataclass(frozen=True)
class Architecture:
    """A built-in architecture: its description and hyperparameters (default, check)."""

    name: str
    description: str
    defaults: Mapping[str, HParamValue]
    checks: Mapping[str, Callable[[str, HParamValue], HParamValue]]
    image_input: bool  # needs (C, H, W) inputs


ARCHITECTURES: dict[str, Architecture] = {
    "mlp": Architecture(
        name="mlp",
        description="flatten, then `layers` x (Linear(hidden) + ReLU + Dropout); or explicit "
        "`hidden_sizes` ('256,128')",
        defaults={"hidden": 128, "layers": 2, "hidden_sizes": "", "dropout": 0.0},
        checks={
            "hidden": _int(1, 65536),
            "layers": _int(1, 16),
            "hidden_sizes": _sizes,
            "dropout": _float(0.0, 1.0, high_open=True),
        },
        image_input=False,
    ),
    "cnn": Architecture(
        name="cnn",
        description="`blocks` x (Conv3x3 + BatchNorm + ReLU [+ MaxPool2]), channels doubling "
        "from `channels`, global average pool, Dropout, Linear",
        defaults={"channels": 16, "blocks": 2, "kernel_size": 3, "dropout": 0.0},
        checks={
            "channels": _int(1, 4096),
            "blocks": _int(1, 8),
            "kernel_size": _int(1, 7),
            "dropout": _float(0.0, 1.0, high_open=True),
        },
        image_input=True,
    ),
    "mobilenet": Architecture(
        name="mobilenet",
        description="MobileNetV2-style: stem conv, inverted residual blocks (expand 1x1, "
        "depthwise 3x3, project 1x1, residual when shapes match) scaled by `width_mult`",
        defaults={"width_mult": 1.0, "expand_ratio": 6, "stem_stride": 1, "dropout": 0.2},
        checks={
            "width_mult": _float(0.1, 4.0),
            "expand_ratio": _int(1, 8),
            "stem_stride": _int(1, 2),
            "dropout": _float(0.0, 1.0, high_open=True),
        },
        image_input=True,
    ),
}


def is_user_architecture(architecture: str) -> bool:
    """Whether ``architecture`` names a user module (``python:PATH.py``)."""
    return architecture.startswith(USER_PREFIX)


def check_architecture_name(architecture: str) -> None:
    """Raise SpecError unless ``architecture`` is built-in or ``python:PATH.py``."""
    if architecture in ARCHITECTURES:
        return
    if is_user_architecture(architecture) and architecture.endswith(".py"):
        return
    raise SpecError(
        f"unknown architecture {architecture!r}; choose from: "
        f"{', '.join(ARCHITECTURES)}, or python:PATH.py (a module with build_model(**hparams))"
    )


def resolve_hparams(
    architecture: str, hparams: Mapping[str, HParamValue]
) -> dict[str, HParamValue]:
    """Defaults overlaid with ``hparams``, each checked; user modules' pass through.

    Raises:
        SpecError: unknown architecture, unknown hyperparameter (naming the allowed ones) or
            a value of the wrong type or range.
    """
    check_architecture_name(architecture)
    if is_user_architecture(architecture):
        return dict(hparams)
    arch = ARCHITECTURES[architecture]
    unknown = sorted(set(hparams) - set(arch.defaults))
    if unknown:
        raise SpecError(
            f"unknown hyperparameter(s) {', '.join(repr(u) for u in unknown)} for architecture "
            f"{architecture!r}; allowed: {', '.join(sorted(arch.defaults))}"
        )
    resolved = dict(arch.defaults)
    for name, value in hparams.items():
        resolved[name] = arch.checks[name](name, value)
    if architecture == "mlp" and resolved["hidden_sizes"] and {"hidden", "layers"} & set(hparams):
        raise SpecError(
            "mlp: give either 'hidden_sizes' or 'hidden'/'layers', not both "
            f"(got hidden_sizes={resolved['hidden_sizes']!r})"
        )
    return resolved
