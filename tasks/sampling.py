"""Score networks from their checkpoints, and annealed Langevin chains from them (Prefect-free: the sample stage
and the Ray tasks that evaluate training checkpoints both draw samples this way)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tasks.config import AnnealedLangevinSample, ConfigError
from tasks.io import load_checkpoint


def load_score_model(model_path: Path, device: str = "cpu"):
    """Rebuild the score network from its checkpoint -> (model in eval mode, sigmas tensor, example shape).

    The checkpoint names the class (``model_class``) and its constructor arguments; images are sampled as
    flattened vectors of ``prod(shape)`` and the conv net reshapes them itself."""
    import torch

    import stein_core

    ckpt = load_checkpoint(model_path)
    cls_name = ckpt.get("model_class", "NoiseConditionalMLP")
    if cls_name not in ("NoiseConditionalMLP", "NoiseConditionalConvNet"):
        raise ConfigError(model_path, "model_class", f"unknown score network class {cls_name!r}")
    model = getattr(stein_core, cls_name)(**ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    sigmas = torch.tensor(ckpt["sigmas"], dtype=torch.float32, device=device)
    shape = tuple(ckpt.get("shape") or (ckpt["model_args"]["dim"],))
    return model, sigmas, shape


def annealed_chains(model, sigmas, cfg: AnnealedLangevinSample, n: int, dim: int, *, generator, callback: Callable | None = None):
    """``n`` annealed Langevin chains (Song & Ermon 2019, Algorithm 1; NCSNv2's final denoising step when
    ``cfg.denoise``) from x_0 ~ N(0, σ_1² I) in ``dim`` dimensions (examples flattened) -> samples ``[n, dim]``
    on the model's device. ``callback(level, x)`` is called after each noise level."""
    import torch

    from stein_core import annealed_langevin

    def score_fn(x, sigma):
        with torch.no_grad():
            return model(x, sigma)

    x0 = sigmas[0] * torch.randn(n, dim, generator=generator, device=sigmas.device)
    return annealed_langevin(
        score_fn, x0, sigmas, eps=cfg.eps, n_steps_each=cfg.n_steps_each, generator=generator,
        denoise=cfg.denoise, callback=callback,
    )


def draw_in_batches(n: int, batch_size: int, run_chains: Callable):
    """``run_chains(m) -> [m, d]`` on consecutive batches of at most ``batch_size`` chains -> ``[n, d]`` on the
    CPU (the batches draw from whatever generator ``run_chains`` holds, in order)."""
    import torch

    return torch.cat([run_chains(min(batch_size, n - start)).detach().cpu() for start in range(0, n, batch_size)])
