"""The training baseline: counted with the device's sketch code, saved and loaded as JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.sketches import SketchAccumulator, baseline_spec, reduce_features
from cloud.baseline import TrainingBaseline, compute_baseline, load_baseline, save_baseline
from cloud.datasets import ArrayDataset
from cloud.errors import CloudError, DatasetError


def fake_logits(ds: ArrayDataset, seed: int = 0) -> np.ndarray:
    """Logits that mostly favour the true class (a plausible trained model)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(ds), len(ds.classes)))
    logits[np.arange(len(ds)), ds.y] += 3.0
    return logits


def test_digits_baseline_matches_a_device_sketch_of_the_same_data(digits: ArrayDataset) -> None:
    logits = fake_logits(digits)
    b = compute_baseline(logits, digits.x, digits.y, digits.classes, reservoir_size=500)
    assert b.n_samples == 1797 and b.classes == list(digits.classes)
    assert b.sketch.reduction.kind == "flatten" and b.num_features == 64
    assert b.sketch == baseline_spec(digits.x, 10)  # edges: training quantiles
    # a device counting the training data on the baseline's spec gets exactly these counts
    acc = SketchAccumulator(b.sketch)
    acc.update(digits.x[:1000], logits[:1000])
    acc.update(digits.x[1000:], logits[1000:])
    device = acc.take()
    assert device.feature_counts == b.feature_counts
    assert device.class_counts == b.class_counts
    assert device.confidence_counts == b.confidence_counts
    assert b.class_counts == np.bincount(logits.argmax(1), minlength=10).tolist()
    assert b.label_counts == digits.class_counts()
    assert all(sum(row) == 1797 for row in b.feature_counts)
    q = np.asarray(b.feature_quantiles)
    assert q.shape == (64, 5) and np.all(np.diff(q, axis=1) >= 0)
    feats = reduce_features(digits.x, b.sketch.reduction)
    np.testing.assert_allclose(q[:, 2], np.median(feats, axis=0))
    res = b.reservoir_array()
    assert res.shape == (500, 64)
    rows = {r.tobytes() for r in feats}
    assert all(r.tobytes() in rows for r in res)  # real training rows (digits are k/16)


def test_callable_outputs_equal_array_outputs(digits: ArrayDataset) -> None:
    logits = fake_logits(digits)
    by_array = compute_baseline(logits, digits.x, digits.y, digits.classes)
    lookup = {x.tobytes(): out for x, out in zip(digits.x, logits, strict=True)}
    calls: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return np.stack([lookup[x.tobytes()] for x in batch])

    by_fn = compute_baseline(model, digits.x, digits.y, digits.classes, batch_size=700)
    assert by_fn == by_array and calls == [700, 700, 397]
    assert len(by_array.reservoir) == 1797  # fewer rows than the reservoir size: all of them


def test_images_are_pooled() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((40, 3, 32, 32), dtype=np.float32)
    y = np.arange(40) % 4
    b = compute_baseline(rng.normal(size=(40, 4)), x, y, ["a", "b", "c", "d"])
    assert b.sketch.reduction.kind == "avgpool" and b.num_features <= 256
    assert len(b.reservoir[0]) == b.num_features


def test_save_load_roundtrip_and_errors(tmp_path: Path, digits: ArrayDataset) -> None:
    b = compute_baseline(fake_logits(digits), digits.x, digits.y, digits.classes, reservoir_size=50)
    path = save_baseline(b, tmp_path / "sub" / "baseline.json")
    assert load_baseline(path) == b
    assert [p.name for p in path.parent.iterdir()] == ["baseline.json"]
    with pytest.raises(CloudError, match=r"does not exist"):
        load_baseline(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"schema_version": 1}')
    with pytest.raises(CloudError, match=r"bad\.json' is not a valid baseline"):
        load_baseline(tmp_path / "bad.json")
    data = b.model_dump()
    data["label_counts"] = [1, 2]
    with pytest.raises(ValueError, match=r"2 label counts for 10 classes"):
        TrainingBaseline.model_validate(data)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"outputs": np.zeros((10, 3))}, r"outputs have shape \[10, 3\], expected \[10, 2\]"),
        ({"y": np.zeros(9, int)}, r"10 inputs but 9 labels"),
        ({"y": np.full(10, 2)}, r"labels must be in 0\.\.1"),
        ({"reservoir_size": 2001}, r"reservoir_size must be in 0\.\.2000, got 2001"),
        ({"x": np.zeros((0, 4))}, r"non-empty batch"),
    ],
)
def test_bad_input(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "outputs": np.zeros((10, 2)),
        "x": np.zeros((10, 4)),
        "y": np.zeros(10, int),
        "classes": ["a", "b"],
    }
    args.update(kwargs)
    with pytest.raises(DatasetError, match=match):
        compute_baseline(**args)  # type: ignore[arg-type]
