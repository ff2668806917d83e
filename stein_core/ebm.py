"""Estimators for energy-based models: an energy ``E(x)`` defines ``p(x) = exp(-E(x)) / Z``.

* Maximum likelihood with MCMC negatives (contrastive divergence, Hinton, "Training Products of Experts by
  Minimizing Contrastive Divergence", Neural Computation 2002; with the L2 energy penalty of Du & Mordatch,
  "Implicit Generation and Modeling with Energy-Based Models", NeurIPS 2019): :func:`cd_loss`. Since
  ``log Z(θ) = log ∫ exp(-E_θ)``, differentiating under the integral gives

      ∇θ log Z(θ) = -∫ exp(-E_θ(x)) / Z · ∇θ E_θ(x) dx = -E_{p_θ}[∇θ E_θ(x)],

  so the gradient of the negative log-likelihood ``NLL(θ) = E_data[E_θ(x)] + log Z(θ)`` is
  ``E_data[∇θ E_θ] - E_{p_θ}[∇θ E_θ]``: the gradient of :func:`cd_loss` with (detached) samples of ``p_θ`` as
  negatives, unbiased when those samples are exact.
* Noise-contrastive estimation (Gutmann & Hyvärinen, "Noise-contrastive estimation: A new estimation principle
  for unnormalized statistical models", AISTATS 2010; JMLR 13, 2012): logistic regression of data against noise
  with the log-ratio ``G(u) = log p_m(u) - log ν - log p_n(u)`` as the logit (:func:`nce_logits`,
  :func:`nce_loss`). The model's normaliser is a learnable parameter and is estimated consistently.
  :class:`GaussianNoise` is a Gaussian fitted to the data, the usual noise.
* Flow contrastive estimation (Gao, Nijkamp, Kingma, Xu, Dai & Wu, "Flow Contrastive Estimation of Energy-Based
  Models", CVPR 2020): NCE with a trainable flow as the noise, played as a min-max game (:func:`fce_value`).
* Evaluation in 2-D: :func:`grid_log_normaliser` (log Z by the midpoint rule on a box), :func:`grid_box` (a box
  around held-out points), :func:`log_density` (the normalised log-density).

Shapes: energies and log-densities of a batch are ``[n]``; points are ``[n, d]``. Device and dtype come from the
inputs; randomness (:meth:`GaussianNoise.sample`) from an explicit ``torch.Generator``
(:mod:`stein_core._random`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._random import randn

__all__ = [
    "GaussianNoise",
    "cd_loss",
    "fce_value",
    "grid_box",
    "grid_log_normaliser",
    "log_density",
    "nce_logits",
    "nce_loss",
]

EnergyFn = Callable[[Tensor], Tensor]

_GRID_CHUNK = 65536  # points per call of energy_fn in grid_log_normaliser


# ---------------------------------------------------------------------------------------------- maximum likelihood


def cd_loss(e_pos: Tensor, e_neg: Tensor, *, l2: float = 0.0) -> Tensor:
    """Maximum-likelihood loss with MCMC negatives (contrastive divergence, Hinton 2002)::

        mean E(x_pos) - mean E(x_neg) + l2 * (mean E(x_pos)^2 + mean E(x_neg)^2)

    Parameters
    ----------
    e_pos : Tensor
        ``[n]``, energies of the data.
    e_neg : Tensor
        ``[m]``, energies of the negatives (samples of the model, e.g. from a Langevin chain). The negatives
        themselves must be detached by the caller (``x_neg.detach()``): the gradient flows through the energy's
        parameters only, never through the sampler.
    l2 : float
        Weight of the squared-energy penalty of Du & Mordatch (NeurIPS 2019), which keeps energies near 0
        (``>= 0``; 0 gives the plain CD loss).

    Returns
    -------
    Tensor
        ``[]``. With exact samples of ``p_θ`` as negatives and ``l2 = 0``, its gradient in θ is an unbiased
        estimate of the gradient of the negative log-likelihood, by ``∇θ log Z = -E_{p_θ}[∇θ E_θ]`` (module
        docstring). Its value is not the NLL (log Z is not estimated).
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    loss = e_pos.mean() - e_neg.mean()
    if l2:
        loss = loss + l2 * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
    return loss


# ---------------------------------------------------------------------------------------------- NCE and FCE


def nce_logits(log_model: Tensor, log_noise: Tensor, nu: float) -> Tensor:
    """The NCE classifier's logit ``G(u) = log p_m(u) - log ν - log p_n(u)`` (Gutmann & Hyvärinen 2012, eq. 5 with
    the noise ratio ν): ``h(u) = sigmoid(G(u))`` is the posterior probability that ``u`` is data.

    Parameters
    ----------
    log_model : Tensor
        ``[n]``, the model's log-density at the points, including its learnable log-normaliser
        (``log p_m(u) = -E(u) + c``).
    log_noise : Tensor
        ``[n]``, the noise's (normalised) log-density at the same points.
    nu : float
        The ratio of noise to data (``> 0``).

    Returns
    -------
    Tensor
        ``[n]``.
    """
    if log_model.shape != log_noise.shape:
        raise ValueError(f"log_model and log_noise must have one shape, got {tuple(log_model.shape)} and "
                         f"{tuple(log_noise.shape)}")
    if not nu > 0:
        raise ValueError(f"nu must be > 0, got {nu}")
    return log_model - log_noise - math.log(nu)


def nce_loss(
    log_model_data: Tensor,
    log_noise_data: Tensor,
    log_model_noise: Tensor,
    log_noise_noise: Tensor,
    *,
    nu: float = 1.0,
) -> Tensor:
    """The NCE logistic loss per data point (Gutmann & Hyvärinen, AISTATS 2010; JMLR 2012, eq. 8 negated)::

        J = mean_x softplus(-G(x)) + ν mean_y softplus(G(y)),

    the negative log-likelihood of the data-vs-noise classifier, with ``-log h = softplus(-G)`` and
    ``-log(1 - h) = softplus(G)``: no sigmoid is formed, so the loss and its gradient are finite for any finite
    logits (``|G| = 1e4`` included). In the paper ``m = ν n`` noise points are drawn; here the noise term is a
    mean weighted by ν, so any ``m`` estimates the same objective. Minimised over the model's parameters,
    including its log-normaliser ``c``, it is consistent for both (the normaliser is learned, not computed).

    Parameters
    ----------
    log_model_data, log_noise_data : Tensor
        ``[n]``: ``log p_m(x)`` (with the learnable log-normaliser, the caller's job: ``-E(x) + c``) and
        ``log p_n(x)`` at the data ``x``.
    log_model_noise, log_noise_noise : Tensor
        ``[m]``: the same at the noise samples ``y``.
    nu : float
        The noise-to-data ratio ν (``> 0``), in the logit and as the weight of the noise term.

    Returns
    -------
    Tensor
        ``[]``.
    """
    g_data = nce_logits(log_model_data, log_noise_data, nu)  # [n]
    g_noise = nce_logits(log_model_noise, log_noise_noise, nu)  # [m]
    return F.softplus(-g_data).mean() + nu * F.softplus(g_noise).mean()


def fce_value(
    log_model_data: Tensor,
    log_flow_data: Tensor,
    log_model_flow: Tensor,
    log_flow_flow: Tensor,
) -> Tensor:
    """The value of flow contrastive estimation (Gao, Nijkamp, Kingma, Xu, Dai & Wu, CVPR 2020, eq. 6)::

        V(θ, α) = E_data[log D(x)] + E_flow[log(1 - D(y))],   D(u) = p_θ(u) / (p_θ(u) + q_α(u)),

    ascended by the energy-based model p_θ and descended by the flow q_α. ``log D = -softplus(-G)`` and
    ``log(1 - D) = -softplus(G)`` with ``G = log p_θ - log q_α``, so V is minus :func:`nce_loss` with ν = 1 and the
    flow as the noise: a frozen flow reduces FCE to NCE. When p_θ = q_α, D = 1/2 and V = -2 log 2 exactly.

    Parameters
    ----------
    log_model_data, log_flow_data : Tensor
        ``[n]``: ``log p_θ(x)`` (with its learnable log-normaliser) and ``log q_α(x)`` at the data.
    log_model_flow, log_flow_flow : Tensor
        ``[m]``: the same at samples of the flow (detach them for the energy's step; the flow's step needs the
        gradient through ``log q_α`` only, as in the paper).

    Returns
    -------
    Tensor
        ``[]``.
    """
    return -nce_loss(log_model_data, log_flow_data, log_model_flow, log_flow_flow, nu=1.0)


# ---------------------------------------------------------------------------------------------- Gaussian noise


class GaussianNoise:
    """A Gaussian ``N(mean, L L^T)``, the usual NCE noise (Gutmann & Hyvärinen 2012, sec. 4: a Gaussian with the
    data's mean and covariance), held as plain tensors.

    Parameters
    ----------
    mean : Tensor
        ``[d]``.
    scale_tril : Tensor
        ``[d, d]``, the lower-triangular Cholesky factor ``L`` of the covariance, with a positive diagonal.

    ``GaussianNoise(**noise.state_dict())`` rebuilds it (the state dict is all a checkpoint needs).
    """

    def __init__(self, mean: Tensor, scale_tril: Tensor) -> None:
        self.mean, self.scale_tril = self._checked(mean, scale_tril)

    @staticmethod
    def _checked(mean: Tensor, scale_tril: Tensor) -> tuple[Tensor, Tensor]:
        if mean.ndim != 1 or scale_tril.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"mean must be [d] and scale_tril [d, d], got {tuple(mean.shape)} and "
                             f"{tuple(scale_tril.shape)}")
        if not torch.equal(scale_tril, scale_tril.tril()):
            raise ValueError("scale_tril must be lower triangular")
        if not bool((scale_tril.diagonal() > 0).all()) or not bool(torch.isfinite(mean).all()):
            raise ValueError("scale_tril must have a positive diagonal and mean must be finite")
        return mean, scale_tril

    @classmethod
    def fit(cls, x: Tensor, *, jitter: float = 1e-6) -> GaussianNoise:
        """The Gaussian with the sample mean and the (unbiased, ``n - 1``) sample covariance of ``x [n, d]``.

        Moments and the Cholesky factor are computed in float64 and cast back to ``x``'s dtype. If the covariance
        is not numerically positive definite (fewer points than dimensions, collinear data), ``jitter · trace / d``
        is added to its diagonal before the factorisation; if that still fails, a ValueError is raised.
        """
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"x must be [n, d] with n >= 2, got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x has non-finite entries")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        x64 = x.detach().to(torch.float64)
        mean = x64.mean(0)  # [d]
        xc = x64 - mean  # [n, d]
        cov = xc.mT @ xc / (x.shape[0] - 1)  # [d, d]
        scale_tril, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            d = cov.shape[0]
            ridge = jitter * float(cov.diagonal().sum()) / d
            scale_tril, info = torch.linalg.cholesky_ex(cov + ridge * torch.eye(d, dtype=cov.dtype, device=cov.device))
            if int(info) != 0 or ridge == 0:
                raise ValueError(f"the covariance of x is not positive definite even with {ridge:.3g} added to its "
                                 f"diagonal (jitter={jitter}, trace={float(cov.diagonal().sum()):.3g})")
        return cls(mean.to(x.dtype), scale_tril.to(x.dtype))

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def covariance(self) -> Tensor:
        """``[d, d]``, ``L L^T``."""
        return self.scale_tril @ self.scale_tril.mT

    def log_prob(self, x: Tensor) -> Tensor:
        """The exact log-density at ``x [..., n, d]`` -> ``[..., n]`` in ``x``'s dtype::

            log N(x; m, L L^T) = -|L^{-1} (x - m)|^2 / 2 - sum_i log L_ii - (d / 2) log 2π,

        with ``L^{-1} (x - m)`` by a triangular solve (no inverse is formed)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be [..., {self.dim}], got {tuple(x.shape)}")
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        scale_tril = self.scale_tril.to(device=x.device, dtype=x.dtype)
        # z L^T = x - m, i.e. z_i = L^{-1} (x_i - m) for every row
        z = torch.linalg.solve_triangular(scale_tril.mT, x - mean, upper=True, left=False)  # [..., n, d]
        half_log_det = scale_tril.diagonal().log().sum()
        return -0.5 * (z * z).sum(-1) - half_log_det - 0.5 * self.dim * math.log(2 * math.pi)

    def sample(self, n: int, *, generator: torch.Generator | None) -> Tensor:
        """``n`` draws ``mean + z L^T`` -> ``[n, d]`` (``z [n, d]`` standard normal), in the dtype and on the device
        of the parameters. ``generator`` is required (pass one; ``None`` explicitly falls back to the global RNG)."""
        z = randn((n, self.dim), like=self.mean, generator=generator)  # [n, d]
        return self.mean + z @ self.scale_tril.mT

    def state_dict(self) -> dict[str, Tensor]:
        """``{"mean": [d], "scale_tril": [d, d]}`` (plain tensors, loadable with ``weights_only=True``)."""
        return {"mean": self.mean, "scale_tril": self.scale_tril}

    def load_state_dict(self, state: dict[str, Tensor]) -> GaussianNoise:
        """Replace the parameters by those of ``state`` (same keys and shapes as :meth:`state_dict`); returns self."""
        if set(state) != {"mean", "scale_tril"}:
            raise ValueError(f"state must have the keys 'mean' and 'scale_tril', got {sorted(state)}")
        if state["mean"].shape != self.mean.shape:
            raise ValueError(f"state is for dimension {tuple(state['mean'].shape)}, "
                             f"this noise is {self.dim}-dimensional")
        self.mean, self.scale_tril = self._checked(state["mean"], state["scale_tril"])
        return self

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GaussianNoise:
        """Move (and cast) the parameters in place, as ``nn.Module.to`` does; returns self."""
        self.mean = self.mean.to(device=device, dtype=dtype)
        self.scale_tril = self.scale_tril.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        return f"GaussianNoise(dim={self.dim}, dtype={self.mean.dtype}, device={self.mean.device})"


# ---------------------------------------------------------------------------------------------- evaluation


def _energies(energy_fn: EnergyFn, x: Tensor) -> Tensor:
    """``energy_fn(x)`` for ``x [k, d]`` as ``[k]`` (an energy network's ``[k, 1]`` is accepted)."""
    e = energy_fn(x)
    if e.shape not in ((x.shape[0],), (x.shape[0], 1)):
        raise ValueError(f"energy_fn must map [k, d] to [k] (or [k, 1]), got {tuple(x.shape)} -> {tuple(e.shape)}")
    return e.reshape(x.shape[0])


def grid_log_normaliser(
    energy_fn: EnergyFn,
    lo: Sequence[float],
    hi: Sequence[float],
    *,
    n: int = 400,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> float:
    """``log ∫_box exp(-E(x)) dx`` for a 2-D energy, by the midpoint rule on an ``n x n`` grid::

        log Z ≈ logsumexp_ij(-E(c_ij)) + log(h_0 h_1),   c_ij = (lo_0 + (i + 1/2) h_0, lo_1 + (j + 1/2) h_1),

    with ``h_k = (hi_k - lo_k) / n``. The box must hold essentially all of the mass (:func:`grid_box` around
    held-out data); the rule's error is then the truncation plus O(h²) (far smaller for smooth, decaying
    integrands).

    Parameters
    ----------
    energy_fn : callable
        ``[k, 2] -> [k]`` (or ``[k, 1]``); called under ``torch.no_grad()`` on chunks of 65,536 points.
    lo, hi : sequence of 2 floats
        The box ``[lo_0, hi_0] x [lo_1, hi_1]``.
    n : int
        Grid points per axis.
    dtype, device :
        Of the points passed to ``energy_fn`` (a float32 network on a GPU wants ``torch.float32`` and its device);
        the log-sum-exp is taken in float64 whatever they are.

    Returns
    -------
    float
        The log-normaliser. A ValueError is raised if any energy on the grid is non-finite.
    """
    lo_t, hi_t = [float(v) for v in lo], [float(v) for v in hi]
    if len(lo_t) != 2 or len(hi_t) != 2:
        raise ValueError(f"lo and hi must each have 2 entries (a 2-D box), got {lo!r} and {hi!r}")
    if not all(math.isfinite(a) and math.isfinite(b) and b > a for a, b in zip(lo_t, hi_t)):
        raise ValueError(f"the box must be finite with hi > lo on both axes, got lo={lo_t}, hi={hi_t}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    h = [(b - a) / n for a, b in zip(lo_t, hi_t)]
    axes = [a + (torch.arange(n, dtype=torch.float64) + 0.5) * hk for a, hk in zip(lo_t, h)]  # 2 x [n]
    grid = torch.cartesian_prod(*axes).to(device=device, dtype=dtype)  # [n * n, 2]
    with torch.no_grad():
        neg_e = torch.cat([-_energies(energy_fn, chunk).to(torch.float64)
                           for chunk in grid.split(_GRID_CHUNK)])  # [n * n]
    bad = ~torch.isfinite(neg_e)
    if bool(bad.any()):
        first = grid[bad.nonzero()[0, 0]].tolist()
        raise ValueError(f"energy_fn is non-finite at {int(bad.sum())} of {n * n} grid points (first at {first}); "
                         "the grid log-normaliser is undefined")
    return float(torch.logsumexp(neg_e, dim=0)) + math.log(h[0] * h[1])


def grid_box(points: Tensor, *, pad: float = 0.25) -> tuple[tuple[float, float], tuple[float, float]]:
    """The bounding box of ``points [n, 2]`` padded by ``pad`` times its width on every side:
    ``lo = min - pad (max - min)``, ``hi = max + pad (max - min)`` per axis, as ``(lo, hi)`` tuples of floats
    (for :func:`grid_log_normaliser` on held-out data)."""
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 1:
        raise ValueError(f"points must be [n, 2] with n >= 1, got {tuple(points.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError("points has non-finite entries")
    p = points.detach().to(torch.float64)
    p_min, p_max = p.min(0).values, p.max(0).values  # [2], [2]
    width = p_max - p_min
    if not bool((width > 0).all()):
        raise ValueError(f"the points have zero width on an axis (widths {width.tolist()}); the box is degenerate")
    lo, hi = (p_min - pad * width).tolist(), (p_max + pad * width).tolist()
    return (lo[0], lo[1]), (hi[0], hi[1])


def log_density(energy_fn: EnergyFn, x: Tensor, log_normaliser: float | Tensor) -> Tensor:
    """The normalised log-density ``log p(x) = -E(x) - log Z`` at ``x [n, d]`` -> ``[n]``, float64 (``log Z`` e.g.
    from :func:`grid_log_normaliser`). No ``no_grad`` is imposed: the caller decides."""
    return -_energies(energy_fn, x).to(torch.float64) - log_normaliser
