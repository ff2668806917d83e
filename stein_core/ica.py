"""Independent component analysis as an unnormalised-model benchmark (the ICA experiments of Grathwohl et al.,
"Learning the Stein Discrepancy for Training and Evaluating Energy-Based Models without Sampling", ICML 2020, and
of Gong, Li & Hernández-Lobato, "Sliced Kernelized Stein Discrepancy", ICLR 2021).

Data: x = W z with independent heavy-tailed sources z_i (Student-t with ν degrees of freedom, or standard
Laplace) and a random, well-conditioned mixing matrix W (:func:`random_mixing`). The model has a learnable
unmixing matrix V (W⁻¹ at the truth):

    log p_V(x) = Σ_i log p_z((V x)_i) + log |det V|,         ∇_x log p_V(x) = Vᵀ ψ(V x),  ψ = (log p_z)'.

The score needs no determinant, which is why Stein discrepancies can train the model without its normaliser;
the held-out log-likelihood, which needs it, is exact (``slogdet`` of V; no inverse anywhere). The true model's
log-likelihood (:func:`true_log_likelihood`) solves W y = x instead of inverting W.

Shapes: ``x [n, d]``, ``W, V [d, d]``; a row x of the data is ``z Wᵀ``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "ICAModel",
    "SOURCES",
    "random_mixing",
    "sample_ica",
    "source_log_prob",
    "source_score",
    "true_log_likelihood",
]

#: The source densities p_z: ``student_t`` (ν degrees of freedom, unit scale) and ``laplace`` (exp(-|z|)/2).
SOURCES = ("student_t", "laplace")


def _check_source(source: str, dof: float) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "student_t" and not dof > 0:
        raise ValueError(f"the Student-t source needs dof > 0, got {dof}")


def source_log_prob(z: Tensor, source: str = "student_t", dof: float = 5.0) -> Tensor:
    """Elementwise log p_z(z), same shape as ``z``. Student-t: lgamma((ν+1)/2) − lgamma(ν/2) − ½log(νπ)
    − (ν+1)/2 · log(1 + z²/ν); Laplace: −|z| − log 2."""
    _check_source(source, dof)
    if source == "laplace":
        return -z.abs() - math.log(2.0)
    const = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    return const - (dof + 1) / 2 * torch.log1p(z * z / dof)


def source_score(z: Tensor, source: str = "student_t", dof: float = 5.0) -> Tensor:
    """Elementwise ψ(z) = d log p_z / dz: −(ν+1) z / (ν + z²) for Student-t, −sign(z) for Laplace (its
    derivative everywhere but at 0)."""
    _check_source(source, dof)
    if source == "laplace":
        return -torch.sign(z)
    return -(dof + 1) * z / (dof + z * z)


def random_mixing(d: int, *, condition: float = 4.0, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """A random ``[d, d]`` mixing matrix W = U diag(s) Qᵀ with U, Q Haar-orthogonal (QR of Gaussian matrices,
    signs fixed by R's diagonal) and singular values s log-uniform on [1/√c, √c]: condition number at most
    ``condition``, |det W| of order 1, so that every dimension's log-likelihoods are comparable."""
    if d < 1 or not condition >= 1:
        raise ValueError(f"need d >= 1 and condition >= 1, got d={d}, condition={condition}")

    def haar() -> Tensor:
        q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)[None, :]

    u, q = haar(), haar()
    half = 0.5 * math.log(condition)
    s = torch.exp((2 * torch.rand(d, generator=generator, dtype=torch.float64) - 1) * half)
    return ((u * s[None, :]) @ q.T).to(dtype)


def sample_ica(n: int, mixing: Tensor, *, source: str = "student_t", dof: float = 5.0,
               generator: torch.Generator | None = None) -> Tensor:
    """``[n, d]`` draws x = W z (rows ``z Wᵀ``), z with i.i.d. components from the source density, in ``mixing``'s
    dtype. Student-t by its definition z = g / √(χ²_ν / ν) (g normal; χ²_ν = 2·Gamma(ν/2)), drawn from
    ``generator`` with torch's own samplers; Laplace as the difference of two unit exponentials."""
    _check_source(source, dof)
    d = mixing.shape[0]
    if source == "laplace":
        e = torch.empty(2, n, d, dtype=torch.float64).exponential_(1.0, generator=generator)
        z = e[0] - e[1]
    else:
        g = torch.randn(n, d, generator=generator, dtype=torch.float64)
        chi2 = 2 * torch._standard_gamma(torch.full((n, d), dof / 2, dtype=torch.float64), generator=generator)
        z = g / torch.sqrt(chi2 / dof)
    return (z @ mixing.to(torch.float64).T).to(mixing.dtype)


def true_log_likelihood(x: Tensor, mixing: Tensor, *, source: str = "student_t", dof: float = 5.0) -> Tensor:
    """``[n]`` log-density of x = W z under the true W: Σ_i log p_z((W⁻¹x)_i) − log|det W|, with W⁻¹x by
    ``torch.linalg.solve`` (no inverse) and the determinant by ``slogdet``."""
    w = mixing.to(x.dtype)
    z = torch.linalg.solve(w, x.T).T  # [n, d]
    return source_log_prob(z, source, dof).sum(-1) - torch.linalg.slogdet(w).logabsdet


class ICAModel(nn.Module):
    """The ICA model with a learnable unmixing matrix V ``[dim, dim]`` (initialised to the identity):
    ``log_prob(x)`` (normalised, for held-out evaluation) and ``score(x)`` (no determinant: what a Stein
    discrepancy trains). ``model_args`` rebuilds it from a checkpoint."""

    def __init__(self, dim: int, source: str = "student_t", dof: float = 5.0) -> None:
        super().__init__()
        _check_source(source, dof)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.model_args = {"dim": int(dim), "source": source, "dof": float(dof)}
        self.source, self.dof = source, float(dof)
        self.unmixing = nn.Parameter(torch.eye(dim))

    def sources(self, x: Tensor) -> Tensor:
        """``[n, d]`` -> the recovered sources V x, ``[n, d]``."""
        return x @ self.unmixing.T

    def score(self, x: Tensor) -> Tensor:
        """``[n, d]`` -> ∇_x log p_V(x) = Vᵀ ψ(V x), rows ``ψ(x Vᵀ) V``; differentiable in V."""
        return source_score(self.sources(x), self.source, self.dof) @ self.unmixing

    def log_prob(self, x: Tensor) -> Tensor:
        """``[n, d]`` -> ``[n]`` normalised log-density Σ_i log p_z((V x)_i) + log|det V|."""
        return source_log_prob(self.sources(x), self.source, self.dof).sum(-1) + torch.linalg.slogdet(self.unmixing).logabsdet

    def forward(self, x: Tensor) -> Tensor:
        return self.score(x)
