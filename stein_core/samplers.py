"""MCMC and Langevin samplers driven by a score or a (unnormalised) log-density.

Every sampler is a factory returning a :class:`Sampler` ``(init_fn, step_fn)``
pair around a target function, in the manner of jax-md's ``nvt_langevin`` and
numpyro's ``hmc``: ``init_fn(x0, *, generator=None) -> state`` and
``step_fn(state, *, generator=None) -> state``, where the state is a NamedTuple
whose first field is ``position``. A step sees a score/log-density function,
never a model. :func:`run_chain` is the generic loop (burn-in, thinning,
acceptance statistics, progress callback).

- :func:`ula` (score): unadjusted Langevin, Roberts & Tweedie 1996;
- :func:`mala` (log-density, optional score): Metropolis-adjusted Langevin, Roberts & Tweedie 1996;
- :func:`rwmh` (log-density): random-walk Metropolis-Hastings, Metropolis et al. 1953, Hastings 1970;
- :func:`underdamped_langevin` (score): kinetic Langevin, BAOAB splitting, Leimkuhler & Matthews 2013;
- :func:`hmc` (log-density, optional score): leapfrog + MH, Neal 2011;
- :func:`svgd` (score): Stein variational gradient descent, Liu & Wang 2016 (interacting
  particles, deterministic; positions ``[..., n, d]``, ``n`` particles of one set).

Shapes: positions are ``[*chains, *event]``, e.g. ``[n, d]`` or ``[..., n, d]``:
every leading entry is an independent chain. A log-density maps
``[*chains, *event] -> [*chains]`` and a score ``[*chains, *event] ->
[*chains, *event]``; the number of event dims is read off the log-density's
output (``x.ndim - log_prob.ndim``), so ``[n, d]`` positions with a ``[n]``
log-density are ``n`` chains in ``R^d``. Step sizes (and ``friction``, ``scale``)
are floats or tensors broadcastable to the positions (e.g. ``[n, 1]`` for one
step size per chain). Device and dtype follow ``x0``; all noise comes from the
explicit ``generator`` (see :mod:`stein_core._random`). States are detached: a
score may use autograd internally, no ``no_grad`` context is imposed on it.

One implementation of the unadjusted Langevin update (``_ula_update``) serves
:func:`langevin_step`, :func:`ula`, the MALA proposal and :func:`annealed_langevin`.
:func:`tempered` turns a log-density or score into that of ``p^beta``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._random import rand, randn
from .distributions import score_from_log_prob
from .kernels import RBF, gram_and_grad_x_sum, median_heuristic

__all__ = [
    "ChainResult",
    "MHState",
    "SVGDState",
    "Sampler",
    "ULAState",
    "UnderdampedState",
    "annealed_langevin",
    "by_name",
    "hmc",
    "langevin_step",
    "mala",
    "run_chain",
    "rwmh",
    "svgd",
    "svgd_direction",
    "svgd_median_kernel",
    "tempered",
    "ula",
    "underdamped_langevin",
]

LogProbFn = Callable[[Tensor], Tensor]
ScoreFn = Callable[[Tensor], Tensor]


# -- states ----------------------------------------------------------------
class Sampler(NamedTuple):
    """``init_fn(x0, *, generator=None) -> state``, ``step_fn(state, *, generator=None) -> state``."""

    init_fn: Callable[..., Any]
    step_fn: Callable[..., Any]


class ULAState(NamedTuple):
    position: Tensor  # [*chains, *event]
    score: Tensor  # [*chains, *event], score at position


class UnderdampedState(NamedTuple):
    position: Tensor  # [*chains, *event]
    momentum: Tensor  # [*chains, *event] (unit mass)
    score: Tensor  # [*chains, *event], score at position


class MHState(NamedTuple):
    """State of the Metropolis-Hastings samplers (MALA, RWMH, HMC)."""

    position: Tensor  # [*chains, *event]
    log_prob: Tensor  # [*chains], log-density at position
    score: Tensor | None  # [*chains, *event] (MALA, HMC); None for RWMH
    accept_prob: Tensor  # [*chains], min(1, MH ratio) of the last step (0 before the first)
    n_accepted: Tensor  # [*chains] int64, accepted proposals since init
    n_steps: int  # steps since init


class SVGDState(NamedTuple):
    """State of :func:`svgd`: one set of interacting particles per leading batch entry."""

    position: Tensor  # [..., n, d], the particles
    score: Tensor  # [..., n, d], score at position
    grad_sq: Tensor | None  # [..., n, d], AdaGrad's running mean of phi^2 (adaptive only, else None)
    n_steps: int  # steps since init


class ChainResult(NamedTuple):
    samples: Tensor  # [n_steps // thin, *chains, *event]
    state: Any  # final state: pass it back to run_chain as x0 to continue the chain
    accept_rate: Tensor | None  # [*chains] accepted fraction after burn-in (MH samplers), else None
    mean_accept_rate: float | None  # accept_rate averaged over chains


# -- shared pieces -----------------------------------------------------------
def _check_positive(value: float | Tensor, name: str) -> None:
    if not bool((torch.as_tensor(value) > 0).all()):
        raise ValueError(f"{name} must be > 0")


def _sum_event(t: Tensor, n_batch: int) -> Tensor:
    """Sum ``[*chains, *event] -> [*chains]`` (``n_batch = len(chains)``)."""
    if t.ndim == n_batch:
        return t
    flat = t.flatten(n_batch)  # [*chains, prod(event)]
    # A GEMV with ones: torch's sum over a short last dim is ~10x slower at d = 2.
    return flat @ torch.ones(flat.shape[-1], dtype=t.dtype, device=t.device)


def _uniform(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``U[0, 1)`` draws of ``shape``, made like :func:`stein_core._random.randn`."""
    return rand(shape, like=like, generator=generator)


def _log_prob_and_score(
    log_prob_fn: LogProbFn, score_fn: ScoreFn | None
) -> tuple[Callable[[Tensor], tuple[Tensor, Tensor]], ScoreFn]:
    """``(x -> (log p(x), s(x)), s)``, the score by autograd when ``score_fn`` is None."""
    score = score_fn if score_fn is not None else score_from_log_prob(log_prob_fn)

    def value_and_score(x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            lp = log_prob_fn(x)
        return lp.detach(), score(x).detach()

    return value_and_score, score


def _init_log_prob(log_prob_fn: LogProbFn, x: Tensor) -> Tensor:
    with torch.no_grad():
        lp = log_prob_fn(x).detach()
    if lp.shape != x.shape[: lp.ndim]:
        raise ValueError(
            f"log_prob_fn must map [*chains, *event] -> [*chains]; got {tuple(x.shape)} -> {tuple(lp.shape)}"
        )
    return lp


def _mh_accept(
    state: MHState,
    proposal: Tensor,
    lp_prop: Tensor,
    score_prop: Tensor | None,
    log_ratio: Tensor,
    generator: torch.Generator | None,
) -> MHState:
    """Accept ``proposal`` per chain with probability ``min(1, exp(log_ratio))`` (NaN rejects)."""
    x = state.position
    accept_prob = torch.nan_to_num(log_ratio, nan=-math.inf).clamp(max=0.0).exp()  # [*chains]
    accept = _uniform(log_ratio.shape, x, generator) < accept_prob  # never for a NaN ratio
    mask = accept.reshape(accept.shape + (1,) * (x.ndim - accept.ndim))  # [*chains, 1...]
    new_score = None if score_prop is None else torch.where(mask, score_prop, state.score)
    return MHState(
        position=torch.where(mask, proposal, x),
        log_prob=torch.where(accept, lp_prop, state.log_prob),
        score=new_score,
        accept_prob=accept_prob,
        n_accepted=state.n_accepted + accept.long(),
        n_steps=state.n_steps + 1,
    )


def _mh_init(position: Tensor, log_prob: Tensor, score: Tensor | None) -> MHState:
    return MHState(
        position=position,
        log_prob=log_prob,
        score=score,
        accept_prob=torch.zeros_like(log_prob),
        n_accepted=torch.zeros(log_prob.shape, dtype=torch.long, device=position.device),
        n_steps=0,
    )



def _mh_init_fn(log_prob_fn: LogProbFn, value_and_score: Callable):
    """The ``init_fn`` of a Metropolis-Hastings sampler that carries the score (MALA, HMC)."""

    def init_fn(x0: Tensor, *, generator: torch.Generator | None = None) -> MHState:
        x = x0.detach()
        lp = _init_log_prob(log_prob_fn, x)
        _, s = value_and_score(x)
        return _mh_init(x, lp, s)

    return init_fn

def tempered(fn: Callable[..., Tensor], beta: float) -> Callable[..., Tensor]:
    """``x -> beta * fn(x, ...)``: the log-density or score of the tempered target ``p^beta``.

    ``log p^beta = beta log p`` up to a constant and ``grad log p^beta = beta s``,
    so the same wrapper serves log-densities and scores; temper both when a
    sampler takes both (e.g. ``mala(tempered(log_p, b), ..., score_fn=tempered(s, b))``).

    Args:
        fn: log-density ``[*chains, *event] -> [*chains]`` or score ``-> [*chains, *event]``;
            extra arguments are passed through.
        beta: inverse temperature in ``(0, 1]``.
    """
    beta = float(beta)
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")

    def tempered_fn(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return beta * fn(x, *args, **kwargs)

    return tempered_fn


# -- unadjusted Langevin -----------------------------------------------------
def _ula_update(x: Tensor, score: Tensor, a: Tensor, z: Tensor) -> Tensor:
    return x + a * score + torch.sqrt(2.0 * a) * z


def langevin_step(
    score_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    step_size: float | Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One unadjusted Langevin (ULA) step ``x + a s(x) + sqrt(2a) z``, ``z ~ N(0, I)``.

    Roberts & Tweedie, "Exponential convergence of Langevin distributions and
    their discrete approximations", Bernoulli 1996.

    Args:
        score_fn: ``x [n, *event] -> [n, *event]``.
        x: current state ``[n, *event]`` (not modified).
        step_size: ``a > 0``, a float or a tensor broadcastable to ``x``.
        generator: RNG for the noise.

    Returns:
        New state, same shape/dtype/device as ``x``. The result is not
        detached (a caller looping many steps should detach between steps).
    """
    a = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
    z = randn(x.shape, like=x, generator=generator)
    return _ula_update(x, score_fn(x), a, z)


def ula(score_fn: ScoreFn, step_size: float | Tensor) -> Sampler:
    """Unadjusted Langevin algorithm: :func:`langevin_step` as an ``(init_fn, step_fn)`` pair.

    Roberts & Tweedie, Bernoulli 1996. No MH correction, so the chain has an
    ``O(step_size)`` bias: on ``N(mu, Sigma)`` with precision ``P`` it is
    stationary at ``N(mu, (P (I - a P / 2))^{-1})``. The state caches the score
    at the position: one score evaluation per step.

    Args:
        score_fn: ``[*chains, *event] -> [*chains, *event]``.
        step_size: ``a > 0``, float or tensor broadcastable to the positions.
    """
    _check_positive(step_size, "step_size")

    def init_fn(x0: Tensor, *, generator: torch.Generator | None = None) -> ULAState:
        x = x0.detach()
        return ULAState(x, score_fn(x).detach())

    def step_fn(state: ULAState, *, generator: torch.Generator | None = None) -> ULAState:
        x = langevin_step(lambda _x: state.score, state.position, step_size, generator=generator)
        x = x.detach()
        return ULAState(x, score_fn(x).detach())

    return Sampler(init_fn, step_fn)


# -- Metropolis-Hastings samplers ------------------------------------------
def mala(
    log_prob_fn: LogProbFn,
    step_size: float | Tensor,
    *,
    score_fn: ScoreFn | None = None,
) -> Sampler:
    """Metropolis-adjusted Langevin algorithm (Roberts & Tweedie, Bernoulli 1996).

    Proposal ``y = x + a s(x) + sqrt(2a) z`` (a :func:`langevin_step`), accepted with
    probability ``min(1, p(y) q(x|y) / (p(x) q(y|x)))`` where
    ``log q(y|x) = -|y - x - a s(x)|^2 / (4a) + const``. The chain is exactly
    invariant for ``p`` at any step size; a large step only lowers the acceptance.

    Args:
        log_prob_fn: unnormalised ``log p``, ``[*chains, *event] -> [*chains]``.
        step_size: ``a > 0``, float or tensor broadcastable to the positions.
        score_fn: ``grad log p`` in closed form; default: autograd of ``log_prob_fn``
            (:func:`stein_core.distributions.score_from_log_prob`).

    One log-density and one score evaluation per step (with the autograd score,
    :func:`~stein_core.distributions.score_from_log_prob` evaluates ``log_prob_fn``
    once more inside its backward pass).
    """
    _check_positive(step_size, "step_size")
    value_and_score, _ = _log_prob_and_score(log_prob_fn, score_fn)

    init_fn = _mh_init_fn(log_prob_fn, value_and_score)

    def step_fn(state: MHState, *, generator: torch.Generator | None = None) -> MHState:
        x, s = state.position, state.score
        n_batch = state.log_prob.ndim
        a = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
        z = randn(x.shape, like=x, generator=generator)
        y = _ula_update(x, s, a, z)  # the ULA proposal
        lp_y, s_y = value_and_score(y)
        # log q(y|x) = -|sqrt(2a) z|^2 / (4a) = -|z|^2 / 2; log q(x|y) = -|x - y - a s(y)|^2 / (4a).
        back = x - y - a * s_y
        log_q_ratio = _sum_event(0.5 * z * z - back * back / (4.0 * a), n_batch)
        log_ratio = lp_y - state.log_prob + log_q_ratio
        return _mh_accept(state, y, lp_y, s_y, log_ratio, generator)

    return Sampler(init_fn, step_fn)


def rwmh(log_prob_fn: LogProbFn, scale: float | Tensor) -> Sampler:
    """Random-walk Metropolis-Hastings with a Gaussian proposal ``y = x + scale z``.

    Metropolis et al., J. Chem. Phys. 1953; Hastings, Biometrika 1970. The proposal
    is symmetric, so the acceptance probability is ``min(1, p(y) / p(x))``; only an
    unnormalised log-density is needed (one evaluation per step).

    Args:
        log_prob_fn: unnormalised ``log p``, ``[*chains, *event] -> [*chains]``.
        scale: proposal standard deviation (float or tensor broadcastable to the positions).
    """
    _check_positive(scale, "scale")

    def init_fn(x0: Tensor, *, generator: torch.Generator | None = None) -> MHState:
        x = x0.detach()
        return _mh_init(x, _init_log_prob(log_prob_fn, x), None)

    def step_fn(state: MHState, *, generator: torch.Generator | None = None) -> MHState:
        x = state.position
        sc = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
        y = x + sc * randn(x.shape, like=x, generator=generator)
        with torch.no_grad():
            lp_y = log_prob_fn(y).detach()
        return _mh_accept(state, y, lp_y, None, lp_y - state.log_prob, generator)

    return Sampler(init_fn, step_fn)


def hmc(
    log_prob_fn: LogProbFn,
    step_size: float | Tensor,
    n_leapfrog: int,
    *,
    score_fn: ScoreFn | None = None,
) -> Sampler:
    """Hamiltonian Monte Carlo with a leapfrog integrator and unit mass (Neal 2011).

    Neal, "MCMC using Hamiltonian dynamics", Handbook of MCMC, 2011, Sec. 5.3.
    Each step draws ``p ~ N(0, I)``, runs ``n_leapfrog`` leapfrog steps of size
    ``eps`` on ``H(x, p) = -log p(x) + |p|^2 / 2`` and accepts the end point with
    probability ``min(1, exp(H(x, p) - H(x', p')))``.

    Args:
        log_prob_fn: unnormalised ``log p``, ``[*chains, *event] -> [*chains]``.
        step_size: leapfrog ``eps > 0``, float or tensor broadcastable to the positions.
        n_leapfrog: leapfrog steps per proposal (``L >= 1``).
        score_fn: ``grad log p`` in closed form; default autograd of ``log_prob_fn``.

    Cost per step: ``n_leapfrog`` score evaluations and one log-density evaluation.
    """
    _check_positive(step_size, "step_size")
    if int(n_leapfrog) < 1:
        raise ValueError(f"n_leapfrog must be >= 1, got {n_leapfrog}")
    n_leapfrog = int(n_leapfrog)
    value_and_score, score = _log_prob_and_score(log_prob_fn, score_fn)

    init_fn = _mh_init_fn(log_prob_fn, value_and_score)

    def step_fn(state: MHState, *, generator: torch.Generator | None = None) -> MHState:
        x, n_batch = state.position, state.log_prob.ndim
        eps = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
        p0 = randn(x.shape, like=x, generator=generator)
        y, p = x, p0 + 0.5 * eps * state.score  # half step in momentum
        for i in range(n_leapfrog):
            y = y + eps * p  # full step in position
            if i < n_leapfrog - 1:
                p = p + eps * score(y).detach()  # full step in momentum
        lp_y, s_y = value_and_score(y)
        p = p + 0.5 * eps * s_y  # final half step in momentum
        # H(x, p0) - H(y, p) with H = -log p + |p|^2 / 2.
        log_ratio = lp_y - state.log_prob + 0.5 * _sum_event(p0 * p0 - p * p, n_batch)
        return _mh_accept(state, y, lp_y, s_y, log_ratio, generator)

    return Sampler(init_fn, step_fn)


# -- underdamped (kinetic) Langevin --------------------------------------------
def underdamped_langevin(
    score_fn: ScoreFn,
    step_size: float | Tensor,
    friction: float | Tensor,
) -> Sampler:
    """Underdamped (kinetic) Langevin dynamics, BAOAB splitting, unit mass and temperature.

    Leimkuhler & Matthews, "Rational construction of stochastic numerical methods
    for molecular sampling", AMRX 2013. Discretises ``dx = p dt``,
    ``dp = s(x) dt - gamma p dt + sqrt(2 gamma) dW`` (invariant law
    ``p(x) N(p; 0, I)``) as B (``p += h/2 s(x)``), A (``x += h/2 p``), O (``p <- c p +
    sqrt(1 - c^2) xi``, ``c = exp(-gamma h)``), A, B. Unadjusted: ``O(h^2)`` bias in
    the position marginal in general, none for a Gaussian target ``N(mu, P^{-1})``
    (stable for ``h^2 < 4 / lambda_max(P)``), where the stationary momentum
    covariance is ``I - h^2 P / 4``. One score evaluation per step.

    Args:
        score_fn: ``[*chains, *event] -> [*chains, *event]``.
        step_size: ``h > 0``, float or tensor broadcastable to the positions.
        friction: ``gamma > 0``, float or tensor broadcastable to the positions.

    ``init_fn(x0, *, generator)`` draws the momentum from ``N(0, I)``.
    """
    _check_positive(step_size, "step_size")
    _check_positive(friction, "friction")

    def init_fn(x0: Tensor, *, generator: torch.Generator | None = None) -> UnderdampedState:
        x = x0.detach()
        return UnderdampedState(x, randn(x.shape, like=x, generator=generator), score_fn(x).detach())

    def step_fn(
        state: UnderdampedState, *, generator: torch.Generator | None = None
    ) -> UnderdampedState:
        x, p, s = state
        h = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
        c = torch.exp(-torch.as_tensor(friction, dtype=x.dtype, device=x.device) * h)
        p = p + 0.5 * h * s  # B
        x = x + 0.5 * h * p  # A
        p = c * p + torch.sqrt(1.0 - c * c) * randn(x.shape, like=x, generator=generator)  # O
        x = x + 0.5 * h * p  # A
        s = score_fn(x).detach()
        p = p + 0.5 * h * s  # B
        return UnderdampedState(x.detach(), p, s)

    return Sampler(init_fn, step_fn)


# -- Stein variational gradient descent ------------------------------------------
def svgd_median_kernel(x: Tensor) -> RBF:
    """Liu & Wang's RBF kernel for SVGD: ``exp(-||x - y||^2 / h)`` with ``h = med^2 / log n``.

    ``med^2`` is the median squared distance between the ``n`` particles (pairs
    ``i < j``, :func:`stein_core.kernels.median_heuristic`, with its fallback when
    most particles coincide). The paper's reason (Liu & Wang 2016, Sec. 5):
    ``sum_j k(x_i, x_j) ~ n exp(-med^2 / h) = 1``, so a particle's own gradient and
    the influence of the others stay balanced.

    Conversion: :class:`~stein_core.kernels.RBF` is ``exp(-r^2 / (2 b^2))``, so
    ``2 b^2 = h = med^2 / log n``, i.e. ``b = sqrt(med^2 / 2) / sqrt(log n) =
    median_heuristic(x) / sqrt(log n)`` (``median_heuristic`` returns
    ``sqrt(med^2 / 2)``). The authors' code uses ``log(n + 1)`` and counts the zero
    diagonal in the median; we follow the paper.

    Args:
        x: particles ``[..., n, d]``; each leading entry gets its own bandwidth.

    Returns:
        :class:`~stein_core.kernels.RBF` with a detached bandwidth ``[...]`` (0-dim
        for ``[n, d]``). With ``n = 1`` the bandwidth is 1: a lone particle's kernel
        terms ``k(x, x) = 1`` and ``grad k(x, x) = 0`` do not depend on it.

    Raises:
        ValueError: if all ``n >= 2`` particles of an entry coincide (no scale; pass
            a fixed ``kernel`` to :func:`svgd`).
    """
    n = x.shape[-2]
    if n < 2:
        return RBF(torch.ones(x.shape[:-2], dtype=x.dtype, device=x.device))
    return RBF(median_heuristic(x) / math.sqrt(math.log(n)))


def svgd_direction(x: Tensor, score: Tensor, kernel: Any = None) -> Tensor:
    """The SVGD update direction ``phi`` of every particle, in closed form.

    ``phi(x_i) = (1/n) sum_j [k(x_j, x_i) s(x_j) + grad_{x_j} k(x_j, x_i)]``
    (Liu & Wang 2016, Eq. 8): the kernel-smoothed score pulls the particles to
    high density, the second (repulsive) term pushes them apart. With
    ``K[i, j] = k(x_j, x_i)`` it is ``(K S + G) / n`` where ``G_i = sum_j
    grad_1 k(x_j, x_i)`` comes from :func:`stein_core.kernels.gram_and_grad_x_sum`
    (two ``[n, n] x [n, d]`` products for a radial kernel; no ``[n, n, d]`` tensor).

    Args:
        x: particles ``[..., n, d]``.
        score: ``grad log p`` at ``x``, ``[..., n, d]``.
        kernel: a kernel of :mod:`stein_core.kernels` (or a Gram callable); default
            :func:`svgd_median_kernel` of ``x``.

    Returns:
        ``[..., n, d]``, dtype and device of ``x``.
    """
    if kernel is None:
        kernel = svgd_median_kernel(x)
    gram_t, grad_sum = gram_and_grad_x_sum(kernel, x, x)  # [..., n, n] (row i: k(x_j, x_i)), [..., n, d]
    return (gram_t @ score + grad_sum) / x.shape[-2]


def svgd(
    score_fn: ScoreFn,
    step_size: float | Tensor,
    *,
    kernel: Any = None,
    adaptive: bool = False,
    alpha: float = 0.9,
    fudge: float = 1e-6,
) -> Sampler:
    """Stein variational gradient descent (Liu & Wang, "Stein Variational Gradient
    Descent: A General Purpose Bayesian Inference Algorithm", NeurIPS 2016).

    A deterministic flow of ``n`` interacting particles ``x <- x + eps phi(x)``, with
    ``phi`` the kernelised Stein direction of :func:`svgd_direction` (the steepest
    descent of the KL divergence in the kernel's RKHS). The particles themselves are
    the sample: run it with :func:`run_chain` and take ``state.position`` (or the
    last kept sample). No noise: the generators are accepted and ignored. With a
    finite ``n`` the fixed point approximates ``p`` and under-disperses: by 2-4% of
    the covariance for 300 particles in 2-D (``tests/unit/test_samplers.py``), much
    more in high dimension (Ba et al., "Understanding the Variance Collapse of SVGD
    in High Dimensions", ICLR 2022). One particle climbs to a mode.

    Step rule: plain, ``x <- x + step_size * phi``; or with ``adaptive=True`` the
    AdaGrad with momentum of the authors' reference code
    (github.com/dilinwang820/Stein-Variational-Gradient-Descent, ``python/svgd.py``),
    per coordinate of every particle: ``G <- phi^2`` at the first step, then
    ``G <- alpha G + (1 - alpha) phi^2``, and ``x <- x + step_size * phi /
    (fudge + sqrt(G))`` (each coordinate moves by about ``step_size``).

    Shapes: particles ``[..., n, d]``; every leading entry is an independent set of
    ``n`` particles (its own kernel bandwidth); flatten events to ``d``. The score
    maps ``[..., n, d] -> [..., n, d]``. Cost per step: one score evaluation and
    ``O(n^2 d)`` time, ``O(n^2)`` memory per set.

    Args:
        score_fn: ``grad log p``, ``[..., n, d] -> [..., n, d]``.
        step_size: ``eps > 0``, float or tensor broadcastable to the positions.
        kernel: a fixed kernel of :mod:`stein_core.kernels` (e.g. ``RBF(1.0)``, ``IMQ()``);
            default None: :func:`svgd_median_kernel` of the particles, recomputed every step.
        adaptive: AdaGrad-with-momentum steps (state ``grad_sq``) instead of plain ones.
        alpha: AdaGrad's momentum on the squared direction, in ``[0, 1)`` (reference: 0.9).
        fudge: added to ``sqrt(G)`` against division by zero (reference: 1e-6).
    """
    _check_positive(step_size, "step_size")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if not fudge > 0.0:
        raise ValueError(f"fudge must be > 0, got {fudge}")

    def init_fn(x0: Tensor, *, generator: torch.Generator | None = None) -> SVGDState:
        if x0.ndim < 2:
            raise ValueError(f"svgd particles are [..., n, d], got shape {tuple(x0.shape)}")
        x = x0.detach()
        return SVGDState(x, score_fn(x).detach(), torch.zeros_like(x) if adaptive else None, 0)

    def step_fn(state: SVGDState, *, generator: torch.Generator | None = None) -> SVGDState:
        x, grad_sq = state.position, state.grad_sq
        eps = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
        phi = svgd_direction(x, state.score, kernel)  # [..., n, d]
        if adaptive:
            grad_sq = phi * phi if state.n_steps == 0 else alpha * grad_sq + (1.0 - alpha) * phi * phi
            phi = phi / (fudge + grad_sq.sqrt())
        x = (x + eps * phi).detach()
        return SVGDState(x, score_fn(x).detach(), grad_sq, state.n_steps + 1)

    return Sampler(init_fn, step_fn)


# -- generic loop -------------------------------------------------------------
def run_chain(
    init_fn: Callable[..., Any],
    step_fn: Callable[..., Any],
    x0: Tensor | tuple,
    n_steps: int,
    *,
    generator: torch.Generator | None = None,
    thin: int = 1,
    burn_in: int = 0,
    callback: Callable[[int, Any], None] | None = None,
    callback_every: int = 1,
) -> ChainResult:
    """Run ``burn_in + n_steps`` transitions of all chains and keep every ``thin``-th after burn-in.

    Args:
        init_fn, step_fn: a :class:`Sampler` pair (``run_chain(*mala(...), x0, n)``).
        x0: initial positions ``[*chains, *event]`` (not modified), or a state
            returned by a previous run (``ChainResult.state``) to continue its chains.
        n_steps: transitions after burn-in; ``n_steps // thin`` samples are kept
            (the states after steps ``burn_in + thin, burn_in + 2 thin, ...``).
        generator: RNG for all the noise (initial momenta included).
        thin: keep one state in ``thin``.
        burn_in: transitions discarded first.
        callback: ``callback(i, state)`` after transition ``i`` (1-based, burn-in
            included) whenever ``i % callback_every == 0`` and after the last one;
            e.g. ``lambda i, s: bar.update(i - bar.n)`` for a tqdm bar of total
            ``burn_in + n_steps``, or logging of ``s.n_accepted / s.n_steps``.
        callback_every: callback period in transitions.

    Returns:
        :class:`ChainResult`: ``samples [n_steps // thin, *chains, *event]`` (dtype and
        device of ``x0``), the final state, and for Metropolis-Hastings samplers
        the per-chain acceptance rate over the ``n_steps`` post-burn-in
        transitions ``[*chains]`` and its mean over chains.
    """
    if n_steps < 0 or burn_in < 0:
        raise ValueError(f"n_steps and burn_in must be >= 0, got {n_steps}, {burn_in}")
    if thin < 1 or callback_every < 1:
        raise ValueError(f"thin and callback_every must be >= 1, got {thin}, {callback_every}")
    state = x0 if isinstance(x0, tuple) else init_fn(x0, generator=generator)
    total = burn_in + n_steps
    samples = torch.empty(
        (n_steps // thin, *state.position.shape),
        dtype=state.position.dtype,
        device=state.position.device,
    )  # [n_keep, *chains, *event]
    n_acc0 = None
    for i in range(1, total + 1):
        if i == burn_in + 1:
            n_acc0 = getattr(state, "n_accepted", None)
        state = step_fn(state, generator=generator)
        j = i - burn_in
        if j > 0 and j % thin == 0:
            samples[j // thin - 1] = state.position
        if callback is not None and (i % callback_every == 0 or i == total):
            callback(i, state)
    accept_rate = mean_rate = None
    if n_acc0 is not None and n_steps > 0:
        accept_rate = (state.n_accepted - n_acc0).to(state.position.dtype) / n_steps
        mean_rate = float(accept_rate.mean())
    return ChainResult(samples, state, accept_rate, mean_rate)


def by_name(
    method: str,
    log_prob_fn: LogProbFn,
    step_size: float | Tensor,
    *,
    score_fn: ScoreFn | None = None,
    friction: float | Tensor = 1.0,
    n_leapfrog: int = 10,
) -> Sampler:
    """The sampler ``method`` (``ula``, ``mala``, ``hmc``, ``kinetic``) on the target ``log_prob_fn`` (unnormalised,
    ``[*chains, *event] -> [*chains]``; ``score_fn`` its gradient, default autograd): the one place where a sample
    section's ``method`` becomes an ``(init_fn, step_fn)`` pair, for :func:`run_chain`.

    ``friction`` is the kinetic chain's γ, ``n_leapfrog`` HMC's L; each is ignored by the other methods."""
    score = score_fn if score_fn is not None else score_from_log_prob(log_prob_fn)
    if method == "ula":
        return ula(score, step_size)
    if method == "mala":
        return mala(log_prob_fn, step_size, score_fn=score)
    if method == "hmc":
        return hmc(log_prob_fn, step_size, n_leapfrog, score_fn=score)
    if method == "kinetic":
        return underdamped_langevin(score, step_size, friction)
    raise ValueError(f"unknown MCMC method {method!r} (ula, mala, hmc, kinetic)")


# -- annealed Langevin ------------------------------------------------------------
def annealed_langevin(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    eps: float,
    n_steps_each: int,
    generator: torch.Generator | None = None,
    denoise: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon, NeurIPS 2019, Algorithm 1).

    For each level ``sigma_i`` (descending), ``n_steps_each`` ULA steps with
    ``alpha_i = eps * sigma_i^2 / sigma_L^2`` on ``x -> score_fn(x, sigma_i)``.
    The step is ``x + alpha_i s(x) + sqrt(2 alpha_i) z`` (:func:`langevin_step`,
    the Euler step of ``dx = s dt + sqrt(2) dW``); Algorithm 1 writes
    ``x + (alpha_i / 2) s + sqrt(alpha_i) z``, the same chain with its ``eps``
    twice ours: ``eps`` here is the paper's ``eps / 2``.
    With ``denoise=True`` a final Tweedie step ``x + sigma_L^2 s(x, sigma_L)``
    is applied (Song & Ermon, "Improved Techniques for Training Score-Based
    Generative Models", NeurIPS 2020).

    Args:
        score_fn: ``(x [n, *event], sigma 0-dim tensor) -> [n, *event]``. It may
            use autograd internally: no ``no_grad`` context is imposed; the
            state is detached after every step instead.
        x0: initial state ``[n, *event]`` (e.g. ``U[-a, a]`` or
            ``N(0, sigma_1^2 I)``); not modified.
        sigmas: ``[L]`` descending noise levels.
        eps: base step size (step at the smallest level).
        n_steps_each: Langevin steps per level (``T``).
        generator: RNG for all the noise.
        denoise: apply the final denoising step.
        callback: ``callback(level_index, x)`` after each level (progress/plots).

    Returns:
        ``[n, *event]`` detached samples, dtype/device of ``x0``.

    Recommended settings (2-D mixture of unit-variance Gaussians at
    (-5,-5) and (5,5), weights 0.8/0.2; see ``tests/unit/test_samplers.py``):
    ``sigmas = geometric_sigmas(20, 0.1, 10)``, ``n_steps_each = 100``,
    ``eps = 2e-3`` (so ``alpha_i / sigma_i^2 = eps / sigma_L^2 = 0.2`` at every
    level, ``alpha_1 = 80``), ``x0 ~ U[-8, 8]^2``. With the exact scores the
    mode weight comes out at 0.787 +- 0.003 (annealed Langevin's own bias) and
    each mode's variance at ~1.04 (1.02 with ``denoise=True``); with a
    ``NoiseConditionalMLP`` trained 3000 DSM steps (Adam 1e-3 with cosine
    decay to 0, batch 256, same ladder) it was 0.77-0.82 over seeds with 2000
    chains (without the lr decay the learned small-sigma scores were too
    noisy and the modes came out shifted by ~0.4).
    Guidelines: ``sigma_1`` of the order of the largest distance between data
    points (Song & Ermon 2020, Technique 1); keep ``eps / sigma_L^2`` around
    0.1-0.2 for ``n_steps_each = 100`` (smaller: levels do not equilibrate and
    the weights drift towards 0.5; larger: discretisation bias at the large
    levels, e.g. 0.5 gives 0.777).
    """
    if n_steps_each < 1:
        raise ValueError(f"n_steps_each must be >= 1, got {n_steps_each}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    sig = torch.as_tensor(sigmas).detach().flatten().to(dtype=x0.dtype, device=x0.device)
    if sig.numel() < 1:
        raise ValueError("sigmas must be non-empty")
    sigma_last = sig[-1]
    x = x0.detach()
    for i in range(sig.numel()):
        sigma_i = sig[i]
        alpha = eps * (sigma_i / sigma_last) ** 2

        def level_score(y: Tensor, _s: Tensor = sigma_i) -> Tensor:
            return score_fn(y, _s)

        for _ in range(n_steps_each):
            x = langevin_step(level_score, x, alpha, generator=generator).detach()
        if callback is not None:
            callback(i, x)
    if denoise:
        x = (x + sigma_last**2 * score_fn(x, sigma_last)).detach()
    return x
