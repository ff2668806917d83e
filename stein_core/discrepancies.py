"""Kernel discrepancies: kernelized Stein discrepancy (KSD) and MMD.

Shapes: samples ``[..., n, d]``; Gram / Stein-kernel matrices ``[..., n, n]``;
estimates ``[...]`` (0-dim for unbatched input). Everything is differentiable
and O(n^2) in memory: no ``[n, n, d]`` tensor is formed.

Module layout (planned additions go in their own sections below): quadratic-time
KSD and MMD estimators here; sliced KSD, linear-time KSD and wild-bootstrap
goodness-of-fit tests are to be added next to them, reusing
``stein_kernel_matrix``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .kernels import RadialKernel, sq_dists

__all__ = ["stein_kernel_matrix", "ksd", "get_ksd_fn", "mmd", "get_mmd_fn"]

_STATISTICS = ("u", "v")


def _check_statistic(statistic: str) -> str:
    s = statistic.lower()
    if s not in _STATISTICS:
        raise ValueError(f"statistic must be one of {_STATISTICS}, got {statistic!r}")
    return s


def _mean_offdiag(mat: Tensor) -> Tensor:
    """Mean of the off-diagonal entries of a square ``[..., n, n]`` matrix -> ``[...]``."""
    n = mat.shape[-1]
    if n < 2:
        raise ValueError("a U-statistic needs at least 2 samples")
    total = mat.sum(dim=(-2, -1)) - torch.diagonal(mat, dim1=-2, dim2=-1).sum(-1)
    return total / (n * (n - 1))


# ---------------------------------------------------------------------------
# Kernelized Stein discrepancy
# ---------------------------------------------------------------------------
def stein_kernel_matrix(x: Tensor, score_x: Tensor, kernel: RadialKernel) -> Tensor:
    """Langevin-Stein kernel matrix ``u_p(x_i, x_j)``.

    Liu, Lee & Jordan, "A Kernelized Stein Discrepancy for Goodness-of-fit
    Tests", ICML 2016 (also Chwialkowski, Strathmann & Gretton, ICML 2016):

        u_p(x, y) = s(x)^T s(y) k(x, y) + s(x)^T grad_y k(x, y)
                    + s(y)^T grad_x k(x, y) + tr grad_x grad_y k(x, y),

    with ``s = grad log p``. For a radial kernel ``k = phi(r^2)`` this is, with
    ``phi', phi''`` derivatives wrt ``r^2``,

        u_p(x_i, x_j) = phi S_ij
                        + 2 phi' (s_i.x_j - s_i.x_i + s_j.x_i - s_j.x_j)
                        - 2 d phi' - 4 phi'' r^2_ij,

    where ``S_ij = s_i.s_j``; all terms are ``[n, n]`` matrix products.

    Args:
        x: ``[..., n, d]`` samples.
        score_x: ``[..., n, d]`` score of the target ``p`` evaluated at ``x``.
        kernel: a :class:`RadialKernel`.

    Returns:
        ``[..., n, n]`` symmetric matrix.
    """
    if x.shape != score_x.shape:
        raise ValueError(f"x {tuple(x.shape)} and score_x {tuple(score_x.shape)} differ")
    d = x.shape[-1]
    r2 = sq_dists(x, x)  # [..., n, n]
    phi, dphi, d2phi = kernel.profile(r2)
    ss = score_x @ score_x.transpose(-2, -1)  # [..., n, n]  s_i.s_j
    sx = score_x @ x.transpose(-2, -1)  # [..., n, n]  s_i.x_j
    sx_diag = torch.diagonal(sx, dim1=-2, dim2=-1)  # [..., n]  s_i.x_i
    # s_i.x_j - s_i.x_i + s_j.x_i - s_j.x_j
    cross = sx - sx_diag[..., :, None] + sx.transpose(-2, -1) - sx_diag[..., None, :]
    return phi * ss + 2.0 * dphi * cross - 2.0 * d * dphi - 4.0 * d2phi * r2


def ksd(
    x: Tensor,
    score: Tensor | Callable[[Tensor], Tensor],
    kernel: RadialKernel,
    statistic: str = "u",
) -> Tensor:
    """Squared kernelized Stein discrepancy ``KSD^2(q || p)`` from samples ``x ~ q``.

    Liu, Lee & Jordan (ICML 2016), eq. for ``S(q, p) = E_{x,x'~q} u_p(x, x')``.

    Args:
        x: ``[..., n, d]`` samples.
        score: score of ``p`` at ``x`` as a tensor ``[..., n, d]``, or a callable
            ``x -> [..., n, d]``.
        kernel: a :class:`RadialKernel`.
        statistic: ``"u"`` (unbiased U-statistic: mean over ``i != j``, may be
            negative) or ``"v"`` (V-statistic: mean over all pairs, >= 0, biased).

    Returns:
        ``[...]`` estimate (0-dim for ``x`` of shape ``[n, d]``).
    """
    stat = _check_statistic(statistic)
    score_x = score(x) if callable(score) else score
    h = stein_kernel_matrix(x, score_x, kernel)
    if stat == "u":
        return _mean_offdiag(h)
    return h.mean(dim=(-2, -1))


def get_ksd_fn(
    kernel: RadialKernel, statistic: str = "u"
) -> Callable[[Tensor, Tensor | Callable[[Tensor], Tensor]], Tensor]:
    """Factory: fix the kernel and statistic, return ``ksd_fn(x, score) -> Tensor``.

    See :func:`ksd` for the arguments of the returned closure.
    """
    stat = _check_statistic(statistic)

    def ksd_fn(x: Tensor, score: Tensor | Callable[[Tensor], Tensor]) -> Tensor:
        return ksd(x, score, kernel, statistic=stat)

    return ksd_fn


# ---------------------------------------------------------------------------
# Maximum mean discrepancy
# ---------------------------------------------------------------------------
def mmd(x: Tensor, y: Tensor, kernel: RadialKernel, statistic: str = "u") -> Tensor:
    """Squared maximum mean discrepancy ``MMD^2(P, Q)`` from ``x ~ P`` and ``y ~ Q``.

    Gretton et al., "A Kernel Two-Sample Test", JMLR 2012 (eq. 3 for the
    unbiased and eq. 5 for the biased estimator).

    Args:
        x: ``[..., n, d]``.
        y: ``[..., m, d]`` (``n`` and ``m`` may differ).
        kernel: any kernel callable ``(x, y) -> Gram``.
        statistic: ``"u"``: within-sample terms averaged over ``i != j``
            (unbiased), cross term over all ``n m`` pairs; ``"v"``: all terms
            over all pairs (biased, >= 0).

    Returns:
        ``[...]`` estimate, differentiable wrt ``x``, ``y`` and kernel parameters.
    """
    stat = _check_statistic(statistic)
    kxx = kernel(x, x)
    kyy = kernel(y, y)
    kxy = kernel(x, y)
    if stat == "u":
        return _mean_offdiag(kxx) + _mean_offdiag(kyy) - 2.0 * kxy.mean(dim=(-2, -1))
    return kxx.mean(dim=(-2, -1)) + kyy.mean(dim=(-2, -1)) - 2.0 * kxy.mean(dim=(-2, -1))


def get_mmd_fn(kernel: RadialKernel, statistic: str = "u") -> Callable[[Tensor, Tensor], Tensor]:
    """Factory: fix the kernel and statistic, return ``mmd_fn(x, y) -> Tensor``."""
    stat = _check_statistic(statistic)

    def mmd_fn(x: Tensor, y: Tensor) -> Tensor:
        return mmd(x, y, kernel, statistic=stat)

    return mmd_fn
