"""Fixtures shared by the stage tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_split(tmp_path_factory):
    from tasks.config.sections import ImagePrepare
    from tasks.stages.prepare import prepare_images

    d = tmp_path_factory.mktemp("digits")
    prepare_images.fn(ImagePrepare(source="digits", seed=0), d / "train.parquet", d / "test.parquet")
    return d


@pytest.fixture
def mlp_checkpoint():
    """Write a small, seeded 2-D noise-conditional MLP checkpoint: ``mlp_checkpoint(path, sigmas) -> path``."""

    def write(path: Path, sigmas=(3.0, 1.0, 0.3)) -> Path:
        import torch

        from stein_core import NoiseConditionalMLP
        from tasks.families import module_checkpoint
        from tasks.data.io import save_torch

        torch.manual_seed(0)
        net = NoiseConditionalMLP(dim=2, hidden=16, n_layers=2, embed_dim=8)
        save_torch(path, module_checkpoint("ncsn", {"score": net}, shape=[2], sigmas=list(sigmas)))
        return path

    return write
