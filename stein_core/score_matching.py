"""Score-matching objectives.

Shapes: data ``[n, *event]`` (e.g. ``[n, d]``; any event rank works, nothing is
hard-coded for images); noise levels ``[L]``; per-sample noise levels ``[n]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._random import randint, randn

__all__ = ["geometric_sigmas", "get_dsm_loss_fn"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def geometric_sigmas(
    sigma_max: float,
    sigma_min: float,
    n_levels: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Geometric noise ladder ``sigma_1 = sigma_max > ... > sigma_L = sigma_min``.

    Song & Ermon, "Generative Modeling by Estimating Gradients of the Data
    Distribution", NeurIPS 2019, Sec. 4.1 (constant ratio ``sigma_{i-1}/sigma_i``).

    Returns:
        ``[n_levels]`` descending tensor; the endpoints are exact.

    Raises:
        ValueError: unless ``n_levels >= 1`` and ``sigma_max > sigma_min > 0``
            (for ``n_levels == 1``: ``sigma_max == sigma_min > 0``).
    """
    sigma_max, sigma_min = float(sigma_max), float(sigma_min)
    if int(n_levels) != n_levels or n_levels < 1:
        raise ValueError(f"n_levels must be an integer >= 1, got {n_levels}")
    n_levels = int(n_levels)
    if not (sigma_min > 0.0 and math.isfinite(sigma_max)):
        raise ValueError(f"need 0 < sigma_min and a finite sigma_max, got {sigma_min}, {sigma_max}")
    if n_levels == 1:
        if sigma_max != sigma_min:
            raise ValueError("n_levels == 1 requires sigma_max == sigma_min")
        return torch.tensor([sigma_max], dtype=dtype, device=device)
    if not sigma_max > sigma_min:
        raise ValueError(f"need sigma_max > sigma_min, got {sigma_max} <= {sigma_min}")
    logs = torch.linspace(math.log(sigma_max), math.log(sigma_min), n_levels, dtype=torch.float64)
    sig = torch.exp(logs)
    sig[0], sig[-1] = sigma_max, sigma_min
    return sig.to(dtype=dtype, device=device)


_WEIGHTINGS = ("sigma2", "none")
_REDUCTIONS = ("mean", "sum")


def get_dsm_loss_fn(
    sigmas: Tensor | Sequence[float],
    *,
    weighting: str = "sigma2",
    reduce: str = "mean",
) -> Callable[..., Tensor]:
    """Multi-scale denoising score-matching loss (NCSN objective).

    Vincent, "A Connection Between Score Matching and Denoising Autoencoders",
    Neural Computation 2011; Song & Ermon, NeurIPS 2019, eqs. (5)-(6).

    For each data point a level ``i`` is drawn uniformly, ``x_tilde = x + sigma_i z``
    with ``z ~ N(0, I)``; the target score is ``-z / sigma_i`` and the per-sample loss

        l = 1/2 lambda(sigma_i) ||s(x_tilde, sigma_i) + z / sigma_i||^2,

    summed over the event dims. With ``weighting="sigma2"`` (``lambda = sigma^2``,
    the paper's choice) this is ``1/2 ||sigma s + z||^2``; ``"none"`` uses ``lambda = 1``.

    Args:
        sigmas: ``[L]`` noise levels.
        weighting: ``"sigma2"`` or ``"none"``.
        reduce: ``"mean"`` or ``"sum"`` over the batch.

    Returns:
        ``loss_fn(score_fn, x, generator=None) -> 0-dim tensor``, where
        ``score_fn(x_tilde [n, *event], sigma [n]) -> [n, *event]`` and ``x`` is
        ``[n, *event]``. Noise and levels come from ``generator``; dtype and device
        follow ``x``.
    """
    sig = torch.as_tensor(sigmas).detach().flatten()
    if sig.numel() < 1 or not bool((sig > 0).all()):
        raise ValueError("sigmas must be a non-empty collection of positive values")
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    n_levels = sig.numel()

    def loss_fn(
        score_fn: ScoreFn, x: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        n = x.shape[0]
        idx = randint(n_levels, (n,), device=x.device, generator=generator)  # [n]
        sigma = sig.to(dtype=x.dtype, device=x.device)[idx]  # [n]
        sigma_b = sigma.reshape((n,) + (1,) * (x.ndim - 1))  # [n, 1, ...]
        z = randn(x.shape, like=x, generator=generator)  # [n, *event]
        x_tilde = x + sigma_b * z
        s = score_fn(x_tilde, sigma)  # [n, *event]
        if weighting == "sigma2":
            resid = sigma_b * s + z  # sigma (s - target)
        else:
            resid = s + z / sigma_b
        per_sample = 0.5 * resid.pow(2).reshape(n, -1).sum(-1)  # [n]
        return per_sample.mean() if reduce == "mean" else per_sample.sum()

    return loss_fn
