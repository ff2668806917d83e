"""Radial kernels ``k(x, y) = phi(r^2)`` with ``r^2 = ||x - y||^2``.

Every radial kernel exposes ``profile(r2) -> (phi, dphi, d2phi)``: the value of
``phi`` and its first and second derivatives with respect to ``r^2``. These are
all the Stein-type discrepancies need, through the closed forms

    grad_x k(x, y)            =  2 phi'(r^2) (x - y)
    grad_y k(x, y)            = -2 phi'(r^2) (x - y)
    tr grad_x grad_y k(x, y)  = -2 d phi'(r^2) - 4 phi''(r^2) r^2

so no ``[n, n, d]`` tensor is ever formed (see ``discrepancies.stein_kernel_matrix``).
The sum ``sum_j grad_1 k(x_j, y_i)`` needed by the Stein gradient estimators
(``score_estimators``) is likewise two matrix products
(:meth:`RadialKernel.grad_x_sum`). Kernels that are not radial in ``x``
(:class:`DeepKernel`) get the same quantity from forward-mode autograd
(:func:`grad_x_sum_autograd`).

Shapes: ``x`` is ``[..., n, d]``, ``y`` is ``[..., m, d]``, a Gram matrix is
``[..., n, m]``. Device and dtype follow the inputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._random import randint

__all__ = [
    "sq_dists",
    "RadialKernel",
    "RBF",
    "IMQ",
    "SumKernel",
    "DeepKernel",
    "median_heuristic",
    "imq_mixture",
    "grad_x_sum_autograd",
    "gram_and_grad_x_sum",
]


def sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances.

    Args:
        x: ``[..., n, d]``.
        y: ``[..., m, d]`` (batch dims broadcastable with ``x``).

    Returns:
        ``[..., n, m]`` with entry ``(i, j) = ||x_i - y_j||^2``, clamped at 0.

    Uses ``||x||^2 + ||y||^2 - 2 x y^T`` (one matmul, O(nm) memory). Both inputs
    are first shifted by the mean of ``x`` (distances are translation
    invariant), which limits cancellation when the data sit far from the origin.
    """
    shift = x.mean(dim=-2, keepdim=True).detach()
    xc = x - shift
    yc = y - shift
    x2 = (xc * xc).sum(-1, keepdim=True)  # [..., n, 1]
    y2 = (yc * yc).sum(-1, keepdim=True)  # [..., m, 1]
    r2 = x2 + y2.transpose(-2, -1) - 2.0 * (xc @ yc.transpose(-2, -1))  # [..., n, m]
    if r2.requires_grad:
        # Clamp the value but keep the gradient of the unclamped expression: where round-off makes r^2
        # slightly negative (the diagonal of x vs x), a plain clamp would zero the first and second
        # derivatives there, and autograd-based Stein kernels would lose their trace term.
        return r2 - (r2 - r2.clamp_min(0.0)).detach()
    return r2.clamp_min_(0.0)


class RadialKernel:
    """Base class of kernels ``k(x, y) = phi(||x - y||^2)``.

    Subclasses implement :meth:`profile` (and may override :meth:`phi` with a
    cheaper value-only version).
    """

    def profile(self, r2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(phi, dphi, d2phi)`` at ``r2`` (any shape), each shaped like ``r2``.

        ``dphi`` and ``d2phi`` are the first and second derivatives of ``phi``
        with respect to ``r^2`` (not ``r``).
        """
        raise NotImplementedError

    def phi(self, r2: Tensor) -> Tensor:
        """Kernel value as a function of the squared distance (shape of ``r2``)."""
        return self.profile(r2)[0]

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Gram matrix: ``x [..., n, d]``, ``y [..., m, d]`` -> ``[..., n, m]``."""
        return self.phi(sq_dists(x, y))

    def gram_and_grad_x_sum(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Transposed Gram matrix and the summed first-argument gradients, in closed form.

        Args:
            x: ``[..., n, d]`` (the points summed over, e.g. samples).
            y: ``[..., m, d]``.

        Returns:
            ``(gram_t [..., m, n], g [..., m, d])`` with ``gram_t[i, j] = k(x_j, y_i)``
            and

                g_i = sum_j grad_1 k(x_j, y_i) = sum_j 2 phi'(r^2_ij) (x_j - y_i)
                    = 2 (Phi' X - rowsum(Phi') * Y)_i,

            where ``Phi'[i, j] = phi'(||y_i - x_j||^2)``: one ``[m, n] x [n, d]``
            product, no ``[m, n, d]`` tensor. With ``y = x`` this is the
            ``<nabla, K>`` of Li & Turner, "Gradient Estimators for Implicit
            Models", ICLR 2018. Both inputs are shifted by the mean of ``x`` (which
            cancels) to limit cancellation far from the origin.
        """
        r2 = sq_dists(y, x)  # [..., m, n]
        phi, dphi, _ = self.profile(r2)
        shift = x.mean(dim=-2, keepdim=True).detach()
        xc, yc = x - shift, y - shift
        g = 2.0 * (dphi @ xc - dphi.sum(-1, keepdim=True) * yc)  # [..., m, d]
        return phi, g

    def grad_x_sum(self, x: Tensor, y: Tensor) -> Tensor:
        """``sum_j grad_1 k(x_j, y_i)``: ``x [..., n, d]``, ``y [..., m, d]`` -> ``[..., m, d]``.

        See :meth:`gram_and_grad_x_sum` for the closed form.
        """
        return self.gram_and_grad_x_sum(x, y)[1]


def _as_param(value: float | Tensor, like: Tensor) -> Tensor:
    """A kernel parameter as a tensor with the dtype and device of ``like`` (differentiable).

    A parameter tensor of shape ``[...]`` (one value per batch entry, e.g. a
    batched median-heuristic bandwidth) is viewed as ``[..., 1, 1]`` so that it
    broadcasts against the batch dims of a squared-distance matrix
    ``r2 [..., n, m]``. Floats and 0-dim tensors broadcast against anything.
    """
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim > 0:
        t = t[..., None, None]
    return t


class RBF(RadialKernel):
    """Gaussian (RBF) kernel ``k(x, y) = exp(-||x - y||^2 / (2 h^2))``.

    Args:
        bandwidth: ``h > 0``; a float or a tensor (a tensor may require grad,
            e.g. a learned bandwidth, and stays differentiable). A tensor of
            shape ``[...]`` gives one bandwidth per batch entry of the Gram
            matrices ``[..., n, m]`` it produces (the output of
            :func:`median_heuristic` on batched samples).
    """

    def __init__(self, bandwidth: float | Tensor) -> None:
        if not isinstance(bandwidth, Tensor):
            bandwidth = float(bandwidth)
            if not bandwidth > 0.0:
                raise ValueError(f"RBF bandwidth must be > 0, got {bandwidth}")
        self.bandwidth = bandwidth

    def __repr__(self) -> str:
        return f"RBF(bandwidth={self.bandwidth})"

    def phi(self, r2: Tensor) -> Tensor:
        h = _as_param(self.bandwidth, r2)
        return torch.exp(-r2 / (2.0 * h * h))

    def profile(self, r2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = _as_param(self.bandwidth, r2)
        a = 1.0 / (2.0 * h * h)
        phi = torch.exp(-a * r2)
        dphi = -a * phi
        d2phi = a * a * phi
        return phi, dphi, d2phi


class IMQ(RadialKernel):
    """Inverse multiquadric kernel ``k(x, y) = (c^2 + ||x - y||^2)^beta``, ``beta < 0``.

    The IMQ kernel with ``beta in (-1, 0)`` makes the KSD detect non-convergence
    (Gorham & Mackey, "Measuring Sample Quality with Kernels", ICML 2017).

    Args:
        c: ``c > 0``; a float or a tensor (differentiable; a tensor of shape
            ``[...]`` gives one ``c`` per batch entry, as for :class:`RBF`).
        beta: exponent, strictly negative.
    """

    def __init__(self, c: float | Tensor = 1.0, beta: float = -0.5) -> None:
        beta = float(beta)
        if not isinstance(c, Tensor):
            c = float(c)
            if not c > 0.0:
                raise ValueError(f"IMQ c must be > 0, got {c}")
        if not beta < 0.0:
            raise ValueError(f"IMQ beta must be < 0, got {beta}")
        self.c = c
        self.beta = beta

    def __repr__(self) -> str:
        return f"IMQ(c={self.c}, beta={self.beta})"

    def phi(self, r2: Tensor) -> Tensor:
        c = _as_param(self.c, r2)
        return (c * c + r2) ** self.beta

    def profile(self, r2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b = self.beta
        c = _as_param(self.c, r2)
        base = r2 + c * c
        inv = base.reciprocal()  # one division, reused twice
        phi = base.rsqrt() if b == -0.5 else base.pow(b)
        dphi = (phi * inv).mul_(b)  # b base^(b-1)
        d2phi = (dphi * inv).mul_(b - 1.0)  # b (b-1) base^(b-2)
        return phi, dphi, d2phi


class SumKernel(RadialKernel):
    """Sum of radial kernels, ``k = sum_c k_c``; radial with profile ``sum_c phi_c``.

    A sum of positive-definite kernels is positive definite, and all derivatives
    of the profile add up, so every closed form of :class:`RadialKernel` holds.

    Args:
        kernels: non-empty sequence of :class:`RadialKernel`.
    """

    def __init__(self, kernels: Sequence[RadialKernel]) -> None:
        kernels = tuple(kernels)
        if not kernels:
            raise ValueError("SumKernel needs at least one kernel")
        for k in kernels:
            if not isinstance(k, RadialKernel):
                raise TypeError(f"SumKernel components must be RadialKernel, got {type(k).__name__}")
        self.kernels = kernels

    def __repr__(self) -> str:
        return f"SumKernel({list(self.kernels)!r})"

    def phi(self, r2: Tensor) -> Tensor:
        out = self.kernels[0].phi(r2)
        for k in self.kernels[1:]:
            out = out + k.phi(r2)
        return out

    def profile(self, r2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        phi, dphi, d2phi = self.kernels[0].profile(r2)
        for k in self.kernels[1:]:
            p, dp, d2p = k.profile(r2)
            phi, dphi, d2phi = phi + p, dphi + dp, d2phi + d2p
        return phi, dphi, d2phi


def grad_x_sum_autograd(
    kernel: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor
) -> Tensor:
    """``sum_j grad_1 k(x_j, y_i)`` for any differentiable kernel, by forward-mode autograd.

    Writes the sum as the derivative of a common translation ``t`` of all
    first arguments: ``g_i = d/dt sum_j k(x_j + t, y_i) |_{t=0}``. One
    Jacobian-vector product per coordinate (``d`` passes, each O(n m) memory),
    so no ``[m, n, d]`` tensor is formed. Differentiable (the result keeps the
    graph to ``x``, ``y`` and the kernel's parameters).

    Args:
        kernel: Gram callable ``(x [..., n, d], y [..., m, d]) -> [..., n, m]``
            supporting forward-mode AD (``torch.func.jvp``).
        x: ``[..., n, d]``.
        y: ``[..., m, d]``.

    Returns:
        ``[..., m, d]`` with the dtype and device of ``x``.
    """
    d = x.shape[-1]

    def summed(t: Tensor) -> Tensor:
        return kernel(x + t, y).sum(dim=-2)  # [..., m]

    t0 = torch.zeros(d, dtype=x.dtype, device=x.device)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    cols = [torch.func.jvp(summed, (t0,), (eye[a],))[1] for a in range(d)]
    return torch.stack(cols, dim=-1)


def gram_and_grad_x_sum(kernel, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(gram_t [..., m, n], g [..., m, d])``: ``gram_t[i, j] = k(x_j, y_i)``, ``g_i = sum_j grad_1 k(x_j, y_i)``.

    Dispatch: the kernel's own ``gram_and_grad_x_sum`` (closed form for every
    :class:`RadialKernel`; autograd for :class:`DeepKernel`), else the Gram
    callable with :func:`grad_x_sum_autograd`.

    Args:
        kernel: a kernel object or a Gram callable ``(x, y) -> [..., n, m]``.
        x: ``[..., n, d]``.
        y: ``[..., m, d]``.
    """
    method = getattr(kernel, "gram_and_grad_x_sum", None)
    if method is not None:
        return method(x, y)
    return kernel(x, y).transpose(-2, -1), grad_x_sum_autograd(kernel, x, y)


class DeepKernel:
    """Kernel on learned features, ``k(x, y) = base(f(x), f(y))``.

    Used e.g. by Wenliang, Sutherland, Strathmann & Gretton, "Learning deep
    kernels for exponential family densities", ICML 2019, and Liu et al.,
    "Learning Deep Kernels for Non-Parametric Two-Sample Tests", ICML 2020.
    It is not radial in ``x``, so Stein methods differentiate it by autograd
    (:meth:`gram_and_grad_x_sum` uses :func:`grad_x_sum_autograd`).

    Args:
        feature_map: ``nn.Module`` or callable ``[..., n, d] -> [..., n, d']``
            acting on each point independently (row-wise).
        base: kernel on features (typically a :class:`RadialKernel`).
    """

    def __init__(self, feature_map: Callable[[Tensor], Tensor], base) -> None:
        if not callable(feature_map):
            raise TypeError("feature_map must be callable")
        self.feature_map = feature_map
        self.base = base

    def __repr__(self) -> str:
        return f"DeepKernel(feature_map={self.feature_map!r}, base={self.base!r})"

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Gram matrix: ``x [..., n, d]``, ``y [..., m, d]`` -> ``[..., n, m]``."""
        fx = self.feature_map(x)
        fy = fx if y is x else self.feature_map(y)
        return self.base(fx, fy)

    def gram_and_grad_x_sum(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """As :meth:`RadialKernel.gram_and_grad_x_sum`, by forward-mode autograd."""
        return self(x, y).transpose(-2, -1), grad_x_sum_autograd(self, x, y)

    def grad_x_sum(self, x: Tensor, y: Tensor) -> Tensor:
        """``sum_j grad_1 k(x_j, y_i)``: ``[..., m, d]`` (autograd)."""
        return grad_x_sum_autograd(self, x, y)


#: Pairs with ``r^2_ij <= _COINCIDE_ROUNDOFF * sqrt(d) * eps * (|z_i - zbar|^2 + |z_j - zbar|^2)`` count as
#: coincident in :func:`median_heuristic`: :func:`sq_dists` expands ``|a|^2 + |b|^2 - 2 a.b`` on centred points,
#: so two equal rows may come out at a few ulps of their squared norms instead of exactly 0 (measured: up to
#: ``0.6 sqrt(d) eps (|z_i|^2 + |z_j|^2)`` for ``d`` from 1 to 3072, float32 and float64); distances below that
#: are not resolved by any kernel built on :func:`sq_dists` either.
_COINCIDE_ROUNDOFF = 8.0

#: :func:`median_heuristic` selects the median by :func:`_upper_triangle_kth` from this many pairs on
#: (``n >= 257`` points); below it, gathering the pairs and taking their ``median`` is as fast.
_SELECT_MIN_PAIRS = 1 << 15
#: Sampled pairs that bracket the wanted rank in :func:`_upper_triangle_kth` (at most; a Fibonacci number).
_SELECT_SAMPLE = 1 << 15
#: Half-width of that bracket, in standard errors of the sample quantile.
_SELECT_SIGMAS = 3.5
#: Elements per row block of :func:`_upper_triangle_kth`'s pass (its temporaries then stay in cache).
_SELECT_BLOCK_ELEMENTS = 1 << 18
#: Entries per group in :func:`_upper_triangle_kth`'s search for the few entries in the bracket.
_SELECT_GROUP = 16


@functools.lru_cache(maxsize=8)
def _pair_sample(n: int, m: int) -> tuple[Tensor, Tensor]:
    """Indices ``(i, j)``, ``i < j``, of at most ``m`` pairs spread evenly over the upper triangle -> 2 x ``[m']``.

    Deterministic (no RNG): the Fibonacci lattice ``(t / F_k, frac(t F_{k-1} / F_k))``, ``t < F_k``, with
    ``F_k`` the largest Fibonacci number ``<= m`` (at least 13), a 2-D rank-1 lattice that covers the square
    evenly (Niederreiter, "Random Number Generation and Quasi-Monte Carlo Methods", SIAM 1992, ch. 5), scaled to
    ``[0, n)^2`` and folded onto ``i < j`` (a point on the diagonal moves one column over). CPU int64 tensors,
    cached (they depend on ``n`` and ``m`` only; callers must not modify them).
    """
    f0, f1 = 8, 13
    while f0 + f1 <= m:
        f0, f1 = f1, f0 + f1
    t = torch.arange(f1, dtype=torch.float64)
    i = (t * (n / f1)).long()
    j = torch.frac(t * (f0 / f1)).mul_(n).long()
    j = torch.where(i == j, (j + 1) % n, j)
    return torch.minimum(i, j), torch.maximum(i, j)


def _upper_triangle_kth(z: Tensor, k: int) -> Tensor | None:
    """The ``k``-th smallest (0-based) squared distance over the pairs ``i < j``, exactly -> ``[...]``.

    Args:
        z: ``[..., n, d]`` float32 or float64 points with ``8 max_i |z_i - zbar|^2`` finite (so no ``r^2``
            and no step below overflows).
        k: rank, ``0 <= k < n (n - 1) / 2``.

    Returns:
        ``[...]``, equal bit for bit to ``sq_dists(z, z)[..., iu[0], iu[1]].kthvalue(k + 1).values`` with
        ``iu = triu_indices(n, n, 1)`` (the upper triangle; the two triangles of ``sq_dists(z, z)`` may
        differ in round-off); with ``k = (n (n - 1) / 2 - 1) // 2`` the lower median of the pairs. ``None``
        if the sample puts the wanted value at 0 or below (ties at 0, which the median heuristic handles on
        its exact path).

    Neither ``r^2`` nor its ``n(n-1)/2`` pairs are gathered or selected among as a whole. Bracket and count
    (as in Floyd & Rivest, "Expected time bounds for selection", CACM 18(3), 1975): a deterministic sample
    of the pairs (:func:`_pair_sample`) gives ``lo <= hi``, ``_SELECT_SIGMAS`` standard errors of a sample
    quantile either side of the wanted rank; one pass over the upper triangle, in row blocks, counts the
    ``c`` pairs below ``lo`` and keeps those in ``[lo, hi]``; if ``c <= k < c + #[lo, hi]`` the answer is
    the ``(k - c)``-th smallest kept value, else (a sample that missed, which only costs time) every pair is
    gathered and selected. So the result is exact whatever the sample.

    Each block of ``r^2`` is made from the Gram matrix as :func:`sq_dists` makes it (the same centred points
    and the same matrix product, then ``(|z_i|^2 + |z_j|^2) - 2 z_i.z_j`` entry by entry; ``2 z_i.z_j`` is
    exact, so ``sub_(alpha=2)`` rounds once, as the two steps of :func:`sq_dists` do), so it is that block of
    ``sq_dists(z, z)`` bit for bit (tested) before the clamp at 0, which cannot move a value ``>= lo > 0``
    nor the count of those below it. The block stays in cache while it is compared, counted and searched:
    comparisons write 0/1 floats (several times faster than bools on the CPU); over strided groups of
    ``_SELECT_GROUP`` entries, the sums of the bracket mask count the kept values and the sums of the masked
    block give each lone kept value exactly (a group with two or more is gathered). Batch entries are handled
    one by one.
    """
    n = z.shape[-2]
    n_pairs = n * (n - 1) // 2
    shift = z.mean(dim=-2, keepdim=True)
    zc, yc = z - shift, z - shift  # as sq_dists(z, z) centres its two arguments
    sq = (zc * zc).sum(-1, keepdim=True).reshape(-1, n, 1)  # [B, n, 1]
    gram = (zc @ yc.transpose(-2, -1)).reshape(-1, n, n)  # [B, n, n], the product sq_dists takes
    si, sj = (t.to(z.device) for t in _pair_sample(n, min(_SELECT_SAMPLE, n_pairs)))  # [m], [m]
    flat = si * n + sj
    m = flat.numel()
    q = (k + 0.5) / n_pairs  # the wanted quantile; a sample quantile has standard error sqrt(q (1 - q) / m)
    half = _SELECT_SIGMAS * math.sqrt(m * q * (1.0 - q)) + 1.0
    lo_at, hi_at = max(0, math.floor(q * m - half)), min(m - 1, math.ceil(q * m + half))
    group = _SELECT_GROUP
    cap = _SELECT_BLOCK_ELEMENTS + 2 * n + group  # a block holds at most max(block, 2 w) entries, w < n
    val = torch.empty(cap, dtype=z.dtype, device=z.device)  # r^2 of the block
    low = torch.empty(cap, dtype=z.dtype, device=z.device)  # 1.0 where r^2 < lo, then r^2 where kept
    mid = torch.empty(cap, dtype=z.dtype, device=z.device)  # 1.0 where lo <= r^2 <= hi (kept)
    out = []
    for s, g in zip(sq, gram):  # [n, 1], [n, n]
        s_t, s_f = s.transpose(0, 1), s.reshape(-1)  # [1, n], [n]
        sample = s_f.index_select(0, si) + s_f.index_select(0, sj) - 2.0 * g.reshape(-1).index_select(0, flat)
        lo, hi = sample.kthvalue(lo_at + 1).values, sample.kthvalue(hi_at + 1).values  # 0-dim
        if not bool(lo > 0):
            return None
        below, kept, lower_corners = [], [], 0
        i0 = 0
        while i0 < n - 1:  # row n - 1 has no pair
            w = n - 1 - i0
            i1 = min(n - 1, i0 + max(1, _SELECT_BLOCK_ELEMENTS // w))
            b, size = i1 - i0, (i1 - i0) * w
            padded = -(-size // group) * group
            # [b, w]: entry (i, j) is r^2 of the pair (i0 + i, i0 + 1 + j), above the diagonal iff j >= i
            v = torch.add(s[i0:i1], s_t[:, i0 + 1 :], out=val[:size].view(b, w))
            v.sub_(g[i0:i1, i0 + 1 :], alpha=2.0)
            v[:, :b].triu_()  # the b (b - 1) / 2 entries below the diagonal -> 0, counted below lo > 0
            lower_corners += b * (b - 1) // 2
            lt = torch.lt(v, lo, out=low[:size].view(b, w))
            below.append(lt.sum())  # exact: a sum of fewer than 2^24 zeros and ones
            torch.le(v, hi, out=mid[:size].view(b, w)).sub_(lt)
            mid[size:padded].zero_()
            kept_mask = mid[:padded].view(group, -1)  # column c: entries c, c + padded / group, ...
            count = kept_mask.sum(0)  # [padded / group] kept values per group
            total = torch.mul(val[:padded], mid[:padded], out=low[:padded]).view(group, -1).sum(0)
            kept.append(total[count == 1])  # a lone kept value is its group's sum, exactly
            several = (count > 1).nonzero().squeeze(-1)
            if several.numel():
                kept.append(
                    torch.masked_select(
                        val[:padded].view(group, -1).index_select(1, several),
                        kept_mask.index_select(1, several).bool(),
                    )
                )
            i0 = i1
        kept = torch.cat(kept)
        c = int(torch.stack(below).sum(dtype=torch.float64)) - lower_corners
        if c <= k < c + kept.numel():
            out.append(kept.kthvalue(k - c + 1).values)
        else:
            iu = torch.triu_indices(n, n, offset=1, device=z.device)
            out.append(((s + s_t) - 2.0 * g)[iu[0], iu[1]].clamp_min_(0.0).kthvalue(k + 1).values)
    return torch.stack(out).reshape(z.shape[:-2])


def median_heuristic(
    x: Tensor,
    y: Tensor | None = None,
    *,
    max_points: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Median-heuristic RBF bandwidth, with a fallback when most points coincide.

    Convention: pool the samples (``x``, and ``y`` if given, along the sample
    axis), take the squared distances ``r^2_ij`` of all pairs ``i < j``
    (the diagonal is excluded, each pair counted once), and return

        h = sqrt(median(r^2_ij) / 2),

    so that ``RBF(h)`` evaluates to ``exp(-r^2 / median(r^2))``. The median is
    the lower median (``torch.median``) when the number of pairs is even. The
    heuristic and its large-sample behaviour: Garreau, Jitkrittum & Kanagawa,
    "Large sample analysis of the median heuristic", arXiv:1707.07269, 2017.

    Degenerate median (documented fallback): when at least half of the pairs
    coincide (e.g. about 71% or more of the points are one repeated point) the
    median is 0, and ``RBF(0)`` would turn every statistic into NaN. Then the
    median of the *non-zero* ``r^2_ij`` is used instead, i.e. the scale of the
    points that differ:

        h = sqrt(median{r^2_ij : r^2_ij > 0} / 2)   if median(r^2_ij) = 0.

    A pair counts as coincident when its ``r^2`` is within round-off of 0
    (``r^2_ij <= 8 sqrt(d) eps (|z_i - zbar|^2 + |z_j - zbar|^2)``, ``zbar``
    the mean point: what :func:`sq_dists` returns for two equal rows). Each
    batch entry is treated on its own.

    Cost: from 257 points on, the median is found by exact selection
    (:func:`_upper_triangle_kth`: a sample brackets it, one pass over the
    upper triangle in cache-sized blocks counts and keeps the few pairs in the
    bracket) instead of gathering the ``n(n-1)/2`` pairs, computing each one's
    tolerance and taking their ``median``; the tolerance is then needed only
    when the median is within round-off of 0 (argument at the code). The
    bandwidth is the same bit for bit (tested against the previous code).

    Args:
        x: ``[..., n, d]``.
        y: optional ``[..., m, d]`` pooled with ``x``.
        max_points: if set and more points are pooled, a uniform random subset
            of ``max_points`` points (without replacement, same for every batch
            entry) is used, bounding memory at ``max_points^2``. The fallback
            and the check below apply to that subset.
        generator: RNG for the subset.

    Returns:
        ``[...]`` bandwidth ``> 0`` (a 0-dim tensor for unbatched input),
        detached, with the dtype and device of ``x``.

    Raises:
        ValueError: if fewer than 2 points are pooled, or if all (subsampled)
            points of a batch entry coincide: there is no scale to take a
            bandwidth from (pass a fixed bandwidth instead).
    """
    z = x if y is None else torch.cat([x, y], dim=-2)
    z = z.detach()
    n, d = z.shape[-2], z.shape[-1]
    if n < 2:
        raise ValueError("median_heuristic needs at least 2 points")
    subsampled = max_points is not None and n > max_points
    if subsampled:
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {max_points}")
        # Random subset without replacement: argsort of uniform keys.
        keys = randint(2**62, (n,), device=z.device, generator=generator)
        idx = torch.argsort(keys)[:max_points]
        z = z.index_select(-2, idx)
        n = max_points
    zc = z - z.mean(dim=-2, keepdim=True)  # the centring sq_dists uses
    norm2 = (zc * zc).sum(-1)  # [..., n]
    scale = _COINCIDE_ROUNDOFF * d**0.5 * torch.finfo(z.dtype).eps  # tol_ij = scale * (norm2_i + norm2_j)
    n_pairs = n * (n - 1) // 2
    max_norm2 = norm2.amax(dim=-1)  # [...]
    fast = n_pairs >= _SELECT_MIN_PAIRS and z.dtype in (torch.float32, torch.float64)
    if fast and bool(torch.isfinite(8.0 * max_norm2).all()):
        # Fast path: the lower median of the raw pairs by exact selection, no per-pair tolerance. The masking
        # below only ever moves pairs with r^2_ij <= tol_ij <= T := max_ij tol_ij to 0, i.e. values that are
        # <= T both before and after it; pairs above T are untouched. If the raw lower median m (sorted index
        # k of the P pairs) is > T, the c pairs <= T all sort below m before and after the masking (c <= k),
        # and the pairs > T are the same multiset, so the k-th smallest is m in both: the masked median equals
        # m bit for bit, it is > 0 (no fallback) and not every pair coincides (no error). 4 scale max(norm2)
        # is twice T (T <= scale * 2 max(norm2) up to one rounding), a margin for the rounding of either side;
        # the finiteness check (norm2 bounds every |r^2_ij| by Cauchy-Schwarz) keeps NaN and overflow, whose
        # ordering differs between median and the selection, on the exact path below.
        med = _upper_triangle_kth(z, (n_pairs - 1) // 2)  # [...], or None if 0
        if med is not None and bool((med > (4.0 * scale) * max_norm2).all()):
            return torch.sqrt(med / 2.0)
    # Exact path (a median within round-off of 0, NaN or overflow, or few pairs): mask, fall back, raise.
    r2 = sq_dists(z, z)  # [..., n, n]
    iu = torch.triu_indices(n, n, offset=1, device=z.device)
    pairs = r2[..., iu[0], iu[1]]  # [..., n(n-1)/2]
    tol = scale * (norm2[..., iu[0]] + norm2[..., iu[1]])
    coincide = pairs <= tol  # [..., n(n-1)/2]
    pairs = pairs.masked_fill(coincide, 0.0)
    med = pairs.median(dim=-1).values  # [...]
    degenerate = med <= 0
    if bool(degenerate.any()):
        all_coincide = coincide.all(dim=-1)  # [...]
        if bool(all_coincide.any()):
            what = f"{n} subsampled (max_points={max_points})" if subsampled else f"{n}"
            where = ""
            if all_coincide.ndim > 0:
                entries = all_coincide.nonzero().tolist()
                shown = ", ".join(str(tuple(e)) for e in entries[:5]) + (", ..." if len(entries) > 5 else "")
                where = f" in {len(entries)} of {all_coincide.numel()} batch entries ({shown})"
            raise ValueError(
                f"all {what} points coincide{where}: no kernel bandwidth; the median heuristic needs at "
                "least two distinct points (pass a fixed bandwidth, or check the samples for a collapse)"
            )
        nonzero_med = pairs.masked_fill(coincide, float("nan")).nanmedian(dim=-1).values  # [...]
        med = torch.where(degenerate, nonzero_med, med)
    return torch.sqrt(med / 2.0)


def imq_mixture(
    x: Tensor,
    y: Tensor | None = None,
    scales: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    beta: float = -0.5,
    *,
    max_points: int | None = None,
    generator: torch.Generator | None = None,
) -> SumKernel:
    """Mixture of IMQ kernels at several scales of the median-heuristic bandwidth.

    ``k = sum_s IMQ(c = s * h, beta)`` with ``h = median_heuristic(x, y)`` on
    the pooled samples: a multi-scale kernel, less sensitive to a single
    bandwidth choice, for training implicit generators (Li & Turner, "Gradient
    Estimators for Implicit Models", ICLR 2018; Li, "Approximate Gradient
    Descent for Training Implicit Generative Models", 2017). Summing kernels
    over bandwidths follows Li, Swersky & Zemel, "Generative Moment Matching
    Networks", ICML 2015; IMQ: Gorham & Mackey, ICML 2017.

    Args:
        x: ``[..., n, d]``.
        y: optional ``[..., m, d]`` pooled with ``x``.
        scales: positive multipliers of ``h``.
        beta: IMQ exponent (< 0).
        max_points, generator: passed to :func:`median_heuristic`.

    Returns:
        A :class:`SumKernel`. For batched input the ``c`` of each component is
        a ``[...]`` tensor (one per batch entry); otherwise a float.

    Raises:
        ValueError: if a scale is not > 0, or (from :func:`median_heuristic`)
            if all pooled points of a batch entry coincide. When most, but not
            all, points coincide ``h`` is the median-heuristic fallback (the
            median of the non-zero squared distances), so ``h > 0`` always.
    """
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0.0:
        raise ValueError(f"scales must be non-empty and > 0, got {scales}")
    h = median_heuristic(x, y, max_points=max_points, generator=generator)  # > 0, or it raised
    if h.ndim == 0:
        hf = float(h)
        return SumKernel([IMQ(s * hf, beta) for s in scales])
    return SumKernel([IMQ(s * h, beta) for s in scales])
