"""Losses for training implicit generators ``x = G_theta(z)`` from a data batch.

* Approximate gradient descent (AGD): Li, "Approximate Gradient Descent for Training Implicit
  Generative Models", 2017 (:func:`get_agd_loss_fn`). The gradient of ``KL[q_theta || p]``, with
  ``q_theta`` the law of ``G_theta(z)``, is, by the reparametrisation ``x = G_theta(z)`` and
  ``E_q[d/dtheta log q_theta(x)] = 0``,

      grad_theta KL = E_z[ (grad log q(x) - grad log p(x))^T  dG_theta(z)/dtheta ],   x = G_theta(z).

  Neither score is known: ``grad log q`` is estimated in-sample from the generator batch with the Stein
  gradient estimator (Li & Turner, "Gradient Estimators for Implicit Models", ICLR 2018) or the spectral
  Stein gradient estimator (Shi, Sun & Zhu, ICML 2018), and ``grad log p`` out-of-sample, at the generator
  samples, from the data batch. With both estimates held fixed (``stop_gradient``) the surrogate

      L(theta) = (1/n) sum_i < stop_gradient(g_q(x_i) - g_p(x_i)), G_theta(z_i) >

  has ``grad_theta L`` equal to the Monte Carlo estimate of ``grad_theta KL``; its value means nothing.
* MMD baseline: direct minimisation of the unbiased ``MMD^2`` between the generator and data batches
  (Li, Swersky & Zemel, "Generative Moment Matching Networks", ICML 2015; Dziugaite, Roy & Ghahramani,
  "Training generative neural networks via Maximum Mean Discrepancy optimization", UAI 2015)
  (:func:`get_mmd_loss_fn`).

Both use the same kernel (:func:`get_kernel_fn`): by default the IMQ mixture of
:func:`stein_core.kernels.imq_mixture` at multiples of the median-heuristic bandwidth of the pooled
(generator, data) batch.

Shapes: ``x_gen [n, d]``, ``y_data [m, d]`` (flatten images to ``d = C*H*W``); memory is ``O((n + m)^2)``,
no ``[n, m, d]`` tensor is formed. Device and dtype follow the inputs.

Data-parallel use: every function here is a pure, deterministic function of the full batch (no random
draws, the median over all pairs without subsampling, no state). The kernel bandwidth and the score
estimates are computed from detached copies, so the gradient of a loss wrt ``x_gen`` is a sum of per-row
terms, and ``x_gen`` may be a concatenation of rows that carry gradient (this worker's) and detached rows
(the other workers'): the gradients of the N such losses add up to the gradient of the loss on the fully
live batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .discrepancies import mmd
from .kernels import IMQ, SumKernel, imq_mixture
from .score_estimators import DEFAULT_ETA_REL, fit_ssge, fit_stein_gradient, stein_gradient_estimator

__all__ = [
    "get_kernel_fn",
    "get_agd_gradient_fn",
    "get_agd_loss_fn",
    "get_mmd_loss_fn",
]

KernelFn = Callable[..., SumKernel]
_ESTIMATORS = ("stein", "ssge")


def get_kernel_fn(
    scales: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    beta: float = -0.5,
    bandwidth: str | float = "median",
) -> KernelFn:
    """Factory of the generator losses' kernel: an IMQ mixture ``k = sum_s IMQ(c = s * h, beta)``.

    Args:
        scales: positive multipliers of the bandwidth ``h``.
        beta: IMQ exponent (< 0).
        bandwidth: ``"median"`` -- ``h`` is the median heuristic of the pooled, detached points
            (:func:`stein_core.kernels.median_heuristic`, all pairs, no subsampling: deterministic), so
            the kernel follows the scale of the data and of the generator as training goes;
            or a float ``h > 0``, fixed.

    Returns:
        ``kernel_fn(x [n, d], y [m, d] | None = None) -> SumKernel``. The bandwidth is a constant for
        autograd (``stop_gradient``); with a fixed bandwidth ``x`` and ``y`` are not looked at.
    """
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0.0:
        raise ValueError(f"scales must be non-empty and > 0, got {scales}")
    beta = float(beta)
    if not beta < 0.0:
        raise ValueError(f"beta must be < 0, got {beta}")
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f'bandwidth must be "median" or a positive float, got {bandwidth!r}')

        def kernel_fn(x: Tensor, y: Tensor | None = None) -> SumKernel:
            return imq_mixture(x, y, scales, beta)  # median of the pooled, detached points

        return kernel_fn
    h = float(bandwidth)
    if not h > 0.0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    fixed = SumKernel([IMQ(s * h, beta) for s in scales])

    def fixed_kernel_fn(x: Tensor, y: Tensor | None = None) -> SumKernel:
        return fixed

    return fixed_kernel_fn


def _check_batches(x_gen: Tensor, y_data: Tensor) -> None:
    if x_gen.ndim != 2 or y_data.ndim != 2:
        raise ValueError(
            f"x_gen and y_data must be [n, d] and [m, d] (flatten images), got {tuple(x_gen.shape)} "
            f"and {tuple(y_data.shape)}"
        )
    if x_gen.shape[1] != y_data.shape[1]:
        raise ValueError(f"x_gen has d={x_gen.shape[1]}, y_data has d={y_data.shape[1]}")
    if x_gen.shape[0] < 2 or y_data.shape[0] < 2:
        raise ValueError(f"need at least 2 generator and 2 data points, got {x_gen.shape[0]} and {y_data.shape[0]}")


def get_agd_gradient_fn(
    kernel_fn: KernelFn,
    *,
    estimator: str = "stein",
    eta: float | None = None,
    eta_rel: float = DEFAULT_ETA_REL,
    n_eigen: int | None = None,
    eigen_threshold: float = 0.99,
) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Factory: the two score estimates of approximate gradient descent (Li, 2017) at the generator samples.

    ``g_q``: ``grad log q`` in-sample, from the generator batch itself --
    :func:`~stein_core.score_estimators.stein_gradient_estimator` (``estimator="stein"``, Li & Turner, ICLR
    2018) or :func:`~stein_core.score_estimators.fit_ssge` fitted on ``x_gen`` (``"ssge"``, Shi, Sun & Zhu,
    ICML 2018).
    ``g_p``: ``grad log p`` out-of-sample, fitted on the data batch and evaluated at the generator samples --
    :func:`~stein_core.score_estimators.fit_stein_gradient` (the ridge extension of the Stein gradient
    estimator) or :func:`~stein_core.score_estimators.fit_ssge` on ``y_data`` (Nystrom eigenfunctions).

    Bandwidth: both estimators use one kernel, ``kernel_fn(x_gen, y_data)``, i.e. (for the median
    heuristic) the bandwidth of the pooled generator and data points. Both estimators shrink towards 0
    (ridge, or the spectral truncation), and an out-of-sample estimate vanishes at distances large against
    the bandwidth. A bandwidth taken from the data alone would make ``g_p`` vanish at generator samples far
    from the data early in training, leaving only the entropy term ``g_q`` (which spreads the generator out
    but does not move it towards the data); the pooled bandwidth grows with the distance between the two
    batches, so ``g_p`` keeps pointing towards the data. Sharing the kernel also gives ``g_q`` and ``g_p``
    the same smoothing, so that their shrinkage partly cancels in ``g_q - g_p``, and the MMD baseline the
    same kernel.

    Args:
        kernel_fn: from :func:`get_kernel_fn` (any ``(x, y) -> kernel`` with the closed forms of a
            :class:`~stein_core.kernels.RadialKernel`, or a Gram callable).
        estimator: ``"stein"`` or ``"ssge"``.
        eta, eta_rel: ridge of the Stein estimators (``"stein"``; see
            :func:`~stein_core.score_estimators.stein_gradient_estimator`); the out-of-sample one needs
            ``eta > 0``.
        n_eigen, eigen_threshold: eigenpairs kept by SSGE (``"ssge"``; see
            :func:`~stein_core.score_estimators.fit_ssge`).

    Returns:
        ``grad_fn(x_gen [n, d], y_data [m, d]) -> (g_q [n, d], g_p [n, d])``, detached (computed under
        ``torch.no_grad`` from detached inputs), dtype and device of ``x_gen``.
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
    if estimator == "ssge":
        if n_eigen is not None and n_eigen < 1:
            raise ValueError(f"n_eigen must be >= 1, got {n_eigen}")
        if n_eigen is None and not 0.0 < eigen_threshold <= 1.0:
            raise ValueError(f"eigen_threshold must be in (0, 1], got {eigen_threshold}")
    elif eta is None and not eta_rel > 0.0:
        raise ValueError(f"eta_rel must be > 0 (the out-of-sample estimator needs a ridge), got {eta_rel}")
    elif eta is not None and not float(eta) > 0.0:
        raise ValueError(f"eta must be > 0 (the out-of-sample estimator needs a ridge), got {eta}")

    def grad_fn(x_gen: Tensor, y_data: Tensor) -> tuple[Tensor, Tensor]:
        _check_batches(x_gen, y_data)
        with torch.no_grad():
            x, y = x_gen.detach(), y_data.detach().to(dtype=x_gen.dtype, device=x_gen.device)
            kernel = kernel_fn(x, y)
            if estimator == "stein":
                g_q = stein_gradient_estimator(x, kernel, eta=eta, eta_rel=eta_rel)  # [n, d]
                g_p = fit_stein_gradient(y, kernel, eta=eta, eta_rel=eta_rel)(x)  # [n, d]
            else:
                kw = {"n_eigen": n_eigen, "eigen_threshold": eigen_threshold}
                g_q = fit_ssge(x, kernel, **kw)(x)  # [n, d]
                g_p = fit_ssge(y, kernel, **kw)(x)  # [n, d]
        return g_q, g_p

    return grad_fn


def get_agd_loss_fn(
    kernel_fn: KernelFn,
    *,
    estimator: str = "stein",
    eta: float | None = None,
    eta_rel: float = DEFAULT_ETA_REL,
    n_eigen: int | None = None,
    eigen_threshold: float = 0.99,
) -> Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]:
    """Factory: the approximate-gradient-descent surrogate loss (Li, "Approximate Gradient Descent for
    Training Implicit Generative Models", 2017).

    With ``(g_q, g_p)`` from :func:`get_agd_gradient_fn` (same arguments; detached),

        L = (1/n) sum_i sum_k (g_q - g_p)_ik x_ik,     x = x_gen = G_theta(z),

    so ``dL/dx_i = (g_q - g_p)_i / n`` and ``grad_theta L = (1/n) sum_i (g_q - g_p)_i^T dx_i/dtheta``, the
    Monte Carlo estimate of ``grad_theta KL[q_theta || p]`` (module docstring). Descending ``L`` descends
    the KL; the value of ``L`` is not the KL and is not comparable across steps.

    Returns:
        ``loss_fn(x_gen [n, d], y_data [m, d]) -> (surrogate [], metrics)``; ``metrics`` holds detached
        0-dim tensors: ``kl_grad_norm`` = mean over the samples of ``||g_q - g_p||_2`` (the size of the
        functional KL gradient; it goes towards 0 as ``q -> p``, up to estimator noise), ``score_q_norm``
        and ``score_p_norm`` (mean ``||g_q||_2``, ``||g_p||_2``).
    """
    grad_fn = get_agd_gradient_fn(
        kernel_fn, estimator=estimator, eta=eta, eta_rel=eta_rel, n_eigen=n_eigen, eigen_threshold=eigen_threshold
    )

    def loss_fn(x_gen: Tensor, y_data: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        g_q, g_p = grad_fn(x_gen, y_data)  # [n, d] each, detached
        delta = g_q - g_p  # [n, d]
        surrogate = (delta * x_gen).sum(-1).mean()
        metrics = {
            "kl_grad_norm": delta.norm(dim=-1).mean(),
            "score_q_norm": g_q.norm(dim=-1).mean(),
            "score_p_norm": g_p.norm(dim=-1).mean(),
        }
        return surrogate, metrics

    return loss_fn


def get_mmd_loss_fn(kernel_fn: KernelFn) -> Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]:
    """Factory: the unbiased ``MMD^2`` between generator and data batches, as a loss.

    Gretton et al., "A Kernel Two-Sample Test", JMLR 2012, eq. 3 (:func:`stein_core.discrepancies.mmd`
    with ``statistic="u"``), used to train generators by Li, Swersky & Zemel (ICML 2015) and Dziugaite,
    Roy & Ghahramani (UAI 2015):

        MMD^2_u = 1/(n(n-1)) sum_{i != j} k(x_i, x_j) + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)
                  - 2/(nm) sum_{i, j} k(x_i, y_j),

    with ``kernel = kernel_fn(x_gen, y_data)`` (the bandwidth is a constant for autograd). Unbiased, so it
    can be negative when the two laws are close. Differentiable wrt ``x_gen`` through the Gram matrices.

    Returns:
        ``loss_fn(x_gen [n, d], y_data [m, d]) -> (mmd2_u [], {"mmd2": detached mmd2_u})``.
    """

    def loss_fn(x_gen: Tensor, y_data: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        _check_batches(x_gen, y_data)
        y = y_data.to(dtype=x_gen.dtype, device=x_gen.device)
        kernel = kernel_fn(x_gen, y)
        value = mmd(x_gen, y, kernel, statistic="u")
        return value, {"mmd2": value.detach()}

    return loss_fn
