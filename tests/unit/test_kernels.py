"""Kernels: profile derivatives vs autograd, Gram matrices vs direct formulas, the summed
gradients of the Stein gradient estimators vs per-pair autograd loops."""

import itertools
import math

import numpy as np
import pytest
import torch

from stein_core import (
    IMQ,
    RBF,
    DeepKernel,
    SumKernel,
    grad_x_sum_autograd,
    gram_and_grad_x_sum,
    imq_mixture,
    median_heuristic,
    sq_dists,
)

KERNELS = [RBF(0.7), RBF(2.5), IMQ(1.0, -0.5), IMQ(0.5, -1.5)]
IDS = ["rbf0.7", "rbf2.5", "imq1,-0.5", "imq0.5,-1.5"]


def direct_phi(kernel, r2):
    if isinstance(kernel, RBF):
        return torch.exp(-r2 / (2 * kernel.bandwidth**2))
    return (kernel.c**2 + r2) ** kernel.beta


@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_profile_derivatives_match_autograd(kernel):
    r2 = torch.linspace(0.0, 9.0, 37, dtype=torch.float64).requires_grad_(True)
    phi, dphi, d2phi = kernel.profile(r2)
    torch.testing.assert_close(phi, direct_phi(kernel, r2), rtol=1e-14, atol=0)
    _assert_profile_derivatives(kernel.profile, r2)


def _assert_profile_derivatives(profile, r2):
    """``profile(r2) = (φ, φ', φ'')``: the analytic derivatives equal autograd's of φ, and the profile itself is
    differentiable (finite differences vs autograd, twice)."""
    phi, dphi, d2phi = profile(r2)
    (g1,) = torch.autograd.grad(phi.sum(), r2, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), r2)
    torch.testing.assert_close(dphi, g1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(d2phi, g2, rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(profile, (r2.detach().requires_grad_(True),))
    assert torch.autograd.gradgradcheck(profile, (r2.detach().requires_grad_(True),))


@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_matches_loop(kernel, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=g, dtype=dtype)  # [B=2, n=5, d=3]
    y = torch.randn(2, 4, 3, generator=g, dtype=dtype)  # [B=2, m=4, d=3]
    gram = kernel(x, y)
    assert gram.shape == (2, 5, 4) and gram.dtype == dtype
    ref = torch.empty(2, 5, 4, dtype=torch.float64)
    for b, i, j in itertools.product(range(2), range(5), range(4)):
        r2 = ((x[b, i].double() - y[b, j].double()) ** 2).sum()
        ref[b, i, j] = direct_phi(kernel, r2)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(gram.double(), ref, rtol=tol, atol=tol)


def test_sq_dists_far_from_origin_float32():
    # Data centred at 1e3: the naive ||x||^2 + ||y||^2 - 2 x.y loses ~all digits in
    # float32 (||x||^2 ~ 3e6, eps * 3e6 ~ 0.4); centring keeps errors at ~1e-5 relative.
    g = torch.Generator().manual_seed(1)
    x64 = 1e3 + torch.randn(30, 3, generator=g, dtype=torch.float64)
    y64 = 1e3 + torch.randn(20, 3, generator=g, dtype=torch.float64)
    ref = torch.cdist(x64, y64) ** 2
    got = sq_dists(x64.float(), y64.float())
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-3)
    assert (sq_dists(x64.float(), x64.float()) >= 0).all()


def test_rbf_tensor_bandwidth_is_differentiable():
    h = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gram = RBF(h)(x, x)
    (gh,) = torch.autograd.grad(gram.sum(), h)
    r2 = sq_dists(x, x)
    ref = (gram * r2 / h**3).sum()  # d/dh exp(-r2/(2h^2)) = exp(.) r2 / h^3
    torch.testing.assert_close(gh, ref.detach())


def test_kernel_validation():
    with pytest.raises(ValueError):
        RBF(0.0)
    with pytest.raises(ValueError):
        IMQ(1.0, 0.5)
    with pytest.raises(ValueError):
        IMQ(0.0, -0.5)


def test_median_heuristic_convention():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64) + 1.0
    z = torch.cat([x, y])
    pairs = sorted(
        float(((z[i] - z[j]) ** 2).sum()) for i in range(13) for j in range(i + 1, 13)
    )  # 78 pairs: lower median is the 39th value (index 38)
    expected = (pairs[(len(pairs) - 1) // 2] / 2) ** 0.5
    h = median_heuristic(x, y)
    assert h.ndim == 0 and h.dtype == torch.float64
    assert abs(h.item() - expected) < 1e-12
    # Batched input gives one bandwidth per batch entry.
    hb = median_heuristic(torch.stack([z, 2 * z]))
    torch.testing.assert_close(hb, torch.stack([h, 2 * h]))


def test_median_heuristic_gaussian_and_subsampling():
    # For x ~ N(0, I_d), ||x - x'||^2 ~ 2 chi^2_d; the median of chi^2_2 is 2 ln 2,
    # so h = sqrt(2 * 2 ln 2 / 2) = sqrt(2 ln 2) = 1.1774 for d = 2.
    x = torch.randn(3000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h_sub = median_heuristic(x, max_points=800, generator=torch.Generator().manual_seed(1))
    h_sub2 = median_heuristic(x, max_points=800, generator=torch.Generator().manual_seed(1))
    assert torch.equal(h_sub, h_sub2)
    # The median of the n(n-1)/2 dependent pairs is a U-quantile with SE ~ c / sqrt(n);
    # over seeds, the SE of h measured 0.018 at n = 800, hence ~0.011 at n = 2000.
    # Allow 4 SE. (Other conventions are far off: sqrt(median) = 1.665.)
    assert abs(h_sub.item() - 1.1774) < 4 * 0.018
    h_full = median_heuristic(x[:2000])
    assert abs(h_full.item() - 1.1774) < 4 * 0.011


# ---------------------------------------------------------------------------
# Issue 10 item 9: the median heuristic when most points coincide
# ---------------------------------------------------------------------------
def coincident_sample(n, d, frac, dtype=torch.float64, seed=0):
    """``n`` points of N(5, 9 I_d), of which ``int(frac * n)`` rows at random positions are one repeated point."""
    g = torch.Generator().manual_seed(seed)
    x = (3.0 * torch.randn(n, d, generator=g, dtype=torch.float64) + 5.0).to(dtype)
    idx = torch.randperm(n, generator=g)[: int(frac * n)]
    if len(idx):
        x[idx] = x[idx[0]].clone()
    return x


def lower_median_sq_dists(z, nonzero):
    """Reference: lower median of the exact pairwise ``r^2`` (``i < j``) of ``z [n, d]`` in float64 numpy,
    over all pairs or over the pairs of distinct points only (``nonzero``)."""
    z = z.double().numpy()
    n = len(z)
    iu = np.triu_indices(n, 1)
    r2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)[iu]  # exact 0 for equal rows
    if nonzero:
        r2 = r2[r2 > 0]
    return np.sort(r2)[(len(r2) - 1) // 2]


# (dtype, d): float64 with d = 784 is a case where sq_dists returns ~1e-13, not 0, for equal rows on this
# machine's BLAS (the round-off tolerance of median_heuristic at work); the others come out exactly 0.
FALLBACK_CASES = [(torch.float32, 1), (torch.float32, 10), (torch.float64, 2), (torch.float64, 784)]


@pytest.mark.parametrize("dtype, d", FALLBACK_CASES)
def test_median_heuristic_falls_back_to_nonzero_median(dtype, d):
    # 80% of 120 points are one point: 96 * 95 / 2 = 4560 of the 7140 pairs (64%) have r^2 = 0, so the plain
    # median is 0 (and RBF(0) would be NaN); the fallback is the median over the 2580 pairs that differ.
    x = coincident_sample(120, d, 0.8, dtype, seed=d)
    assert lower_median_sq_dists(x, nonzero=False) == 0.0
    want = math.sqrt(lower_median_sq_dists(x, nonzero=True) / 2.0)
    h = median_heuristic(x)
    assert h.dtype == dtype and h.ndim == 0
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert abs(h.item() - want) <= tol * want, (h.item(), want)
    # Pooling x with y is the same as passing the concatenation.
    assert torch.equal(median_heuristic(x[:50], x[50:]), h)


def test_median_heuristic_no_fallback_when_fewer_than_half_the_pairs_coincide():
    # 60% of 100 points coincide: 60 * 59 / 2 = 1770 of 4950 pairs (36%) are 0, so the ordinary median of all
    # pairs, zeros included, is positive and is used unchanged (it is below the non-zero median).
    x = coincident_sample(100, 2, 0.6)
    plain = lower_median_sq_dists(x, nonzero=False)
    assert 0.0 < plain < lower_median_sq_dists(x, nonzero=True)
    assert abs(median_heuristic(x).item() - math.sqrt(plain / 2.0)) < 1e-12


def test_median_heuristic_fallback_is_per_batch_entry_and_keeps_subsampling():
    deg = coincident_sample(120, 3, 0.8, seed=1)
    ok = coincident_sample(120, 3, 0.0, seed=2)
    hb = median_heuristic(torch.stack([deg, ok, 2.0 * deg]))  # [3]
    want = [
        math.sqrt(lower_median_sq_dists(deg, nonzero=True) / 2.0),
        math.sqrt(lower_median_sq_dists(ok, nonzero=False) / 2.0),
        2.0 * math.sqrt(lower_median_sq_dists(deg, nonzero=True) / 2.0),
    ]
    torch.testing.assert_close(hb, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    # max_points: the same random subset as before (argsort of the generator's keys), fallback on that subset.
    x = coincident_sample(400, 2, 0.85, seed=3)
    h_sub = median_heuristic(x, max_points=150, generator=torch.Generator().manual_seed(4))
    keys = torch.randint(0, 2**62, (400,), generator=torch.Generator().manual_seed(4))
    sub = x[torch.argsort(keys)[:150]]
    assert lower_median_sq_dists(sub, nonzero=False) == 0.0
    assert abs(h_sub.item() - math.sqrt(lower_median_sq_dists(sub, nonzero=True) / 2.0)) < 1e-12


def test_median_heuristic_treats_round_off_distances_as_coincident():
    # Rows that differ by 1e-13 relative (r^2 ~ 1e-26 |x|^2, below what sq_dists resolves: ~eps |x|^2) count as
    # one point: the bandwidth is the fallback of the exactly repeated sample, not sqrt(~1e-25).
    x = coincident_sample(120, 5, 0.8, seed=5)
    exact = median_heuristic(x)
    mask = (x[:, None, :] == x[None, :, :]).all(-1).sum(-1) > 1  # [120] rows of the repeated point
    rep = x[mask][0]
    jitter = torch.randn(int(mask.sum()), 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x_jit = x.clone()
    x_jit[mask] = rep + 1e-13 * rep.abs().max() * jitter
    assert int(mask.sum()) == 96 and not bool((x_jit[mask] == rep).all())  # no longer bit-identical
    torch.testing.assert_close(median_heuristic(x_jit), exact, rtol=1e-9, atol=0)


def test_median_heuristic_raises_when_all_points_coincide():
    with pytest.raises(ValueError, match="all 7 points coincide: no kernel bandwidth"):
        median_heuristic(torch.full((7, 3), 2.5))
    with pytest.raises(ValueError, match="all 5 points coincide"):
        median_heuristic(torch.ones(2, 3), torch.ones(3, 3))  # pooled
    # Batched: one degenerate entry fails the call and is named.
    xb = torch.stack([torch.randn(6, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(6, 2)])
    with pytest.raises(ValueError, match=r"all 6 points coincide in 1 of 2 batch entries \(\(1,\)\)"):
        median_heuristic(xb)
    with pytest.raises(ValueError, match=r"all 3 subsampled \(max_points=3\) points coincide"):
        median_heuristic(torch.ones(10, 2), max_points=3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="all 4 points coincide"):
        imq_mixture(torch.ones(4, 2))


def test_imq_mixture_uses_the_fallback_bandwidth():
    # Was: ValueError "bandwidth is 0 (all points coincide)" although 20% of the points differ.
    x = coincident_sample(120, 2, 0.8, seed=7)
    h = math.sqrt(lower_median_sq_dists(x, nonzero=True) / 2.0)
    k = imq_mixture(x, scales=(1.0, 3.0))
    assert [c.c for c in k.kernels] == pytest.approx([h, 3.0 * h], rel=1e-12)


# ---------------------------------------------------------------------------
# Issue 3: SumKernel, batched parameters, imq_mixture, grad_x_sum, DeepKernel
# ---------------------------------------------------------------------------
SUM = SumKernel([RBF(0.6), IMQ(1.5, -0.5), IMQ(0.4, -1.2)])
CLOSED_FORM = KERNELS + [SUM]
CLOSED_IDS = IDS + ["sum"]


def pairwise_grad_sum_loop(kernel_fn, x, y):
    """sum_j grad_1 k(x_j, y_i), one autograd call per pair: ``x [n, d]``, ``y [m, d]`` -> ``[m, d]``."""
    out = torch.zeros(y.shape[0], x.shape[1], dtype=torch.float64)
    for i, j in itertools.product(range(y.shape[0]), range(x.shape[0])):
        xj = x[j].detach().double().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(kernel_fn(xj[None], y[i].double()[None])[0, 0], xj)
        out[i] += g
    return out


def test_sum_kernel_profile_is_sum_and_differentiable():
    r2 = torch.linspace(0.0, 9.0, 29, dtype=torch.float64).requires_grad_(True)
    parts = [k.profile(r2) for k in SUM.kernels]
    for got, want in zip(SUM.profile(r2), [sum(p[i] for p in parts) for i in range(3)]):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    torch.testing.assert_close(SUM.phi(r2), SUM.profile(r2)[0], rtol=1e-14, atol=0)
    # The derivatives of the summed profile are those of the summed phi (autograd).
    _assert_profile_derivatives(SUM.profile, r2)
    # Gram of the sum = sum of the Grams.
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(SUM(x, y), sum(k(x, y) for k in SUM.kernels), rtol=1e-14, atol=0)


def test_sum_kernel_validation():
    with pytest.raises(ValueError):
        SumKernel([])
    with pytest.raises(TypeError):
        SumKernel([RBF(1.0), lambda x, y: x @ y.T])


@pytest.mark.parametrize("kernel", CLOSED_FORM, ids=CLOSED_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_x_sum_closed_form_matches_autograd(kernel, dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 3, generator=g, dtype=dtype)  # [B=2, n=6, d=3]
    y = torch.randn(2, 4, 3, generator=g, dtype=dtype)  # [B=2, m=4, d=3]
    gram_t, gsum = kernel.gram_and_grad_x_sum(x, y)
    assert gram_t.shape == (2, 4, 6) and gsum.shape == (2, 4, 3)
    assert gram_t.dtype == gsum.dtype == dtype
    torch.testing.assert_close(gram_t, kernel(x, y).transpose(-2, -1))
    torch.testing.assert_close(kernel.grad_x_sum(x, y), gsum)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for b in range(2):  # per-pair autograd loop (float64 reference)
        ref = pairwise_grad_sum_loop(kernel, x[b], y[b])
        torch.testing.assert_close(gsum[b].double(), ref, rtol=tol, atol=tol)
    # Forward-mode autograd fallback agrees too (same dtype).
    torch.testing.assert_close(grad_x_sum_autograd(kernel, x, y), gsum, rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", [RBF(0.9), IMQ(0.7, -0.5), SUM], ids=["rbf", "imq", "sum"])
def test_grad_x_sum_gradcheck(kernel):
    # The closed form is itself differentiable in x and y (finite differences vs autograd).
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kernel.grad_x_sum, (x, y))


def test_grad_x_sum_far_from_origin_float32():
    # The closed form centres x and y (the shift cancels), so float32 keeps ~1e-4 relative accuracy at 1e3.
    g = torch.Generator().manual_seed(6)
    x = 1e3 + torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = 1e3 + torch.randn(30, 2, generator=g, dtype=torch.float64)
    k = RBF(1.0)
    ref = k.grad_x_sum(x - 1e3, y - 1e3)
    got = k.grad_x_sum(x.float(), y.float()).double()
    assert (got - ref).norm() / ref.norm() < 1e-3


def test_batched_parameters_match_per_entry_kernels():
    # A [B] bandwidth / c gives one kernel per batch entry of a [B, n, m] Gram matrix.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    y = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    h = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    for batched, single in [(RBF(h), RBF), (IMQ(h, -0.7), lambda c: IMQ(c, -0.7))]:
        gram_t, gsum = batched.gram_and_grad_x_sum(x, y)
        for b in range(3):
            ref_t, ref_g = single(float(h[b])).gram_and_grad_x_sum(x[b], y[b])
            torch.testing.assert_close(gram_t[b], ref_t, rtol=1e-14, atol=1e-15)
            torch.testing.assert_close(gsum[b], ref_g, rtol=1e-13, atol=1e-15)


def test_imq_mixture_uses_scaled_median_bandwidth():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(15, 3, generator=g, dtype=torch.float64) + 0.5
    h = median_heuristic(x, y).item()
    k = imq_mixture(x, y, scales=(0.5, 2.0), beta=-0.5)
    assert isinstance(k, SumKernel) and len(k.kernels) == 2
    assert [c.c for c in k.kernels] == pytest.approx([0.5 * h, 2.0 * h], rel=1e-14)
    r2 = sq_dists(x, y)
    want = (0.25 * h * h + r2) ** -0.5 + (4.0 * h * h + r2) ** -0.5
    torch.testing.assert_close(k(x, y), want, rtol=1e-14, atol=0)
    # Default: 4 scales (0.5, 1, 2, 4); batched input: one c per batch entry.
    xb = torch.stack([x, 3.0 * x])
    kb = imq_mixture(xb)
    assert len(kb.kernels) == 4 and kb.kernels[1].c.shape == (2,)
    for b in range(2):
        torch.testing.assert_close(kb(xb, xb)[b], imq_mixture(xb[b])(xb[b], xb[b]))
    with pytest.raises(ValueError, match="all 5 points coincide"):
        imq_mixture(torch.zeros(5, 2))


class _Tanh(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deep_kernel_gram_and_grad_sum(dtype):
    torch.manual_seed(0)  # nn.Linear initialisation
    fmap = _Tanh().to(dtype)
    base = IMQ(1.0, -0.5)
    kern = DeepKernel(fmap, base)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 3, generator=g, dtype=dtype)
    y = torch.randn(2, 4, 3, generator=g, dtype=dtype)
    gram = kern(x, y)
    assert gram.shape == (2, 5, 4) and gram.dtype == dtype
    torch.testing.assert_close(gram, base(fmap(x), fmap(y)))
    gram_t, gsum = gram_and_grad_x_sum(kern, x, y)
    assert gsum.shape == (2, 4, 3) and gsum.dtype == dtype
    torch.testing.assert_close(gram_t, gram.transpose(-2, -1))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    with torch.no_grad():
        kern64 = DeepKernel(_Tanh().double(), base)
        kern64.feature_map.load_state_dict(fmap.state_dict())
    for b in range(2):
        ref = pairwise_grad_sum_loop(kern64, x[b].double(), y[b].double())
        torch.testing.assert_close(gsum[b].double(), ref, rtol=tol, atol=tol)
    # With the identity feature map the deep kernel is the base kernel: autograd == closed form.
    ident = DeepKernel(lambda z: z, base)
    torch.testing.assert_close(ident.grad_x_sum(x, y), base.grad_x_sum(x, y), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# Issue 24: the median heuristic by exact selection, bit for bit the bandwidth it had before
# ---------------------------------------------------------------------------
def _median_heuristic_before(x, y=None, *, max_points=None, generator=None):
    """``median_heuristic`` as it was before issue 24 (a private copy, kept here on purpose): every pair
    ``i < j`` gathered with ``triu_indices``, a per-pair coincidence tolerance, ``median``, the fallback."""
    from stein_core._random import randint
    from stein_core.kernels import _COINCIDE_ROUNDOFF

    z = (x if y is None else torch.cat([x, y], dim=-2)).detach()
    n, d = z.shape[-2], z.shape[-1]
    if n < 2:
        raise ValueError("median_heuristic needs at least 2 points")
    subsampled = max_points is not None and n > max_points
    if subsampled:
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {max_points}")
        keys = randint(2**62, (n,), device=z.device, generator=generator)
        z = z.index_select(-2, torch.argsort(keys)[:max_points])
        n = max_points
    r2 = sq_dists(z, z)
    iu = torch.triu_indices(n, n, offset=1, device=z.device)
    pairs = r2[..., iu[0], iu[1]]
    zc = z - z.mean(dim=-2, keepdim=True)
    norm2 = (zc * zc).sum(-1)
    tol = (_COINCIDE_ROUNDOFF * d**0.5 * torch.finfo(z.dtype).eps) * (norm2[..., iu[0]] + norm2[..., iu[1]])
    coincide = pairs <= tol
    pairs = pairs.masked_fill(coincide, 0.0)
    med = pairs.median(dim=-1).values
    degenerate = med <= 0
    if bool(degenerate.any()):
        if bool(coincide.all(dim=-1).any()):
            raise ValueError("all points coincide")
        nonzero_med = pairs.masked_fill(coincide, float("nan")).nanmedian(dim=-1).values
        med = torch.where(degenerate, nonzero_med, med)
    return torch.sqrt(med / 2.0)


def _median_cases():
    """(name, x, y): shapes and data on both sides of the selection threshold (n >= 257 points)."""
    g = torch.Generator().manual_seed(24)
    for dtype in (torch.float32, torch.float64):
        for n in (2, 3, 4, 5, 100, 256, 257, 300, 513, 1000):
            for d in (1, 2, 64):
                yield f"gauss-n{n}-d{d}-{dtype}", torch.randn(n, d, generator=g, dtype=dtype), None
        yield f"far-{dtype}", torch.randn(600, 3, generator=g, dtype=dtype) + 1e3, None
        yield f"far-big-{dtype}", 1e-3 * torch.randn(400, 2, generator=g, dtype=dtype) + 1e2, None
        grid = torch.stack(torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij"), -1)
        yield f"grid-ties-{dtype}", grid.reshape(-1, 2).to(dtype), None  # 576 points, heavily tied r^2
        yield f"integers-d1-{dtype}", torch.randint(0, 7, (700, 1), generator=g).to(dtype), None
        for frac in (0.3, 0.5, 0.7, 0.8):  # 70% and 80%: the plain median is 0 (the fallback)
            yield f"dup{frac}-{dtype}", coincident_sample(400, 3, frac, dtype, seed=int(100 * frac)), None
        yield f"pooled-{dtype}", torch.randn(250, 4, generator=g, dtype=dtype), torch.randn(
            170, 4, generator=g, dtype=dtype
        ) + 0.5
        yield f"batched-{dtype}", torch.stack(
            [coincident_sample(300, 2, 0.0, dtype, seed=1), 3.0 * coincident_sample(300, 2, 0.2, dtype, seed=2)]
        ), None
        yield f"batched-one-degenerate-{dtype}", torch.stack(
            [coincident_sample(300, 2, 0.0, dtype, seed=3), coincident_sample(300, 2, 0.8, dtype, seed=4)]
        ).reshape(2, 1, 300, 2), None
        yield f"skewed-{dtype}", torch.randn(500, 8, generator=g, dtype=dtype) * torch.rand(
            500, 1, generator=g, dtype=dtype
        ) ** -2, None
        yield f"sorted-{dtype}", torch.sort(torch.randn(900, 1, generator=g, dtype=dtype), dim=0).values, None


@pytest.mark.parametrize("name, x, y", list(_median_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_median_heuristic_is_bit_for_bit_the_one_before(name, x, y):
    # The selection path (n >= 257) and the gathered one (n < 257) both give the old bandwidth exactly: the
    # models of the pipelines (trained at the median-heuristic bandwidth) must not move by one bit.
    h = median_heuristic(x, y)
    want = _median_heuristic_before(x, y)
    assert h.dtype == want.dtype and h.shape == want.shape
    assert torch.equal(h, want), (name, h, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_median_heuristic_is_the_plain_median_of_all_pairs(dtype):
    # Without coincident points the bandwidth is sqrt(torch.median(r^2_ij, i < j) / 2), nothing else.
    x = torch.randn(700, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)
    r2 = sq_dists(x, x)
    iu = torch.triu_indices(700, 700, offset=1)
    assert torch.equal(median_heuristic(x), torch.sqrt(r2[iu[0], iu[1]].median() / 2.0))


def test_median_heuristic_subsampling_is_unchanged():
    x = torch.randn(3000, 3, generator=torch.Generator().manual_seed(2))
    for max_points in (2, 300, 1200, 2999):
        h = median_heuristic(x, max_points=max_points, generator=torch.Generator().manual_seed(3))
        want = _median_heuristic_before(x, max_points=max_points, generator=torch.Generator().manual_seed(3))
        assert torch.equal(h, want), max_points


def test_median_heuristic_takes_each_branch(monkeypatch):
    """Both sides of the masking argument in median_heuristic: a median above every coincidence tolerance is
    taken from the selection as it is; a median within round-off of 0 (here: 55% of the points repeated
    with a 1e-13 jitter, so the raw median is ~1e-26 |x|^2 > 0 but the masked one is 0) goes to the exact path
    and its fallback. Both equal the copy from before."""
    import stein_core.kernels as K

    calls = []
    real = K._upper_triangle_kth
    monkeypatch.setattr(K, "_upper_triangle_kth", lambda z, k: calls.append(k) or real(z, k))
    x = coincident_sample(400, 3, 0.0, seed=8)
    assert torch.equal(median_heuristic(x), _median_heuristic_before(x)) and len(calls) == 1
    x = coincident_sample(400, 3, 0.8, seed=9)
    mask = (x[:, None, :] == x[None, :, :]).all(-1).sum(-1) > 1
    rep = x[mask][0]
    jitter = torch.randn(int(mask.sum()), 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x[mask] = rep + 1e-13 * rep.abs().max() * jitter
    raw = K._upper_triangle_kth(x, (400 * 399 // 2 - 1) // 2)
    assert raw is None or 0.0 <= float(raw) < 1e-20  # the raw median is (within) round-off
    h = median_heuristic(x)
    assert torch.equal(h, _median_heuristic_before(x)) and float(h) > 1.0  # the fallback, not ~1e-13
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upper_triangle_kth_is_exact_for_any_rank_and_any_sample(monkeypatch, dtype):
    # The k-th smallest r^2 over i < j, for ranks from the smallest to the largest pair, against the gathered
    # upper triangle of sq_dists; also with a bracket so narrow that the sample misses (the fallback).
    import stein_core.kernels as K

    x = torch.randn(2, 300, 3, generator=torch.Generator().manual_seed(4), dtype=dtype) + 10.0
    r2 = sq_dists(x, x)
    iu = torch.triu_indices(300, 300, offset=1)
    pairs = r2[..., iu[0], iu[1]]
    n_pairs = pairs.shape[-1]
    missed = []
    gather = torch.triu_indices  # the selection gathers the pairs only when its bracket missed
    monkeypatch.setattr(torch, "triu_indices", lambda *a, **kw: missed.append(1) or gather(*a, **kw))
    monkeypatch.setattr(K, "_SELECT_BLOCK_ELEMENTS", 5000)  # many blocks, uneven
    for sigmas in (K._SELECT_SIGMAS, 0.0):
        monkeypatch.setattr(K, "_SELECT_SIGMAS", sigmas)
        missed.clear()
        for k in (300, 7000, (n_pairs - 1) // 2, n_pairs - 1):
            got = K._upper_triangle_kth(x, k)
            assert torch.equal(got, pairs.kthvalue(k + 1, dim=-1).values), (sigmas, k)
    assert len(missed) >= 4  # with no margin the sample misses (and the answer stays exact)


def test_median_heuristic_errors_and_nan_are_unchanged():
    for bad in (torch.zeros(1, 2), torch.zeros(0, 3)):
        with pytest.raises(ValueError, match="at least 2 points"):
            median_heuristic(bad)
    with pytest.raises(ValueError, match="max_points must be >= 2"):
        median_heuristic(torch.randn(5, 2), max_points=1)
    with pytest.raises(ValueError, match=r"all 300 points coincide in 1 of 3 batch entries \(\(2,\)\)"):
        median_heuristic(torch.cat([torch.randn(2, 300, 2), torch.ones(1, 300, 2)]))
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(5))
    x[7, 1] = float("nan")
    assert torch.isnan(median_heuristic(x)) and torch.isnan(_median_heuristic_before(x))
    x[7, 1] = float("inf")
    assert torch.isnan(median_heuristic(x)) == torch.isnan(_median_heuristic_before(x))
