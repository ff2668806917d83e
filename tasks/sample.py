"""Sample stage: annealed Langevin dynamics from a trained noise-conditional score network."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import AnnealedLangevinSample, LangevinSample
from tasks.io import file_md5, write_dataset
from tasks.sampling import annealed_chains, draw_in_batches, load_score_model

log = logging.getLogger("stein")


def _sample_in_batches(
    n_samples: int,
    batch_size: int,
    run_chains,
    *,
    steps_per_batch: int,
    steps_per_chain: int,
    desc: str,
    unit: str,
    out_path: Path,
    model_path: Path,
    shape: tuple[int, ...],
    metadata: dict,
) -> dict[str, float]:
    """Run ``run_chains(m, bar) -> [m, d]`` on batches of at most ``batch_size`` chains with a progress bar of
    ``steps_per_batch`` ticks per batch, then write the samples with the sampler's metadata."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    n_batches = -(-n_samples // batch_size)
    with tqdm(total=n_batches * steps_per_batch, desc=desc, unit=unit, mininterval=2.0) as bar:
        x = draw_in_batches(n_samples, batch_size, lambda m: run_chains(m, bar)).numpy()
    seconds = time.perf_counter() - t0
    write_dataset(out_path, x, shape=shape, metadata={"split": "samples", "model_md5": file_md5(model_path), **metadata})
    log.info("wrote %d samples to %s in %.1f s", len(x), out_path, seconds)
    return {"sample_seconds": seconds, "chain_steps_per_s": n_samples * steps_per_chain / seconds}


@task(name="sample-annealed-langevin", cache_policy=NO_CACHE)
def sample_annealed_langevin(cfg: AnnealedLangevinSample, *, model_path: Path, out_path: Path, device: str = "cpu") -> dict[str, float]:
    """Draw ``cfg.n_samples`` samples, ``cfg.batch_size`` chains at a time, from x_0 ~ N(0, σ_1² I) (NCSNv2)."""
    import torch

    model, sigmas, shape = load_score_model(model_path, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def run_chains(m, bar):
        return annealed_chains(model, sigmas, cfg, m, math.prod(shape), generator=gen, callback=lambda i, _x: bar.update(1))

    return _sample_in_batches(
        cfg.n_samples, cfg.batch_size, run_chains, steps_per_batch=len(sigmas),
        steps_per_chain=len(sigmas) * cfg.n_steps_each, desc="annealed Langevin (levels)", unit="level",
        out_path=out_path, model_path=model_path, shape=shape,
        metadata={"source": "annealed_langevin", "seed": cfg.seed, "sampler": cfg.model_dump()},
    )


@task(name="sample-langevin", cache_policy=NO_CACHE)
def sample_langevin(cfg: LangevinSample, *, model_path: Path, out_path: Path, device: str = "cpu") -> dict[str, float]:
    """Unadjusted Langevin dynamics with the learned score at σ_L only: x ← x + α s(x, σ_L) + √(2α) z, from
    x_0 ~ N(0, init_std² I). The baseline of the mixing-proportion blindness comparison."""
    import torch

    from stein_core import langevin_step

    model, sigmas, shape = load_score_model(model_path, device)
    dim = math.prod(shape)
    sigma_min = sigmas[-1]
    init_std = cfg.init_std if cfg.init_std is not None else float(sigmas[0])
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def score_fn(x):
        with torch.no_grad():
            return model(x, sigma_min)

    def run_chains(m, bar):
        x = init_std * torch.randn(m, dim, generator=gen, device=device)
        for _ in range(cfg.n_steps):
            x = langevin_step(score_fn, x, cfg.step_size, generator=gen)
            bar.update(1)
        return x

    return _sample_in_batches(
        cfg.n_samples, cfg.batch_size, run_chains, steps_per_batch=cfg.n_steps, steps_per_chain=cfg.n_steps,
        desc="Langevin at σ_L (steps)", unit="step", out_path=out_path, model_path=model_path, shape=shape,
        metadata={"source": "langevin", "seed": cfg.seed, "sigma": float(sigma_min), "sampler": cfg.model_dump()},
    )
