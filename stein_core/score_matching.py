"""Score-matching objectives.

Shapes: the multi-scale :func:`get_dsm_loss_fn` takes data ``[n, *event]`` (e.g.
``[n, d]``; any event rank works, nothing is hard-coded for images), noise levels
``[L]`` and per-sample noise levels ``[n]``. The single-model objectives of
:func:`get_score_matching_loss_fn` (exact, denoising at one ``sigma``, sliced) take
``[..., n, d]``: flatten images to ``[n, d]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._random import randint, randn
from .distributions import score_from_log_prob

__all__ = [
    "geometric_sigmas",
    "get_dsm_loss_fn",
    "get_score_matching_loss_fn",
    "score_from_energy",
]

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


def _check_levels(levels: Tensor, n: int, n_levels: int) -> Tensor:
    """Validate caller-supplied level indices: an ``[n]`` integer tensor with values in ``[0, n_levels)``."""
    integer = isinstance(levels, Tensor) and not (
        levels.dtype.is_floating_point or levels.dtype.is_complex or levels.dtype == torch.bool
    )
    if not integer:
        raise ValueError(f"levels must be an integer tensor, got {getattr(levels, 'dtype', type(levels))}")
    if tuple(levels.shape) != (n,):
        raise ValueError(f"levels must have shape [n={n}], got {tuple(levels.shape)}")
    if n and bool(((levels < 0) | (levels >= n_levels)).any()):
        raise ValueError(
            f"levels must index sigmas, in [0, {n_levels}); got values in "
            f"[{int(levels.min())}, {int(levels.max())}]"
        )
    return levels.long()


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
        ``loss_fn(score_fn, x, generator=None, *, levels=None, noise=None) -> 0-dim tensor``,
        where ``score_fn(x_tilde [n, *event], sigma [n]) -> [n, *event]`` and ``x`` is
        ``[n, *event]``. Levels are drawn first, then the noise, both from ``generator``;
        dtype and device follow ``x``. ``levels`` (``[n]`` integer indices into ``sigmas``)
        and ``noise`` (``[n, *event]``, the ``z`` above) replace the corresponding draw
        when given (a given one draws nothing), so that a data-parallel caller can draw
        the randomness of the global batch once and hand each worker its rows: with
        ``reduce="mean"`` the mean of equal-sized shards' losses is the global loss.
        ``noise`` is cast to the dtype and device of ``x``.

    Raises:
        ValueError: on invalid options, or (from ``loss_fn``) when ``levels`` is not
            an ``[n]`` integer tensor with values in ``[0, L)`` or ``noise`` does not
            have the shape of ``x``.
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
        score_fn: ScoreFn,
        x: Tensor,
        generator: torch.Generator | None = None,
        *,
        levels: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        n = x.shape[0]
        if levels is None:
            idx = randint(n_levels, (n,), device=x.device, generator=generator)  # [n]
        else:
            idx = _check_levels(levels, n, n_levels).to(x.device)  # [n]
        sigma = sig.to(dtype=x.dtype, device=x.device)[idx]  # [n]
        sigma_b = sigma.reshape((n,) + (1,) * (x.ndim - 1))  # [n, 1, ...]
        if noise is None:
            z = randn(x.shape, like=x, generator=generator)  # [n, *event]
        else:
            if tuple(noise.shape) != tuple(x.shape):
                raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
            z = noise.to(dtype=x.dtype, device=x.device)  # [n, *event]
        x_tilde = x + sigma_b * z
        s = score_fn(x_tilde, sigma)  # [n, *event]
        if weighting == "sigma2":
            resid = sigma_b * s + z  # sigma (s - target)
        else:
            resid = s + z / sigma_b
        per_sample = 0.5 * resid.pow(2).reshape(n, -1).sum(-1)  # [n]
        return per_sample.mean() if reduce == "mean" else per_sample.sum()

    return loss_fn


# --------------------------------------------------------------------------
# Single-point objectives (exact, single-sigma denoising, sliced) for [..., n, d].
# --------------------------------------------------------------------------

PointScoreFn = Callable[[Tensor], Tensor]

_METHODS = ("exact", "dsm", "ssm", "ssm_vr")
_PROJECTIONS = ("gaussian", "rademacher")
_LOSS_REDUCTIONS = ("mean", "sum", "none")


def score_from_energy(
    energy_fn: Callable[..., Tensor], *, create_graph: bool = True
) -> Callable[..., Tensor]:
    """Score of an energy-based model, ``x -> -grad_x E(x)``, by autograd.

    Lets every objective of :func:`get_score_matching_loss_fn` train an energy
    network ``E_theta`` (density ``exp(-E_theta) / Z``, ``Z`` never needed):
    Song, Garg, Shi & Ermon, "Sliced Score Matching: A Scalable Approach to
    Density and Score Estimation", UAI 2019, Sec. 2-3 (score matching needs
    only ``grad_x log p = -grad_x E``); Saremi et al., "Deep Energy Estimator
    Networks", 2018 (denoising score matching of an energy).

    This is :func:`stein_core.distributions.score_from_log_prob` applied to
    ``-E``.

    Args:
        energy_fn: ``x [..., n, d] (, *args, **kwargs) -> [..., n]`` (a trailing
            size-1 dim is fine); each output entry must depend only on its own
            point, since the gradient of the sum is taken.
        create_graph: keep the graph of ``grad_x E``. Must be ``True`` for
            training (so the loss reaches the energy's parameters) and for the
            ``"exact"``, ``"ssm"`` and ``"ssm_vr"`` objectives, which
            differentiate the score once more wrt ``x``. ``False`` gives a
            detached score, e.g. for a Langevin sampler.

    Returns:
        ``score_fn(x, *args, **kwargs) -> [..., n, d]`` with the dtype and device
        of ``x``; ``x`` is never modified.
    """

    def neg_energy(x: Tensor, *args, **kwargs) -> Tensor:
        return -energy_fn(x, *args, **kwargs)

    return score_from_log_prob(neg_energy, create_graph=create_graph)


def _grad_x(out: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    """``grad_x out.sum()`` ``[..., n, d]``; zeros where ``out`` does not depend on ``x``."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(
        out.sum(), x, create_graph=create_graph, retain_graph=True, materialize_grads=True
    )
    return g


def _score(score_fn: PointScoreFn, x: Tensor) -> Tensor:
    s = score_fn(x)
    if s.shape != x.shape:
        raise ValueError(f"score_fn must return the shape of x {tuple(x.shape)}, got {tuple(s.shape)}")
    return s


def _exact_per_sample(score_fn: PointScoreFn, x: Tensor, create_graph: bool) -> Tensor:
    # 1/2 ||s||^2 + tr grad_x s, the trace one coordinate (one backward pass) at a time.
    s = _score(score_fn, x)  # [..., n, d]
    trace = torch.zeros_like(s[..., 0])  # [..., n]
    for i in range(x.shape[-1]):
        trace = trace + _grad_x(s[..., i], x, create_graph)[..., i]
    return 0.5 * s.pow(2).sum(-1) + trace


def _projections(
    kind: str, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None
) -> Tensor:
    if kind == "gaussian":
        return randn(shape, like=like, generator=generator)
    signs = randint(2, shape, device=like.device, generator=generator)
    return (2 * signs - 1).to(like.dtype)


def _sliced_per_sample(
    score_fn: PointScoreFn,
    x: Tensor,
    v: Tensor,
    variance_reduced: bool,
    create_graph: bool,
) -> Tensor:
    # v [M, ..., n, d]; per projection one backward of sum_i v_i^T s(x_i), whose
    # gradient at x_i is J(x_i)^T v_i, dotted with v_i: v^T J v. Mean over the M projections.
    s = _score(score_fn, x)  # [..., n, d]
    total = torch.zeros_like(s[..., 0])  # [..., n]
    for vk in v:
        sv = (s * vk).sum(-1)  # [..., n]
        total = total + (_grad_x(sv, x, create_graph) * vk).sum(-1)
        if not variance_reduced:
            total = total + 0.5 * sv.pow(2)
    total = total / v.shape[0]
    if variance_reduced:
        total = total + 0.5 * s.pow(2).sum(-1)
    return total


def get_score_matching_loss_fn(
    method: str,
    *,
    sigma: float | None = None,
    n_projections: int = 1,
    projection: str = "gaussian",
    reduce: str = "mean",
) -> Callable[..., Tensor]:
    """Score-matching objective for a score model ``s(x)`` of data ``x [..., n, d]``.

    Every ``method`` is, in expectation, the Fisher divergence
    ``1/2 E ||s(x) - grad log p(x)||^2`` up to a constant independent of ``s``
    (for ``"dsm"``: of the noise-perturbed density ``p_sigma = p * N(0, sigma^2 I)``).
    Per data point:

    * ``"exact"`` -- Hyvarinen, "Estimation of Non-Normalized Statistical Models
      by Score Matching", JMLR 2005, Theorem 1:
      ``1/2 ||s(x)||^2 + tr grad_x s(x)``. The trace takes ``d`` backward passes
      (one per coordinate): the reference for low ``d``.
    * ``"dsm"`` -- Vincent, "A Connection Between Score Matching and Denoising
      Autoencoders", Neural Computation 2011, Sec. 4 (one noise level, no
      weighting): ``x_tilde = x + sigma z``, ``z ~ N(0, I)``,
      ``1/2 ||s(x_tilde) + z / sigma||^2``. ``score_fn`` is evaluated at
      ``x_tilde``, and its minimiser is the score of ``p_sigma``, not of ``p``.
      For a noise-conditional network over many levels use :func:`get_dsm_loss_fn`.
    * ``"ssm"`` -- Song, Garg, Shi & Ermon, "Sliced Score Matching: A Scalable
      Approach to Density and Score Estimation", UAI 2019, Sec. 3:
      ``mean_k [v_k^T grad_x(v_k^T s(x)) + 1/2 (v_k^T s(x))^2]`` over
      ``n_projections`` directions ``v_k`` per point.
    * ``"ssm_vr"`` -- the same paper's variance-reduced SSM-VR:
      ``mean_k [v_k^T grad_x(v_k^T s(x))] + 1/2 ||s(x)||^2``, unbiased because
      ``E[v v^T] = I`` for both projection kinds.

    The sliced methods cost one forward pass and one Hessian-vector-style backward
    per projection (``v^T s`` summed over the batch, differentiated wrt ``x``,
    dotted with ``v``), independent of ``d``; ``"exact"`` costs ``d`` backwards.

    Args:
        method: ``"exact"``, ``"dsm"``, ``"ssm"`` or ``"ssm_vr"``.
        sigma: noise standard deviation, required for (and only for) ``"dsm"``.
        n_projections: directions per data point (``"ssm"``, ``"ssm_vr"``).
        projection: ``"gaussian"`` (``v ~ N(0, I)``) or ``"rademacher"``
            (independent ``+-1`` entries); used by ``"ssm"``, ``"ssm_vr"``.
        reduce: ``"mean"`` or ``"sum"`` over all points, or ``"none"`` for the
            per-point values ``[..., n]`` (e.g. for standard errors).

    Returns:
        ``loss_fn(score_fn, x, generator=None) -> 0-dim tensor`` (``[..., n]`` for
        ``reduce="none"``), where ``x`` is ``[..., n, d]`` (flatten images to
        ``[n, d]`` and wrap the network to reshape inside ``score_fn``) and
        ``score_fn(x [..., n, d]) -> [..., n, d]``; each output row must depend only
        on its own input row (no batch norm), since ``x``-derivatives are taken of
        batch sums. Noise and projections are drawn from ``generator`` (``"exact"``
        draws nothing); dtype and device follow ``x``. ``x`` is never modified; if
        it requires grad it is used as is, so the loss stays differentiable wrt it.
        Under ``torch.no_grad()`` the ``x``-derivatives are still taken (grad is
        re-enabled locally) and a detached loss is returned. Wrap an energy
        network with :func:`score_from_energy`.

    Raises:
        ValueError: on an unknown option, a missing or non-positive ``sigma`` for
            ``"dsm"``, a ``sigma`` for another method, or ``n_projections < 1``.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "dsm":
        if sigma is None:
            raise ValueError('method "dsm" needs sigma')
        sigma = float(sigma)
        if not (sigma > 0.0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be positive and finite, got {sigma}")
    elif sigma is not None:
        raise ValueError(f"sigma applies only to method 'dsm', not {method!r}")
    if isinstance(n_projections, bool) or int(n_projections) != n_projections or n_projections < 1:
        raise ValueError(f"n_projections must be an integer >= 1, got {n_projections}")
    n_projections = int(n_projections)
    if projection not in _PROJECTIONS:
        raise ValueError(f"projection must be one of {_PROJECTIONS}, got {projection!r}")
    if reduce not in _LOSS_REDUCTIONS:
        raise ValueError(f"reduce must be one of {_LOSS_REDUCTIONS}, got {reduce!r}")

    def per_sample(score_fn: PointScoreFn, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if method == "dsm":
            z = randn(x.shape, like=x, generator=generator)  # [..., n, d]
            s = _score(score_fn, x + sigma * z)  # at x_tilde
            return 0.5 * (s + z / sigma).pow(2).sum(-1)  # [..., n]
        create_graph = torch.is_grad_enabled()
        if method != "exact":
            v = _projections(projection, (n_projections,) + tuple(x.shape), x, generator)  # [M, ..., n, d]
        with torch.enable_grad():
            xr = x if x.requires_grad else x.detach().requires_grad_(True)
            if method == "exact":
                out = _exact_per_sample(score_fn, xr, create_graph)
            else:
                out = _sliced_per_sample(score_fn, xr, v, method == "ssm_vr", create_graph)
        return out if create_graph else out.detach()

    def loss_fn(
        score_fn: PointScoreFn, x: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        if x.ndim < 2:
            raise ValueError(f"x must be [..., n, d], got shape {tuple(x.shape)}")
        per = per_sample(score_fn, x, generator)  # [..., n]
        if reduce == "mean":
            return per.mean()
        return per.sum() if reduce == "sum" else per

    return loss_fn
