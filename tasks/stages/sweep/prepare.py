"""Prepare stage of a sweep: the synthetic ICA data of every (dimension, seed) (``stein_core.ica``)."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config.sweep import ICAPrepare, cell_name
from tasks.data.io import atomic_path, write_dataset

log = logging.getLogger("stein")


@task(name="prepare-ica", cache_policy=NO_CACHE)
def prepare_ica(cfg: ICAPrepare, out_dir: Path) -> dict[str, int]:
    """For each dimension D and seed s: W from ``random_mixing(D)``, then the train and test draws, all from one
    generator seeded by (s, D); W (float64, row-major) goes into both files' metadata."""
    import torch

    from stein_core.ica import random_mixing, sample_ica

    with atomic_path(out_dir, directory=True) as tmp:
        for d in cfg.dims:
            for s in cfg.seeds:
                gen = torch.Generator().manual_seed(s * 100_003 + d)
                w = random_mixing(d, condition=cfg.condition, generator=gen)
                x_train = sample_ica(cfg.n_train, w, source=cfg.sources, dof=cfg.dof, generator=gen)
                x_test = sample_ica(cfg.n_test, w, source=cfg.sources, dof=cfg.dof, generator=gen)
                meta = {"source": "ica", "seed": s, "ica": {"sources": cfg.sources, "dof": cfg.dof,
                                                             "mixing": w.tolist()}}
                cell = tmp / cell_name(d, s)
                cell.mkdir()
                write_dataset(cell / "train.parquet", x_train.float().numpy(), metadata=meta | {"split": "train"})
                write_dataset(cell / "test.parquet", x_test.float().numpy(), metadata=meta | {"split": "test"})
                log.info("ICA data D=%d seed=%d: %d train, %d test points (cond(W) = %.2f)", d, s, cfg.n_train,
                         cfg.n_test, float(torch.linalg.cond(w)))
    return {"n_datasets": len(cfg.dims) * len(cfg.seeds), "n_train": cfg.n_train, "n_test": cfg.n_test}
