"""The training loop: a plain, seeded torch loop on the CPU, with per-epoch metrics.

:func:`train` splits the dataset (stratified, seeded), builds the model, trains with Adam or
SGD on cross-entropy, evaluates on the held-out split after every epoch, then writes into
``out_dir`` (atomically: a temporary sibling directory renamed into place):

* ``model.pt``: ``{"format", "spec", "input_shape", "classes", "state_dict"}``
  (:func:`cloud.training.models.load_trained` rebuilds the model);
* ``model.onnx``: input ``input`` ``(1, *input_shape)`` float32, output ``logits``, opset 17,
  exported like the compiler's own test models so ``edgeloop compile`` takes it as it is;
* ``baseline.json``: the :class:`~cloud.baseline.TrainingBaseline` of the training split;
* ``metrics.json``: final metrics, per-epoch metrics, spec, classes, input shape.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F

from cloud.baseline import compute_baseline, save_baseline
from cloud.datasets import ArrayDataset, split_dataset
from cloud.errors import JobCanceledError, SpecError
from cloud.training.models import CHECKPOINT_FORMAT, build_model
from cloud.training.spec import TrainingSpec, parse_training_spec

ONNX_OPSET = 17
ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"
_EVAL_BATCH = 1024


@dataclass
class EpochMetrics:
    """One epoch: mean training loss, held-out loss and accuracy, and training throughput
    (``seconds`` is the training phase only, evaluation excluded)."""

    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    samples: int
    seconds: float
    samples_per_s: float


@dataclass
class TrainResult:
    """What :func:`train` produced; paths are inside ``out_dir``."""

    spec: TrainingSpec
    metrics: dict[str, float]
    epochs: list[EpochMetrics]
    out_dir: Path
    weights: Path
    onnx: Path
    baseline: Path
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    wall_s: float = field(default=0.0)


def _evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float, npt.NDArray[np.float32]]:
    """Mean loss, accuracy and the logits of ``model`` on (x, y) in eval mode."""
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, x.shape[0], _EVAL_BATCH):
            outs.append(model(x[i : i + _EVAL_BATCH]))
    logits = torch.cat(outs)
    loss = float(F.cross_entropy(logits, y).item())
    acc = float((logits.argmax(dim=1) == y).float().mean().item())
    return loss, acc, logits.numpy().astype(np.float32)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Export ``model`` (eval mode) to ONNX with a static batch of 1.

    Raises:
        SpecError: the model cannot be exported (naming the exporter's error).
    """
    model.eval()
    example = torch.zeros((1, *input_shape), dtype=torch.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                dynamo=False,
                opset_version=ONNX_OPSET,
            )
    except Exception as err:  # the exporter raises many types
        first = str(err).splitlines()[0] if str(err) else ""
        raise SpecError(
            f"the model cannot be exported to ONNX: {type(err).__name__}: {first}"
        ) from err
    return path


def _make_optimizer(spec: TrainingSpec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(), lr=spec.learning_rate, momentum=0.9, weight_decay=spec.weight_decay
    )


def train(
    spec: TrainingSpec,
    dataset: ArrayDataset,
    out_dir: Path,
    *,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    threads: int | None = 1,
) -> TrainResult:
    """Train ``spec`` on ``dataset`` and write the model, ONNX and baseline into ``out_dir``.

    Args:
        spec: what to train (checked first).
        dataset: all samples; split into train/test by ``spec.test_fraction`` and ``spec.seed``.
        out_dir: created (or replaced) atomically when training succeeds.
        on_epoch: called after each epoch; what it raises (e.g. ``optuna.TrialPruned``)
            propagates and nothing is written.
        should_stop: polled before every batch; True stops with JobCanceledError.
        log: receives one line per epoch and per step of the write-out.
        threads: torch intra-op threads while training (restored afterwards); None keeps
            torch's setting. One thread per process is the default: small models gain
            nothing from more, and several workers on one machine would oversubscribe it.

    Returns:
        The metrics and the paths of the files written.

    Raises:
        SpecError: bad architecture/hyperparameters, or an ONNX export failure.
        DatasetError: a dataset too small to split, or a model that does not fit its shape.
        JobCanceledError: ``should_stop()`` returned True.
    """
    spec = parse_training_spec(spec)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    try:
        return _train(spec, dataset, Path(out_dir), on_epoch, should_stop, log)
    finally:
        torch.set_num_threads(previous)


def _train(
    spec: TrainingSpec,
    dataset: ArrayDataset,
    out_dir: Path,
    on_epoch: Callable[[EpochMetrics], None] | None,
    should_stop: Callable[[], bool] | None,
    log: Callable[[str], None] | None,
) -> TrainResult:
    started = time.perf_counter()
    emit = log or (lambda _line: None)
    stop = should_stop or (lambda: False)
    train_ds, test_ds = split_dataset(dataset, test_fraction=spec.test_fraction, seed=spec.seed)
    torch.manual_seed(spec.seed)
    model = build_model(
        spec.architecture,
        spec.hparams,
        input_shape=dataset.input_shape,
        num_classes=len(dataset.classes),
    )
    optimizer = _make_optimizer(spec, model)
    generator = torch.Generator().manual_seed(spec.seed)
    x_train = torch.from_numpy(np.ascontiguousarray(train_ds.x))
    y_train = torch.from_numpy(np.ascontiguousarray(train_ds.y))
    x_test = torch.from_numpy(np.ascontiguousarray(test_ds.x))
    y_test = torch.from_numpy(np.ascontiguousarray(test_ds.y))
    n = len(train_ds)
    emit(
        f"training {spec.architecture} on {n} samples (test {len(test_ds)}), input "
        f"{list(dataset.input_shape)}, {len(dataset.classes)} classes, {spec.epochs} epochs"
    )
    history: list[EpochMetrics] = []
    for epoch in range(1, spec.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=generator)
        total = 0.0
        seen = 0
        t0 = time.perf_counter()
        for start in range(0, n, spec.batch_size):
            if stop():
                raise JobCanceledError(f"training canceled during epoch {epoch}")
            idx = perm[start : start + spec.batch_size]
            if idx.numel() < 2 < n:  # a batch of one breaks BatchNorm; drop it
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()  # type: ignore[no-untyped-call, unused-ignore]
            optimizer.step()
            total += float(loss.item()) * idx.numel()
            seen += idx.numel()
        seconds = time.perf_counter() - t0
        test_loss, test_acc, _ = _evaluate(model, x_test, y_test)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=total / max(seen, 1),
            test_loss=test_loss,
            test_accuracy=test_acc,
            samples=seen,
            seconds=seconds,
            samples_per_s=seen / seconds if seconds > 0 else 0.0,
        )
        history.append(metrics)
        emit(
            f"epoch {epoch}/{spec.epochs}: train_loss {metrics.train_loss:.4f} test_loss "
            f"{test_loss:.4f} test_accuracy {test_acc:.4f} ({metrics.samples_per_s:.0f} samples/s)"
        )
        if on_epoch is not None:
            on_epoch(metrics)
    if stop():
        raise JobCanceledError("training canceled after the last epoch")
    _, train_acc, train_logits = _evaluate(model, x_train, y_train)
    last = history[-1]
    final = {
        "test_accuracy": last.test_accuracy,
        "test_loss": last.test_loss,
        "train_loss": last.train_loss,
        "train_accuracy": train_acc,
    }
    result = _write_outputs(
        spec, model, train_ds, train_logits, dataset, final, history, out_dir, emit
    )
    result.wall_s = time.perf_counter() - started
    return result


def _write_outputs(
    spec: TrainingSpec,
    model: nn.Module,
    train_ds: ArrayDataset,
    train_logits: npt.NDArray[np.float32],
    dataset: ArrayDataset,
    final: dict[str, float],
    history: list[EpochMetrics],
    out_dir: Path,
    emit: Callable[[str], None],
) -> TrainResult:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would survive the rename
    try:
        model.eval()
        checkpoint: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "spec": spec.model_dump(mode="json"),
            "input_shape": list(dataset.input_shape),
            "classes": list(dataset.classes),
            "state_dict": model.state_dict(),
        }
        torch.save(checkpoint, tmp / "model.pt")
        emit("exporting ONNX")
        export_onnx(model, dataset.input_shape, tmp / "model.onnx")
        emit("computing the training baseline")
        baseline = compute_baseline(
            train_logits, train_ds.x, train_ds.y, dataset.classes, seed=spec.seed
        )
        save_baseline(baseline, tmp / "baseline.json")
        summary = {
            "metrics": final,
            "epochs": [asdict(m) for m in history],
            "spec": spec.model_dump(mode="json"),
            "input_shape": list(dataset.input_shape),
            "classes": list(dataset.classes),
            "n_train": len(train_ds),
            "n_test": len(dataset) - len(train_ds),
        }
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    emit(f"wrote {out_dir}")
    return TrainResult(
        spec=spec,
        metrics=final,
        epochs=history,
        out_dir=out_dir,
        weights=out_dir / "model.pt",
        onnx=out_dir / "model.onnx",
        baseline=out_dir / "baseline.json",
        input_shape=dataset.input_shape,
        classes=dataset.classes,
    )


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (a retried job) is moved aside first."""
    old: Path | None = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        dst.rename(old / dst.name)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
