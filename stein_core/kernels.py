"""Radial kernels ``k(x, y) = phi(r^2)`` with ``r^2 = ||x - y||^2``.

Every radial kernel exposes ``profile(r2) -> (phi, dphi, d2phi)``: the value of
``phi`` and its first and second derivatives with respect to ``r^2``. These are
all the Stein-type discrepancies need, through the closed forms

    grad_x k(x, y)            =  2 phi'(r^2) (x - y)
    grad_y k(x, y)            = -2 phi'(r^2) (x - y)
    tr grad_x grad_y k(x, y)  = -2 d phi'(r^2) - 4 phi''(r^2) r^2

so no ``[n, n, d]`` tensor is ever formed (see ``discrepancies.stein_kernel_matrix``).

Shapes: ``x`` is ``[..., n, d]``, ``y`` is ``[..., m, d]``, a Gram matrix is
``[..., n, m]``. Device and dtype follow the inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._random import randint

__all__ = ["sq_dists", "RadialKernel", "RBF", "IMQ", "median_heuristic"]


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
    return r2.clamp_min(0.0)


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


def _as_param(value: float | Tensor, like: Tensor) -> Tensor:
    """A kernel parameter as a tensor with the dtype and device of ``like`` (differentiable)."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


class RBF(RadialKernel):
    """Gaussian (RBF) kernel ``k(x, y) = exp(-||x - y||^2 / (2 h^2))``.

    Args:
        bandwidth: ``h > 0``; a float or a 0-dim tensor (a tensor may require
            grad, e.g. a learned bandwidth, and stays differentiable).
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
        c: ``c > 0``.
        beta: exponent, strictly negative.
    """

    def __init__(self, c: float = 1.0, beta: float = -0.5) -> None:
        c, beta = float(c), float(beta)
        if not c > 0.0:
            raise ValueError(f"IMQ c must be > 0, got {c}")
        if not beta < 0.0:
            raise ValueError(f"IMQ beta must be < 0, got {beta}")
        self.c = c
        self.beta = beta

    def __repr__(self) -> str:
        return f"IMQ(c={self.c}, beta={self.beta})"

    def phi(self, r2: Tensor) -> Tensor:
        return (self.c**2 + r2) ** self.beta

    def profile(self, r2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b = self.beta
        base = self.c**2 + r2
        phi = base**b
        dphi = b * phi / base  # b base^(b-1)
        d2phi = (b - 1.0) * dphi / base  # b (b-1) base^(b-2)
        return phi, dphi, d2phi


def median_heuristic(
    x: Tensor,
    y: Tensor | None = None,
    *,
    max_points: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Median-heuristic RBF bandwidth.

    Convention: pool the samples (``x``, and ``y`` if given, along the sample
    axis), take the squared distances ``r^2_ij`` of all pairs ``i < j``
    (the diagonal is excluded, each pair counted once), and return

        h = sqrt(median(r^2_ij) / 2),

    so that ``RBF(h)`` evaluates to ``exp(-r^2 / median(r^2))``. The median is
    the lower median (``torch.median``) when the number of pairs is even.

    Args:
        x: ``[..., n, d]``.
        y: optional ``[..., m, d]`` pooled with ``x``.
        max_points: if set and more points are pooled, a uniform random subset
            of ``max_points`` points (without replacement, same for every batch
            entry) is used, bounding memory at ``max_points^2``.
        generator: RNG for the subset.

    Returns:
        ``[...]`` bandwidth (a 0-dim tensor for unbatched input), detached,
        with the dtype and device of ``x``. Returns 0 if all points coincide.
    """
    z = x if y is None else torch.cat([x, y], dim=-2)
    z = z.detach()
    n = z.shape[-2]
    if n < 2:
        raise ValueError("median_heuristic needs at least 2 points")
    if max_points is not None and n > max_points:
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
    med = pairs.median(dim=-1).values
    return torch.sqrt(med / 2.0)
