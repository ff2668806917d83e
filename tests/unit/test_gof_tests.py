"""Kernel hypothesis tests: vectorised resampling vs per-draw loops, p-value convention,
level and power over repeated experiments (batched along a leading repetition dim).

Tolerances for rejection rates are binomial: with R repetitions at rate p the sd of the
observed rate is sqrt(p (1 - p) / R) (0.0154 for R = 200, p = 0.05).
"""

import pytest
import torch

from stein_core import IMQ, RBF, ksd, mmd, stein_kernel_matrix
from stein_core.discrepancies import median_rbf
from stein_core.kernels import median_heuristic
from stein_core.tests_stat import KernelTestResult, ksd_test, mmd_permutation_test, wild_bootstrap


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
