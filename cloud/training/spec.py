"""Training and tuning specs: pure pydantic models, stored as JSON on jobs.

Structure is checked by pydantic (``extra="forbid"``); meaning is checked by
:func:`check_training_spec` / :func:`check_hpo_spec` (architecture, hyperparameter names and
ranges, search-space names and bounds), which raise :class:`~cloud.errors.SpecError`.
:func:`parse_training_spec` / :func:`parse_hpo_spec` do both and turn pydantic's errors into
SpecError too, so a caller gets one error type for every bad spec.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cloud.errors import SpecError
from cloud.training.architectures import (
    ARCHITECTURES,
    HParamValue,
    check_architecture_name,
    is_user_architecture,
    resolve_hparams,
)

#: TrainingSpec fields a search space may tune (the rest are hyperparameters of the model).
TUNABLE_FIELDS = ("learning_rate", "weight_decay", "batch_size", "optimizer", "epochs")
_INT_FIELDS = ("batch_size", "epochs")


class TrainingSpec(BaseModel):
    """What to train: architecture, its hyperparameters, and the optimisation settings."""

    model_config = ConfigDict(extra="forbid")

    architecture: str = Field(
        description="'mlp', 'cnn', 'mobilenet' or 'python:PATH.py' (a module with "
        "build_model(input_shape=, num_classes=, **hparams))"
    )
    hparams: dict[str, HParamValue] = Field(default_factory=dict)
    epochs: int = Field(ge=1)
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = 0
    test_fraction: float = Field(default=0.2, gt=0, lt=1)


class ParamSpec(BaseModel):
    """One dimension of a search space."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[HParamValue] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            if any(x is not None for x in (self.low, self.high, self.step)) or self.log:
                raise ValueError("a categorical parameter takes only 'choices'")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes low/high, not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs 'low' and 'high'")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"need low < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scaled parameter needs low > 0, got {self.low}")
        if self.step is not None:
            if self.step <= 0:
                raise ValueError(f"step must be > 0, got {self.step}")
            if self.log:
                raise ValueError("'step' and 'log' cannot be combined")
        if self.type == "int":
            for name, v in (("low", self.low), ("high", self.high), ("step", self.step)):
                if v is not None and not float(v).is_integer():
                    raise ValueError(f"an int parameter needs an integer {name}, got {v}")
        return self

    def corners(self) -> list[HParamValue]:
        """Values a sampler can return at the extremes (to check them against the model)."""
        if self.type == "categorical":
            assert self.choices is not None
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


SearchSpace = dict[str, ParamSpec]


class HpoSpec(BaseModel):
    """A hyperparameter search: a base spec, the space, and how many trials with how many
    workers."""

    model_config = ConfigDict(extra="forbid")

    base: TrainingSpec
    search_space: SearchSpace = Field(min_length=1)
    n_trials: int = Field(ge=1)
    workers: int = Field(default=1, ge=1)
    metric: Literal["test_accuracy"] = "test_accuracy"
    direction: Literal["maximize"] = "maximize"
    pruner: Literal["median", "none"] = "median"
    #: Completed trials before the median pruner starts pruning.
    pruner_startup_trials: int = Field(default=2, ge=0)
    #: Epochs of each trial that are never pruned.
    pruner_warmup_epochs: int = Field(default=0, ge=0)
    #: Parameter sets tried first (e.g. the current production settings), then the sampler's.
    enqueue: list[dict[str, HParamValue]] = Field(default_factory=list)


def apply_params(base: TrainingSpec, params: Mapping[str, HParamValue]) -> TrainingSpec:
    """``base`` with tunable fields and hyperparameters replaced by ``params``.

    Raises:
        SpecError: a value the spec refuses.
    """
    fields = {k: v for k, v in params.items() if k in TUNABLE_FIELDS}
    hparams = {**base.hparams, **{k: v for k, v in params.items() if k not in TUNABLE_FIELDS}}
    data = {**base.model_dump(), **fields, "hparams": hparams}
    try:
        return TrainingSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_describe(err, "training spec")) from err


def check_training_spec(spec: TrainingSpec) -> dict[str, HParamValue]:
    """Check the architecture and hyperparameters; return the resolved hyperparameters.

    Raises:
        SpecError: unknown architecture or hyperparameter, or a value out of range.
    """
    return resolve_hparams(spec.architecture, spec.hparams)


def check_hpo_spec(spec: HpoSpec) -> None:
    """Check the base spec, every search dimension at its extremes, and enqueued params.

    Raises:
        SpecError: naming the parameter and what is allowed.
    """
    check_training_spec(spec.base)
    arch = spec.base.architecture
    allowed: list[str] | None = None
    if not is_user_architecture(arch):
        allowed = [*TUNABLE_FIELDS, *sorted(ARCHITECTURES[arch].defaults)]
    for name, param in spec.search_space.items():
        if allowed is not None and name not in allowed:
            raise SpecError(
                f"search space names {name!r}, which is neither a tunable training field nor a "
                f"hyperparameter of {arch!r}; allowed: {', '.join(allowed)}"
            )
        if name in _INT_FIELDS and param.type == "float":
            raise SpecError(
                f"search space {name!r} is an integer field; use type 'int' or 'categorical'"
            )
        for value in param.corners():
            try:
                check_training_spec(apply_params(spec.base, {name: value}))
            except SpecError as err:
                raise SpecError(
                    f"search space {name!r}: value {value!r} is refused: {err}"
                ) from err
    for i, params in enumerate(spec.enqueue):
        unknown = sorted(set(params) - set(spec.search_space))
        if unknown:
            raise SpecError(
                f"enqueue[{i}] names {unknown}, not in the search space "
                f"({', '.join(spec.search_space)})"
            )
        try:
            check_training_spec(apply_params(spec.base, params))
        except SpecError as err:
            raise SpecError(f"enqueue[{i}] is refused: {err}") from err


def parse_training_spec(data: Mapping[str, Any] | TrainingSpec) -> TrainingSpec:
    """Validate ``data`` as a :class:`TrainingSpec` and check it.

    Raises:
        SpecError: structural or semantic problems, naming the field.
    """
    try:
        spec = data if isinstance(data, TrainingSpec) else TrainingSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_describe(err, "training spec")) from err
    check_architecture_name(spec.architecture)
    check_training_spec(spec)
    return spec


def parse_hpo_spec(data: Mapping[str, Any] | HpoSpec) -> HpoSpec:
    """Validate ``data`` as an :class:`HpoSpec` and check it.

    Raises:
        SpecError: structural or semantic problems, naming the field.
    """
    try:
        spec = data if isinstance(data, HpoSpec) else HpoSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_describe(err, "tuning spec")) from err
    check_hpo_spec(spec)
    return spec


def _describe(err: ValidationError, what: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        parts.append(f"{loc}: {msg}{shown}")
    return f"invalid {what}: " + "; ".join(parts)
