"""Sample stage: draw from a trained model of any family with the sampler its sample section names."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.families.loading import load_model
from tasks.data.io import file_md5, write_dataset
from tasks.families.base import draw_in_batches

log = logging.getLogger("stein")

_UNITS = {"annealed_langevin": "level", "langevin": "step", "generator": "batch", "latent_langevin": "step",
          "svgd": "step", "mcmc": "step"}


@task(name="sample", cache_policy=NO_CACHE)
def sample_model(cfg, *, model_path: Path, out_path: Path, device: str = "cpu") -> dict[str, float]:
    """Draw ``cfg.n_samples`` samples, ``cfg.batch_size`` at a time, from one seeded generator (the batches draw
    from it in order), with a progress bar; write them with the sampler's settings in the metadata."""
    import torch
    from tqdm.auto import tqdm

    model = load_model(model_path, device=device, sampler=cfg)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    n_batches = -(-cfg.n_samples // cfg.batch_size)
    t0 = time.perf_counter()
    with tqdm(total=n_batches * model.ticks(cfg.batch_size), desc=f"{cfg.sampler} sampling",
              unit=_UNITS.get(cfg.sampler, "tick"), mininterval=2.0) as bar:
        x = draw_in_batches(cfg.n_samples, cfg.batch_size, lambda m: model.sample(m, generator=gen, callback=bar.update))
    seconds = time.perf_counter() - t0
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(1).sum())
        raise FloatingPointError(f"{bad} of {len(x)} samples from {model_path} are not finite: the sampler diverged "
                                 f"(a smaller step size?); nothing written to {out_path}")
    diagnostics = model.diagnostics()
    write_dataset(out_path, x.numpy(), shape=model.shape, metadata={
        "split": "samples", "source": cfg.sampler, "seed": cfg.seed, "model_md5": file_md5(model_path),
        "sampler": cfg.model_dump(), **diagnostics,
    })
    log.info("wrote %d samples to %s in %.1f s%s", len(x), out_path, seconds,
             "".join(f", {k} {v:.3g}" for k, v in diagnostics.items()))
    return {"sample_seconds": seconds, "samples_per_s": cfg.n_samples / seconds, **diagnostics}
