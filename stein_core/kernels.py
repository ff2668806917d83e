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
    r2 = sq_dists(z, z)  # [..., n, n]
    iu = torch.triu_indices(n, n, offset=1, device=z.device)
    pairs = r2[..., iu[0], iu[1]]  # [..., n(n-1)/2]
    zc = z - z.mean(dim=-2, keepdim=True)  # the centring sq_dists uses
    norm2 = (zc * zc).sum(-1)  # [..., n]
    tol = (_COINCIDE_ROUNDOFF * d**0.5 * torch.finfo(z.dtype).eps) * (norm2[..., iu[0]] + norm2[..., iu[1]])
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
