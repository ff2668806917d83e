"""Prepare stage: write train and test splits as Parquet."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import GMMPrepare
from tasks.io import write_dataset

log = logging.getLogger("stein")


def mixture_spec(cfg: GMMPrepare) -> dict:
    """The mixture as plain data: stored in the datasets' metadata so later stages know the true score."""
    return {"weights": list(cfg.weights), "means": [list(m) for m in cfg.means], "stds": [cfg.std] * len(cfg.weights)}


@task(name="prepare-gmm", cache_policy=NO_CACHE)
def prepare_gmm(cfg: GMMPrepare, train_path: Path, test_path: Path) -> dict[str, int]:
    """Draw train and test sets from the Gaussian mixture with one seeded generator (test after train)."""
    import torch

    from stein_core import GaussianMixture

    spec = mixture_spec(cfg)
    mixture = GaussianMixture(spec["weights"], spec["means"], spec["stds"])
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, c_train = mixture.sample(cfg.n_train, generator=gen, dtype=torch.float32)
    x_test, c_test = mixture.sample(cfg.n_test, generator=gen, dtype=torch.float32)
    meta = {"source": "gaussian_mixture", "seed": cfg.seed, "mixture": spec}
    write_dataset(train_path, x_train.numpy(), label=c_train.numpy(), metadata=meta | {"split": "train"})
    write_dataset(test_path, x_test.numpy(), label=c_test.numpy(), metadata=meta | {"split": "test"})
    log.info("wrote %d train and %d test points (d=%d) to %s", cfg.n_train, cfg.n_test, x_train.shape[1], Path(train_path).parent)
    return {"n_train": cfg.n_train, "n_test": cfg.n_test, "dim": int(x_train.shape[1])}
