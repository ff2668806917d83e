"""Target distributions with closed-form scores, and a log-density -> score helper.

Shapes: points are ``[..., d]``; densities and indices are ``[...]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._random import randn

__all__ = ["GaussianMixture", "score_from_log_prob"]


def _to_vec(value: Tensor | Sequence[float] | float, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.ndim > 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t


class GaussianMixture:
    """Mixture of isotropic Gaussians ``p(x) = sum_k w_k N(x; mu_k, s_k^2 I)``.

    Args:
        weights: ``[K]`` non-negative, normalised internally.
        means: ``[K, d]``.
        stds: ``[K]`` positive per-component standard deviations (a scalar is
            broadcast to all components).

    Parameters are kept in float64 on the device they were given on; every
    method returns tensors with the dtype and device of its input ``x``.
    """

    def __init__(
        self,
        weights: Tensor | Sequence[float],
        means: Tensor | Sequence[Sequence[float]],
        stds: Tensor | Sequence[float] | float,
    ) -> None:
        w = _to_vec(weights, "weights")
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(mu.shape)}")
        k = mu.shape[0]
        s = _to_vec(stds, "stds").to(mu.device)
        if s.ndim == 0:
            s = s.expand(k).clone()
        if w.shape != (k,) or s.shape != (k,):
            raise ValueError(
                f"weights {tuple(w.shape)} and stds {tuple(s.shape)} must both be [K={k}]"
            )
        if bool((w < 0).any()) or not float(w.sum()) > 0.0:
            raise ValueError("weights must be non-negative with a positive sum")
        if not bool((s > 0).all()):
            raise ValueError("stds must be > 0")
        self.weights = (w / w.sum()).to(mu.device)
        self.means = mu
        self.stds = s

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, d={self.dim})"

    # -- internals ---------------------------------------------------------
    def _params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        kw = {"dtype": x.dtype, "device": x.device}
        return self.weights.to(**kw), self.means.to(**kw), self.stds.to(**kw)

    def _component_terms(
        self, x: Tensor, sigma: Tensor | float | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(log w_k + log N_k(x) [..., K], diff = mu_k - x [..., K, d], var [..., K])``.

        ``sigma`` (scalar or ``[...]``) adds ``sigma^2`` to every component variance.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has last dim {x.shape[-1]}, mixture has d={self.dim}")
        w, mu, s = self._params(x)
        var = s * s  # [K]
        if sigma is not None:
            sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
            var = var + (sig * sig)[..., None]  # [..., K]
        diff = mu - x[..., None, :]  # [..., K, d]
        sq = (diff * diff).sum(-1)  # [..., K]
        d = self.dim
        log_norm = -0.5 * d * torch.log(2.0 * math.pi * var)
        return torch.log(w) + log_norm - 0.5 * sq / var, diff, var

    # -- public API --------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)``: ``[..., d]`` -> ``[...]`` (log-sum-exp over components)."""
        logits, _, _ = self._component_terms(x, None)
        return torch.logsumexp(logits, dim=-1)

    def score(self, x: Tensor) -> Tensor:
        """Closed-form ``grad_x log p(x) = sum_k r_k(x) (mu_k - x) / s_k^2``: ``[..., d]`` -> ``[..., d]``.

        ``r_k(x)`` are the posterior responsibilities (softmax of the component log-terms).
        """
        return self.perturbed_score(x, None)

    def perturbed_score(self, x: Tensor, sigma: Tensor | float | None) -> Tensor:
        """Score of the mixture convolved with ``N(0, sigma^2 I)``, per point.

        Equal to ``self.perturbed(sigma).score(x)`` but ``sigma`` may also be a
        tensor ``[...]`` (one noise level per point), which is what a
        noise-conditional score ``s(x_tilde, sigma)`` receives.

        Args:
            x: ``[..., d]``.
            sigma: ``None`` (no noise), a scalar, or ``[...]``.

        Returns:
            ``[..., d]``.
        """
        logits, diff, var = self._component_terms(x, sigma)
        resp = torch.softmax(logits, dim=-1)  # [..., K]
        return ((resp / var)[..., None] * diff).sum(-2)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` points.

        Returns:
            ``(x [n, d] of dtype, component [n] long)``. Draws are made on the
            generator's device (CPU by default) and moved to ``device``
            (default: the device of the mixture parameters).
        """
        device = torch.device(device) if device is not None else self.means.device
        gen_device = generator.device if generator is not None else self.means.device
        comp = torch.multinomial(
            self.weights.to(gen_device), n, replacement=True, generator=generator
        )
        like = torch.empty(0, dtype=torch.float64, device=gen_device)
        z = randn((n, self.dim), like=like, generator=generator)
        mu, s = self.means.to(gen_device), self.stds.to(gen_device)
        x = mu[comp] + s[comp, None] * z
        return x.to(device=device, dtype=dtype), comp.to(device)

    def perturbed(self, sigma: float | Tensor) -> "GaussianMixture":
        """The mixture convolved with ``N(0, sigma^2 I)``: stds become ``sqrt(s_k^2 + sigma^2)``."""
        sig = float(sigma)
        if sig < 0.0:
            raise ValueError(f"sigma must be >= 0, got {sig}")
        return GaussianMixture(
            self.weights, self.means, torch.sqrt(self.stds**2 + sig * sig)
        )

    def nearest_component(self, x: Tensor) -> Tensor:
        """Index of the nearest mean (Euclidean): ``[..., d]`` -> ``[...]`` long."""
        mu = self.means.to(dtype=x.dtype, device=x.device)
        sq = ((x[..., None, :] - mu) ** 2).sum(-1)  # [..., K]
        return sq.argmin(dim=-1)


def score_from_log_prob(
    log_prob_fn: Callable[..., Tensor], *, create_graph: bool = False
) -> Callable[..., Tensor]:
    """Turn an (unnormalised) log-density into a score function via autograd.

    Args:
        log_prob_fn: ``x [..., d] (, *args, **kwargs) -> [...]``; each output
            entry must depend only on its own point (the gradient of the sum is
            taken).
        create_graph: keep the graph of the gradient (needed when the score
            enters a loss that is differentiated again, e.g. wrt the
            parameters of ``log_prob_fn``). Then an ``x`` that already requires
            grad is used as is, so the score is differentiable wrt ``x``.

    Returns:
        ``score_fn(x, *args, **kwargs) -> [..., d]`` with the dtype and device of
        ``x``. Works under an outer ``torch.no_grad()`` (grad is re-enabled
        locally); ``x`` itself is never modified.
    """

    def score_fn(x: Tensor, *args, **kwargs) -> Tensor:
        with torch.enable_grad():
            if create_graph and x.requires_grad:
                xr = x
            else:
                xr = x.detach().requires_grad_(True)
            lp = log_prob_fn(xr, *args, **kwargs)
            (g,) = torch.autograd.grad(lp.sum(), xr, create_graph=create_graph)
        return g

    return score_fn
