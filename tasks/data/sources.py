"""Image datasets read from local files (nothing is ever downloaded), for the prepare stage.

Every loader returns an :class:`ImageData` ``(x, labels, shape)``: ``x`` float32 ``[n, C*H*W]`` scaled to
``[0, 1]`` (row-major ``C, H, W``, the layout :func:`tasks.data.io.write_dataset` stores with ``shape``),
``labels`` int64 ``[n]`` and ``shape = (C, H, W)``.

- :func:`load_digits_8x8`: the 1,797 8x8 digits bundled with scikit-learn (no network, no path).
- :func:`load_mnist_idx`: MNIST-format IDX files (also Fashion-MNIST, KMNIST), plain or gzipped.
- :func:`load_cifar10_batches`: the CIFAR-10 "python version" pickle batches.

A missing directory or file, or content that is not what the format promises, raises
:class:`tasks.config.sections.ConfigError` naming the file, where it was looked for and how to provide it.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tasks.config.sections import ConfigError

__all__ = [
    "ImageData",
    "load_cifar10_batches",
    "load_digits_8x8",
    "load_mnist_idx",
    "split_train_test",
]

_HINT = "or set prepare.path in the pipeline's conf/*.yaml to the directory that holds them"


class ImageData(NamedTuple):
    x: np.ndarray  # float32 [n, C*H*W] in [0, 1]
    labels: np.ndarray  # int64 [n]
    shape: tuple[int, int, int]  # (C, H, W)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _check_directory(directory: Path, what: str, hint: str) -> None:
    if not directory.is_dir():
        raise ConfigError(directory, None, f"directory not found; put the {what} there {hint}")


# --------------------------------------------------------------------------------------------- digits


def load_digits_8x8() -> ImageData:
    """The scikit-learn 8x8 digits (UCI optical recognition of handwritten digits, test part): 1,797 images.

    Pixel counts ``0..16`` are divided by 16. Shape ``(1, 8, 8)``; no official train/test split (see
    :func:`split_train_test`).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()  # reads the CSV shipped inside the scikit-learn package
    x = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)  # [1797, 64]
    return ImageData(np.ascontiguousarray(x), np.asarray(bunch.target, dtype=np.int64), (1, 8, 8))


# --------------------------------------------------------------------------------------------- MNIST IDX

_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers: 0x0803 (ubyte, 3 dims), 0x0801 (ubyte, 1 dim)
_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def _find_mnist_file(directory: Path, stem: str, what: str, hint: str) -> Path:
    # "train-images-idx3-ubyte" as distributed; some mirrors use "train-images.idx3-ubyte"; either gzipped.
    dotted = stem.replace("-idx", ".idx")
    names = [stem, stem + ".gz", dotted, dotted + ".gz"]
    for folder in (directory, directory / "MNIST" / "raw"):  # also torchvision's layout
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise ConfigError(
        directory / stem,
        None,
        f"{what} file not found in {directory} (looked for {', '.join(names)}, also under MNIST/raw/); "
        f"put the IDX files there {hint}",
    )


def _read_idx(path: Path, magic: int, n_dims: int) -> np.ndarray:
    """An unsigned-byte IDX array: big-endian int32 magic, ``n_dims`` big-endian int32 sizes, then the bytes."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise ConfigError(path, None, f"cannot read the IDX file: {exc}") from exc
    header = 4 * (1 + n_dims)
    if len(raw) < header:
        raise ConfigError(path, None, f"not an IDX file: {len(raw)} bytes, shorter than the {header}-byte header")
    found = int(np.frombuffer(raw, dtype=">i4", count=1)[0])
    if found != magic:
        raise ConfigError(
            path, None, f"not an IDX file of the expected kind: magic number {found}, expected {magic}"
        )
    dims = tuple(int(v) for v in np.frombuffer(raw, dtype=">i4", count=n_dims, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if min(dims) < 0 or len(raw) - header != expected:
        raise ConfigError(
            path, None, f"truncated or corrupt IDX file: header says {dims} ({expected} bytes of data), "
            f"found {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist_idx(directory: str | Path, split: str = "train", *, hint: str = _HINT) -> ImageData:
    """MNIST from local IDX files: ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` for
    ``split="train"``, ``t10k-...`` for ``"test"``, each plain or ``.gz``.

    Pixels ``0..255`` are divided by 255; shape ``(1, rows, cols)`` from the header (28x28 for MNIST).
    ``hint`` ends the error messages (say which config key sets the path).
    """
    _check_split(split)
    directory = Path(directory)
    what = f"MNIST {split} IDX files ({_MNIST_PREFIX[split]}-images-idx3-ubyte, {_MNIST_PREFIX[split]}-labels-idx1-ubyte)"
    _check_directory(directory, what, hint)
    prefix = _MNIST_PREFIX[split]
    img_path = _find_mnist_file(directory, f"{prefix}-images-idx3-ubyte", f"MNIST {split} images", hint)
    lab_path = _find_mnist_file(directory, f"{prefix}-labels-idx1-ubyte", f"MNIST {split} labels", hint)
    images = _read_idx(img_path, _IDX_IMAGES, 3)  # [n, rows, cols] uint8
    labels = _read_idx(lab_path, _IDX_LABELS, 1)  # [n] uint8
    if images.shape[0] != labels.shape[0]:
        raise ConfigError(
            lab_path, None, f"{labels.shape[0]} labels for {images.shape[0]} images in {img_path.name}"
        )
    n, rows, cols = images.shape
    x = images.reshape(n, rows * cols).astype(np.float32) / np.float32(255.0)
    return ImageData(x, labels.astype(np.int64), (1, rows, cols))


# --------------------------------------------------------------------------------------------- CIFAR-10

_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_DIM = 3 * 32 * 32


def _numpy_core(module: str, name: str):
    import importlib

    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: a pickle is code, and a data file must not run any.

    The globals an ``ndarray`` pickle needs (as written by Python 2's cPickle for the official batches, and by
    Python 3 at protocols 2 to 5), plus ``_codecs.encode``, which protocol 2 uses for ``bytes``.
    """

    _SAFE = {"numpy": {"ndarray", "dtype"}, "_codecs": {"encode"}}
    _NUMPY_CORE = {"multiarray": "_reconstruct", "numeric": "_frombuffer"}  # numpy.core.* or numpy._core.*

    def find_class(self, module: str, name: str):
        core_module = module.removeprefix("numpy.core.").removeprefix("numpy._core.")
        if core_module != module and self._NUMPY_CORE.get(core_module) == name:
            return _numpy_core(core_module, name)
        if name in self._SAFE.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ConfigError(path, None, f"not a CIFAR-10 python batch (unreadable pickle): {exc}") from exc
    if not isinstance(batch, dict):
        raise ConfigError(path, None, f"not a CIFAR-10 python batch: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ConfigError(path, None, f"not a CIFAR-10 python batch: keys {sorted(map(str, batch))}, expected data and labels")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_DIM:
        raise ConfigError(path, None, f"data must be uint8 [n, {_CIFAR_DIM}], got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(path, None, f"labels must be {data.shape[0]} integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ConfigError(path, None, f"labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data, labels


def load_cifar10_batches(directory: str | Path, split: str = "train", *, hint: str = _HINT) -> ImageData:
    """CIFAR-10 from the python pickle batches: ``data_batch_1..5`` (train, 50,000) or ``test_batch`` (10,000).

    ``directory`` is the ``cifar-10-batches-py`` folder or the folder containing it. Each batch is a dict with
    ``b"data"`` uint8 ``[10000, 3072]`` (row-major ``3, 32, 32``) and ``b"labels"``; pixels are divided by
    255; shape ``(3, 32, 32)``. Only plain data is unpickled (no code in the file runs).
    """
    _check_split(split)
    directory = Path(directory)
    names = _CIFAR_FILES[split]
    what = f"CIFAR-10 python batches ({', '.join(names)}, from cifar-10-python.tar.gz)"
    _check_directory(directory, what, hint)
    folder = directory / "cifar-10-batches-py" if (directory / "cifar-10-batches-py").is_dir() else directory
    xs, ys = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise ConfigError(
                path, None, f"CIFAR-10 batch not found in {folder} (expected {', '.join(names)}); "
                f"extract cifar-10-python.tar.gz there {hint}"
            )
        data, labels = _read_cifar_batch(path)
        xs.append(data)
        ys.append(labels)
    x = np.concatenate(xs).astype(np.float32) / np.float32(255.0)  # [n, 3072]
    return ImageData(x, np.concatenate(ys).astype(np.int64), (3, 32, 32))


# --------------------------------------------------------------------------------------------- splits


def split_train_test(
    x: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded random split ``(x_train, labels_train, x_test, labels_test)`` for data without an official one.

    ``round(n * test_fraction)`` examples (at least 1, at most ``n - 1``) go to the test set, chosen by a
    permutation from ``numpy.random.default_rng(seed)``; each part keeps the original order of its rows, so
    the result depends only on ``(n, test_fraction, seed)``.
    """
    x, labels = np.asarray(x), np.asarray(labels)
    n = x.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"x has {n} rows but labels has {labels.shape[0]}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 examples to split, got {n}")
    n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return x[train_idx], labels[train_idx], x[test_idx], labels[test_idx]
