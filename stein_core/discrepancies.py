"""Kernel discrepancies: kernelized Stein discrepancy (KSD), sliced KSD and MMD.

Shapes: samples ``[..., n, d]``; Gram / Stein-kernel matrices ``[..., n, n]``;
estimates ``[...]`` (0-dim for unbatched input). Leading ``...`` dims are
independent problems (e.g. repetitions of an experiment) and are never mixed.
Everything is differentiable and O(n^2) in memory: no ``[n, n, d]`` tensor is
formed.

Sections: quadratic- and linear-time KSD (closed form for radial kernels, an
autograd reference for any other kernel); noise-smoothed KSD over a ladder of
noise levels; sliced KSD and maxSKSD; quadratic- and linear-time MMD. Hypothesis tests built on these statistics (wild
bootstrap, permutations) live in :mod:`stein_core.tests_stat`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ._random import randn
from .kernels import IMQ, RBF, RadialKernel, _as_param, median_heuristic, sq_dists

__all__ = [
    "Kernel",
    "LinearStatistic",
    "MaxSKSDResult",
    "stein_kernel_matrix",
    "ksd",
    "get_ksd_fn",
    "ksd_linear",
    "median_rbf",
    "sliced_stein_kernel_matrix",
    "sksd",
    "get_sksd_fn",
    "maxsksd",
    "mmd",
    "get_mmd_fn",
    "mmd_linear",
    "ksd_smoothed",
    "get_ksd_smoothed_fn",
    "smoothed_kernels",
]

Kernel = Callable[[Tensor, Tensor], Tensor]
"""Any kernel: ``(x [..., n, d], y [..., m, d]) -> Gram [..., n, m]``."""

ScoreArg = Tensor | Callable[[Tensor], Tensor]
"""A score given as values ``[..., n, d]`` at the samples, or as a callable ``x -> [..., n, d]``."""

SliceKernel = RadialKernel | Callable[[Tensor], RadialKernel]
"""Kernel on 1-D projections: a radial kernel, or a factory ``u [..., n, 1] -> RadialKernel``."""

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


def _reduce(mat: Tensor, stat: str) -> Tensor:
    """U- (off-diagonal mean) or V- (mean of all entries) statistic of ``[..., n, n]`` -> ``[...]``."""
    return _mean_offdiag(mat) if stat == "u" else mat.mean(dim=(-2, -1))


def _eval_score(x: Tensor, score: ScoreArg) -> Tensor:
    score_x = score(x) if callable(score) else score
    if score_x.shape != x.shape:
        raise ValueError(f"x {tuple(x.shape)} and score {tuple(score_x.shape)} differ")
    return score_x


def _pairs(x: Tensor) -> tuple[Tensor, Tensor]:
    """Disjoint consecutive pairs ``(x_1, x_2), (x_3, x_4), ...`` -> two ``[..., n // 2, d]``."""
    m = x.shape[-2] // 2
    if m < 2:
        raise ValueError("a linear-time statistic needs at least 4 samples")
    return x[..., 0 : 2 * m : 2, :], x[..., 1 : 2 * m : 2, :]


def _gram_pairs(kernel: Kernel, a: Tensor, b: Tensor) -> Tensor:
    """``k(a_i, b_i)`` for matched rows: ``[..., m, d]`` twice -> ``[..., m]`` in O(m d).

    Radial kernels use the profile directly; any other kernel is called on
    ``[..., m, 1, d]`` inputs (it must accept leading batch dims).
    """
    if isinstance(kernel, RadialKernel):
        diff = a - b
        return kernel.phi((diff * diff).sum(-1))
    return kernel(a.unsqueeze(-2), b.unsqueeze(-2))[..., 0, 0]


def _linear_statistic(h: Tensor) -> LinearStatistic:
    """Mean, standard error and one-sided normal p-value of i.i.d. terms ``h [..., m]``."""
    m = h.shape[-1]
    value = h.mean(-1)
    se = h.std(-1, correction=1) / math.sqrt(m)
    p_value = torch.special.ndtr(-value / se)
    return LinearStatistic(value, se, p_value)


class LinearStatistic(NamedTuple):
    """A linear-time statistic: mean of ``m`` i.i.d. terms, each field ``[...]``.

    Attributes:
        value: the estimate (unbiased).
        std_error: ``std(h) / sqrt(m)`` (sample std of the terms).
        p_value: one-sided p-value of ``H0: E h = 0`` against ``E h > 0`` from the
            normal approximation, ``1 - Phi(value / std_error)``.
    """

    value: Tensor
    std_error: Tensor
    p_value: Tensor


# ---------------------------------------------------------------------------
# Kernelized Stein discrepancy
# ---------------------------------------------------------------------------
def _stein_cross_radial(
    x: Tensor, sx: Tensor, y: Tensor, sy: Tensor, kernel: RadialKernel
) -> Tensor:
    """Closed-form ``u_p(x_i, y_j)`` for a radial kernel -> ``[..., n, m]``.

    See :func:`stein_kernel_matrix`; here ``x [..., n, d]`` and ``y [..., m, d]``
    with scores ``sx``, ``sy`` may differ.
    """
    d = x.shape[-1]
    r2 = sq_dists(x, y)  # [..., n, m]
    phi, dphi, d2phi = kernel.profile(r2)
    # The cross term is invariant to a common shift of x and y: centre both at
    # the (detached) mean of x to limit cancellation, as sq_dists does.
    shift = x.mean(dim=-2, keepdim=True).detach()
    xc, yc = x - shift, y - shift
    s_y = sx @ yc.transpose(-2, -1)  # [..., n, m]  s_i.y_j
    x_t = xc @ sy.transpose(-2, -1)  # [..., n, m]  x_i.t_j
    s_x = (sx * xc).sum(-1)  # [..., n]  s_i.x_i
    t_y = (sy * yc).sum(-1)  # [..., m]  t_j.y_j
    # s_i.(y_j - x_i) + t_j.(x_i - y_j)
    cross = s_y - s_x[..., :, None] + x_t - t_y[..., None, :]
    ss = sx @ sy.transpose(-2, -1)  # [..., n, m]  s_i.t_j
    return phi * ss + 2.0 * dphi * cross - 2.0 * d * dphi - 4.0 * d2phi * r2


def _stein_cross_autograd(x: Tensor, sx: Tensor, y: Tensor, sy: Tensor, kernel: Kernel) -> Tensor:
    """``u_p(x_i, y_j)`` for any twice-differentiable kernel, by autograd -> ``[..., n, m]``.

    Gram entry ``(i, j)`` may depend only on ``x_i`` and ``y_j``. Then, with a
    zero dummy ``w [..., n, m]``, ``G(w) = grad_x sum(w * K)`` is linear in ``w``
    and ``d/dw_ij sum_i G(w)_ia = dk(x_i, y_j)/dx_ia``: one double-backward pass
    per coordinate ``a`` gives the whole ``[n, m]`` matrix of partials (the
    "double-vjp" form of a Jacobian-vector product). The same trick once more
    gives ``d^2 k / dx_ia dy_ja``. Cost: ``O(d)`` passes through the kernel
    (``O(n m d)`` for a radial-like kernel); every intermediate is ``[..., n, m]``
    or ``[..., n, d]``. When the result itself must be differentiated (grad
    mode on and an input requires grad) autograd keeps the ``d`` per-coordinate
    graphs alive, so that use is for small ``n``.
    """
    d = x.shape[-1]
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        # Separate graph nodes for the two arguments (x and y may be the same tensor).
        xa = x.clone() if x.requires_grad else x.detach().requires_grad_(True)
        ya = y.clone() if y.requires_grad else y.detach().requires_grad_(True)
        k = kernel(xa, ya)  # [..., n, m]
        w = torch.zeros_like(k, requires_grad=True)
        # [..., n, d] and [..., m, d], both linear in w
        gx, gy = torch.autograd.grad(k, (xa, ya), grad_outputs=w, create_graph=True)
        out = (sx @ sy.transpose(-2, -1)) * k
        for a in range(d):
            dk_dx = torch.autograd.grad(gx[..., a].sum(), w, create_graph=True)[0]  # [..., n, m]
            dk_dy = torch.autograd.grad(gy[..., a].sum(), w, create_graph=True)[0]  # [..., n, m]
            w2 = torch.zeros_like(k, requires_grad=True)
            g2 = torch.autograd.grad(dk_dx, ya, grad_outputs=w2, create_graph=True)[0]  # [.., m, d]
            d2k = torch.autograd.grad(g2[..., a].sum(), w2, create_graph=keep_graph)[0]  # [.., n, m]
            out = out + sx[..., :, a, None] * dk_dy + sy[..., None, :, a] * dk_dx + d2k
    return out if keep_graph else out.detach()


def _stein_cross(x: Tensor, sx: Tensor, y: Tensor, sy: Tensor, kernel: Kernel) -> Tensor:
    if isinstance(kernel, RadialKernel):
        return _stein_cross_radial(x, sx, y, sy, kernel)
    return _stein_cross_autograd(x, sx, y, sy, kernel)


def stein_kernel_matrix(x: Tensor, score_x: Tensor, kernel: Kernel) -> Tensor:
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

    Any other kernel (a deep kernel ``k(f(x), f(y))``, a product kernel, ...)
    goes through an autograd reference: ``O(d)`` double-backward passes, each
    ``[..., n, n]`` (see ``_stein_cross_autograd``); slower, for small ``n`` or
    for checking closed forms. Its Gram entry ``(i, j)`` must depend only on
    ``x_i, x_j`` and be twice differentiable by autograd (``torch.cdist`` has no
    double backward; a distance clamped at 0, as in ``sq_dists``, has a zero
    gradient where it clamps, i.e. possibly on the diagonal).

    Args:
        x: ``[..., n, d]`` samples.
        score_x: ``[..., n, d]`` score of the target ``p`` evaluated at ``x``.
        kernel: a :class:`RadialKernel` (closed form), or any callable
            ``(x [..., n, d], y [..., m, d]) -> [..., n, m]`` (autograd).

    Returns:
        ``[..., n, n]`` symmetric matrix, differentiable wrt ``x``, ``score_x``
        and kernel parameters.
    """
    if x.shape != score_x.shape:
        raise ValueError(f"x {tuple(x.shape)} and score_x {tuple(score_x.shape)} differ")
    return _stein_cross(x, score_x, x, score_x, kernel)


def ksd(x: Tensor, score: ScoreArg, kernel: Kernel, statistic: str = "u") -> Tensor:
    """Squared kernelized Stein discrepancy ``KSD^2(q || p)`` from samples ``x ~ q``.

    Liu, Lee & Jordan (ICML 2016), eq. for ``S(q, p) = E_{x,x'~q} u_p(x, x')``.

    Args:
        x: ``[..., n, d]`` samples.
        score: score of ``p`` at ``x`` as a tensor ``[..., n, d]``, or a callable
            ``x -> [..., n, d]``.
        kernel: a :class:`RadialKernel` or any kernel callable (see
            :func:`stein_kernel_matrix`).
        statistic: ``"u"`` (unbiased U-statistic: mean over ``i != j``, may be
            negative) or ``"v"`` (V-statistic: mean over all pairs, >= 0, biased).

    Returns:
        ``[...]`` estimate (0-dim for ``x`` of shape ``[n, d]``).
    """
    stat = _check_statistic(statistic)
    score_x = _eval_score(x, score)
    if isinstance(kernel, RadialKernel):
        return _ksd_radial_blocked(x, score_x, kernel, stat)
    return _reduce(stein_kernel_matrix(x, score_x, kernel), stat)


#: Elements of one ``[block, n]`` slab of the CPU's blocked kernel statistics (:func:`_ksd_radial_blocked`,
#: :func:`_mmd_radial_blocked`, ``tests_stat``): a float32 slab of 4 MiB stays in cache.
_BLOCK_ELEMENTS = 1 << 20

#: Elements of one ``[block, n]`` slab of :func:`_ksd_radial_blocked` above ``_KSD_EXACT_MAX_N`` samples, per
#: device type (else ``_BLOCK_ELEMENTS``). CUDA: 2^24 (measured on an H200, ``bench/bench_ksd_block.py``:
#: 3.6-10.6x faster than 2^20 at the same value; small blocks there are many small kernel launches). CPU: 2^19,
#: the fastest of 2^17 .. 2^20 for :func:`_ksd_sum_fast` timed side by side (2 threads, n = 2048 and 4096,
#: d = 64 and 784): more rows per block compute more of the diagonal squares twice and leave the cache, fewer
#: pay more per-call costs.
_KSD_BLOCK_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 19}

#: ... but never fewer rows than this: the products ``[block, n] x [n, d]`` of :func:`_ksd_sum_fast` ran 5-20x
#: slower per flop with 32 or 64 rows than with 128 (MKL, 2 threads, n = 16384; at n = 16384, d = 64 the
#: whole KSD took 2.2x its floor with 32 rows, 1.1x with 128, 1.2x with 256).
_KSD_MIN_ROWS = 128

#: Up to this many samples :func:`_ksd_radial_blocked` runs the generic closed form, on every device:
#: unchanged since the models of the pipelines (which train with :func:`ksd` at batch <= 1000) were made, so
#: their losses stay the same bit for bit. Above it runs the cheaper form of :func:`_ksd_sum_fast`, equal to
#: round-off. Changing this number changes the round-off of every KSD in between.
_KSD_EXACT_MAX_N = 1024


def _ksd_block_elements(device: torch.device) -> int:
    """Elements of one ``[block, n]`` slab of :func:`_ksd_radial_blocked` on ``device``."""
    return _KSD_BLOCK_ELEMENTS.get(device.type, _BLOCK_ELEMENTS)


def _frobenius(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b)`` over the last two dims -> ``[...]``; unbatched, a BLAS dot (no ``[n, m]`` temporary).
    (A ``[1, nm] @ [nm, 1]`` matmul would be the batched analogue but runs ~30x slower on CPU.)"""
    if a.dim() == 2 and b.dim() == 2:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum((-2, -1))


def _ksd_radial_blocked(x: Tensor, s: Tensor, kernel: RadialKernel, stat: str) -> Tensor:
    """KSD² for a radial kernel without forming the Stein kernel matrix -> ``[...]``.

    Summing :func:`stein_kernel_matrix` over all pairs and using the symmetry of ``Phi' = [phi'(r_ij^2)]``,

        sum_ij u_ij = <S, Phi S + 4 Phi' X> - 4 a.rho - 2 d sum(rho) - 4 <Phi'', R2>,

    with ``S = [s_i]``, ``X = [x_i]`` (centred), ``a_i = s_i.x_i``, ``rho = rowsum(Phi')`` and ``<.,.>`` the
    Frobenius product. Per block of rows that is three GEMMs (``r^2`` from one product of the augmented
    ``[x, |x|^2, 1]`` and ``[-2x, 1, |x|^2]``, then ``Phi S`` and ``Phi' X``) and a few element-wise passes over a
    ``[..., block, n]`` slab small enough to stay in cache, so memory is ``O(n * block)``, not ``O(n^2)``.
    Up to ``_KSD_EXACT_MAX_N`` samples this is computed as written (any radial kernel, through its
    ``profile``); above, by :func:`_ksd_sum_fast` (fewer passes, the same value to round-off), with blocks
    of ``_ksd_block_elements(device)`` elements.
    The U-statistic removes the diagonal ``u_ii = phi(0) |s_i|^2 - 2 d phi'(0)`` (``r_ii = 0``).
    Differentiable; agrees with the matrix form to round-off (tested).
    """
    n, d = x.shape[-2], x.shape[-1]
    if stat == "u" and n < 2:
        raise ValueError("a U-statistic needs at least 2 samples")
    if n > _KSD_EXACT_MAX_N:
        total = _ksd_sum_fast(x, s, kernel, min(n, max(_KSD_MIN_ROWS, _ksd_block_elements(x.device) // n)))
    else:
        shift = x.mean(dim=-2, keepdim=True).detach()
        xc = x - shift  # [..., n, d]; u is translation invariant
        sq = (xc * xc).sum(-1, keepdim=True)  # [..., n, 1]
        ones = torch.ones_like(sq)
        left = torch.cat([xc, sq, ones], dim=-1)  # [..., n, d + 2]
        right_t = torch.cat([-2.0 * xc, ones, sq], dim=-1).transpose(-2, -1)  # [..., d + 2, n]
        a = (s * xc).sum(-1)  # [..., n]
        block = max(16, min(n, _BLOCK_ELEMENTS // max(n, 1)))
        total = x.new_zeros(x.shape[:-2])
        for i0 in range(0, n, block):
            i1 = min(n, i0 + block)
            r2 = (left[..., i0:i1, :] @ right_t).clamp_min_(0.0)  # [..., b, n] = |x_i - x_j|^2
            phi, dphi, d2phi = kernel.profile(r2)
            m = phi @ s + 4.0 * (dphi @ xc)  # [..., b, d]
            rho = dphi.sum(-1)  # [..., b]
            total = total + (
                (s[..., i0:i1, :] * m).sum((-2, -1))
                - 4.0 * (a[..., i0:i1] * rho).sum(-1)
                - 2.0 * d * rho.sum(-1)
                - 4.0 * _frobenius(d2phi, r2)
            )
    if stat == "v":
        return total / (n * n)
    phi0, dphi0, _ = kernel.profile(x.new_zeros((*x.shape[:-2], 1, 1)))
    diag = phi0[..., 0, 0] * (s * s).sum((-2, -1)) - 2.0 * d * n * dphi0[..., 0, 0]
    return (total - diag) / (n * (n - 1))


def _ksd_sum_fast(x: Tensor, s: Tensor, kernel: RadialKernel, block: int) -> Tensor:
    """``sum_ij u_ij`` of :func:`_ksd_radial_blocked` over the upper triangle only, in few passes -> ``[...]``.

    Args:
        x, s: ``[..., n, d]`` samples and scores.
        kernel: any :class:`RadialKernel`; :class:`IMQ` and :class:`RBF` get the closed forms below.
        block: rows per block.

    ``u`` is symmetric, so a block of rows ``R = [i0, i1)`` is taken against the columns ``C = [i0, n)`` only,
    with the weights ``omega_j = 1/2`` on its leading ``[b, b]`` square (which holds both orders of its pairs)
    and 1 beyond it (the pairs with later rows, once), and ``sum_ij u_ij = 2 sum_blocks sum_RC omega u``: about
    half the kernel values of the full sum. With ``w_i = s_i.x_i + d/2`` and ``phi' = kappa D`` (below), the
    terms of ``u_ij`` (see :func:`stein_kernel_matrix`) summed over a block, the weights folded into the
    columns of ``Phi`` and ``D``, are

        <S_R, Phi S_C + 2 kappa D X_C> - 2 kappa <w_R, D 1> + 2 kappa (<X_R, D S_C> - sum D w_C) - 4 <Phi'', R2>

    (the second ``kappa`` term is ``sum_ij D_ij (s_j.x_i - w_j)``, the pairs' other order): three GEMMs on
    ``[b, n - i0]``, ``r^2`` from the augmented ``[x, 1, |x|^2]`` and ``[-2x, |x|^2, 1]``, ``Phi S_C`` and
    ``D [X_C, 1, S_C, w_C]`` (two floors' worth of products, against three for the full rows), and, for the two
    kernels with closed forms, three or four element-wise passes (a generic ``profile`` takes about ten):

    * IMQ, ``phi = b^beta`` with ``b = c^2 + r^2`` (the GEMM adds ``c^2``: ``[-2x, |x|^2 + c^2, 1]``):
      ``D = phi / b = b^(beta - 1)``, ``kappa = beta``, ``phi'' = beta (beta - 1) D / b`` and
      ``<Phi'', R2> = beta (beta - 1) (sum D - c^2 <D, 1 / b>)`` (``r^2 = b - c^2``). For ``beta = -1/2``,
      ``phi = rsqrt(b)`` and ``1 / b = phi^2``, no division: ``phi' = -phi^3 / 2``, ``phi'' = 3 phi^5 / 4``.
      ``b`` is clamped at ``c^2`` (``r^2 >= 0``) only where round-off could take it near 0: when
      ``c^2 < 2^10 (d + 3) eps max_i |x_i|^2``; above that the GEMM's error on ``r^2``, at most about
      ``(d + 3) eps 4 max_i |x_i|^2``, leaves ``b > c^2 / 2`` and moves the sum by round-off only.
    * RBF, ``phi = exp(e)``, ``e = -alpha r^2``, ``alpha = 1 / (2 h^2)`` (the GEMM scales by ``-alpha``;
      no clamp needed, ``exp`` of a round-off above 0 is 1): ``D = Phi``, ``kappa = -alpha``,
      ``<Phi'', R2> = alpha^2 <Phi, R2> = -alpha <Phi, E>``, and ``Phi S_C`` is a part of ``D [X_C, 1, S_C, w_C]``:
      one GEMM besides ``r^2``.
    * any other radial kernel: ``D = phi'``, ``kappa = 1``, from its ``profile`` on ``r^2`` clamped at 0.

    Without autograd (``no_grad``, or nothing requires grad) every ``[..., b, n - i0]`` temporary is written
    into one of three preallocated slabs (a fresh multi-MiB tensor per pass pays its page faults, about as much
    again as the pass) and the weights go in place; with autograd, new tensors.
    """
    n, d = x.shape[-2], x.shape[-1]
    batch = x.shape[:-2]
    shift = x.mean(dim=-2, keepdim=True).detach()
    xc = x - shift  # [..., n, d]; u is translation invariant
    sq = torch.linalg.vecdot(xc, xc).unsqueeze(-1)  # [..., n, 1]
    ones = torch.ones_like(sq)
    w = torch.linalg.vecdot(s, xc).unsqueeze(-1) + 0.5 * d  # [..., n, 1]
    # [..., n, 2d + 3 + pad] = [X, 1, |x|^2, S, w, 0]: its first d + 2 columns are the left factor of r^2, and
    # D aug_C = (D X_C, D 1, -, D S_C, D w_C); zero columns up to a multiple of 16, where the GEMM runs about a
    # fifth faster (e.g. 131 -> 144 columns for d = 64, measured with MKL)
    pad = -(2 * d + 3) % 16
    aug = torch.cat([xc, ones, sq, s, w] + ([sq.new_zeros(*sq.shape[:-1], pad)] if pad else []), dim=-1)
    kind = type(kernel)
    params: tuple = ()
    clamp = True
    if kind is IMQ:
        params = (kernel.c,)
        c2 = _as_param(kernel.c, x) ** 2  # 0-dim or [..., 1, 1]
        c2_b = c2.reshape(c2.shape[:-2]) if c2.ndim else c2  # [...] or 0-dim
        beta = kernel.beta
        kappa = beta
        right = torch.cat([-2.0 * xc, sq + c2.expand_as(sq), ones], dim=-1)  # [X, 1, |x|^2] . this = c^2 + r^2
        roundoff = 1024.0 * (d + 3) * torch.finfo(x.dtype).eps * sq.detach().amax()
        clamp = not bool((c2.detach() > roundoff).all())
    elif kind is RBF:
        params = (kernel.bandwidth,)
        h = _as_param(kernel.bandwidth, x)
        alpha = 0.5 / (h * h)  # 0-dim or [..., 1, 1]
        kappa = -(alpha.reshape(alpha.shape[:-2]) if alpha.ndim else alpha)  # [...] or 0-dim
        right = torch.cat([(2.0 * alpha) * xc, -alpha * sq, -alpha * ones], dim=-1)  # -alpha r^2
    else:
        kappa = 1.0
        right = torch.cat([-2.0 * xc, sq, ones], dim=-1)  # r^2
    right_t = right.transpose(-2, -1)  # [..., d + 2, n]
    track = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (x, s, *params))
    rows = math.prod(batch)
    work = None if track else x.new_empty((3, rows * block * n))

    def slab(k: int, b: int, cols: int) -> Tensor | None:
        return None if work is None else work[k, : rows * b * cols].view(*batch, b, cols)

    def weighted(a: Tensor, b: int) -> Tensor:  # omega: the columns of the leading square halved
        if track:
            return a * _half_cols(a, b)
        a[..., :b].mul_(0.5)
        return a

    prs, ms, seconds = [], [], []  # per block: D aug_C [..., b, 2d + 3 + pad], Phi S_C [..., b, d], [...]
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        b, cols = i1 - i0, n - i0
        g = torch.matmul(aug[..., i0:i1, : d + 2], right_t[..., i0:], out=slab(0, b, cols))  # [..., b, cols]
        if kind is IMQ:
            base = g.clamp_min_(c2) if clamp else g  # c^2 + r^2
            if beta == -0.5:
                phi = torch.rsqrt(base, out=None if track else base)
                inv = torch.mul(phi, phi, out=slab(1, b, cols))
            else:
                inv = torch.reciprocal(base, out=slab(1, b, cols))
                phi = torch.pow(base, beta, out=None if track else base)
            phi = weighted(phi, b)
            dk = torch.mul(phi, inv, out=slab(2, b, cols))  # D = b^(beta - 1), weighted
            ms.append(phi @ s[..., i0:, :])
            seconds.append(_frobenius(dk, inv))  # <D, 1 / b>
        elif kind is RBF:
            dk = weighted(torch.exp(g, out=slab(1, b, cols)), b)  # Phi = D
            seconds.append(_frobenius(dk, g))  # <Phi, E>
        else:
            r2 = g.clamp_min_(0.0)
            # out of place: the outputs of a profile may share memory with one another or with r2
            phi, dk, d2phi = (t * _half_cols(t, b) for t in kernel.profile(r2))
            ms.append(phi @ s[..., i0:, :])
            seconds.append(_frobenius(d2phi, r2))  # <Phi'', R2>
        prs.append(dk @ aug[..., i0:, :])
    # The block sums, all blocks at once: rows i of pr and m are D_i. aug_C and Phi_i. S_C.
    pr = torch.cat(prs, dim=-2)  # [..., n, 2d + 3 + pad]
    pr_s = pr[..., d + 2 : 2 * d + 2]  # D S_C
    m = pr_s if kind is RBF else torch.cat(ms, dim=-2)  # [..., n, d]
    rho = pr[..., d].sum(-1)  # [...] sum of the weighted D
    cross = (s * pr[..., :d] + xc * pr_s).sum((-2, -1)) - (w[..., 0] * pr[..., d]).sum(-1)
    cross = cross - pr[..., 2 * d + 2].sum(-1)  # [...]: the kappa terms over 2 kappa
    second = torch.stack(seconds).sum(0)  # [...]
    if kind is IMQ:
        second = (-4.0 * beta * (beta - 1.0)) * (rho - c2_b * second)
    elif kind is RBF:
        second = (-4.0 * kappa) * second
    else:
        second = -4.0 * second
    return 2.0 * ((s * m).sum((-2, -1)) + (2.0 * kappa) * cross + second)


def _half_cols(a: Tensor, b: int) -> Tensor:
    """``[cols]`` column weights: 1/2 on the first ``b`` columns of ``a``, 1 beyond."""
    col = torch.ones(a.shape[-1], dtype=a.dtype, device=a.device)
    col[:b] = 0.5
    return col


def get_ksd_fn(kernel: Kernel, statistic: str = "u") -> Callable[[Tensor, ScoreArg], Tensor]:
    """Factory: fix the kernel and statistic, return ``ksd_fn(x, score) -> Tensor``.

    See :func:`ksd` for the arguments of the returned closure.
    """
    stat = _check_statistic(statistic)

    def ksd_fn(x: Tensor, score: ScoreArg) -> Tensor:
        return ksd(x, score, kernel, statistic=stat)

    return ksd_fn


def ksd_linear(x: Tensor, score: ScoreArg, kernel: Kernel) -> LinearStatistic:
    """Linear-time KSD^2: mean of ``u_p`` over disjoint consecutive pairs.

    Liu, Lee & Jordan (ICML 2016), Sec. 4 (linear-time statistic, after
    Gretton et al. 2012): with ``m = n // 2``,

        KSD^2_l = (1/m) sum_{i=1}^m u_p(x_{2i-1}, x_{2i}),

    an unbiased mean of ``m`` i.i.d. terms, hence asymptotically normal with
    standard error ``std(u_p) / sqrt(m)`` under the null (mean 0) and the
    alternative alike. O(n d) time and memory. An odd last sample is dropped.

    Args:
        x: ``[..., n, d]`` samples, ``n >= 4``, in i.i.d. order.
        score: tensor ``[..., n, d]`` or callable, as in :func:`ksd`.
        kernel: as in :func:`ksd`.

    Returns:
        :class:`LinearStatistic` with fields ``[...]``; ``p_value`` tests
        ``KSD = 0`` (one-sided, since KSD^2 >= 0).
    """
    score_x = _eval_score(x, score)
    a, b = _pairs(x)
    sa, sb = _pairs(score_x)
    # Matched pairs as [..., m, 1, d] batches of 1 x 1 Stein-kernel matrices.
    h = _stein_cross(a.unsqueeze(-2), sa.unsqueeze(-2), b.unsqueeze(-2), sb.unsqueeze(-2), kernel)
    return _linear_statistic(h[..., 0, 0])


# ---------------------------------------------------------------------------
# Noise-smoothed KSD (Wenliang & Kanagawa, 2020/2021)
# ---------------------------------------------------------------------------
PerturbedScore = Callable[[Tensor, float], Tensor]
"""Score of the model convolved with ``N(0, sigma^2 I)``: ``(x [N, d], sigma) -> [N, d]``.

:meth:`stein_core.distributions.GaussianMixture.perturbed_score` and a noise-conditional
score network's ``s(x, sigma)`` have this form; ``sigma = 0`` must give the model's own score."""

SmoothedKernel = RadialKernel | Sequence[Kernel] | Callable[[Tensor], Kernel]
"""Kernel of each noise level: one :class:`RadialKernel` for every ``sigma``, a sequence of
``L`` kernels (one per ``sigma``), or a factory ``x_tilde [..., n, d] -> Kernel`` called on each
level's smoothed sample (e.g. :func:`median_rbf`)."""


def _check_sigmas(sigmas: Sequence[float] | Tensor) -> list[float]:
    """The noise ladder as Python floats: 1-D, non-empty, finite, ``>= 0``."""
    t = torch.as_tensor(sigmas, dtype=torch.float64)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"sigmas must be finite and >= 0, got {t.tolist()}")
    return [float(s) for s in t]


def _check_smoothed_kernel(kernel: SmoothedKernel, n_sigmas: int) -> SmoothedKernel:
    if isinstance(kernel, (list, tuple)) and len(kernel) != n_sigmas:
        raise ValueError(f"{len(kernel)} kernels for {n_sigmas} noise levels: give one per sigma")
    return kernel


def _smoothing_noise(x: Tensor, n_noise: int, generator: torch.Generator | None) -> Tensor:
    """``eps [n_noise, ..., n, d]`` standard normal, shared by every noise level (common random numbers)."""
    if n_noise < 1:
        raise ValueError(f"n_noise must be >= 1, got {n_noise}")
    return randn((n_noise, *x.shape), like=x, generator=generator)


def _smoothed_level(
    x: Tensor,
    eps: Tensor,
    sigma: float,
    perturbed_score: PerturbedScore,
    kernel: SmoothedKernel,
    level: int,
) -> tuple[Tensor, Tensor, Kernel]:
    """``(x_tilde [M, ..., n, d], score [M, ..., n, d], kernel)`` at one noise level.

    ``x_tilde = x + sigma eps`` (``M = n_noise``; ``M = 1`` and ``x_tilde = x`` at ``sigma = 0``), its
    perturbed score (called on the flattened ``[M * ... * n, d]`` points, as a score network wants), and the
    level's kernel (see :data:`SmoothedKernel`).
    """
    xt = x.unsqueeze(0) if sigma == 0.0 else x + sigma * eps  # [M, ..., n, d]
    flat = xt.reshape(-1, xt.shape[-1])  # [M * ... * n, d]
    s = perturbed_score(flat, sigma)
    if s.shape != flat.shape:
        raise ValueError(f"perturbed_score at sigma={sigma} returned {tuple(s.shape)} for points {tuple(flat.shape)}")
    if isinstance(kernel, RadialKernel):
        k = kernel
    elif isinstance(kernel, (list, tuple)):
        k = kernel[level]
    else:
        k = kernel(xt)
    return xt, s.reshape(xt.shape), k


def smoothed_kernels(kernel: RBF | IMQ, sigmas: Sequence[float] | Tensor) -> list[RadialKernel]:
    """One kernel per noise level whose length scale grows with the data's: ``l -> sqrt(l^2 + sigma^2)``.

    ``l`` is an :class:`RBF`'s bandwidth or an :class:`IMQ`'s ``c``. Smoothing a component of standard
    deviation ``s`` by ``N(0, sigma^2 I)`` makes its standard deviation ``sqrt(s^2 + sigma^2)``; a kernel
    kept at the unsmoothed scale sees the smoothed modes as nearly flat and loses most of its power at a
    ``sigma`` comparable to the distance between modes (measured: samples of the 0.8/0.2 mixture at
    +-(5, 5) against the 0.5/0.5 one, n = 500, ``sigma = 5``, three seeds: the KSD^2 with ``IMQ(c=1)`` is
    0.5-1.5 wild-bootstrap standard deviations, with the widened IMQ 9-15).
    The result is a :data:`SmoothedKernel` for :func:`ksd_smoothed`.
    """
    out: list[RadialKernel] = []
    for s in _check_sigmas(sigmas):
        if isinstance(kernel, RBF):
            h = kernel.bandwidth
            out.append(RBF(torch.sqrt(h * h + s * s) if isinstance(h, Tensor) else math.hypot(h, s)))
        elif isinstance(kernel, IMQ):
            c = kernel.c
            out.append(IMQ(torch.sqrt(c * c + s * s) if isinstance(c, Tensor) else math.hypot(c, s), kernel.beta))
        else:
            raise TypeError(f"smoothed_kernels widens an RBF or an IMQ, got {type(kernel).__name__}")
    return out


def ksd_smoothed(
    x: Tensor,
    perturbed_score: PerturbedScore,
    kernel: SmoothedKernel,
    sigmas: Sequence[float] | Tensor,
    *,
    generator: torch.Generator | None,
    statistic: str = "u",
    n_noise: int = 1,
) -> Tensor:
    """Noise-smoothed KSD^2 over a ladder of noise levels: ``KSD^2(q * N_sigma || p * N_sigma)`` per ``sigma``.

    Wenliang & Kanagawa, "Blindness of score-based methods to isolated components and mixing
    proportions", arXiv:2008.10087 (2020; NeurIPS 2021 workshop on distribution shifts): score-based
    discrepancies barely see the mixing proportions of far-apart modes, since the scores of two mixtures
    that differ only in their weights differ only where no mode has mass. Smoothing *both* sides with
    the same Gaussian noise (the "temperature-matched" comparison) fills the gap between the modes, where
    the weights do change the score. For each level ``sigma_l``:

        x_tilde_i = x_i + sigma_l eps_i,   eps_i ~ N(0, I)        (a sample of q * N(0, sigma_l^2 I))
        KSD^2_l   = ksd(x_tilde, perturbed_score(., sigma_l), k_l)  (against p * N(0, sigma_l^2 I))

    with the blocked :func:`ksd` (U- or V-statistic). One ``eps`` is drawn (from ``generator``) and
    shared by every level, so the values vary smoothly along the ladder and the per-level U-statistics
    are those :func:`stein_core.tests_stat.ksd_smoothed_test` sums. With ``n_noise = M > 1`` each level
    averages the statistic over ``M`` independent noise draws (still unbiased for the U-statistic).
    ``sigma = 0`` is the plain KSD of ``x`` against ``perturbed_score(., 0)``, the model's own score.

    Choice of kernel per level (``kernel``, see :data:`SmoothedKernel`): the smoothed data spread as
    ``sqrt(s^2 + sigma^2)``, so a kernel fixed at the scale of the unsmoothed data loses power at large
    ``sigma``. Either let the median heuristic follow the smoothed sample (``kernel=median_rbf``, a
    bandwidth per level and per batch entry), or widen an IMQ/RBF with the noise,
    ``smoothed_kernels(IMQ(c=1.0), sigmas)`` (``c -> sqrt(c^2 + sigma^2)``, deterministic); one radial
    kernel for every level is accepted too.

    Everything stays differentiable wrt ``x`` (and the parameters of ``perturbed_score``); memory is
    that of :func:`ksd`, ``O(M n * block)`` per level.

    Args:
        x: ``[..., n, d]`` samples of ``q``.
        perturbed_score: ``(x [N, d], sigma: float) -> [N, d]``, the score of ``p * N(0, sigma^2 I)``,
            called once per level on every smoothed point of every batch entry and noise draw.
        kernel: see :data:`SmoothedKernel`.
        sigmas: ``[L]`` noise levels, ``>= 0``.
        generator: RNG of the noise (pass ``None`` explicitly to use the global one).
        statistic: ``"u"`` or ``"v"``.
        n_noise: noise draws ``M`` per point.

    Returns:
        ``[..., L]``: ``KSD^2`` per level (``.sum(-1)`` for the sum over the ladder).
    """
    stat = _check_statistic(statistic)
    sig = _check_sigmas(sigmas)
    kernel = _check_smoothed_kernel(kernel, len(sig))
    eps = _smoothing_noise(x, n_noise, generator)  # [M, ..., n, d]
    values = []
    for level, s in enumerate(sig):
        xt, score, k = _smoothed_level(x, eps, s, perturbed_score, kernel, level)
        values.append(ksd(xt, score, k, statistic=stat).mean(0))  # [...]
    return torch.stack(values, dim=-1)


def get_ksd_smoothed_fn(
    kernel: SmoothedKernel, sigmas: Sequence[float] | Tensor, statistic: str = "u", n_noise: int = 1
) -> Callable[..., Tensor]:
    """Factory: fix the kernel, ladder, statistic and noise draws; return
    ``ksd_smoothed_fn(x, perturbed_score, *, generator) -> [..., L]`` (see :func:`ksd_smoothed`)."""
    stat = _check_statistic(statistic)
    sig = _check_sigmas(sigmas)
    kernel = _check_smoothed_kernel(kernel, len(sig))

    def ksd_smoothed_fn(x: Tensor, perturbed_score: PerturbedScore, *, generator: torch.Generator | None) -> Tensor:
        return ksd_smoothed(x, perturbed_score, kernel, sig, generator=generator, statistic=stat, n_noise=n_noise)

    return ksd_smoothed_fn


# ---------------------------------------------------------------------------
# Sliced kernelized Stein discrepancy (Gong, Li & Hernandez-Lobato, ICLR 2021)
# ---------------------------------------------------------------------------
def median_rbf(x: Tensor, y: Tensor | None = None) -> RBF:
    """RBF kernel with the median-heuristic bandwidth of ``x`` (pooled with ``y``).

    The bandwidth (see :func:`stein_core.kernels.median_heuristic`, detached) is
    computed per leading batch entry (``[...]``; :class:`RBF` broadcasts it
    against ``[..., n, m]`` distance matrices of the same batch). Passed as the
    ``kernel`` of :func:`sksd` / :func:`maxsksd` (a factory called on each 1-D
    projection ``[..., n, 1]``) it gives every slice its own median-heuristic
    bandwidth, the setting of Gong et al. (2021).

    Where most points coincide the bandwidth is the median heuristic's
    fallback (the median of the non-zero squared distances); where all of them
    coincide (e.g. a constant coordinate, for a slice) it raises ``ValueError``
    rather than return a zero bandwidth, whose kernel would be NaN.
    """
    return RBF(median_heuristic(x, y))  # bandwidth [...], broadcast by RBF


def _unit(v: Tensor) -> Tensor:
    """Rows of ``v [..., R, d]`` scaled to unit Euclidean norm."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


#: Elements of one chunk of slices' ``[..., C, n, n]`` temporaries in :func:`sliced_stein_kernel_matrix`
#: (2^21: 16 MB of float64 each).
SLICE_BLOCK = 2**21


def sliced_stein_kernel_matrix(
    x: Tensor, score_x: Tensor, kernel: SliceKernel, r: Tensor, g: Tensor
) -> Tensor:
    """Sliced Stein kernel ``sum_k h_{r_k, g_k}(x_i, x_j)`` -> ``[..., n, n]``.

    Gong, Li & Hernandez-Lobato, "Sliced Kernelized Stein Discrepancy", ICLR
    2021, Thm. 3 (analytic SKSD). Slice ``k`` projects the score on ``r`` and
    the kernel input on ``g`` (dropping ``k``): ``s_r(x) = r^T s(x)`` and
    ``k_g(x, y) = kappa(g^T x, g^T y)`` with a 1-D kernel ``kappa``. Its Stein
    kernel

        h_{r,g}(x, y) = s_r(x) s_r(y) k_g + s_r(x) r^T grad_y k_g
                        + s_r(y) r^T grad_x k_g + r^T grad_x grad_y k_g r

    reduces to 1-D derivatives by the chain rule: ``grad_x k_g = kappa_u g``,
    ``grad_y k_g = kappa_v g`` and ``grad_x grad_y k_g = kappa_uv g g^T``, with
    ``u = g^T x``, ``v = g^T y``, so every ``r^T g`` factor is the scalar
    ``c = r.g``. For a radial ``kappa = phi((u - v)^2)`` (``phi', phi''`` wrt
    the squared distance, ``delta = u - v``): ``kappa_u = 2 phi' delta``,
    ``kappa_v = -2 phi' delta``, ``kappa_uv = -2 phi' - 4 phi'' delta^2``, so

        h_{r,g}(x, y) = phi s_r(x) s_r(y) + 2 c phi' delta (s_r(y) - s_r(x))
                        - c^2 (2 phi' + 4 phi'' delta^2).

    With ``r = g = e_a`` this is the 1-D Stein kernel of coordinate ``a``.

    Slices are processed in chunks of ``C = max(1, SLICE_BLOCK // n^2)``, each a
    batched pass (one median heuristic for a chunk's projections): forward
    memory is ``O(max(C n^2, n^2))`` whatever ``R`` (a backward pass stores
    ``O(R n^2)``). At n = 100 every slice of D = 200 is one pass.

    Args:
        x: ``[..., n, d]`` samples.
        score_x: ``[..., n, d]`` score of ``p`` at ``x``.
        kernel: 1-D kernel ``kappa``: a :class:`RadialKernel`, or a factory
            called with each projection ``[..., n, 1]`` returning one (e.g.
            :func:`median_rbf`: a per-slice median-heuristic bandwidth).
        r: ``[R, d]`` or ``[..., R, d]`` score directions (unit vectors; used as given).
        g: ``[..., R, d]`` kernel directions, one per ``r`` (batch dims of
            ``x``, ``r`` and ``g`` broadcast).

    Returns:
        ``[..., n, n]`` symmetric matrix, the sum over the ``R`` slices.
    """
    if x.shape != score_x.shape:
        raise ValueError(f"x {tuple(x.shape)} and score_x {tuple(score_x.shape)} differ")
    if r.ndim < 2 or g.ndim < 2 or r.shape[-2:] != g.shape[-2:] or r.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"r {tuple(r.shape)} and g {tuple(g.shape)} must both be [..., R, d={x.shape[-1]}]"
        )
    proj_x = x @ g.transpose(-2, -1)  # [..., n, R]  g_k.x_i
    proj_s = score_x @ r.transpose(-2, -1)  # [..., n, R]  r_k.s_i
    c = (r * g).sum(-1)  # [..., R]
    n = x.shape[-2]
    chunk = max(1, SLICE_BLOCK // max(n * n, 1))  # slices per pass: C n^2 elements per temporary
    out = None
    for k0 in range(0, r.shape[-2], chunk):
        u = proj_x[..., k0 : k0 + chunk].transpose(-1, -2)  # [..., C, n]
        s = proj_s[..., k0 : k0 + chunk].transpose(-1, -2)  # [..., C, n]
        ck = c[..., k0 : k0 + chunk, None, None]  # [..., C, 1, 1]
        delta = u[..., :, None] - u[..., None, :]  # [..., C, n, n]
        delta2 = delta * delta
        if isinstance(kernel, RadialKernel):
            # its parameters broadcast against [..., n, n]: the slice axis goes in front of the batch dims
            phi, dphi, d2phi = (t.movedim(0, -3) for t in kernel.profile(delta2.movedim(-3, 0)))
        else:
            try:  # one kernel for the chunk's slices: a median-heuristic bandwidth [..., C] per slice
                kern = kernel(u.unsqueeze(-1))
            except ValueError as err:  # e.g. a median heuristic on a projection where all points coincide
                raise ValueError(
                    f"the slice kernel factory failed on the projections g.x_i of a slice: {err}"
                ) from err
            phi, dphi, d2phi = kern.profile(delta2)
        h = (
            phi * (s[..., :, None] * s[..., None, :])
            + 2.0 * ck * dphi * delta * (s[..., None, :] - s[..., :, None])
            - ck * ck * (2.0 * dphi + 4.0 * d2phi * delta2)
        ).sum(-3)
        out = h if out is None else out + h
    if out is None:
        raise ValueError("need at least one slice (R >= 1)")
    return out


def sksd(
    x: Tensor,
    score: ScoreArg,
    kernel: SliceKernel,
    *,
    r: Tensor,
    g: Tensor,
    statistic: str = "u",
) -> Tensor:
    """Sliced kernelized Stein discrepancy ``SKSD(q || p) = sum_k D^2_{r_k, g_k}`` from ``x ~ q``.

    Gong, Li & Hernandez-Lobato (ICLR 2021), eq. (6)/Thm. 3: the sum over the
    slices of the squared 1-D KSDs, each estimated by the U- (or V-) statistic
    of :func:`sliced_stein_kernel_matrix`. Fixed ``r, g``; see :func:`maxsksd`
    for optimised ones. Differentiable wrt ``x``, the score and ``r, g``.

    Args:
        x: ``[..., n, d]``.
        score: tensor ``[..., n, d]`` or callable ``x -> [..., n, d]``.
        kernel: see :func:`sliced_stein_kernel_matrix`.
        r, g: ``[R, d]`` or ``[..., R, d]`` unit directions.
        statistic: ``"u"`` or ``"v"``.

    Returns:
        ``[...]`` estimate.
    """
    stat = _check_statistic(statistic)
    h = sliced_stein_kernel_matrix(x, _eval_score(x, score), kernel, r, g)
    return _reduce(h, stat)


def get_sksd_fn(
    kernel: SliceKernel, *, r: Tensor, g: Tensor, statistic: str = "u"
) -> Callable[[Tensor, ScoreArg], Tensor]:
    """Factory: fix the kernel, directions and statistic; return ``sksd_fn(x, score)``."""
    stat = _check_statistic(statistic)

    def sksd_fn(x: Tensor, score: ScoreArg) -> Tensor:
        return sksd(x, score, kernel, r=r, g=g, statistic=stat)

    return sksd_fn


class MaxSKSDResult(NamedTuple):
    """Output of :func:`maxsksd`.

    Attributes:
        statistic: ``[...]`` SKSD at the optimised directions (differentiable wrt
            ``x`` and the score; the directions are detached).
        r: ``[..., R, d]`` unit score directions (the basis for ``variant="g"``).
        g: ``[..., R, d]`` optimised unit kernel directions.
    """

    statistic: Tensor
    r: Tensor
    g: Tensor


_VARIANTS = ("g", "rg")


def _init_directions(
    x: Tensor,
    variant: str,
    r: Tensor | None,
    g: Tensor | None,
    n_slices: int | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Initial unit ``(r, g)``, each ``[..., R, d]`` with the batch dims of ``x``."""
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    batch, d = x.shape[:-2], x.shape[-1]
    if r is None:
        if variant == "g":
            r = torch.eye(d, dtype=x.dtype, device=x.device)
        else:
            r = randn((*batch, n_slices or 1, d), like=x, generator=generator)
    r = _unit(r.to(dtype=x.dtype, device=x.device).detach()).expand(*batch, *r.shape[-2:])
    g = r if g is None else _unit(g.to(dtype=x.dtype, device=x.device).detach())
    g = g.expand(*batch, *g.shape[-2:])
    if g.shape != r.shape:
        raise ValueError(f"r {tuple(r.shape)} and g {tuple(g.shape)} differ")
    return r.clone(), g.clone()


def _optimise_directions(
    x: Tensor,
    score_x: Tensor,
    kernel: SliceKernel,
    r: Tensor,
    g: Tensor,
    *,
    optimise_r: bool,
    n_steps: int,
    lr: float,
    statistic: str,
) -> tuple[Tensor, Tensor]:
    """Adam ascent of the SKSD over unit directions; returns detached unit ``(r, g)``."""
    x, score_x = x.detach(), score_x.detach()
    g_p = g.detach().clone().requires_grad_(True)
    r_p = r.detach().clone().requires_grad_(optimise_r)
    params = [g_p, r_p] if optimise_r else [g_p]
    opt = torch.optim.Adam(params, lr=lr, maximize=True)
    with torch.enable_grad():
        for _ in range(n_steps):
            opt.zero_grad(set_to_none=True)
            # The objective is a sum over slices (and over independent batch
            # entries; Adam's update is elementwise): back-propagate slice by
            # slice so that only one slice's [..., n, n] graph is alive.
            for k in range(g_p.shape[-2]):
                obj = sksd(
                    x,
                    score_x,
                    kernel,
                    r=_unit(r_p[..., k : k + 1, :]),
                    g=_unit(g_p[..., k : k + 1, :]),
                    statistic=statistic,
                )
                obj.sum().backward()
            opt.step()
            with torch.no_grad():
                for p in params:
                    p.copy_(_unit(p))
    return _unit(r_p).detach(), _unit(g_p).detach()


def maxsksd(
    x: Tensor,
    score: ScoreArg,
    kernel: SliceKernel,
    *,
    variant: str = "g",
    r: Tensor | None = None,
    g: Tensor | None = None,
    n_slices: int | None = None,
    n_steps: int = 50,
    lr: float = 0.01,
    statistic: str = "u",
    generator: torch.Generator | None = None,
) -> MaxSKSDResult:
    """maxSKSD: the SKSD at slice directions optimised by projected gradient ascent.

    Gong, Li & Hernandez-Lobato (ICLR 2021), Sec. 3.3:

    - ``variant="g"`` (maxSKSD-g): ``r`` is an orthonormal basis (the standard
      basis unless ``r`` is given, ``R = d``) and each ``g_r`` is optimised.
    - ``variant="rg"`` (maxSKSD-rg): ``R`` slices (``n_slices``, default 1, or
      ``r.shape[-2]``) whose ``r`` and ``g`` are both optimised.

    Initialisation: ``g = r``; ``r`` is the given one, the standard basis
    (``"g"``) or ``n_slices`` Gaussian directions (``"rg"``, drawn with
    ``generator``). Optimisation: ``n_steps`` Adam steps (learning rate ``lr``)
    maximising the statistic of ``x`` itself with ``x`` and the score detached,
    the objective evaluated at the normalised directions and the parameters
    renormalised to the unit sphere after every step. As in the paper's model
    learning use, the same samples serve for optimisation and estimation, which
    biases the statistic upwards; :func:`stein_core.tests_stat.sksd_test` splits
    the sample instead to keep the level of a test.

    The returned statistic is recomputed at the optimised, detached directions
    with the graph of ``x`` and the score intact, so it is a differentiable
    training loss (the directions act like an inner maximisation step).

    Args:
        x: ``[..., n, d]``; every batch entry gets its own directions.
        score: tensor ``[..., n, d]`` or callable.
        kernel: see :func:`sliced_stein_kernel_matrix` (:func:`median_rbf`
            recomputes the bandwidth of each projection at every step).
        variant: ``"g"`` or ``"rg"``.
        r, g: optional initial (or, ``r`` for ``"g"``, fixed) directions
            ``[R, d]`` or ``[..., R, d]``.
        n_slices: number of slices for ``"rg"`` when ``r`` is not given.
        n_steps: Adam steps (0: evaluate at the initial directions).
        lr: Adam learning rate. Adam moves each coordinate by about ``lr`` per
            step, so a direction moves by about ``lr * sqrt(d)``.
        statistic: ``"u"`` or ``"v"``.
        generator: RNG for the random initial ``r`` of ``"rg"``.

    Returns:
        :class:`MaxSKSDResult` ``(statistic [...], r [..., R, d], g [..., R, d])``.
    """
    stat = _check_statistic(statistic)
    score_x = _eval_score(x, score)
    r0, g0 = _init_directions(x, variant, r, g, n_slices, generator)
    r_opt, g_opt = _optimise_directions(
        x,
        score_x,
        kernel,
        r0,
        g0,
        optimise_r=(variant == "rg"),
        n_steps=n_steps,
        lr=lr,
        statistic=stat,
    )
    value = sksd(x, score_x, kernel, r=r_opt, g=g_opt, statistic=stat)
    return MaxSKSDResult(value, r_opt, g_opt)


# ---------------------------------------------------------------------------
# Maximum mean discrepancy
# ---------------------------------------------------------------------------
def mmd(x: Tensor, y: Tensor, kernel: Kernel, statistic: str = "u") -> Tensor:
    """Squared maximum mean discrepancy ``MMD^2(P, Q)`` from ``x ~ P`` and ``y ~ Q``.

    Gretton et al., "A Kernel Two-Sample Test", JMLR 2012 (eq. 3 for the
    unbiased and eq. 5 for the biased estimator).

    Args:
        x: ``[..., n, d]``, ``n >= 2``.
        y: ``[..., m, d]``, ``m >= 2`` (``n`` and ``m`` may differ).
        kernel: any kernel callable ``(x, y) -> Gram``.
        statistic: ``"u"``: within-sample terms averaged over ``i != j``
            (unbiased), cross term over all ``n m`` pairs; ``"v"``: all terms
            over all pairs (biased, >= 0).

    Returns:
        ``[...]`` estimate, differentiable wrt ``x``, ``y`` and kernel parameters.

    Memory: a :class:`RadialKernel` on a pooled sample with ``(n + m)^2 > _MMD_DENSE_ELEMENTS`` goes through
    :func:`_mmd_radial_blocked`, ``O((n + m) * block)`` memory and no Gram matrix (equal to the dense form to
    round-off); smaller inputs and any other kernel form the three Gram matrices ``[..., n, n]``,
    ``[..., m, m]``, ``[..., n, m]``.
    """
    stat = _check_statistic(statistic)
    if isinstance(kernel, RadialKernel) and (x.shape[-2] + y.shape[-2]) ** 2 > _MMD_DENSE_ELEMENTS:
        return _mmd_radial_blocked(x, y, kernel, stat)
    kxx = kernel(x, x)
    kyy = kernel(y, y)
    kxy = kernel(x, y)
    return _reduce(kxx, stat) + _reduce(kyy, stat) - 2.0 * kxy.mean(dim=(-2, -1))


#: :func:`mmd` keeps its three dense Gram matrices while the pooled Gram of one problem has at most this many
#: entries, ``(n + m)^2 <= 2^22``, i.e. ``n + m <= 2048``: the dense Grams then hold ``n^2 + m^2 + n m <= 2^22``
#: elements (16 MiB float32 per problem, four of the 2^20-element row blocks), and every shipped
#: training loss (generator batches ``n + m`` of a few hundred, up to about 2000) and the held-out MMD
#: (``heldout_n`` 360 to 500 a side) stays on exactly the computation its trained models were made with, bit
#: for bit. Changing this number changes which inputs take the blocked path, hence the round-off of their
#: losses: it reruns every pipeline that trains with :func:`mmd` near the threshold.
_MMD_DENSE_ELEMENTS = 1 << 22


def _mmd_radial_blocked(x: Tensor, y: Tensor, kernel: RadialKernel, stat: str) -> Tensor:
    """MMD² for a radial kernel without forming a Gram matrix -> ``[...]``.

    Gretton et al. (JMLR 2012), eqs. 3 and 5, from the three sums ``S_xx = sum_ij k(x_i, x_j)``,
    ``S_yy`` and ``S_xy = sum_ij k(x_i, y_j)``. The samples are pooled, ``z = (x, y)`` ``[..., N, d]`` with
    ``N = n + m``, centred at their (detached) mean, and ``r^2`` of a block of rows against columns is one GEMM
    of the augmented ``[z, |z|^2, 1]`` and ``[-2 z, 1, |z|^2]`` (as in :func:`_ksd_radial_blocked`), then
    ``phi``. The symmetry of ``K_xx`` and ``K_yy`` halves the work: a block of rows ``[i0, i1)`` of ``x`` is
    taken against the columns ``[i0, N)`` only, whose leading ``[b, b]`` square (the diagonal block) counts
    once, the columns ``[i1, n)`` (above it) twice and the columns ``[n, N)`` (``K_xy``) once; a block of
    ``y`` rows against the ``y`` columns from its own first row on. In all ``n^2/2 + n m + m^2/2`` kernel
    values, against ``n^2 + m^2 + n m`` for three Grams. Each block is ``[..., b, <= N]`` with
    ``b = max(1, _BLOCK_ELEMENTS // N)`` rows, so memory is ``O(N * block)``, never ``O(N^2)``. The
    U-statistic subtracts the computed diagonals (``trace`` of the diagonal blocks), as the dense form does.
    Each block's sums are added up in float64 and the result cast back to the input's dtype: ``S_xx`` of
    ``2^28`` float32 terms, accumulated over 128 blocks in float32, lost ``1e-6`` of itself, and the three
    ``O(1)`` terms cancel to an MMD² of ``~4e-3`` (``n = m = 16384``, ``d = 64``: ``1.3e-4`` relative error
    against float64 measured, ``7e-6`` for the three float32 Grams' one-pass sums; ``6e-7`` now).
    Batch dims of ``x`` and ``y`` broadcast. Differentiable wrt ``x``, ``y`` and kernel parameters (the graph
    keeps each block's tensors, as the dense form keeps its Grams).
    """
    n, m, d = x.shape[-2], y.shape[-2], x.shape[-1]
    if stat == "u" and (n < 2 or m < 2):
        raise ValueError("a U-statistic needs at least 2 samples")
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    z = torch.cat([x.expand(*batch, n, d), y.expand(*batch, m, y.shape[-1])], dim=-2)  # [..., N, d]
    total = n + m
    zc = z - z.mean(dim=-2, keepdim=True).detach()  # distances are translation invariant
    sq = (zc * zc).sum(-1, keepdim=True)  # [..., N, 1]
    ones = torch.ones_like(sq)
    left = torch.cat([zc, sq, ones], dim=-1)  # [..., N, d + 2]
    right_t = torch.cat([-2.0 * zc, ones, sq], dim=-1).transpose(-2, -1)  # [..., d + 2, N]
    block = max(1, _BLOCK_ELEMENTS // total)
    acc = torch.float64  # running sums of [...] scalars, see the docstring
    s_xx = s_yy = s_xy = tr_x = tr_y = 0.0
    for lo, hi in ((0, n), (n, total)):  # rows of x, then rows of y
        for i0 in range(lo, hi, block):
            i1 = min(hi, i0 + block)
            b = i1 - i0
            r2 = (left[..., i0:i1, :] @ right_t[..., :, i0:]).clamp_min_(0.0)  # [..., b, N - i0]
            k = kernel.phi(r2)  # k(z_i, z_j) for rows i in [i0, i1), columns j >= i0
            col = k.sum(-2)  # [..., N - i0] column sums over the block's rows
            within = col[..., :b].sum(-1) + 2.0 * col[..., b : hi - i0].sum(-1)  # [...]
            trace = torch.diagonal(k[..., :, :b], dim1=-2, dim2=-1).sum(-1)  # [...] k(z_i, z_i)
            if lo == 0:
                s_xx, tr_x = s_xx + within.to(acc), tr_x + trace.to(acc)
                s_xy = s_xy + col[..., n - i0 :].sum(-1).to(acc)
            else:
                s_yy, tr_y = s_yy + within.to(acc), tr_y + trace.to(acc)
    if stat == "u":
        out = (s_xx - tr_x) / (n * (n - 1)) + (s_yy - tr_y) / (m * (m - 1)) - 2.0 * s_xy / (n * m)
    else:
        out = s_xx / (n * n) + s_yy / (m * m) - 2.0 * s_xy / (n * m)
    return out.to(z.dtype)


def get_mmd_fn(kernel: Kernel, statistic: str = "u") -> Callable[[Tensor, Tensor], Tensor]:
    """Factory: fix the kernel and statistic, return ``mmd_fn(x, y) -> Tensor``."""
    stat = _check_statistic(statistic)

    def mmd_fn(x: Tensor, y: Tensor) -> Tensor:
        return mmd(x, y, kernel, statistic=stat)

    return mmd_fn


def mmd_linear(x: Tensor, y: Tensor, kernel: Kernel) -> LinearStatistic:
    """Linear-time MMD^2 (Gretton et al., JMLR 2012, Sec. 6, Lemma 14).

    With ``m = n // 2`` disjoint pairs,

        MMD^2_l = (1/m) sum_i h(z_{2i-1}, z_{2i}),
        h(z, z') = k(x, x') + k(y, y') - k(x, y') - k(x', y),   z = (x, y),

    a mean of i.i.d. terms: asymptotically normal with standard error
    ``std(h) / sqrt(m)``. O(n d) time and memory; an odd last pair is dropped.

    Args:
        x: ``[..., n, d]``; y: ``[..., n, d]`` (equal sizes, ``n >= 4``). Any
            kernel callable; a non-radial one must accept leading batch dims.
        kernel: as in :func:`mmd`.

    Returns:
        :class:`LinearStatistic` with fields ``[...]``; ``p_value`` is one-sided
        (large values reject ``P = Q``).
    """
    if x.shape[-2] != y.shape[-2]:
        raise ValueError(
            f"mmd_linear needs equal sample sizes, got {x.shape[-2]} and {y.shape[-2]}"
        )
    x1, x2 = _pairs(x)
    y1, y2 = _pairs(y)
    h = (
        _gram_pairs(kernel, x1, x2)
        + _gram_pairs(kernel, y1, y2)
        - _gram_pairs(kernel, x1, y2)
        - _gram_pairs(kernel, x2, y1)
    )  # [..., m]
    return _linear_statistic(h)
