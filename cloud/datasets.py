"""Datasets for training: load, digest, split and concatenate labelled arrays.

A dataset is a *source* string, one of four kinds (:func:`detect_kind`):

* ``builtin:NAME``: a small real dataset shipped with a dependency. ``builtin:digits`` is
  scikit-learn's 8x8 handwritten digits (1,797 samples), inputs ``float32 (1, 8, 8)`` in
  ``[0, 1]``, classes ``"0"`` .. ``"9"``.
* a directory with one sub-directory per class (its name is the class name) holding images:
  PGM/PPM (Netpbm, read here), ``.npy`` arrays, and PNG/JPEG/BMP when Pillow is installed
  (a clear error with the ``pip install pillow`` hint otherwise). Grey images become
  ``(1, H, W)``, colour ``(3, H, W)``; 8/16-bit pixels are scaled to ``[0, 1]``, ``.npy``
  arrays are taken as they are (``(H, W)`` gains a channel axis). All images must share
  one shape (no resizing: a ragged directory is an error naming both shapes).
* ``*.csv``: one sample per row, numeric feature columns, the label in the column named
  ``label`` (any position) or else the last column. The first row is a header when it has
  a cell ``label`` or a non-number in any column but the last (labels may be names).
* ``*.npz``: arrays ``x`` (``(N, ...)``, numeric) and ``y`` (``(N,)``, class indices or
  names), optionally ``classes`` (names, then ``y`` holds indices into it).

Classes are sorted (numerically when every name is an integer); every class must have at
least one sample. :func:`dataset_digest` hashes the *content* (file bytes, relative paths),
never mtimes or directory listing order, so it identifies a dataset version.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from cloud.errors import DatasetError

DatasetKind = Literal["builtin", "images", "csv", "npz"]
DATASET_KINDS: tuple[str, ...] = get_args(DatasetKind)
BUILTIN_PREFIX = "builtin:"
BUILTINS = ("digits",)
NETPBM_SUFFIXES = (".pgm", ".ppm", ".pnm")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
IMAGE_SUFFIXES = (*NETPBM_SUFFIXES, ".npy", *PILLOW_SUFFIXES)


@dataclass(frozen=True)
class ArrayDataset:
    """Labelled samples: ``x`` ``float32 (N, *input_shape)``, ``y`` ``int64 (N,)`` indices
    into ``classes``."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.ndim < 2:
            raise DatasetError(f"x must be (N, *input_shape), got shape {list(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise DatasetError(
                f"{self.x.shape[0]} inputs but y has shape {list(self.y.shape)}; "
                "need one label per input"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (without the batch axis)."""
        return tuple(int(d) for d in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def class_counts(self) -> list[int]:
        """Samples per class, in ``classes`` order."""
        return [int(c) for c in np.bincount(self.y, minlength=len(self.classes))]


def detect_kind(source: str) -> DatasetKind:
    """The kind of a dataset source.

    Raises:
        DatasetError: the path does not exist, or is a file of another type.
    """
    if source.startswith(BUILTIN_PREFIX):
        return "builtin"
    path = Path(source)
    if not path.exists():
        raise DatasetError(
            f"dataset {source!r} does not exist; give a directory of class sub-directories, "
            f"a .csv or .npz file, or one of: {', '.join(BUILTIN_PREFIX + b for b in BUILTINS)}"
        )
    if path.is_dir():
        return "images"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".npz":
        return "npz"
    raise DatasetError(
        f"cannot tell the kind of dataset file {source!r} from its suffix {path.suffix!r}; "
        "supported: .csv, .npz, or a directory of class sub-directories"
    )


def load_dataset(source: str, kind: DatasetKind | None = None) -> ArrayDataset:
    """Load ``source`` (of ``kind``, detected when None).

    Raises:
        DatasetError: the source is missing, empty, malformed or inconsistent; the message
            names the file, row, column or class and what was expected.
    """
    if kind is None:
        kind = detect_kind(source)
    elif kind not in DATASET_KINDS:
        raise DatasetError(
            f"unknown dataset kind {kind!r}; choose from: {', '.join(DATASET_KINDS)}"
        )
    if kind != "builtin" and not Path(source).exists():
        raise DatasetError(f"dataset {source!r} does not exist")
    if kind == "builtin":
        return _load_builtin(source)
    if kind == "images":
        return _load_images(Path(source))
    if kind == "csv":
        return _load_csv(Path(source))
    return _load_npz(Path(source))


def dataset_digest(source: str) -> str:
    """SHA-256 (hex) of the dataset's content, independent of file order and mtimes.

    Files: their bytes. Directories: the sorted (relative path, file digest) pairs of the
    files :func:`load_dataset` reads. Built-ins: their loaded arrays.

    Raises:
        DatasetError: as :func:`detect_kind`.
    """
    kind = detect_kind(source)
    h = hashlib.sha256(f"edgeloop-dataset-v1:{kind}\n".encode())
    if kind == "builtin":
        ds = _load_builtin(source)
        h.update(source.encode() + b"\n")
        _hash_arrays(h, {"x": ds.x, "y": ds.y})
        h.update("\n".join(ds.classes).encode())
    elif kind == "images":
        root = Path(source)
        for rel in sorted(p.relative_to(root).as_posix() for p in _image_files(root)):
            h.update(f"{rel}\0{_file_sha256(root / rel)}\n".encode())
    else:
        h.update(_file_sha256(Path(source)).encode())
    return h.hexdigest()


def split_dataset(
    ds: ArrayDataset, *, test_fraction: float, seed: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """A stratified (train, test) split: each class contributes ``round(n * test_fraction)``
    samples to test (at least one, and at least one stays in train).

    Raises:
        DatasetError: ``test_fraction`` outside (0, 1), or a class too small to split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train_idx: list[npt.NDArray[np.int64]] = []
    test_idx: list[npt.NDArray[np.int64]] = []
    for c, name in enumerate(ds.classes):
        idx = np.flatnonzero(ds.y == c)
        if idx.size < 2:
            raise DatasetError(
                f"class {name!r} has {idx.size} sample(s); a train/test split needs >= 2 per class"
            )
        idx = rng.permutation(idx)
        n_test = min(max(1, round(idx.size * test_fraction)), idx.size - 1)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = np.sort(np.concatenate(train_idx))
    te = np.sort(np.concatenate(test_idx))
    return (
        ArrayDataset(ds.x[tr], ds.y[tr], ds.classes),
        ArrayDataset(ds.x[te], ds.y[te], ds.classes),
    )


def concat_datasets(a: ArrayDataset, b: ArrayDataset) -> ArrayDataset:
    """``a`` followed by ``b`` (e.g. the original data plus relabelled captures).

    ``b``'s labels are mapped onto ``a``'s class order when both have the same class names.

    Raises:
        DatasetError: different input shapes or class sets.
    """
    if a.input_shape != b.input_shape:
        raise DatasetError(
            f"cannot concatenate datasets of input shapes {list(a.input_shape)} and "
            f"{list(b.input_shape)}"
        )
    if set(a.classes) != set(b.classes) or len(a.classes) != len(b.classes):
        raise DatasetError(
            f"cannot concatenate datasets with classes {list(a.classes)} and {list(b.classes)}"
        )
    remap = np.asarray([a.classes.index(name) for name in b.classes], dtype=np.int64)
    return ArrayDataset(
        np.concatenate([a.x, b.x]).astype(np.float32, copy=False),
        np.concatenate([a.y, remap[b.y]]).astype(np.int64, copy=False),
        a.classes,
    )


# --- helpers ---------------------------------------------------------------------------


def _finish(
    x: npt.NDArray[Any], labels: Sequence[Any] | npt.NDArray[Any], where: str
) -> ArrayDataset:
    """Validate inputs and map labels (names or numbers) to sorted class indices."""
    if x.shape[0] == 0:
        raise DatasetError(f"dataset {where} is empty (no samples)")
    if len(labels) != x.shape[0]:
        raise DatasetError(f"dataset {where} has {x.shape[0]} inputs but {len(labels)} labels")
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(xf)):
        bad = np.argwhere(~np.isfinite(xf))[0]
        raise DatasetError(
            f"dataset {where} has a non-finite input value at sample {int(bad[0])} "
            f"(index {[int(i) for i in bad[1:]]})"
        )
    names = [_label_name(v) for v in labels]
    classes = _sort_classes(set(names))
    index = {c: i for i, c in enumerate(classes)}
    y = np.asarray([index[n] for n in names], dtype=np.int64)
    return ArrayDataset(xf, y, classes)


def _label_name(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _sort_classes(names: Iterable[str]) -> tuple[str, ...]:
    names = list(names)
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_arrays(h: Any, arrays: dict[str, npt.NDArray[Any]]) -> None:
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{list(a.shape)}\n".encode())
        h.update(a.tobytes())


def _load_builtin(source: str) -> ArrayDataset:
    name = source[len(BUILTIN_PREFIX) :]
    if name not in BUILTINS:
        raise DatasetError(
            f"unknown built-in dataset {name!r}; choose from: "
            f"{', '.join(BUILTIN_PREFIX + b for b in BUILTINS)}"
        )
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DatasetError(
            "built-in dataset 'digits' needs scikit-learn: pip install 'edgeloop[cloud]'"
        ) from err
    digits = load_digits()
    x = (np.asarray(digits.images, dtype=np.float32) / 16.0)[:, None, :, :]
    y = np.asarray(digits.target, dtype=np.int64)
    return ArrayDataset(np.ascontiguousarray(x), y, tuple(str(i) for i in range(10)))


# images


def _image_files(root: Path) -> list[Path]:
    """Every sample file under ``root``'s class directories (hidden entries skipped)."""
    files: list[Path] = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files.extend(sorted(p for p in cls.iterdir() if p.is_file() and not p.name.startswith(".")))
    return files


def _load_images(root: Path) -> ArrayDataset:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(
            f"image dataset {str(root)!r} has no class sub-directories; "
            "expected ROOT/<class name>/<image files>"
        )
    arrays: list[npt.NDArray[np.float32]] = []
    labels: list[str] = []
    first: tuple[Path, tuple[int, ...]] | None = None
    for cls in class_dirs:
        files = sorted(p for p in cls.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DatasetError(
                f"class {cls.name!r} has no samples (directory {str(cls)!r} is empty)"
            )
        for path in files:
            img = _read_image(path)
            if first is None:
                first = (path, img.shape)
            elif img.shape != first[1]:
                raise DatasetError(
                    f"image {str(path)!r} has shape {list(img.shape)} but "
                    f"{str(first[0])!r} has {list(first[1])}; all images must share one shape"
                )
            arrays.append(img)
            labels.append(cls.name)
    return _finish(np.stack(arrays), labels, repr(str(root)))


def _read_image(path: Path) -> npt.NDArray[np.float32]:
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise DatasetError(
            f"file {str(path)!r} is not a supported image; supported: {', '.join(IMAGE_SUFFIXES)}"
        )
    try:
        if suffix == ".npy":
            arr: npt.NDArray[np.float32] = np.load(path, allow_pickle=False).astype(np.float32)
            if arr.ndim not in (2, 3):
                raise DatasetError(
                    f"array {str(path)!r} has shape {list(arr.shape)}; expected (H, W) or (C, H, W)"
                )
            return arr[None] if arr.ndim == 2 else arr
        if suffix in NETPBM_SUFFIXES:
            return _read_netpbm(path)
        return _read_with_pillow(path)
    except DatasetError:
        raise
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read image {str(path)!r}: {err}") from err


def _read_netpbm(path: Path) -> npt.NDArray[np.float32]:
    """Binary PGM (P5) / PPM (P6), 8 or 16 bit, scaled to [0, 1]."""
    data = path.read_bytes()
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:
        m = re.compile(rb"\s*(#[^\n]*\n\s*)*([^\s#]+)").match(data, pos)
        if m is None:
            raise DatasetError(f"image {str(path)!r} has a truncated Netpbm header")
        tokens.append(m.group(2))
        pos = m.end()
    magic = tokens[0]
    if magic not in (b"P5", b"P6"):
        raise DatasetError(
            f"image {str(path)!r} is Netpbm {magic.decode(errors='replace')!r}; "
            "supported: P5 (binary PGM), P6 (binary PPM)"
        )
    width, height, maxval = (int(t) for t in tokens[1:])
    channels = 1 if magic == b"P5" else 3
    dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
    pixels = np.frombuffer(data, dtype=dtype, offset=pos + 1)
    need = width * height * channels
    if pixels.size < need:
        raise DatasetError(
            f"image {str(path)!r} holds {pixels.size} values, its header says "
            f"{width}x{height}x{channels} = {need}"
        )
    arr = pixels[:need].reshape(height, width, channels).transpose(2, 0, 1)
    return (arr.astype(np.float32) / float(maxval)).copy()


def _read_with_pillow(path: Path) -> npt.NDArray[np.float32]:
    try:
        from PIL import Image  # type: ignore[import-not-found, unused-ignore]
    except ImportError as err:
        raise DatasetError(
            f"reading {path.suffix} image {str(path)!r} needs Pillow: pip install pillow "
            f"(or convert to {', '.join(NETPBM_SUFFIXES)} or .npy)"
        ) from err
    with Image.open(path) as im:
        mode = "L" if im.mode in ("1", "L", "I;16", "I", "F") else "RGB"
        arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


# csv


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _load_csv(path: Path) -> ArrayDataset:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [(i + 1, row) for i, row in enumerate(csv.reader(f)) if row and any(row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read CSV {str(path)!r}: {err}") from err
    if not rows:
        raise DatasetError(f"CSV {str(path)!r} is empty")
    header: list[str] | None = None
    first = [c.strip() for c in rows[0][1]]
    if "label" in first or not all(_is_number(c) for c in first[:-1]):
        header = [c.strip() for c in rows[0][1]]
        rows = rows[1:]
    if not rows:
        raise DatasetError(f"CSV {str(path)!r} has a header but no data rows")
    width = len(header) if header is not None else len(rows[0][1])
    if width < 2:
        raise DatasetError(f"CSV {str(path)!r} needs at least one feature and a label column")
    names = header if header is not None else [f"column {i + 1}" for i in range(width)]
    label_col = names.index("label") if "label" in names else width - 1
    features = np.empty((len(rows), width - 1), dtype=np.float32)
    labels: list[str] = []
    for r, (line, row) in enumerate(rows):
        if len(row) != width:
            raise DatasetError(
                f"CSV {str(path)!r} line {line} has {len(row)} cells, expected {width}"
            )
        labels.append(row[label_col].strip())
        j = 0
        for c, cell in enumerate(row):
            if c == label_col:
                continue
            try:
                value = float(cell)
            except ValueError:
                raise DatasetError(
                    f"CSV {str(path)!r} line {line}, column {names[c]!r} (#{c + 1}): "
                    f"{cell!r} is not a number"
                ) from None
            if not math.isfinite(value):
                raise DatasetError(
                    f"CSV {str(path)!r} line {line}, column {names[c]!r} (#{c + 1}): "
                    f"{cell!r} is not a finite number"
                )
            features[r, j] = value
            j += 1
    if any(label == "" for label in labels):
        line = rows[labels.index("")][0]
        raise DatasetError(f"CSV {str(path)!r} line {line} has an empty label")
    return _finish(features, labels, repr(str(path)))


# npz


def _load_npz(path: Path) -> ArrayDataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read .npz {str(path)!r}: {err}") from err
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DatasetError(
            f".npz {str(path)!r} lacks array(s) {', '.join(missing)}; it has "
            f"{', '.join(sorted(arrays)) or 'none'} (expected x, y and optionally classes)"
        )
    x, y = arrays["x"], arrays["y"]
    where = repr(str(path))
    if x.ndim < 2:
        raise DatasetError(f".npz {where}: x has shape {list(x.shape)}; expected (N, ...)")
    if y.ndim != 1:
        raise DatasetError(f".npz {where}: y has shape {list(y.shape)}; expected (N,)")
    if x.shape[0] != y.shape[0]:
        raise DatasetError(
            f".npz {where}: x has {x.shape[0]} samples but y has {y.shape[0]} labels"
        )
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DatasetError(f".npz {where}: x has dtype {x.dtype}; expected a real number type")
    if "classes" not in arrays:
        return _finish(x, list(y), where)
    classes = [_label_name(c) for c in arrays["classes"].ravel()]
    if len(set(classes)) != len(classes):
        raise DatasetError(f".npz {where}: classes {classes} has duplicates")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(
            f".npz {where}: with a classes array, y must hold integer indices, got {y.dtype}"
        )
    if y.size and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DatasetError(
            f".npz {where}: label {bad} is outside classes 0..{len(classes) - 1} {classes}"
        )
    ds = _finish(x, [classes[int(i)] for i in y], where)
    empty = [c for c in classes if c not in ds.classes]
    if empty:
        raise DatasetError(f".npz {where}: class(es) {empty} have no samples")
    # keep the file's class order
    remap = np.asarray([classes.index(c) for c in ds.classes], dtype=np.int64)
    return ArrayDataset(ds.x, remap[ds.y], tuple(classes))
