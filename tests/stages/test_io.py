"""Artifact I/O: Parquet schema round trip, clear errors for missing/corrupt inputs, atomic writes."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.config.sections import ConfigError
from tasks.data.io import atomic_path, load_checkpoint, read_dataset, save_checkpoint, write_dataset


def test_parquet_round_trip_keeps_values_shape_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 12)).astype(np.float32)
    label = rng.integers(0, 3, size=50)
    path = tmp_path / "d.parquet"
    write_dataset(path, x, label=label, shape=(3, 2, 2), metadata={"seed": 7, "mixture": {"weights": [0.5, 0.5]}})
    schema = pq.read_schema(path)
    assert str(schema.field("x").type) == "fixed_size_list<element: float>[12]"
    ds = read_dataset(path)
    np.testing.assert_array_equal(ds.x, x)
    np.testing.assert_array_equal(ds.label, label)
    assert ds.shape == (3, 2, 2) and ds.metadata["seed"] == 7 and ds.metadata["mixture"]["weights"] == [0.5, 0.5]


def test_missing_and_corrupt_inputs_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="input file not found") as info:
        read_dataset(tmp_path / "absent.parquet")
    assert "absent.parquet" in str(info.value)
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ConfigError, match="not a readable Parquet file") as info:
        read_dataset(bad)
    assert "corrupt.parquet" in str(info.value)
    with pytest.raises(ConfigError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(ConfigError, match="not a PyTorch checkpoint"):
        load_checkpoint(bad)
    import zipfile

    foreign = tmp_path / "foreign.pt"  # a zip archive, but not what torch.save writes
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(ConfigError, match="not a readable checkpoint: ") as info:
        load_checkpoint(foreign)
    assert "\n" not in str(info.value)  # one line, whatever torch says


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "file.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(target.parent.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new, half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"  # the previous version survives an interrupted rewrite


def test_a_killed_writers_temporary_files_are_removed_by_the_next_write(tmp_path):
    """SIGKILL runs no cleanup: the temporary file (or folder) of a killed writer stays beside the output. The next
    atomic write of that output removes it, and only it: another output's temporary file is not touched."""
    target = tmp_path / "samples.parquet"
    (tmp_path / ".samples.parquet.k1ll3d.tmp").write_bytes(b"half")
    (tmp_path / ".samples.parquet.d1r.tmp").mkdir()
    (tmp_path / ".samples.parquet.d1r.tmp" / "part").write_bytes(b"half")
    other = tmp_path / ".model.pt.abc.tmp"
    other.write_bytes(b"someone else's")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.pt.abc.tmp", "samples.parquet"]
    assert target.read_bytes() == b"whole"


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    import torch

    from stein_core import NoiseConditionalMLP

    net = NoiseConditionalMLP(dim=3, hidden=16, n_layers=2, embed_dim=8)
    save_checkpoint(tmp_path / "m.pt", state_dict=net.state_dict(), model_args=net.model_args, sigmas=[1.0, 0.1])
    ckpt = load_checkpoint(tmp_path / "m.pt")
    rebuilt = NoiseConditionalMLP(**ckpt["model_args"])
    rebuilt.load_state_dict(ckpt["state_dict"])
    x = torch.randn(5, 3)
    torch.testing.assert_close(rebuilt(x, torch.tensor(0.5)), net(x, torch.tensor(0.5)))


def test_equal_checkpoints_are_equal_bytes(tmp_path):
    """DVC compares outputs by MD5: the same weights saved twice (through different temporary files) must give
    the same bytes, or every retrain would make the stages downstream rerun."""
    import hashlib

    import torch

    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    for name in ("a.pt", "b.pt"):
        save_checkpoint(tmp_path / name, state_dict=sd, model_args={"dim": 3}, sigmas=[1.0])
    digest = [hashlib.md5((tmp_path / n).read_bytes()).hexdigest() for n in ("a.pt", "b.pt")]
    assert digest[0] == digest[1]
    save_checkpoint(tmp_path / "c.pt", state_dict={"w": sd["w"] + 1}, model_args={"dim": 3}, sigmas=[1.0])
    assert hashlib.md5((tmp_path / "c.pt").read_bytes()).hexdigest() != digest[0]
