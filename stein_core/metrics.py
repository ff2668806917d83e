"""Sample-quality metrics on feature vectors: FID, KID, Inception Score, precision/recall.

Shapes: features ``[n, d]`` (one row per sample, e.g. Inception pool features);
moments ``mean [..., d]`` and ``cov [..., d, d]``; class probabilities or
logits ``[n, K]``. The metrics are evaluation numbers, not training losses:
every statistic is accumulated and returned in float64 on the device of the
inputs, whatever their dtype. Randomness (KID subsets) comes from an explicit
``torch.Generator``.

Sections: streaming first and second moments (cacheable reference
statistics); Frechet distance from moments and from samples (an exact Gram
form when there are fewer samples than dimensions); kernel inception distance;
Inception Score; improved precision and recall.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .discrepancies import mmd
from .kernels import sq_dists

__all__ = [
    "MeanStd",
    "PrecisionRecall",
    "StreamingMoments",
    "frechet_distance",
    "frechet_distance_from_samples",
    "kid",
    "inception_score",
    "precision_recall",
]

Kernel = Callable[[Tensor, Tensor], Tensor]
"""A kernel ``(x [m, d], y [m', d]) -> Gram [m, m']``."""


class MeanStd(NamedTuple):
    """Mean and standard deviation (``correction=0``, as in the reference codes) over subsets/splits.

    Both fields are 0-dim float64 tensors.
    """

    mean: Tensor
    std: Tensor


class PrecisionRecall(NamedTuple):
    """Improved precision and recall, each a 0-dim float64 tensor in ``[0, 1]``."""

    precision: Tensor
    recall: Tensor


def _as_float64_2d(x: Tensor, name: str) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [n, d], got shape {tuple(x.shape)}")
    return x.to(torch.float64)


# ---------------------------------------------------------------------------
# Streaming moments
# ---------------------------------------------------------------------------
class StreamingMoments:
    """Streaming float64 mean and covariance of ``[n, d]`` batches.

    Chan, Golub & LeVeque, "Algorithms for computing the sample variance:
    analysis and recommendations", The American Statistician 37(3), 1983
    (pairwise update). Each batch is reduced to its own count ``n_b``, mean
    ``m_b`` and centred scatter ``M_b = sum_i (x_i - m_b)(x_i - m_b)^T`` (all
    float64); it is merged into the running ``(n_a, m_a, M_a)`` by

        n = n_a + n_b,   delta = m_b - m_a,
        m = m_a + delta n_b / n,
        M = M_a + M_b + delta delta^T n_a n_b / n.

    No raw second moment ``sum x x^T`` is ever formed, so data far from the
    origin (e.g. offset by 1e4) lose no precision to cancellation. The same
    rule merges two accumulators (:meth:`merge`), so statistics computed on
    shards or devices combine exactly.

    Attributes:
        dim: feature dimension ``d``.
        n: number of rows seen.
        mean: ``[d]`` float64 running mean.
        cov: ``[d, d]`` float64 sample covariance ``M / (n - 1)`` (the
            unbiased normalisation used by the FID literature; needs ``n >= 2``).

    State lives on the device of the first batch (or of ``device``).
    """

    def __init__(self, dim: int, *, device: torch.device | str | None = None) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.n = 0
        self._device_fixed = device is not None
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._mean = torch.zeros(self.dim, dtype=torch.float64, device=dev)  # [d]
        self._m2 = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=dev)  # [d, d]

    def _merge_stats(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        if n_b == 0:
            return
        if self.n == 0:
            if not self._device_fixed:  # adopt the device of the first data
                self._mean = self._mean.to(mean_b.device)
                self._m2 = self._m2.to(mean_b.device)
            self.n = n_b
            self._mean = mean_b.to(self._mean.device).clone()
            self._m2 = m2_b.to(self._m2.device).clone()
            return
        mean_b = mean_b.to(self._mean.device)
        m2_b = m2_b.to(self._m2.device)
        n_a = self.n
        n = n_a + n_b
        delta = mean_b - self._mean  # [d]
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.n = n

    def update(self, batch: Tensor) -> StreamingMoments:
        """Add the rows of ``batch [n_b, d]`` (any float dtype; accumulated in float64). Returns ``self``."""
        if batch.dim() != 2 or batch.shape[-1] != self.dim:
            raise ValueError(f"batch must be [n, {self.dim}], got shape {tuple(batch.shape)}")
        n_b = batch.shape[0]
        if n_b == 0:
            return self
        xb = batch.detach().to(torch.float64)
        mean_b = xb.mean(0)  # [d]
        xc = xb - mean_b  # [n_b, d]
        self._merge_stats(n_b, mean_b, xc.T @ xc)
        return self

    def merge(self, other: StreamingMoments) -> StreamingMoments:
        """Fold the statistics of ``other`` (same ``dim``) into ``self`` in place. Returns ``self``."""
        if other.dim != self.dim:
            raise ValueError(f"dims differ: {self.dim} vs {other.dim}")
        self._merge_stats(other.n, other._mean, other._m2)
        return self

    @property
    def mean(self) -> Tensor:
        if self.n == 0:
            raise ValueError("no data seen yet")
        return self._mean.clone()

    @property
    def cov(self) -> Tensor:
        if self.n < 2:
            raise ValueError("a sample covariance needs at least 2 rows")
        return self._m2 / (self.n - 1)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors ``{"n": int64 [], "mean": [d], "m2": [d, d]}`` (``m2`` is the centred scatter)."""
        return {
            "n": torch.tensor(self.n, dtype=torch.int64),
            "mean": self._mean.clone(),
            "m2": self._m2.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> StreamingMoments:
        """Rebuild an accumulator from :meth:`state_dict` (on the device of ``state["mean"]``)."""
        mean = torch.as_tensor(state["mean"], dtype=torch.float64)
        m2 = torch.as_tensor(state["m2"], dtype=torch.float64, device=mean.device)
        if mean.dim() != 1 or m2.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"inconsistent state: mean {tuple(mean.shape)}, m2 {tuple(m2.shape)}")
        out = cls(mean.shape[0], device=mean.device)
        out.n = int(state["n"])
        out._mean = mean.clone()
        out._m2 = m2.clone()
        return out


# ---------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------
def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.transpose(-2, -1))


def _psd_factor(cov: Tensor) -> Tensor:
    """A factor ``F [..., d, d]`` with ``F F^T = cov`` (PSD part): Cholesky, else ``V diag(sqrt(max(l, 0)))``.

    Cholesky is backward stable (``F F^T = cov + E``, ``||E|| ~ d eps ||cov||``);
    a singular or round-off-indefinite ``cov`` falls back to ``eigh`` with its
    negative eigenvalues clipped at 0.
    """
    factor, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        evals, evecs = torch.linalg.eigh(cov)  # [..., d], [..., d, d]
        factor = evecs * evals.clamp_min(0.0).sqrt().unsqueeze(-2)
    return factor


def _trace_sqrt_from_factors(f1: Tensor, f2: Tensor) -> Tensor:
    """``tr((S1^{1/2} S2 S1^{1/2})^{1/2})`` for ``S_i = F_i F_i^T``, ``F_i [..., d, r_i]`` -> ``[...]``.

    The nonzero eigenvalues of ``S1^{1/2} S2 S1^{1/2}`` equal those of ``S1 S2 = F1 (F1^T F2 F2^T)``,
    hence those of ``(F1^T F2 F2^T) F1 = B B^T`` with ``B = F1^T F2 [..., r1, r2]`` (``AB`` and ``BA``
    share their nonzero eigenvalues). So the trace is the nuclear norm ``sum_i sigma_i(B)``.
    """
    return torch.linalg.svdvals(f1.transpose(-2, -1) @ f2).sum(-1)


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """Frechet (2-Wasserstein) distance squared between ``N(mu1, cov1)`` and ``N(mu2, cov2)``.

    Dowson & Landau, "The Frechet distance between multivariate normal
    distributions", J. Multivariate Anal. 12, 1982; used as FID by Heusel et
    al., "GANs trained by a two time-scale update rule converge to a local
    Nash equilibrium", NeurIPS 2017:

        d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2}).

    No general (Schur-based) matrix square root is taken. With any factors
    ``S_i = F_i F_i^T``, the nonzero eigenvalues of ``S1^{1/2} S2 S1^{1/2}`` equal
    those of ``S1 S2 = F1 F1^T F2 F2^T``, hence those of ``B B^T`` with
    ``B = F1^T F2`` (``AB`` and ``BA`` share nonzero eigenvalues), so

        tr((S1^{1/2} S2 S1^{1/2})^{1/2}) = sum_i sigma_i(F1^T F2),

    the nuclear norm of a ``d x d`` product. ``F_i`` is the Cholesky factor,
    or ``V diag(sqrt(max(l, 0)))`` from ``eigh`` when ``S_i`` is singular or
    indefinite by round-off. Everything is real float64: no complex parts and
    no NaN.

    Accuracy: singular values carry an absolute error ``~ eps sigma_max(B)``,
    whereas the square roots of the eigenvalues ``m`` of the formed product
    ``S1^{1/2} S2 S1^{1/2}`` (the usual route) carry up to ``sqrt(d eps max(m))``
    each for small ``m``; this matters for (near-)singular covariances and
    for close distributions, where the result is a small difference of traces.
    The remaining error is the cancellation in ``tr S1 + tr S2 - 2 (...)``,
    ``~ d eps (tr S1 + tr S2)`` in absolute terms. The value, mathematically
    ``>= 0``, is clipped at 0 so that round-off on (near-)identical statistics
    cannot return a small negative number.

    Args:
        mu1, mu2: ``[..., d]`` means.
        cov1, cov2: ``[..., d, d]`` symmetric PSD covariances (only the
            symmetric part is used).

    Returns:
        ``[...]`` float64 (0-dim for unbatched input), on the inputs' device.
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    cov1, cov2 = _sym(cov1.to(torch.float64)), _sym(cov2.to(torch.float64))
    if cov1.shape[-1] != mu1.shape[-1] or cov2.shape[-1] != mu2.shape[-1] or mu1.shape[-1] != mu2.shape[-1]:
        raise ValueError(
            f"inconsistent shapes: mu1 {tuple(mu1.shape)}, cov1 {tuple(cov1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, cov2 {tuple(cov2.shape)}"
        )
    tr_sqrt = _trace_sqrt_from_factors(_psd_factor(cov1), _psd_factor(cov2))  # [...]
    diff = mu1 - mu2
    tr1 = torch.diagonal(cov1, dim1=-2, dim2=-1).sum(-1)
    tr2 = torch.diagonal(cov2, dim1=-2, dim2=-1).sum(-1)
    return ((diff * diff).sum(-1) + tr1 + tr2 - 2.0 * tr_sqrt).clamp_min(0.0)


_FD_METHODS = ("auto", "gram", "eigen")


def frechet_distance_from_samples(x: Tensor, y: Tensor, *, method: str = "auto") -> Tensor:
    """Frechet distance squared between Gaussians fitted to ``x`` and ``y`` (FID on features).

    Heusel et al., NeurIPS 2017 (FID); Dowson & Landau 1982 (closed form). The
    moments are the sample mean and the ``1/(n-1)`` covariance, as in
    :class:`StreamingMoments`.

    Gram form (exact for ``n < d``). With centred ``X [n1, d]``, ``Y [n2, d]``,
    ``S1 = X^T X / (n1 - 1)``, ``S2 = Y^T Y / (n2 - 1)`` and ``c = (n1 - 1)(n2 - 1)``:
    since ``AB`` and ``BA`` have the same nonzero eigenvalues,

        S1^{1/2} S2 S1^{1/2}  ~  S1 S2 = X^T (X Y^T Y) / c
                              ~  (X Y^T Y) X^T / c = (X Y^T)(X Y^T)^T / c,

    whose eigenvalues are ``sigma_i(X Y^T)^2 / c``. Hence

        tr((S1^{1/2} S2 S1^{1/2})^{1/2}) = sum_i sigma_i(X Y^T) / sqrt(c),

    the singular values of an ``[n1, n2]`` matrix (backward-stable SVD, absolute
    error ``~ eps sigma_max``: no square root of a round-off eigenvalue), and
    ``tr(S1) = ||X||_F^2 / (n1 - 1)``. So ``FID(X, X)`` is ``0`` to round-off
    instead of the ``sqrt(eps)``-sized noise that the square root of a
    rank-deficient ``d x d`` covariance leaves on its null space.

    Args:
        x: ``[n1, d]`` features, ``n1 >= 2``.
        y: ``[n2, d]`` features, ``n2 >= 2``.
        method: ``"gram"`` (above, ``O(n1 n2 d)``), ``"eigen"`` (``d x d`` covariances, then
            :func:`frechet_distance`, ``O(n d^2 + d^3)``), or ``"auto"``: Gram
            when ``n1 n2 < d^2`` (the Gram matrix is smaller than a covariance,
            e.g. ``n1 = n2 < d``), eigen otherwise.

    Returns:
        0-dim float64 tensor (clipped at 0, see :func:`frechet_distance`).
    """
    if method not in _FD_METHODS:
        raise ValueError(f"method must be one of {_FD_METHODS}, got {method!r}")
    x, y = _as_float64_2d(x, "x"), _as_float64_2d(y, "y")
    (n1, d), (n2, d2) = x.shape, y.shape
    if d != d2:
        raise ValueError(f"feature dims differ: {d} vs {d2}")
    if n1 < 2 or n2 < 2:
        raise ValueError("each sample needs at least 2 rows")
    if method == "auto":
        method = "gram" if n1 * n2 < d * d else "eigen"
    mu1, mu2 = x.mean(0), y.mean(0)  # [d]
    xc, yc = x - mu1, y - mu2  # [n1, d], [n2, d]
    if method == "eigen":
        cov1 = xc.T @ xc / (n1 - 1)
        cov2 = yc.T @ yc / (n2 - 1)
        return frechet_distance(mu1, cov1, mu2, cov2)
    # Factors F1 = X^T / sqrt(n1 - 1), F2 = Y^T / sqrt(n2 - 1): B = F1^T F2 = X Y^T / sqrt(c), [n1, n2].
    tr_sqrt = _trace_sqrt_from_factors(xc.T, yc.T) / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    tr1 = (xc * xc).sum() / (n1 - 1)
    tr2 = (yc * yc).sum() / (n2 - 1)
    return ((diff * diff).sum() + tr1 + tr2 - 2.0 * tr_sqrt).clamp_min(0.0)


# ---------------------------------------------------------------------------
# Kernel inception distance
# ---------------------------------------------------------------------------
def _kid_poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    """KID's cubic kernel ``(x^T y / d + 1)^3`` (Binkowski et al. 2018): ``[m, d], [m', d] -> [m, m']``."""
    return (x @ y.transpose(-2, -1) / x.shape[-1] + 1.0) ** 3


def _subset(n: int, m: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``m`` distinct indices in ``[0, n)`` (a random permutation's prefix), long on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=gen_device)[:m].to(device)


def kid(
    x: Tensor,
    y: Tensor,
    *,
    n_subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
    kernel: str | Kernel = "poly",
) -> MeanStd:
    """Kernel inception distance: unbiased MMD^2 averaged over random subsets.

    Binkowski, Sutherland, Arbel & Gretton, "Demystifying MMD GANs", ICLR 2018
    (Sec. 5, KID): for each of ``n_subsets`` subsets of ``m`` rows drawn without
    replacement from ``x`` and from ``y``, the unbiased MMD^2 of Gretton et al.
    (2012, eq. 3; :func:`stein_core.discrepancies.mmd` with ``statistic="u"``)
    with the kernel ``k(a, b) = (a^T b / d + 1)^3``. Each subset estimate is
    unbiased, so their mean is too; ``m = min(subset_size, n_x, n_y)`` as in
    the reference implementation. Computed in float64.

    Args:
        x: ``[n_x, d]`` features (e.g. real), ``n_x >= 2``.
        y: ``[n_y, d]`` features (e.g. generated), ``n_y >= 2``.
        n_subsets: number of subsets.
        subset_size: rows per subset (per sample).
        generator: drives the subset draws (``x``'s indices, then ``y``'s, per subset).
        kernel: ``"poly"`` or any kernel callable ``(a [m, d], b [m, d]) -> [m, m]``
            (it receives float64 inputs).

    Returns:
        :class:`MeanStd` over the subset estimates (std with ``correction=0``).
    """
    x, y = _as_float64_2d(x, "x"), _as_float64_2d(y, "y")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"feature dims differ: {x.shape[-1]} vs {y.shape[-1]}")
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets}")
    if isinstance(kernel, str):
        if kernel != "poly":
            raise ValueError(f"kernel must be 'poly' or a callable, got {kernel!r}")
        kernel = _kid_poly_kernel
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError("subsets need at least 2 rows")
    estimates = x.new_empty(n_subsets)
    for s in range(n_subsets):
        ix = _subset(x.shape[0], m, x.device, generator)
        iy = _subset(y.shape[0], m, y.device, generator)
        estimates[s] = mmd(x[ix], y[iy], kernel, statistic="u")
    return MeanStd(estimates.mean(), estimates.std(correction=0))


# ---------------------------------------------------------------------------
# Inception score
# ---------------------------------------------------------------------------
def inception_score(probs_or_logits: Tensor, *, splits: int = 10, from_logits: bool = False) -> MeanStd:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``, mean and std over splits.

    Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016
    (Sec. 4). The ``n`` rows are cut into ``splits`` contiguous, near-equal
    parts (``torch.tensor_split``; no row is dropped); in each part ``p(y)`` is
    the mean of the rows and the score is ``exp(mean_x KL(p(y|x) || p(y)))``,
    with ``0 log 0 = 0``. Computed in float64. Uniform predictions give 1;
    confident, class-balanced predictions over ``K`` classes give ``K``.

    Args:
        probs_or_logits: ``[n, K]`` class probabilities (rows sum to 1) or logits.
        splits: number of parts, ``1 <= splits <= n``.
        from_logits: treat the input as logits (a log-softmax is applied).

    Returns:
        :class:`MeanStd` over splits (std with ``correction=0``, as in the reference code).
    """
    p = _as_float64_2d(probs_or_logits, "probs_or_logits")
    n = p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, {n}], got {splits}")
    if from_logits:
        log_p = torch.log_softmax(p, dim=-1)  # [n, K]
        p = log_p.exp()
    else:
        log_p = p.log()  # -inf at 0 is harmless: xlogy-style masking below
    scores = []
    for part, log_part in zip(torch.tensor_split(p, splits), torch.tensor_split(log_p, splits)):
        log_marginal = part.mean(0).log()  # [K]
        # KL(p(y|x) || p(y)) = sum_y p log p - p log p(y), with 0 log 0 = 0
        kl = torch.where(part > 0, part * (log_part - log_marginal), torch.zeros_like(part)).sum(-1)  # [n_s]
        scores.append(kl.mean().exp())
    scores_t = torch.stack(scores)
    return MeanStd(scores_t.mean(), scores_t.std(correction=0))


# ---------------------------------------------------------------------------
# Improved precision and recall
# ---------------------------------------------------------------------------
def _knn_radii_sq(x: Tensor, k: int, batch: int) -> Tensor:
    """Squared distance of each row of ``x [n, d]`` to its ``k``-th nearest other row -> ``[n]``."""
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} rows, got {n}")
    out = []
    for i0 in range(0, n, batch):
        r2 = sq_dists(x[i0 : i0 + batch], x)  # [b, n], includes the row itself at 0
        out.append(r2.kthvalue(k + 1, dim=-1).values)
    return torch.cat(out)


def _coverage(queries: Tensor, support: Tensor, radii_sq: Tensor, batch: int) -> Tensor:
    """Fraction of ``queries [m, d]`` in some ball ``||q - s_j||^2 <= radii_sq[j]``, ``support [n, d]``."""
    inside = 0
    for i0 in range(0, queries.shape[0], batch):
        r2 = sq_dists(queries[i0 : i0 + batch], support)  # [b, n]
        inside += int((r2 <= radii_sq).any(dim=-1).sum())
    return torch.tensor(inside / queries.shape[0], dtype=torch.float64, device=queries.device)


def precision_recall(
    real_features: Tensor, fake_features: Tensor, *, k: int = 3, batch: int = 1024
) -> PrecisionRecall:
    """Improved precision and recall of generated samples.

    Kynkaanniemi, Karras, Laine, Lehtinen & Aila, "Improved Precision and
    Recall Metric for Assessing Generative Models", NeurIPS 2019 (Sec. 2).
    Each set's manifold is the union of balls centred at its samples with
    radius the distance to the ``k``-th nearest neighbour within the set.
    Precision is the fraction of fake samples inside the real manifold;
    recall is the fraction of real samples inside the fake manifold (a point
    on a sphere counts as inside).

    Distances are computed ``batch`` rows at a time (:func:`stein_core.kernels.sq_dists`),
    so memory is ``O(batch n)``; no ``[n, n, d]`` tensor is formed. Computed in float64.

    Args:
        real_features: ``[n_r, d]``, ``n_r > k``.
        fake_features: ``[n_f, d]``, ``n_f > k``.
        k: neighbour index of the radius (3 in the paper).
        batch: rows per block of pairwise distances.

    Returns:
        :class:`PrecisionRecall`.
    """
    real = _as_float64_2d(real_features, "real_features")
    fake = _as_float64_2d(fake_features, "fake_features")
    if real.shape[-1] != fake.shape[-1]:
        raise ValueError(f"feature dims differ: {real.shape[-1]} vs {fake.shape[-1]}")
    if k < 1 or batch < 1:
        raise ValueError(f"k and batch must be >= 1, got k={k}, batch={batch}")
    radii_real = _knn_radii_sq(real, k, batch)  # [n_r]
    radii_fake = _knn_radii_sq(fake, k, batch)  # [n_f]
    precision = _coverage(fake, real, radii_real, batch)
    recall = _coverage(real, fake, radii_fake, batch)
    return PrecisionRecall(precision, recall)
