"""Kernel hypothesis tests: vectorised resampling vs per-draw loops, p-value convention,
level and power over repeated experiments (batched along a leading repetition dim).

Tolerances for rejection rates are binomial: with R repetitions at rate p the sd of the
observed rate is sqrt(p (1 - p) / R) (0.0154 for R = 200, p = 0.05).
"""

import math

import numpy as np
import pytest
import torch

from stein_core import IMQ, RBF, ksd, mmd, stein_kernel_matrix
from stein_core.discrepancies import get_ksd_smoothed_fn, ksd_smoothed, median_rbf, smoothed_kernels
from stein_core.distributions import GaussianMixture
from stein_core.kernels import imq_mixture, median_heuristic
from stein_core.tests_stat import (
    KernelTestResult,
    ksd_smoothed_test,
    ksd_test,
    mmd_permutation_test,
    sksd_test,
    wild_bootstrap,
)


def rademacher_draws(shape, seed):
    """The Rademacher draws wild_bootstrap makes from a CPU generator seeded with ``seed``."""
    return 2 * torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)) - 1


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wild_bootstrap_matches_loop(d, dtype):
    n, b = 9, 7
    g = torch.Generator().manual_seed(d)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    h = stein_kernel_matrix(x, -x + 0.3, IMQ())
    stat, null, p = wild_bootstrap(h, n_bootstrap=b, generator=torch.Generator().manual_seed(123))
    assert stat.dtype == null.dtype == p.dtype == dtype and null.shape == (b,)
    w = rademacher_draws((b, n), 123).double()
    hd = h.double()
    ref = torch.tensor(
        [sum(w[k, i] * w[k, j] * hd[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1)) for k in range(b)]
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(null.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(stat.double(), ksd(x.double(), -x.double() + 0.3, IMQ()), rtol=tol, atol=tol)
    assert p.item() == (1 + (null >= stat).sum().item()) / (1 + b)


def test_wild_bootstrap_p_value_counts_observed_statistic():
    # With n = 2 the bootstrap statistic is W_1 W_2 h_12 and equals the observed one
    # whenever W_1 W_2 = +1 (half of the draws): these ties are counted.
    h = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    stat, null, p = wild_bootstrap(h, n_bootstrap=50, generator=torch.Generator().manual_seed(0))
    ties = (null == stat).sum().item()
    assert 0 < ties < 50 and p.item() == (1 + ties) / 51
    # A statistic above every draw gets p = 1 / (1 + B), never 0. (Constant h: U* = U only
    # when all weights are equal, probability 2^-19 for n = 20.)
    h_big = torch.full((20, 20), 5.0, dtype=torch.float64)
    _, _, p_big = wild_bootstrap(h_big, n_bootstrap=99, generator=torch.Generator().manual_seed(1))
    assert p_big.item() == pytest.approx(1 / 100)


@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("statistic", ["u", "v"])
def test_mmd_permutation_matches_loop(d, dtype, statistic):
    n, m, b = 6, 4, 9
    g = torch.Generator().manual_seed(10 + d)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(m, d, generator=g, dtype=dtype) + 0.5
    kernel = RBF(1.1)
    res = mmd_permutation_test(x, y, kernel, n_permutations=b, generator=torch.Generator().manual_seed(7), statistic=statistic)
    assert isinstance(res, KernelTestResult) and res.n == n + m and res.d == d
    assert res.statistic.dtype == res.null_samples.dtype == dtype
    # Reference: the same permutations (argsort of the same uniform keys), statistic by mmd().
    keys = torch.randint(0, 2**62, (b, n + m), generator=torch.Generator().manual_seed(7))
    z = torch.cat([x, y]).double()
    ref = []
    for k in range(b):
        perm = torch.argsort(keys[k])
        ref.append(mmd(z[perm[:n]], z[perm[n:]], kernel, statistic=statistic))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(res.null_samples.double(), torch.stack(ref), rtol=tol, atol=tol)
    torch.testing.assert_close(res.statistic.double(), mmd(x.double(), y.double(), kernel, statistic), rtol=tol, atol=tol)
    assert res.p_value.item() == pytest.approx((1 + (res.null_samples >= res.statistic).sum().item()) / (1 + b))


def test_batched_tests_equal_per_entry_statistics_and_keep_device():
    g = torch.Generator().manual_seed(20)
    x = torch.randn(3, 40, 2, generator=g, dtype=torch.float64)
    y = torch.randn(3, 30, 2, generator=g, dtype=torch.float64)
    kernel = IMQ()
    res = ksd_test(x, lambda t: -t, kernel, n_bootstrap=50, generator=g)
    assert res.statistic.shape == res.p_value.shape == res.reject.shape == (3,)
    assert res.null_samples.shape == (3, 50) and res.reject.dtype == torch.bool
    for i in range(3):
        torch.testing.assert_close(res.statistic[i], ksd(x[i], -x[i], kernel), rtol=1e-12, atol=1e-12)
    # Independent Rademacher draws per batch entry.
    assert not torch.equal(res.null_samples[0], res.null_samples[1])
    res2 = mmd_permutation_test(x, y, kernel, n_permutations=50, generator=g)
    for i in range(3):
        torch.testing.assert_close(res2.statistic[i], mmd(x[i], y[i], kernel), rtol=1e-12, atol=1e-12)
    assert ((res2.p_value > 0) & (res2.p_value <= 1)).all()
    # Same generator seed, same result (reproducible); no autograd graph kept.
    a = ksd_test(x, -x, kernel, n_bootstrap=20, generator=torch.Generator().manual_seed(5))
    b = ksd_test(x, -x, kernel, n_bootstrap=20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.null_samples, b.null_samples) and not a.statistic.requires_grad


def test_ksd_test_with_non_radial_kernel():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)

    def kernel(a, b):  # RBF(1) written as a plain callable: autograd path
        diff = a[..., :, None, :] - b[..., None, :, :]
        return torch.exp(-0.5 * (diff * diff).sum(-1))

    a = ksd_test(x + 1.0, -(x + 1.0), kernel, n_bootstrap=30, generator=torch.Generator().manual_seed(0))
    b = ksd_test(x + 1.0, -(x + 1.0), RBF(1.0), n_bootstrap=30, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.null_samples, b.null_samples, rtol=1e-12, atol=1e-12)
    assert a.reject.item() and a.p_value.item() == pytest.approx(1 / 31)


# ---------------------------------------------------------------------------
# Level and power over repeated experiments (float32, batched over repetitions)
# ---------------------------------------------------------------------------
D, ALPHA, B = 5, 0.05, 200


def rejection_rate(run, reps, chunk):
    """Fraction of rejections over ``reps`` repetitions, run ``chunk`` at a time (batched)."""
    out = [run(min(chunk, reps - i)) for i in range(0, reps, chunk)]
    return torch.cat(out).double().mean().item()


def normal_samples(reps, n, shift, gen):
    x = torch.randn(reps, n, D, generator=gen)
    x[..., 0] += shift  # mean shift along one coordinate (||shift|| = shift)
    return x


def ksd_run(n, shift, gen):
    def run(reps):
        x = normal_samples(reps, n, shift, gen)
        kernel = RBF(median_heuristic(x))  # one median-heuristic bandwidth per repetition
        return ksd_test(x, lambda t: -t, kernel, n_bootstrap=B, generator=gen, alpha=ALPHA).reject

    return run


def mmd_run(n, shift, gen):
    def run(reps):
        x = normal_samples(reps, n, 0.0, gen)
        y = normal_samples(reps, n, shift, gen)
        return mmd_permutation_test(x, y, median_rbf(x, y), n_permutations=B, generator=gen, alpha=ALPHA).reject

    return run


# Level (true null, n = 200 for KSD, n = m = 100 for MMD). Binomial sd at 0.05:
# 0.0154 for 200 repetitions, so [0.02, 0.09] is -2 / +2.6 sd; 0.0069 for 1000, so
# [0.03, 0.075] is -2.9 / +3.6 sd. (Scratch runs of 3000 repetitions: KSD 0.049, MMD 0.045-0.057.)
LEVEL_CASES = [
    pytest.param(200, 0.02, 0.09, id="200reps"),
    pytest.param(1000, 0.03, 0.075, id="1000reps", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("reps, lo, hi", LEVEL_CASES)
def test_ksd_test_level(reps, lo, hi):
    rate = rejection_rate(ksd_run(200, 0.0, torch.Generator().manual_seed(reps)), reps=reps, chunk=100)
    assert lo <= rate <= hi, rate


@pytest.mark.parametrize("reps, lo, hi", LEVEL_CASES)
def test_mmd_permutation_test_level(reps, lo, hi):
    rate = rejection_rate(mmd_run(100, 0.0, torch.Generator().manual_seed(reps + 1)), reps=reps, chunk=100)
    assert lo <= rate <= hi, rate


# Power: a mean shift of 0.5 along one axis in d = 5 with n = 500 (n = m = 500 for MMD);
# scratch runs: 100/100 rejections for both. If the true power were only 0.9, passing
# (>= 95%) would have probability 0.22 with 40 repetitions and 0.008 with 200.
POWER_CASES = [pytest.param(40, id="40reps"), pytest.param(200, id="200reps", marks=pytest.mark.slow)]


@pytest.mark.parametrize("reps", POWER_CASES)
def test_ksd_test_power(reps):
    rate = rejection_rate(ksd_run(500, 0.5, torch.Generator().manual_seed(reps + 2)), reps=reps, chunk=20)
    assert rate >= 0.95, rate


@pytest.mark.parametrize("reps", POWER_CASES)
def test_mmd_permutation_test_power(reps):
    rate = rejection_rate(mmd_run(500, 0.5, torch.Generator().manual_seed(reps + 3)), reps=reps, chunk=10)
    assert rate >= 0.95, rate


# ---------------------------------------------------------------------------
# Issue 10 item 9: a collapsed bandwidth or non-finite data is an error, never a decision
# ---------------------------------------------------------------------------
def mostly_one_point(n, d, frac, seed):
    """``n`` rows of N(0, I_d) in float64, ``int(frac * n)`` of them (at random positions) one repeated draw."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    idx = torch.randperm(n, generator=g)[: int(frac * n)]
    x[idx] = x[idx[0]].clone()
    return x


def nonzero_median_bandwidth(z):
    """Reference fallback bandwidth: sqrt(lower median of the non-zero exact r^2_ij, i < j, / 2), numpy."""
    z = z.numpy()
    r2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)[np.triu_indices(len(z), 1)]
    assert np.median(r2) == 0.0  # the case the fallback is for
    nz = np.sort(r2[r2 > 0])
    return math.sqrt(nz[(len(nz) - 1) // 2] / 2.0)


@pytest.mark.parametrize("kernel_name", ["rbf_median", "imq_mixture"])
def test_ksd_test_with_mostly_coincident_points_is_finite_and_rejects(kernel_name):
    # 80% of 200 rows are one point (64% of the pairs have r^2 = 0): the plain median bandwidth was 0, the RBF KSD
    # NaN, and the test returned p = 1/(B+1), reject=True *because* of the NaN (imq_mixture raised instead).
    # With the fallback bandwidth the statistic is finite, equals ksd() at the reference bandwidth, and the test
    # rejects for the right reason: a sample with an atom is not i.i.d. N(0, I), and its KSD^2 (~1.8 for the
    # RBF) lies far above every one of the B = 200 bootstrap draws (null sd ~0.01 at n = 200).
    x = mostly_one_point(200, 2, 0.8, seed=30)
    h = nonzero_median_bandwidth(x)
    kernel = median_rbf(x) if kernel_name == "rbf_median" else imq_mixture(x)
    res = ksd_test(x, lambda t: -t, kernel, n_bootstrap=200, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(res.statistic) and torch.isfinite(res.null_samples).all()
    if kernel_name == "rbf_median":
        assert abs(kernel.bandwidth.item() - h) < 1e-12
        torch.testing.assert_close(res.statistic, ksd(x, -x, RBF(h)), rtol=1e-12, atol=0)
    assert res.statistic > 10 * res.null_samples.abs().max()
    assert res.reject and res.p_value.item() == pytest.approx(1 / 201)


def test_sksd_test_with_mostly_coincident_points_is_finite_and_rejects():
    # The per-slice median bandwidth of the projections (coordinates, at the start) was 0 for the same sample:
    # NaN statistic and directions, p = 1/(B+1). Now finite, and rejecting as for KSD above.
    x = mostly_one_point(200, 2, 0.8, seed=31)
    res = sksd_test(x, lambda t: -t, median_rbf, n_steps=5, n_bootstrap=200, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(res.statistic) and torch.isfinite(res.null_samples).all()
    assert torch.isfinite(res.g).all() and res.n == 100
    # KSD-like margin: the statistic (3.9) is ~9x the largest |bootstrap draw| (0.43; the 100 tested rows).
    assert res.statistic > 5 * res.null_samples.abs().max() and res.reject


def test_mmd_permutation_test_with_an_atom_holds_its_level():
    # Both samples from 0.9 delta_a + 0.1 N(0, I_2), n = m = 50, 200 repetitions batched, median-heuristic RBF per
    # repetition. About 81% of the pooled pairs have r^2 = 0, so the plain median bandwidth is 0 in (almost) every
    # repetition: before the fallback each of those statistics was NaN and rejected (rate 1). H0 holds and the
    # pooled multiset, hence the bandwidth, is permutation invariant, so the permutation test is exact
    # conditionally on it: the rejection rate among the degenerate repetitions is <= 0.05 up to binomial noise
    # (sd 0.0154 at 0.05 for 200; scratch runs of 1000 repetitions: 0.043-0.046). [0.01, 0.09] is -2.6/+2.6 sd.
    gen = torch.Generator().manual_seed(32)
    atom = torch.tensor([0.3, -0.2], dtype=torch.float64)

    def sample():
        z = torch.randn(200, 50, 2, generator=gen, dtype=torch.float64)
        return torch.where((torch.rand(200, 50, generator=gen) < 0.9)[..., None], atom, z)

    x, y = sample(), sample()
    z = torch.cat([x, y], dim=-2)
    iu = torch.triu_indices(100, 100, offset=1)
    exact_r2 = ((z[..., :, None, :] - z[..., None, :, :]) ** 2).sum(-1)  # [200, 100, 100], exact 0 for ties
    degenerate = exact_r2[..., iu[0], iu[1]].median(-1).values == 0  # [200]
    assert degenerate.sum() >= 190
    res = mmd_permutation_test(x, y, median_rbf(x, y), n_permutations=200, generator=gen)
    assert torch.isfinite(res.statistic).all() and torch.isfinite(res.null_samples).all()
    rate = res.reject[degenerate].double().mean().item()
    assert 0.01 <= rate <= 0.09, rate


def _three_tests(x, kernel, slice_kernel=None, y=None):
    """Run KSD, MMD (against ``y``) and maxSKSD (no optimisation) on ``x`` with the given kernels."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn_like(x) if y is None else y
    return {
        "ksd": lambda: ksd_test(x, lambda t: -t, kernel, n_bootstrap=50, generator=gen),
        "mmd": lambda: mmd_permutation_test(x, y, kernel, n_permutations=50, generator=gen),
        "sksd": lambda: sksd_test(x, lambda t: -t, slice_kernel or kernel, n_steps=0, n_bootstrap=50, generator=gen),
    }


@pytest.mark.parametrize("test", ["ksd", "mmd", "sksd"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_samples_are_an_error(test, bad):
    # Was: statistic NaN, p = 1/(B+1), reject=True.
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
    x[7, 1] = bad
    x[12, 0] = bad
    with pytest.raises(ValueError, match="2 of 40 rows of x are not finite"):
        _three_tests(x, IMQ())[test]()


def test_non_finite_second_sample_and_score_are_errors():
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(34), dtype=torch.float64)
    y = x.clone()
    y[3] = float("nan")
    with pytest.raises(ValueError, match="1 of 30 rows of y are not finite"):
        mmd_permutation_test(x, y, IMQ(), n_permutations=20)
    score = -x.clone()
    score[4, 0] = float("inf")  # e.g. a score network that overflowed
    with pytest.raises(ValueError, match="1 of 30 rows of the score at x are not finite"):
        ksd_test(x, score, IMQ(), n_bootstrap=20)
    with pytest.raises(ValueError, match="1 of 30 rows of the score at x are not finite"):
        sksd_test(x, score, IMQ(), n_steps=0, n_bootstrap=20)


@pytest.mark.parametrize("test, name", [("ksd", "KSD\\^2"), ("mmd", "MMD\\^2"), ("sksd", "maxSKSD")])
def test_nan_statistic_is_an_error_not_a_p_value(test, name):
    # A zero RBF bandwidth (a tensor, which RBF does not validate, as a collapsed median heuristic would give)
    # makes exp(-0/0) = NaN on the diagonal of every kernel matrix: the statistic is NaN. Was: p = 1/(B+1),
    # reject=True.
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(35), dtype=torch.float64)
    kernel = RBF(torch.tensor(0.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"the {name} statistic is not finite \\(nan\\).*bandwidth collapsed"):
        _three_tests(x, kernel)[test]()


def test_nan_statistic_in_one_batch_entry_is_an_error():
    x = torch.randn(3, 30, 2, generator=torch.Generator().manual_seed(36), dtype=torch.float64)
    kernel = RBF(torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))  # entry 1 collapsed
    with pytest.raises(ValueError, match="KSD\\^2 statistic is not finite \\(nan\\) in 1 of 3 batch entries"):
        ksd_test(x, lambda t: -t, kernel, n_bootstrap=20)
    with pytest.raises(ValueError, match="MMD\\^2 statistic is not finite \\(nan\\) in 1 of 3 batch entries"):
        mmd_permutation_test(x, -x, kernel, n_permutations=20)


def test_wild_bootstrap_rejects_a_non_finite_kernel_matrix():
    h = torch.eye(5, dtype=torch.float64) + 1.0
    h[1, 3] = h[3, 1] = float("nan")
    with pytest.raises(ValueError, match="the U statistic is not finite"):
        wild_bootstrap(h, n_bootstrap=10, generator=torch.Generator().manual_seed(0))


def test_sksd_test_with_a_constant_coordinate_names_the_collapsed_slice():
    # A constant coordinate: the first slice's projections all coincide, so the per-slice median heuristic has no
    # bandwidth. Was: NaN statistic and directions, p = 1/(B+1), reject=True.
    x = torch.randn(60, 2, generator=torch.Generator().manual_seed(37), dtype=torch.float64)
    x[:, 0] = 0.25
    with pytest.raises(ValueError, match="slice kernel factory failed.*all 30 points coincide"):
        sksd_test(x, lambda t: -t, median_rbf, n_steps=3, n_bootstrap=20)


@pytest.mark.gpu
def test_tests_and_statistics_stay_on_cuda():
    from stein_core import ksd_linear, maxsksd, mmd_linear, sksd_test

    dev = torch.device("cuda")
    for gen in (torch.Generator().manual_seed(0), torch.Generator(device=dev).manual_seed(0)):
        x = torch.randn(2, 64, 3, device=dev)
        y = torch.randn(2, 64, 3, device=dev)
        outs = [
            *ksd_test(x, -x, median_rbf(x), n_bootstrap=20, generator=gen)[:4],
            *mmd_permutation_test(x, y, median_rbf(x, y), n_permutations=20, generator=gen)[:4],
            *sksd_test(x, -x, median_rbf, n_steps=2, n_bootstrap=20, generator=gen)[:4],
            *maxsksd(x, -x, median_rbf, variant="rg", n_slices=2, n_steps=2, generator=gen),
            *ksd_linear(x, -x, IMQ()),
            *mmd_linear(x, y, IMQ()),
        ]
        for t in outs:
            assert t.device.type == "cuda", t
            assert t.dtype in (torch.float32, torch.bool), t.dtype


# ---------------------------------------------------------------------------
# Noise-smoothed KSD (Wenliang & Kanagawa, arXiv:2008.10087): blind plain KSD, seeing smoothed KSD
# ---------------------------------------------------------------------------
# The gmm2d pipeline's data (conf/gmm2d.yaml prepare: source mixture, weights 0.8/0.2, means +-(5, 5), std 1;
# tasks/stages/prepare.py mixture_spec) and the blind model: the same components, weights 0.5/0.5.
GMM_MEANS = [[-5.0, -5.0], [5.0, 5.0]]
GMM_TRUE = GaussianMixture([0.8, 0.2], GMM_MEANS, 1.0)
GMM_BLIND = GaussianMixture([0.5, 0.5], GMM_MEANS, 1.0)


def gmm_samples(reps, n, seed):
    return GMM_TRUE.sample(reps * n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[0].reshape(reps, n, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ksd_smoothed_is_the_ksd_of_the_noised_sample_against_the_perturbed_score(dtype):
    # Reference: draw the noise as ksd_smoothed does (one [n_noise, ..., n, d] standard normal from the generator,
    # shared by every level) and call ksd() level by level.
    x = gmm_samples(2, 40, seed=40).to(dtype)  # [2, 40, 2]: two independent batch entries
    sigmas = [0.0, 1.5, 6.0]
    kernels = smoothed_kernels(IMQ(c=1.0), sigmas)
    assert [k.c for k in kernels] == pytest.approx([1.0, math.hypot(1.0, 1.5), math.hypot(1.0, 6.0)])
    for n_noise in (1, 3):
        got = ksd_smoothed(x, GMM_BLIND.perturbed_score, kernels, sigmas, generator=torch.Generator().manual_seed(7),
                           n_noise=n_noise)
        assert got.shape == (2, 3) and got.dtype == dtype
        eps = torch.randn((n_noise, *x.shape), generator=torch.Generator().manual_seed(7), dtype=dtype)
        for level, s in enumerate(sigmas):
            xt = x + s * eps  # [M, 2, 40, 2]
            ref = torch.stack([ksd(xt[m], GMM_BLIND.perturbed(s).score(xt[m]), kernels[level]) for m in range(n_noise)]).mean(0)
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(got[:, level], ref, rtol=tol, atol=tol)
        # sigma = 0 is plain KSD against the model's own score (no noise enters)
        torch.testing.assert_close(got[:, 0], ksd(x, GMM_BLIND.score(x), kernels[0]), rtol=1e-12, atol=0)
    # a kernel factory is called on each level's smoothed sample (the median heuristic follows the noise); the
    # factory closure of get_ksd_smoothed_fn gives the same numbers; the same seed gives the same values
    fn = get_ksd_smoothed_fn(median_rbf, sigmas)
    a = fn(x, GMM_BLIND.perturbed_score, generator=torch.Generator().manual_seed(3))
    b = ksd_smoothed(x, GMM_BLIND.perturbed_score, median_rbf, sigmas, generator=torch.Generator().manual_seed(3))
    eps = torch.randn((1, *x.shape), generator=torch.Generator().manual_seed(3), dtype=dtype)[0]
    xt = x + 6.0 * eps
    torch.testing.assert_close(a[:, 2], ksd(xt, GMM_BLIND.perturbed_score(xt, 6.0), median_rbf(xt)), rtol=1e-5, atol=1e-7)
    assert torch.equal(a, b)


def test_ksd_smoothed_is_differentiable_and_refuses_bad_ladders():
    x = gmm_samples(1, 30, seed=41)[0].requires_grad_(True)
    val = ksd_smoothed(x, GMM_BLIND.perturbed_score, IMQ(), [0.0, 3.0], generator=torch.Generator().manual_seed(0)).sum()
    (grad,) = torch.autograd.grad(val, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="finite and >= 0"):
        ksd_smoothed(x, GMM_BLIND.perturbed_score, IMQ(), [1.0, -0.5], generator=None)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        ksd_smoothed(x, GMM_BLIND.perturbed_score, IMQ(), [], generator=None)
    with pytest.raises(ValueError, match="2 kernels for 3 noise levels"):
        ksd_smoothed(x, GMM_BLIND.perturbed_score, [IMQ(), IMQ()], [0.0, 1.0, 2.0], generator=None)
    with pytest.raises(ValueError, match="returned \\(30,\\) for points \\(30, 2\\)"):
        ksd_smoothed(x, lambda z, s: z[:, 0], IMQ(), [1.0], generator=None)


@pytest.mark.parametrize("weighting", ["sum", "studentized"])
def test_ksd_smoothed_test_is_one_wild_bootstrap_with_shared_multipliers(weighting):
    # Reference loop: the noise (drawn first), then the B x n Rademacher draws (next, from the same generator);
    # every level's U-statistic and bootstrap draws with the same multipliers, weighted and summed.
    n, b, sigmas = 9, 7, [0.0, 2.0, 8.0]
    x = gmm_samples(1, n, seed=42)[0]
    kernels = smoothed_kernels(RBF(1.5), sigmas)
    res = ksd_smoothed_test(x, GMM_TRUE.perturbed_score, kernels, sigmas, weighting=weighting, n_bootstrap=b,
                            generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    eps = torch.randn((1, n, 2), generator=g, dtype=torch.float64)[0]
    w = (2 * torch.randint(0, 2, (b, n), generator=g) - 1).double()
    stat, null = 0.0, torch.zeros(b, dtype=torch.float64)
    for level, s in enumerate(sigmas):
        xt = x + s * eps
        h = stein_kernel_matrix(xt, GMM_TRUE.perturbed_score(xt, s), kernels[level])
        off = [(i, j) for i in range(n) for j in range(n) if i != j]
        u = sum(h[i, j] for i, j in off) / (n * (n - 1))
        weight = 1.0 if weighting == "sum" else 1.0 / math.sqrt(2 * sum(h[i, j] ** 2 for i, j in off) / (n * (n - 1)) ** 2)
        torch.testing.assert_close(res.per_sigma[level], u, rtol=1e-12, atol=1e-15)
        assert res.weights[level].item() == pytest.approx(weight, rel=1e-12)
        torch.testing.assert_close(u, ksd(xt, GMM_TRUE.perturbed_score(xt, s), kernels[level]), rtol=1e-10, atol=1e-15)
        stat = stat + weight * u
        null = null + weight * torch.stack([sum(w[k, i] * w[k, j] * h[i, j] for i, j in off) for k in range(b)]) / (n * (n - 1))
    torch.testing.assert_close(res.statistic, stat, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(res.null_samples, null, rtol=1e-10, atol=1e-14)
    assert res.p_value.item() == (1 + (res.null_samples >= res.statistic).sum().item()) / (1 + b)
    assert (res.n, res.d) == (n, 2) and res.per_sigma.shape == res.weights.shape == (3,)


def test_ksd_smoothed_test_same_seed_same_result_and_bad_input_is_an_error():
    x = gmm_samples(3, 50, seed=43)
    run = lambda seed: ksd_smoothed_test(x, GMM_TRUE.perturbed_score, median_rbf, [2.0, 6.0], n_noise=2,  # noqa: E731
                                         n_bootstrap=30, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(s, t) for s, t in zip(a[:4], b[:4])) and torch.equal(a.per_sigma, b.per_sigma)
    assert not torch.equal(a.per_sigma, c.per_sigma)  # another seed, other noise
    assert a.statistic.shape == (3,) and a.null_samples.shape == (3, 30) and not a.statistic.requires_grad
    with pytest.raises(ValueError, match="weighting must be one of"):
        ksd_smoothed_test(x, GMM_TRUE.perturbed_score, IMQ(), [1.0], weighting="mean")
    bad = x.clone()
    bad[1, 4, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 150 rows of x are not finite"):
        ksd_smoothed_test(bad, GMM_TRUE.perturbed_score, IMQ(), [1.0])
    with pytest.raises(ValueError, match="rows of the perturbed score at sigma=2 are not finite"):
        ksd_smoothed_test(x, lambda z, s: z / (s - 2.0), IMQ(), [1.0, 2.0])


# The test. Plain KSD is blind: the 0.5/0.5 model's score differs from the true 0.8/0.2 one only where
# the responsibilities are not 0 or 1, around the line x1 + x2 = 0 at 5 sqrt(2) = 7.1 standard deviations from
# both means, where none of 500 points lands; its KSD^2 is then the true model's own, and its test rejects at the
# level: the number of rejections among 20 independent seeds is Binomial(20, 0.05), P(>= 6) = 3.3e-4. Smoothed at
# sigma = 7 and 14 (half and once the distance 14.1 between the means) the modes overlap, the weights change the
# score where the data are, and every smoothed test rejects (scratch runs: 20 of 20 at p = 1/201, the smallest
# p-value, for both kernels and for sigmas (5, 10) or (14,)); if its power were only 0.95, P(<= 14 of 20) = 3.3e-4.
def test_smoothed_ksd_sees_the_mixing_proportions_plain_ksd_is_blind_to():
    reps, n, k = 20, 500, 5
    x = gmm_samples(reps, n, seed=44)  # [20, 500, 2]: one experiment per seed, batched
    assert (GMM_BLIND.score(x) - GMM_TRUE.score(x)).abs().max() < 1e-6  # blindness, at every sample
    plain = ksd_test(x, GMM_BLIND.score, median_rbf(x), n_bootstrap=200, generator=torch.Generator().manual_seed(45))
    assert plain.reject.sum().item() <= k, plain.p_value
    smoothed = ksd_smoothed_test(x, GMM_BLIND.perturbed_score, median_rbf, [7.0, 14.0], n_bootstrap=200,
                                 generator=torch.Generator().manual_seed(46))
    assert smoothed.reject.sum().item() >= reps - k, smoothed.p_value
    # each level is a KSD^2 of its own: positive at both levels in every experiment (the alternative is seen)
    assert (smoothed.per_sigma > 0).all()


# Level: samples of the true 0.8/0.2 mixture, n = 200, 200 repetitions batched, ladder (7, 14) with the widened IMQ.
# Binomial sd at 0.05 with 200 repetitions: 0.0154, so [0.02, 0.09] is -2 / +2.6 sd (P(< 4 of 200) = 0.009,
# P(> 18 of 200) = 0.006). Scratch runs of 1000 repetitions: 0.040 (IMQ) and 0.047 (median RBF) studentized,
# 0.040 and 0.044 with the plain sum.
def test_ksd_smoothed_test_level():
    x = gmm_samples(200, 200, seed=47)
    sigmas = [7.0, 14.0]
    res = ksd_smoothed_test(x, GMM_TRUE.perturbed_score, smoothed_kernels(IMQ(), sigmas), sigmas, n_bootstrap=200,
                            generator=torch.Generator().manual_seed(48))
    rate = res.reject.double().mean().item()
    assert 0.02 <= rate <= 0.09, rate
