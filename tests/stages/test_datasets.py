"""Local image-dataset readers: sklearn digits, MNIST IDX and CIFAR-10 batches written here in their formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from tasks.config.sections import ConfigError
from tasks.data.sources import load_cifar10_batches, load_digits_8x8, load_mnist_idx, split_train_test


def test_digits_shape_range_and_count():
    x, labels, shape = load_digits_8x8()
    assert x.shape == (1797, 64) and x.dtype == np.float32 and x.flags.c_contiguous
    assert labels.shape == (1797,) and labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    assert shape == (1, 8, 8)
    assert x.min() == 0.0 and x.max() == 1.0  # counts 0..16 divided by 16
    assert np.all(np.isin(x * 16, np.arange(17)))


# --------------------------------------------------------------------------------------------- MNIST


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    # IDX: big-endian int32 magic (0x0803 images / 0x0801 labels), one big-endian int32 per dim, then uint8 data.
    return struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(directory, prefix, images, labels, gz):
    directory.mkdir(parents=True, exist_ok=True)
    for name, arr, magic in ((f"{prefix}-images-idx3-ubyte", images, 2051), (f"{prefix}-labels-idx1-ubyte", labels, 2049)):
        data = idx_bytes(arr, magic)
        if gz:
            with gzip.open(directory / (name + ".gz"), "wb") as f:
                f.write(data)
        else:
            (directory / name).write_bytes(data)


@pytest.fixture
def mnist_like():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=5, dtype=np.uint8)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("split, prefix", [("train", "train"), ("test", "t10k")])
def test_mnist_idx_plain_and_gz(tmp_path, mnist_like, gz, split, prefix):
    images, labels = mnist_like
    write_mnist(tmp_path, prefix, images, labels, gz)
    x, y, shape = load_mnist_idx(tmp_path, split)
    assert shape == (1, 28, 28) and x.shape == (5, 784) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, images.reshape(5, -1).astype(np.float32) / 255)  # row-major, as written
    np.testing.assert_array_equal(y, labels)


def test_mnist_torchvision_layout_and_non_square(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_mnist(tmp_path / "MNIST" / "raw", "train", images, np.array([1, 2], np.uint8), gz=False)
    x, y, shape = load_mnist_idx(tmp_path)
    assert shape == (1, 3, 4) and x[1, 0] == 12 / 255 and y.tolist() == [1, 2]


def test_mnist_missing_inputs_name_the_file_and_the_fix(tmp_path, mnist_like):
    with pytest.raises(ConfigError, match="directory not found.*prepare.path") as info:
        load_mnist_idx(tmp_path / "nowhere")
    assert info.value.path == str(tmp_path / "nowhere")
    images, labels = mnist_like
    write_mnist(tmp_path, "train", images, labels, gz=False)
    with pytest.raises(ConfigError, match=r"MNIST test images file not found .*t10k-images-idx3-ubyte\.gz") as info:
        load_mnist_idx(tmp_path, "test")
    assert info.value.path.endswith("t10k-images-idx3-ubyte")
    os.remove(tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(ConfigError, match="labels file not found"):
        load_mnist_idx(tmp_path, "train", hint="or set prepare.path in conf/mnist.yaml")
    with pytest.raises(ValueError, match="split"):
        load_mnist_idx(tmp_path, "val")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda img, lab: (idx_bytes(img, 2049), lab), "magic number 2049, expected 2051"),  # labels file as images
        (lambda img, lab: (idx_bytes(img, 2051)[:-7], lab), "truncated or corrupt"),
        (lambda img, lab: (b"\x00\x00\x08", lab), "shorter than the 16-byte header"),
        (lambda img, lab: (idx_bytes(img, 2051), idx_bytes(np.zeros(4, np.uint8), 2049)), "4 labels for 5 images"),
    ],
)
def test_mnist_corrupt_files_raise_config_error(tmp_path, mnist_like, corrupt, message):
    images, labels = mnist_like
    img_bytes, lab_bytes = corrupt(images, labels)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(img_bytes)
    lab = lab_bytes if isinstance(lab_bytes, bytes) else idx_bytes(lab_bytes, 2049)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(lab)
    with pytest.raises(ConfigError, match=message) as info:
        load_mnist_idx(tmp_path)
    assert "idx" in info.value.path


def test_mnist_corrupt_gzip(tmp_path, mnist_like):
    images, labels = mnist_like
    write_mnist(tmp_path, "train", images, labels, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ConfigError, match="cannot read the IDX file") as info:
        load_mnist_idx(tmp_path)
    assert info.value.path.endswith("train-images-idx3-ubyte.gz")


# --------------------------------------------------------------------------------------------- CIFAR-10


def write_cifar(folder, names, n=3, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for name in names:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()  # a list of ints, as in the official files
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"a.png"] * n}
        raw = pickle.dumps(batch, protocol=2)
        if name != "test_batch":  # as Python 2 + NumPy 1 wrote the official files (numpy.core, not numpy._core)
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            assert b"numpy.core.multiarray" in raw
        (folder / name).write_bytes(raw)
        written.append((data, labels))
    return written


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_train_and_test(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    train = write_cifar(folder, [f"data_batch_{i}" for i in range(1, 6)])
    test = write_cifar(folder, ["test_batch"], n=2, seed=1)
    x, y, shape = load_cifar10_batches(tmp_path, "train")  # the folder itself or its parent
    assert shape == (3, 32, 32) and x.shape == (15, 3072) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, np.concatenate([d for d, _ in train]).astype(np.float32) / 255)
    assert y.tolist() == sum((lab for _, lab in train), [])
    xt, yt, _ = load_cifar10_batches(tmp_path, "test")
    np.testing.assert_array_equal(xt * 255, test[0][0].astype(np.float32))
    assert yt.tolist() == test[0][1]


def test_cifar10_missing_inputs(tmp_path):
    with pytest.raises(ConfigError, match="directory not found.*data_batch_1"):
        load_cifar10_batches(tmp_path / "nowhere")
    write_cifar(tmp_path, ["data_batch_1", "data_batch_2"])
    with pytest.raises(ConfigError, match="CIFAR-10 batch not found.*cifar-10-python.tar.gz") as info:
        load_cifar10_batches(tmp_path)
    assert info.value.path == str(tmp_path / "data_batch_3")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"not a pickle", "unreadable pickle"),
        (pickle.dumps(_Evil()), "refusing to load"),  # a pickle that would run a command is refused
        (pickle.dumps([1, 2]), "expected a dict"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "expected data and labels"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"uint8 \[n, 3072\]"),
        (pickle.dumps({b"data": np.zeros((2, 99), np.uint8), b"labels": [0, 1]}, protocol=5), r"\(2, 99\)"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), r"uint8 \[n, 3072\]"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "labels must be 2 integers"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), r"0\.\.9"),
    ],
)
def test_cifar10_corrupt_batches(tmp_path, payload, message):
    (tmp_path / "test_batch").write_bytes(payload)
    with pytest.raises(ConfigError, match=message) as info:
        load_cifar10_batches(tmp_path, "test")
    assert info.value.path == str(tmp_path / "test_batch")


# --------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_sized():
    x = np.arange(100, dtype=np.float32).reshape(50, 2)
    labels = np.arange(50)
    a = split_train_test(x, labels, 0.2, seed=7)
    b = split_train_test(x, labels, 0.2, seed=7)
    c = split_train_test(x, labels, 0.2, seed=8)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[3], c[3])
    x_tr, y_tr, x_te, y_te = a
    assert len(y_te) == 10 and len(y_tr) == 40
    assert sorted(np.concatenate([y_tr, y_te]).tolist()) == list(range(50))  # a partition
    np.testing.assert_array_equal(x_tr[:, 0], 2 * y_tr)  # rows stay paired with their labels
    assert np.all(np.diff(y_tr) > 0) and np.all(np.diff(y_te) > 0)  # original order kept within each part
    assert len(split_train_test(x[:3], labels[:3], 0.01, seed=0)[3]) == 1  # at least one test example
    with pytest.raises(ValueError):
        split_train_test(x, labels, 1.0, seed=0)
    with pytest.raises(ValueError):
        split_train_test(x, labels[:4], 0.2, seed=0)
