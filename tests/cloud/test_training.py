"""Training: specs and architectures (errors named), the seeded loop, its output files."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cloud.datasets import ArrayDataset, split_dataset
from cloud.errors import DatasetError, JobCanceledError, SpecError
from cloud.training import (
    ARCHITECTURES,
    EpochMetrics,
    TrainingSpec,
    build_model,
    load_trained,
    parse_training_spec,
    train,
)


def small(ds: ArrayDataset, n: int = 300) -> ArrayDataset:
    """A stratified subset of ``ds`` with about ``n`` samples (fast tests)."""
    _, sub = split_dataset(ds, test_fraction=n / len(ds), seed=0)
    return sub


USER_MODULE = """
    from torch import nn

    def build_model(input_shape, num_classes, width=16):
        n = 1
        for d in input_shape:
            n *= d
        layers = [nn.Flatten(), nn.Linear(n, width), nn.ReLU(), nn.Linear(width, num_classes)]
        return nn.Sequential(*layers)
"""


def test_architectures_listed() -> None:
    assert set(ARCHITECTURES) == {"mlp", "cnn", "mobilenet"}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            {"architecture": "resnet", "epochs": 1},
            r"unknown architecture 'resnet'; choose from: mlp, cnn, mobilenet, or python:PATH\.py",
        ),
        (
            {"architecture": "mlp", "epochs": 1, "hparams": {"width": 3}},
            r"unknown hyperparameter\(s\) 'width' for architecture 'mlp'; "
            r"allowed: dropout, hidden, hidden_sizes, layers",
        ),
        (
            {"architecture": "cnn", "epochs": 1, "hparams": {"channels": 0}},
            r"'channels' must be in \[1, 4096\], got 0",
        ),
        (
            {"architecture": "cnn", "epochs": 1, "hparams": {"blocks": 1.5}},
            r"'blocks' must be an integer, got 1\.5",
        ),
        (
            {"architecture": "mlp", "epochs": 1, "hparams": {"dropout": 1.0}},
            r"'dropout' must be in \[0\.0, 1\.0\), got 1\.0",
        ),
        (
            {"architecture": "mlp", "epochs": 1, "hparams": {"hidden_sizes": "64,x"}},
            r"'hidden_sizes' must be comma-separated positive integers, got '64,x'",
        ),
        (
            {"architecture": "mlp", "epochs": 1, "hparams": {"hidden_sizes": "64", "layers": 2}},
            r"either 'hidden_sizes' or 'hidden'/'layers'",
        ),
        (
            {"architecture": "mlp", "epochs": 0},
            r"epochs: Input should be greater than or equal to 1 \(got 0\)",
        ),
        (
            {"architecture": "mlp", "epochs": 1, "optimizer": "lion"},
            r"optimizer: Input should be 'adam' or 'sgd' \(got 'lion'\)",
        ),
        ({"architecture": "mlp", "epochs": 1, "lr": 0.1}, r"lr: Extra inputs are not permitted"),
    ],
)
def test_spec_errors_name_the_value_and_choices(data: dict[str, object], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_training_spec(data)


@pytest.mark.parametrize(
    ("architecture", "hparams"),
    [
        ("mlp", {}),
        ("mlp", {"hidden_sizes": "32,16", "dropout": 0.1}),
        ("cnn", {"channels": 4, "blocks": 3}),
        ("mobilenet", {"width_mult": 0.25, "expand_ratio": 2}),
    ],
)
def test_built_in_models_fit_digits(architecture: str, hparams: dict[str, object]) -> None:
    import torch

    model = build_model(architecture, hparams, input_shape=(1, 8, 8), num_classes=10)  # type: ignore[arg-type]
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    # channel-less images get a channel axis
    model = build_model(architecture, hparams, input_shape=(8, 8), num_classes=4)  # type: ignore[arg-type]
    assert model(torch.zeros(2, 8, 8)).shape == (2, 4)


def test_image_model_on_flat_features_names_the_shape() -> None:
    with pytest.raises(DatasetError, match=r"'cnn' needs image inputs .* input shape is \[20\]"):
        build_model("cnn", {}, input_shape=(20,), num_classes=3)


def test_user_module(tmp_path: Path, digits: ArrayDataset) -> None:
    module = tmp_path / "my_model.py"
    module.write_text(textwrap.dedent(USER_MODULE))
    arch = f"python:{module}"
    result = train(
        TrainingSpec(architecture=arch, hparams={"width": 8}, epochs=1),
        small(digits),
        tmp_path / "out",
    )
    assert result.onnx.is_file() and len(result.epochs) == 1
    with pytest.raises(SpecError, match=r"unknown hyperparameter\(s\) 'depth' .*; allowed: width"):
        build_model(arch, {"depth": 2}, input_shape=(1, 8, 8), num_classes=10)


def test_user_module_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    with pytest.raises(SpecError, match=r"module file .*nope\.py' does not exist"):
        build_model(f"python:{missing}", {}, input_shape=(4,), num_classes=2)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(SpecError, match=r"has no function build_model"):
        build_model(f"python:{empty}", {}, input_shape=(4,), num_classes=2)
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(SpecError, match=r"importing .* failed: ModuleNotFoundError"):
        build_model(f"python:{broken}", {}, input_shape=(4,), num_classes=2)
    fixed = tmp_path / "fixed.py"
    fixed.write_text("from torch import nn\ndef build_model(**kw):\n    return nn.Linear(64, 10)\n")
    with pytest.raises(DatasetError, match=r"does not accept the dataset's input shape \[5\]"):
        build_model(f"python:{fixed}", {}, input_shape=(5,), num_classes=10)
    with pytest.raises(
        DatasetError, match=r"maps input shape \[64\] to output \[2, 10\] .* \[2, 3\]"
    ):
        build_model(f"python:{fixed}", {}, input_shape=(64,), num_classes=3)


@pytest.mark.parametrize(
    ("architecture", "epochs", "learning_rate"), [("mlp", 15, 3e-3), ("cnn", 8, 1e-2)]
)
def test_digits_reach_95_percent(
    tmp_path: Path, digits: ArrayDataset, architecture: str, epochs: int, learning_rate: float
) -> None:
    from compiler.frontends import load_model

    seen: list[EpochMetrics] = []
    lines: list[str] = []
    spec = TrainingSpec(architecture=architecture, epochs=epochs, learning_rate=learning_rate)
    result = train(spec, digits, tmp_path / "run", on_epoch=seen.append, log=lines.append)
    assert result.metrics["test_accuracy"] >= 0.95, result.metrics
    assert [m.epoch for m in seen] == list(range(1, epochs + 1)) and seen == result.epochs
    assert all(m.samples == 1438 and m.samples_per_s > 0 for m in seen)
    assert any("epoch 1/" in line for line in lines)
    assert {p.name for p in result.out_dir.iterdir()} == {
        "model.pt",
        "model.onnx",
        "baseline.json",
        "metrics.json",
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    summary = json.loads((result.out_dir / "metrics.json").read_text())
    assert summary["metrics"] == result.metrics and len(summary["epochs"]) == epochs
    # the ONNX file is what the compiler loads; its outputs match the torch model's
    source = load_model(result.onnx)
    assert [(t.name, t.shape) for t in source.inputs] == [("input", [1, 1, 8, 8])]
    model, meta = load_trained(result.weights)
    assert meta["classes"] == list(digits.classes) and meta["input_shape"] == [1, 8, 8]
    import torch

    x = digits.x[:1]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(source.reference([x])[0], expected, rtol=1e-4, atol=1e-5)


def test_same_seed_same_model_other_seed_other_model(tmp_path: Path, digits: ArrayDataset) -> None:
    ds = small(digits)

    def run(seed: int, name: str) -> tuple[list[float], bytes]:
        spec = TrainingSpec(architecture="cnn", hparams={"channels": 4}, epochs=2, seed=seed)
        r = train(spec, ds, tmp_path / name)
        return [m.train_loss for m in r.epochs], r.onnx.read_bytes()

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    assert a == b
    assert a[0] != c[0]


def test_on_epoch_exception_propagates_and_nothing_is_written(
    tmp_path: Path, digits: ArrayDataset
) -> None:
    class Stop(Exception):
        pass

    def on_epoch(m: EpochMetrics) -> None:
        raise Stop(m.epoch)

    with pytest.raises(Stop):
        train(
            TrainingSpec(architecture="mlp", epochs=3),
            small(digits),
            tmp_path / "out",
            on_epoch=on_epoch,
        )
    assert list(tmp_path.iterdir()) == []


def test_should_stop_cancels(tmp_path: Path, digits: ArrayDataset) -> None:
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(JobCanceledError, match=r"canceled during epoch 1"):
        train(
            TrainingSpec(architecture="mlp", epochs=2, batch_size=16),
            small(digits),
            tmp_path / "out",
            should_stop=should_stop,
        )
    assert list(tmp_path.iterdir()) == []


def test_retrain_into_the_same_dir_replaces_it(tmp_path: Path, digits: ArrayDataset) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    train(TrainingSpec(architecture="mlp", epochs=1), small(digits), out)
    assert not (out / "stale.txt").exists() and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_shape_mismatch_is_a_dataset_error_before_training(tmp_path: Path) -> None:
    flat = ArrayDataset(
        np.random.default_rng(0).random((20, 6), dtype=np.float32),
        np.array([0, 1] * 10),
        ("a", "b"),
    )
    with pytest.raises(DatasetError, match=r"'mobilenet' needs image inputs .* \[6\]"):
        train(TrainingSpec(architecture="mobilenet", epochs=1), flat, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    result = train(
        TrainingSpec(architecture="mlp", epochs=1, optimizer="sgd"), flat, tmp_path / "o"
    )
    assert result.input_shape == (6,) and result.classes == ("a", "b")
