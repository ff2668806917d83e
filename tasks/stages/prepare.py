"""Prepare stage: write train and test splits as Parquet."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config.sections import ImagePrepare, MixturePrepare, RingPrepare
from tasks.data.io import write_dataset

log = logging.getLogger("stein")


def mixture_spec(cfg: MixturePrepare | RingPrepare) -> dict:
    """The mixture as plain data: stored in the datasets' metadata so later stages know the true score. A ring
    has its ``n_modes`` means at angles 2πk/n_modes on the circle of ``radius``, equal weights."""
    if isinstance(cfg, RingPrepare):
        angles = [2 * math.pi * k / cfg.n_modes for k in range(cfg.n_modes)]
        means = [[cfg.radius * math.cos(a), cfg.radius * math.sin(a)] for a in angles]
        return {"weights": [1.0 / cfg.n_modes] * cfg.n_modes, "means": means, "stds": [cfg.std] * cfg.n_modes}
    return {"weights": list(cfg.weights), "means": [list(m) for m in cfg.means], "stds": [cfg.std] * len(cfg.weights)}


@task(name="prepare-mixture", cache_policy=NO_CACHE)
def prepare_mixture(cfg: MixturePrepare | RingPrepare, train_path: Path, test_path: Path) -> dict[str, int]:
    """Draw train and test sets from the Gaussian mixture with one seeded generator (test after train)."""
    import torch

    from stein_core.distributions import GaussianMixture

    spec = mixture_spec(cfg)
    mixture = GaussianMixture(spec["weights"], spec["means"], spec["stds"])
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, c_train = mixture.sample(cfg.n_train, generator=gen, dtype=torch.float32)
    x_test, c_test = mixture.sample(cfg.n_test, generator=gen, dtype=torch.float32)
    meta = {"source": cfg.source, "seed": cfg.seed, "mixture": spec}
    write_dataset(train_path, x_train.numpy(), label=c_train.numpy(), metadata=meta | {"split": "train"})
    write_dataset(test_path, x_test.numpy(), label=c_test.numpy(), metadata=meta | {"split": "test"})
    log.info("wrote %d train and %d test points (d=%d) to %s", cfg.n_train, cfg.n_test, x_train.shape[1], Path(train_path).parent)
    return {"n_train": cfg.n_train, "n_test": cfg.n_test, "dim": int(x_train.shape[1])}


@task(name="prepare-images", cache_policy=NO_CACHE)
def prepare_images(cfg: ImagePrepare, train_path: Path, test_path: Path) -> dict[str, int]:
    """Real images from local sources, pixels in [0, 1], flattened with their (C, H, W) shape in the metadata.

    Digits (scikit-learn's bundled copy) get a seeded split; MNIST and CIFAR-10 keep their official one."""
    import numpy as np

    from tasks.data.sources import load_cifar10_batches, load_digits_8x8, load_mnist_idx, split_train_test

    hint = "set prepare.path in the pipeline's conf/*.yaml to the folder holding the files"
    if cfg.source == "digits":
        data = load_digits_8x8()
        x_tr, y_tr, x_te, y_te = split_train_test(data.x, data.labels, cfg.test_fraction, cfg.seed)
        shape = data.shape
    else:
        load = load_mnist_idx if cfg.source == "mnist" else load_cifar10_batches
        train, test = load(cfg.path, "train", hint=hint), load(cfg.path, "test", hint=hint)
        x_tr, y_tr, x_te, y_te, shape = train.x, train.labels, test.x, test.labels, train.shape
    if cfg.max_train is not None and len(x_tr) > cfg.max_train:
        keep = np.random.default_rng(cfg.seed).permutation(len(x_tr))[: cfg.max_train]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    meta = {"source": cfg.source, "seed": cfg.seed}
    write_dataset(train_path, x_tr, label=y_tr, shape=shape, metadata=meta | {"split": "train"})
    write_dataset(test_path, x_te, label=y_te, shape=shape, metadata=meta | {"split": "test"})
    log.info("wrote %d train and %d test images of shape %s from %s", len(x_tr), len(x_te), shape, cfg.source)
    return {"n_train": int(len(x_tr)), "n_test": int(len(x_te)), "dim": int(x_tr.shape[1])}
