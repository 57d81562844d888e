"""Datasets: every source kind, the errors for bad input, digests, splits, concatenation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cloud.datasets import (
    ArrayDataset,
    concat_datasets,
    dataset_digest,
    detect_kind,
    load_dataset,
    split_dataset,
)
from cloud.errors import DatasetError


def write_pgm(path: Path, pixels: np.ndarray) -> None:
    h, w = pixels.shape
    path.write_bytes(
        f"P5\n# a comment\n{w} {h}\n255\n".encode() + pixels.astype(np.uint8).tobytes()
    )


def write_ppm(path: Path, pixels: np.ndarray) -> None:  # pixels (H, W, 3)
    h, w, _ = pixels.shape
    path.write_bytes(f"P6 {w} {h} 255\n".encode() + pixels.astype(np.uint8).tobytes())


def image_dir(root: Path, shape: tuple[int, int] = (4, 5)) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            write_pgm(root / cls / f"{i}.pgm", rng.integers(0, 256, shape))
    return root


def test_builtin_digits(digits: ArrayDataset) -> None:
    assert digits.x.shape == (1797, 1, 8, 8) and digits.x.dtype == np.float32
    assert digits.y.dtype == np.int64 and len(digits) == 1797
    assert digits.classes == tuple(str(i) for i in range(10))
    assert digits.input_shape == (1, 8, 8)
    assert 0.0 <= digits.x.min() and digits.x.max() == 1.0
    assert min(digits.class_counts()) > 170


def test_unknown_builtin_names_the_choices() -> None:
    with pytest.raises(DatasetError, match=r"'mnist'.*builtin:digits"):
        load_dataset("builtin:mnist")


@pytest.mark.parametrize(
    ("name", "kind"),
    [("data.csv", "csv"), ("data.CSV", "csv"), ("arrays.npz", "npz"), ("imgs", "images")],
)
def test_detect_kind(tmp_path: Path, name: str, kind: str) -> None:
    path = tmp_path / name
    if kind == "images":
        path.mkdir()
    else:
        path.write_bytes(b"")
    assert detect_kind(str(path)) == kind
    assert detect_kind("builtin:digits") == "builtin"


def test_detect_kind_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"does not exist.*builtin:digits"):
        detect_kind(str(tmp_path / "missing.csv"))
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"'\.parquet'; supported: \.csv, \.npz"):
        detect_kind(str(tmp_path / "x.parquet"))
    with pytest.raises(DatasetError, match=r"unknown dataset kind 'json'"):
        load_dataset(str(tmp_path / "x.parquet"), kind="json")  # type: ignore[arg-type]


def test_image_directory_pgm_ppm_npy(tmp_path: Path) -> None:
    ds = load_dataset(str(image_dir(tmp_path / "grey")))
    assert ds.classes == ("cat", "dog") and ds.x.shape == (5, 1, 4, 5)
    assert ds.y.tolist() == [0, 0, 0, 1, 1]
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    colour = tmp_path / "colour"
    (colour / "a").mkdir(parents=True)
    (colour / "b").mkdir()
    px = np.zeros((2, 3, 3), np.uint8)
    px[..., 0] = 255  # red
    write_ppm(colour / "a" / "1.ppm", px)
    np.save(colour / "b" / "1.npy", np.full((3, 2, 3), 0.5, np.float32))
    ds = load_dataset(str(colour))
    assert ds.x.shape == (2, 3, 2, 3)
    assert ds.x[0, 0].min() == 1.0 and ds.x[0, 1].max() == 0.0
    assert np.allclose(ds.x[1], 0.5)


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("ragged", r"1\.pgm'.* shape \[1, 6, 5\] but .*0\.pgm' has \[1, 4, 5\]"),
        ("empty_class", r"class 'empty' has no samples"),
        ("no_classes", r"no class sub-directories"),
        ("bad_suffix", r"notes\.txt' is not a supported image; supported: \.pgm"),
        ("truncated", r"holds \d+ values, its header says 5x4x1 = 20"),
        ("ascii_pgm", r"Netpbm 'P2'; supported: P5"),
    ],
)
def test_image_directory_errors(tmp_path: Path, setup: str, match: str) -> None:
    root = tmp_path / "imgs"
    if setup == "no_classes":
        root.mkdir()
        (root / "loose.pgm").write_bytes(b"")
    else:
        image_dir(root)
    if setup == "ragged":
        write_pgm(root / "dog" / "1.pgm", np.zeros((6, 5)))
    elif setup == "empty_class":
        (root / "empty").mkdir()
    elif setup == "bad_suffix":
        (root / "dog" / "notes.txt").write_text("hi")
    elif setup == "truncated":
        (root / "dog" / "1.pgm").write_bytes(b"P5 5 4 255\n" + bytes(7))
    elif setup == "ascii_pgm":
        (root / "dog" / "1.pgm").write_bytes(b"P2 1 1 255\n0\n")
    with pytest.raises(DatasetError, match=match):
        load_dataset(str(root))


def test_png_needs_pillow_or_loads(tmp_path: Path) -> None:
    root = image_dir(tmp_path / "imgs")
    try:
        from PIL import Image
    except ImportError:
        (root / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        with pytest.raises(DatasetError, match=r"2\.png'.*needs Pillow: pip install pillow"):
            load_dataset(str(root))
        return
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(root / "dog" / "2.png")
    assert load_dataset(str(root)).x.shape == (6, 1, 4, 5)


def test_hidden_files_are_ignored(tmp_path: Path) -> None:
    root = image_dir(tmp_path / "imgs")
    (root / "cat" / ".DS_Store").write_bytes(b"junk")
    (root / ".cache").mkdir()
    assert len(load_dataset(str(root))) == 5


def test_csv_header_label_column_anywhere(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,label,b\n1,x,2\n3,y,4\n\n5,x,6.5\n")
    ds = load_dataset(str(path))
    assert ds.classes == ("x", "y") and ds.input_shape == (2,)
    assert ds.x.tolist() == [[1, 2], [3, 4], [5, 6.5]] and ds.y.tolist() == [0, 1, 0]


def test_csv_without_header_and_named_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("0.5,1,cat\n0.25,2,dog\n")
    ds = load_dataset(str(path))
    assert len(ds) == 2 and ds.classes == ("cat", "dog") and ds.x.tolist() == [[0.5, 1], [0.25, 2]]


def test_csv_without_header_uses_last_column_and_numeric_class_order(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("0.5,1,10\n0.25,2,2\n1,3,10\n")
    ds = load_dataset(str(path))
    assert ds.classes == ("2", "10")  # numeric order, not "10" < "2"
    assert ds.y.tolist() == [1, 0, 1] and ds.x.shape == (3, 2)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a,b,label\n1,2,x\n3,oops,y\n", r"line 3, column 'b' \(#2\): 'oops' is not a number"),
        ("a,b,label\n1,2,x\n3,y\n", r"line 3 has 2 cells, expected 3"),
        ("", r"is empty"),
        ("a,b,label\n", r"has a header but no data rows"),
        ("a,b,label\n1,2,x\n1,nan,y\n", r"line 3, column 'b' \(#2\): 'nan' is not a finite"),
        ("a,b,label\n1,2,x\n1,2,\n", r"line 3 has an empty label"),
        ("label\nx\n", r"at least one feature"),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=match):
        load_dataset(str(path))


def test_npz_with_and_without_classes(tmp_path: Path) -> None:
    x = np.arange(24, dtype=np.float64).reshape(4, 2, 3)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([3, 1, 3, 1]))
    ds = load_dataset(str(tmp_path / "a.npz"))
    assert ds.classes == ("1", "3") and ds.y.tolist() == [1, 0, 1, 0]
    assert ds.x.dtype == np.float32 and ds.input_shape == (2, 3)
    np.savez(tmp_path / "b.npz", x=x, y=np.array([1, 0, 1, 0]), classes=np.array(["zeta", "alpha"]))
    ds = load_dataset(str(tmp_path / "b.npz"))
    assert ds.classes == ("zeta", "alpha")  # the file's order is kept
    assert ds.y.tolist() == [1, 0, 1, 0]
    np.savez(tmp_path / "c.npz", x=x, y=np.array(["b", "a", "b", "a"]))
    assert load_dataset(str(tmp_path / "c.npz")).classes == ("a", "b")


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((3, 2))}, r"lacks array\(s\) y; it has x"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(2, int)}, r"x has 3 samples but y has 2 labels"),
        ({"x": np.zeros(3), "y": np.zeros(3, int)}, r"x has shape \[3\]; expected \(N, \.\.\.\)"),
        (
            {"x": np.zeros((3, 2)), "y": np.array([0, 0, 1]), "classes": np.array(["a", "b", "c"])},
            r"class\(es\) \['c'\] have no samples",
        ),
        (
            {"x": np.zeros((2, 2)), "y": np.array([0, 5]), "classes": np.array(["a", "b"])},
            r"label 5 is outside classes 0\.\.1",
        ),
        (
            {"x": np.array([[0.0, np.nan]]), "y": np.array([0])},
            r"non-finite input value at sample 0",
        ),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0, int)}, r"is empty"),
        ({"x": np.array([["a", "b"]]), "y": np.array([0])}, r"x has dtype <U1"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match=match):
        load_dataset(str(tmp_path / "bad.npz"))


def test_npz_that_is_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(DatasetError, match=r"cannot read \.npz"):
        load_dataset(str(tmp_path / "bad.npz"))


def test_digest_ignores_order_and_mtime_but_not_content(tmp_path: Path) -> None:
    a = image_dir(tmp_path / "a")
    # the same files created in the opposite order, with other mtimes
    b = tmp_path / "b"
    for path in sorted(a.rglob("*.pgm"), reverse=True):
        target = b / path.relative_to(a)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        os.utime(target, (1_000_000, 1_000_000))
    (b / "cat" / ".hidden").write_text("ignored")
    assert dataset_digest(str(a)) == dataset_digest(str(b))
    moved = b / "dog" / "0.pgm"
    moved.rename(b / "cat" / "9.pgm")  # same bytes, other class: another dataset
    assert dataset_digest(str(a)) != dataset_digest(str(b))
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("1,2,x\n")
    first = dataset_digest(str(csv_path))
    os.utime(csv_path, (1, 1))
    assert dataset_digest(str(csv_path)) == first
    csv_path.write_text("1,3,x\n")
    assert dataset_digest(str(csv_path)) != first
    digits = dataset_digest("builtin:digits")
    assert digits == dataset_digest("builtin:digits") and len(digits) == 64


def test_split_is_stratified_disjoint_and_seeded(digits: ArrayDataset) -> None:
    train, test = split_dataset(digits, test_fraction=0.2, seed=1)
    assert len(train) + len(test) == len(digits)
    for c, n in enumerate(digits.class_counts()):
        assert test.class_counts()[c] == round(n * 0.2)
    again_train, again_test = split_dataset(digits, test_fraction=0.2, seed=1)
    assert np.array_equal(again_test.x, test.x) and np.array_equal(again_train.y, train.y)
    other, _ = split_dataset(digits, test_fraction=0.2, seed=2)
    assert not np.array_equal(other.x, train.x)
    rows = {r.tobytes() for r in np.concatenate([train.x, test.x])}
    assert len(rows) == len({r.tobytes() for r in digits.x})


def test_split_errors() -> None:
    ds = ArrayDataset(np.zeros((3, 2), np.float32), np.array([0, 0, 1]), ("a", "b"))
    with pytest.raises(DatasetError, match=r"class 'b' has 1 sample\(s\)"):
        split_dataset(ds, test_fraction=0.5, seed=0)
    with pytest.raises(DatasetError, match=r"test_fraction must be in \(0, 1\), got 1.0"):
        split_dataset(ds, test_fraction=1.0, seed=0)


def test_concat_maps_class_order_and_refuses_mismatches() -> None:
    a = ArrayDataset(np.zeros((2, 3), np.float32), np.array([0, 1]), ("x", "y"))
    b = ArrayDataset(np.ones((1, 3), np.float32), np.array([0]), ("y", "x"))
    both = concat_datasets(a, b)
    assert both.classes == ("x", "y") and both.y.tolist() == [0, 1, 1] and len(both) == 3
    with pytest.raises(DatasetError, match=r"input shapes \[3\] and \[4\]"):
        concat_datasets(a, ArrayDataset(np.zeros((1, 4), np.float32), np.array([0]), ("x", "y")))
    with pytest.raises(DatasetError, match=r"classes \['x', 'y'\] and \['x', 'z'\]"):
        concat_datasets(a, ArrayDataset(np.zeros((1, 3), np.float32), np.array([0]), ("x", "z")))


def test_dataset_checks_lengths() -> None:
    with pytest.raises(DatasetError, match=r"2 inputs but y has shape \[3\]"):
        ArrayDataset(np.zeros((2, 3), np.float32), np.zeros(3, np.int64), ("a",))
