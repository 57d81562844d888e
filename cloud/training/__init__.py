"""Training: specs (pure), built-in architectures, the torch training loop, Optuna tuning.

``TrainingSpec``, ``SearchSpace``, ``HpoSpec`` and ``ARCHITECTURES`` import no torch;
``train``, ``build_model`` and the tuning functions import torch/Optuna on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cloud.training.architectures import ARCHITECTURES
from cloud.training.spec import (
    HpoSpec,
    ParamSpec,
    SearchSpace,
    TrainingSpec,
    parse_hpo_spec,
    parse_training_spec,
)

if TYPE_CHECKING:
    from cloud.training.hpo import best_trial_summary, create_study, run_hpo_worker
    from cloud.training.models import build_model, load_trained
    from cloud.training.trainer import EpochMetrics, TrainResult, train

_LAZY = {
    "train": "cloud.training.trainer",
    "TrainResult": "cloud.training.trainer",
    "EpochMetrics": "cloud.training.trainer",
    "build_model": "cloud.training.models",
    "load_trained": "cloud.training.models",
    "create_study": "cloud.training.hpo",
    "run_hpo_worker": "cloud.training.hpo",
    "best_trial_summary": "cloud.training.hpo",
}

__all__ = [
    "ARCHITECTURES",
    "EpochMetrics",
    "HpoSpec",
    "ParamSpec",
    "SearchSpace",
    "TrainResult",
    "TrainingSpec",
    "best_trial_summary",
    "build_model",
    "create_study",
    "load_trained",
    "parse_hpo_spec",
    "parse_training_spec",
    "run_hpo_worker",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cloud.training' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
