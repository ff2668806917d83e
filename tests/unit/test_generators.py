"""Implicit-generator losses (approximate gradient descent, Li 2017; MMD) and the generator networks.

Statistical tests average over fixed seeds; each tolerance has its derivation next to it. "SE" is the
standard error of a mean over seeds, sd / sqrt(#seeds).
"""

import math

import pytest
import torch

from stein_core import (
    ConvGenerator,
    MLPGenerator,
    fit_ssge,
    get_agd_gradient_fn,
    get_agd_loss_fn,
    get_kernel_fn,
    get_mmd_loss_fn,
    imq_mixture,
    mmd,
    stein_gradient_estimator,
    stein_gradient_predict,
)
from stein_core.kernels import IMQ, SumKernel, median_heuristic

DT = torch.float64
ESTIMATORS = ["stein", "ssge"]


def mean_and_se(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over the first dim (the seeds)."""
    return values.mean(0), values.std(0) / math.sqrt(values.shape[0])


# ---------------------------------------------------------------------------
# Kernel factory
# ---------------------------------------------------------------------------
def test_kernel_fn_median_pools_detached_points_and_fixed_bandwidth():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=DT, requires_grad=True)
    y = 2.0 + torch.randn(40, 3, generator=g, dtype=DT)
    k = get_kernel_fn(scales=(0.5, 2.0), beta=-0.5)(x, y)
    h = median_heuristic(x, y)  # of the pooled points
    assert isinstance(k, SumKernel) and [c.c for c in k.kernels] == [0.5 * float(h), 2.0 * float(h)]
    ref = imq_mixture(x, y, (0.5, 2.0), -0.5)
    assert torch.equal(k(x, y), ref(x, y))
    # Pooled, not x alone: y sits 2 * sqrt(3) away, so the pooled bandwidth is clearly larger.
    assert float(h) > 1.2 * float(median_heuristic(x))
    fixed = get_kernel_fn(scales=(1.0, 3.0), beta=-0.3, bandwidth=0.7)
    kf = fixed(x, y)
    assert [(c.c, c.beta) for c in kf.kernels] == [(0.7, -0.3), (pytest.approx(2.1), -0.3)]
    assert fixed(y) is kf  # fixed: independent of the points
    for bad in ({"scales": ()}, {"scales": (1.0, 0.0)}, {"beta": 0.0}, {"bandwidth": "mean"}, {"bandwidth": 0.0}):
        with pytest.raises(ValueError):
            get_kernel_fn(**bad)


# ---------------------------------------------------------------------------
# AGD: estimators, surrogate, metrics
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agd_gradient_fn_is_the_two_estimators_at_the_generator_samples(dtype):
    g = torch.Generator().manual_seed(1)
    x = (0.5 + torch.randn(50, 3, generator=g, dtype=dtype)).requires_grad_(True)
    y = torch.randn(60, 3, generator=g, dtype=dtype)
    kernel_fn = get_kernel_fn()
    kernel = kernel_fn(x, y)  # one kernel, bandwidth from the pooled batch
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    g_q, g_p = get_agd_gradient_fn(kernel_fn)(x, y)
    torch.testing.assert_close(g_q, stein_gradient_estimator(x.detach(), kernel), **tol)
    torch.testing.assert_close(g_p, stein_gradient_predict(x.detach(), y, kernel), **tol)
    s_q, s_p = get_agd_gradient_fn(kernel_fn, estimator="ssge", eigen_threshold=0.95)(x, y)
    torch.testing.assert_close(s_q, fit_ssge(x.detach(), kernel, eigen_threshold=0.95)(x.detach()), **tol)
    torch.testing.assert_close(s_p, fit_ssge(y, kernel, eigen_threshold=0.95)(x.detach()), **tol)
    for out in (g_q, g_p, s_q, s_p):
        assert out.shape == (50, 3) and out.dtype == dtype and not out.requires_grad
    assert x.grad is None


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_agd_surrogate_gradient_in_x_is_the_score_difference(estimator):
    # L = (1/n) sum_i <delta_i, x_i> with delta detached, so dL/dx_i = delta_i / n exactly.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 2, generator=g, dtype=DT).requires_grad_(True)
    y = 1.0 + torch.randn(50, 2, generator=g, dtype=DT)
    loss_fn = get_agd_loss_fn(get_kernel_fn(), estimator=estimator)
    loss, metrics = loss_fn(x, y)
    (grad,) = torch.autograd.grad(loss, x)
    g_q, g_p = get_agd_gradient_fn(get_kernel_fn(), estimator=estimator)(x, y)
    torch.testing.assert_close(grad, (g_q - g_p) / 40, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(loss, ((g_q - g_p) * x.detach()).sum() / 40)
    torch.testing.assert_close(metrics["kl_grad_norm"], (g_q - g_p).norm(dim=1).mean())
    torch.testing.assert_close(metrics["score_q_norm"], g_q.norm(dim=1).mean())
    torch.testing.assert_close(metrics["score_p_norm"], g_p.norm(dim=1).mean())
    for v in metrics.values():
        assert v.ndim == 0 and not v.requires_grad and v.dtype == DT


MU_SHIFT = torch.tensor([0.6, -0.36], dtype=DT)  # mu - m
M_TARGET = torch.tensor([0.3, -0.2], dtype=DT)
S_TARGET = 1.2


def gaussian_generator_grads(estimator, mu0, sigma0, *, seeds=40, n=200, m=M_TARGET, s=S_TARGET):
    """Autograd of the AGD surrogate through x = mu + sigma z (mu [2], sigma a scalar, both leaves), against
    the data batch y ~ N(m, s^2 I); one independent (z, y) draw per seed. Returns ([seeds, 2], [seeds])."""
    loss_fn = get_agd_loss_fn(get_kernel_fn(), estimator=estimator)
    g_mu, g_sigma = [], []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(1000 + seed)
        z = torch.randn(n, 2, generator=gen, dtype=DT)
        y = m + s * torch.randn(n, 2, generator=gen, dtype=DT)
        mu = mu0.clone().requires_grad_(True)
        sigma = torch.tensor(sigma0, dtype=DT, requires_grad=True)
        loss, _ = loss_fn(mu + sigma * z, y)
        a, b = torch.autograd.grad(loss, (mu, sigma))
        g_mu.append(a)
        g_sigma.append(b)
    return torch.stack(g_mu), torch.stack(g_sigma)


# Relative bias allowed on the mu-gradient, per estimator: the finite-n bias measured at n = 200, sigma = s,
# 40 seeds, in units of the analytic gradient (+- 1 SE), for the shift MU_SHIFT and twice it, per coordinate.
# "stein": -1% +- 4%, -2% +- 6%; at 2 MU_SHIFT -7% +- 2%, -9% +- 3% (the ridge shrinks the out-of-sample data
# score, more so far from the data). "ssge": +17% +- 7%, +33% +- 9%; at 2 MU_SHIFT +9% +- 4%, +15% +- 5%
# (truncated Nystrom extrapolation, eigen_threshold 0.99; for s = 1 it falls from +17% at n = 200 to +8% at
# n = 800, and flips to -7% with eigen_threshold = 0.9).
MU_BIAS = {"stein": 0.05, "ssge": 0.20}


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_agd_mu_gradient_matches_the_kl_gradient(estimator):
    """The approximate KL gradient wrt the location matches grad_mu KL[N(mu, sigma^2 I) || N(m, s^2 I)]
    = (mu - m) / s^2 (KL = d/2 (sigma^2/s^2 - 1 - log sigma^2/s^2) + ||mu - m||^2 / (2 s^2)).

    In the surrogate's mu-gradient, mean_i (g_q - g_p)(x_i), the in-sample term mean_i g_q(x_i) is
    negligible (below 0.4% of the mean |g_q| for both estimators here, as E_q grad log q = 0), so the test
    checks the out-of-sample data score averaged over the generator batch. Tolerance per coordinate:
    2 SE over 40 seeds + MU_BIAS |analytic| (the estimator's measured finite-n bias, above).
    """
    analytic = MU_SHIFT / S_TARGET**2  # (0.417, -0.25)
    g_mu, _ = gaussian_generator_grads(estimator, M_TARGET + MU_SHIFT, S_TARGET)
    mean, se = mean_and_se(g_mu)
    tol = 2 * se + MU_BIAS[estimator] * analytic.abs()
    assert (tol < 0.5 * analytic.abs()).all(), (tol, analytic)  # resolves a factor of 2 and the sign
    assert ((mean - analytic).abs() < tol).all(), (mean, se, analytic)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("ratio_sigma", [0.7, 1.5])
def test_agd_sigma_gradient_has_the_kl_sign_and_is_shrunk(estimator, ratio_sigma):
    """dKL/dsigma = d (sigma / s^2 - 1 / sigma): its sign is right, its size shrunk by the estimators.

    Measured at n = 200, 40 seeds (ratio of the mean to the analytic value, +- 1 SE): "stein" 0.66 +- 0.02
    at sigma = 0.7 s and 0.65 +- 0.01 at sigma = 1.5 s; "ssge" 0.69 +- 0.03 and 0.90 +- 0.04. The shrinkage
    falls with n (stein, s = 1, sigma = 0.7 s: 0.71 at n = 200, 0.90 at n = 800). At sigma = s, where the
    analytic gradient is 0, the estimate is +0.20 +- 0.02 (stein) and +0.43 +- 0.04 (ssge): against the
    analytic slope 2 d / s^2 = 2.8 per unit of sigma, AGD's fixed point is under-dispersed, sigma* ~ 0.94 s
    (stein) and ~0.87 s (ssge), which test_generator_fits_a_correlated_gaussian sees as a covariance ~15%
    too small.
    Asserted: the mean has the analytic sign at > 3 SE, and the ratio is in (0.5, 1.05): shrunk by less than
    half and never amplified by more than 5% (each bound >= 4 SE from every measured ratio).
    """
    sigma0 = ratio_sigma * S_TARGET
    analytic = 2 * (sigma0 / S_TARGET**2 - 1 / sigma0)
    _, g_sigma = gaussian_generator_grads(estimator, M_TARGET + MU_SHIFT, sigma0)
    mean, se = mean_and_se(g_sigma)
    assert math.copysign(1.0, mean.item()) == math.copysign(1.0, analytic) and mean.abs() > 3 * se
    assert 0.5 < mean.item() / analytic < 1.05, (mean.item() / analytic, se.item() / abs(analytic))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_agd_gradient_points_away_from_the_target(estimator):
    # A wrong sign (g_p - g_q, or ascending) would fail: for a clearly shifted generator every seed's
    # mu-gradient has a positive dot product with mu - m (descent moves mu towards m), cosine > 0.9.
    shift = torch.tensor([2.0, -1.5], dtype=DT)
    g_mu, _ = gaussian_generator_grads(estimator, M_TARGET + shift, S_TARGET, seeds=8)
    cos = (g_mu @ shift) / (g_mu.norm(dim=1) * shift.norm())
    assert (cos > 0.9).all(), cos


def test_agd_and_mmd_are_pure_functions_of_the_batch():
    # Same batch, same output bit for bit, and no draw from the global RNG (the training loop relies on it).
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, generator=g)
    y = torch.randn(64, 3, generator=g) + 0.5
    for loss_fn in (get_agd_loss_fn(get_kernel_fn()), get_agd_loss_fn(get_kernel_fn(), estimator="ssge"),
                    get_mmd_loss_fn(get_kernel_fn())):
        state = torch.get_rng_state()
        a, ma = loss_fn(x, y)
        b, mb = loss_fn(x.clone(), y.clone())
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(a, b) and all(torch.equal(ma[k], mb[k]) for k in ma)
        assert a.dtype == torch.float32 and a.ndim == 0


@pytest.mark.parametrize("loss", ["agd_stein", "agd_ssge", "mmd"])
def test_loss_validation(loss):
    fn = get_mmd_loss_fn(get_kernel_fn()) if loss == "mmd" else get_agd_loss_fn(
        get_kernel_fn(), estimator=loss.split("_")[1])
    x = torch.randn(10, 3)
    for bad_x, bad_y in ((x[0], x), (x, torch.randn(10, 2)), (x[:1], x), (x.reshape(2, 5, 3), x)):
        with pytest.raises(ValueError):
            fn(bad_x, bad_y)


def test_agd_option_validation():
    kf = get_kernel_fn()
    for kw in ({"estimator": "kde"}, {"eta": 0.0}, {"eta_rel": 0.0}, {"estimator": "ssge", "n_eigen": 0},
               {"estimator": "ssge", "eigen_threshold": 1.5}):
        with pytest.raises(ValueError):
            get_agd_loss_fn(kf, **kw)


# ---------------------------------------------------------------------------
# N workers == 1 worker: slices of the batch that carry gradient add up
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["agd_stein", "agd_ssge", "mmd"])
def test_distributed_slices_add_up_to_the_full_batch_gradient(loss):
    """A data-parallel worker computes the loss on the gathered global batch in which only its own rows
    carry gradient; the all-reduce sums the workers' parameter gradients. Since the bandwidth and (AGD)
    the score estimates are computed from detached points, d loss / d theta = sum_i (d loss / d x_i)
    (d x_i / d theta) splits over any partition of the rows: the sum of the slice gradients equals the
    full-batch gradient (float64; only summation order differs)."""
    torch.manual_seed(0)
    net = MLPGenerator(2, 3, hidden=16, n_layers=2).double()
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(90, 2, generator=gen, dtype=DT)
    y = torch.randn(80, 3, generator=gen, dtype=DT) + 0.5
    fn = get_mmd_loss_fn(get_kernel_fn()) if loss == "mmd" else get_agd_loss_fn(
        get_kernel_fn(), estimator=loss.split("_")[1])
    params = list(net.parameters())

    def grads(live: slice | None):
        x = net(z)
        if live is not None:  # only the rows of this slice carry gradient
            mask = torch.zeros(90, 1, dtype=torch.bool)
            mask[live] = True
            x = torch.where(mask, x, x.detach())
        value, _ = fn(x, y)
        return torch.autograd.grad(value, params), value.detach()

    full, v_full = grads(None)
    parts = [grads(slice(0, 35)), grads(slice(35, 90))]  # unequal shards
    for gf, ga, gb in zip(full, parts[0][0], parts[1][0]):
        torch.testing.assert_close(ga + gb, gf, rtol=1e-10, atol=1e-13)
    assert all(torch.equal(v, v_full) for _, v in parts)  # the value does not depend on which rows are live
    assert max(g.abs().max() for g in full) > 1e-4  # non-trivial gradients


# ---------------------------------------------------------------------------
# MMD loss
# ---------------------------------------------------------------------------
def test_mmd_loss_is_the_u_statistic_and_passes_gradcheck():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 2, generator=g, dtype=DT, requires_grad=True)
    y = torch.randn(5, 2, generator=g, dtype=DT) + 0.3
    value, metrics = get_mmd_loss_fn(get_kernel_fn())(x, y)
    torch.testing.assert_close(value, mmd(x, y, imq_mixture(x, y), statistic="u"), rtol=0, atol=0)
    assert metrics["mmd2"].ndim == 0 and not metrics["mmd2"].requires_grad and value.requires_grad
    # Reference: the U-statistic written out with loops (Gretton et al. 2012, eq. 3).
    k = imq_mixture(x, y)
    kv = lambda a, b: k(a[None], b[None])[0, 0]  # noqa: E731
    ref = (sum(kv(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / 42
           + sum(kv(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
           - 2 * sum(kv(x[i], y[j]) for i in range(7) for j in range(5)) / 35)
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-14)
    # The median bandwidth moves with x under finite differences but is a constant for autograd (a
    # stop-gradient, by design), so gradcheck uses the fixed-bandwidth kernel.
    fixed = get_mmd_loss_fn(get_kernel_fn(bandwidth=0.8))
    assert torch.autograd.gradcheck(lambda a: fixed(a, y)[0], (x,))
    assert torch.autograd.gradcheck(lambda a, b: fixed(a, b)[0], (x, y.clone().requires_grad_(True)))


def test_mmd_loss_under_the_null_and_the_alternative():
    """Under P = Q the unbiased MMD^2 has mean 0 exactly (the median bandwidth is a symmetric function of
    the pooled batch, and for any fixed kernel the three U-statistics have the same mean over the
    exchangeable split), and it is a degenerate U-statistic: its sd falls like 1/n, not 1/sqrt(n)
    (Gretton et al. 2012, Thm. 12), so 4x the batch gives ~1/4 the sd. Over 30 seeds: |mean| < 3 SE at each
    n, the sd ratio in (0.15, 0.4) (1/4 expected; 0.5 would be the non-degenerate rate), and a mean shift of
    0.5 gives MMD^2 > 10 null sds at n = 400."""
    loss_fn = get_mmd_loss_fn(get_kernel_fn())
    stats = {}
    for n in (100, 400):
        vals = []
        for seed in range(30):
            gen = torch.Generator().manual_seed(2000 + seed)
            vals.append(loss_fn(torch.randn(n, 2, generator=gen, dtype=DT), torch.randn(n, 2, generator=gen, dtype=DT))[0])
        vals = torch.stack(vals)
        mean, se = mean_and_se(vals)
        assert mean.abs() < 3 * se, (n, mean, se)
        stats[n] = vals.std()
    assert 0.15 < (stats[400] / stats[100]).item() < 0.4, stats
    gen = torch.Generator().manual_seed(3000)
    shifted = loss_fn(torch.randn(400, 2, generator=gen, dtype=DT) + torch.tensor([0.5, 0.0], dtype=DT),
                      torch.randn(400, 2, generator=gen, dtype=DT))[0]
    assert shifted > 10 * stats[400]


# ---------------------------------------------------------------------------
# Training: AGD and MMD fit a correlated 2-D Gaussian
# ---------------------------------------------------------------------------
TARGET_MEAN = torch.tensor([1.0, -0.5])
TARGET_CHOL = torch.tensor([[1.0, 0.0], [0.6, 0.5]])
TARGET_COV = TARGET_CHOL @ TARGET_CHOL.T  # [[1, 0.6], [0.6, 0.61]]: correlation 0.77, variances 1 and 0.61


def train_affine(loss_fn, *, steps=300, batch=200, lr=0.05, seed=0):
    """Fit x = A z + b (A = I, b = 0 at the start) with Adam and a cosine learning-rate decay to 0; a fresh
    data batch per step. Returns the mean and covariance of 100 000 samples of the trained generator."""
    torch.manual_seed(seed)
    gen_net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        gen_net.weight.copy_(torch.eye(2))
        gen_net.bias.zero_()
    opt = torch.optim.Adam(gen_net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        z = torch.randn(batch, 2, generator=rng)
        y = TARGET_MEAN + torch.randn(batch, 2, generator=rng) @ TARGET_CHOL.T
        loss, _ = loss_fn(gen_net(z), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        x = gen_net(torch.randn(100_000, 2, generator=rng))
    return x.mean(0), torch.cov(x.T)


@pytest.mark.parametrize("method", ["agd", "mmd"])
def test_generator_fits_a_correlated_gaussian(method):
    """300 Adam steps (lr 0.05, cosine decay), batch 200, affine generator, IMQ-mixture kernel at the median
    bandwidth. Asserted: every coordinate of the mean within 0.1 (absolute) and the covariance within 20%
    (relative Frobenius error ||C_hat - C|| / ||C||), from 100 000 samples (sampling error of the covariance
    ~0.5%, negligible). Measured over seeds 0-2: AGD (stein) mean errors <= 0.02, covariance errors
    0.15-0.16, a uniform under-dispersion (every entry ~0.85x; the sigma-gradient bias of
    test_agd_sigma_gradient_has_the_kl_sign_and_is_shrunk: 0.25 at batch 100, 0.14 at batch 400; with
    SSGE 0.20-0.22, so SSGE is not asserted here); MMD mean errors <= 0.02, covariance errors 0.013-0.025.
    MMD is also asserted within 5%: a tighter bound that a broken kernel or statistic would miss."""
    kernel_fn = get_kernel_fn()
    loss_fn = get_agd_loss_fn(kernel_fn) if method == "agd" else get_mmd_loss_fn(kernel_fn)
    mean, cov = train_affine(loss_fn)
    assert ((mean - TARGET_MEAN).abs() < 0.1).all(), mean
    rel = ((cov - TARGET_COV).norm() / TARGET_COV.norm()).item()
    assert rel < (0.2 if method == "agd" else 0.05), (rel, cov)
    if method == "agd":
        # The shrinkage is a scale, not a shape error: the correlation is right to 0.02.
        corr = cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt()
        assert abs(corr.item() - 0.6 / math.sqrt(0.61)) < 0.02, corr


# ---------------------------------------------------------------------------
# Generator networks
# ---------------------------------------------------------------------------
def test_mlp_generator_shapes_round_trip_and_rows(tmp_path, round_trip):
    torch.manual_seed(0)
    net = MLPGenerator(3, 5, hidden=16, n_layers=2)
    assert net.model_args == {"latent_dim": 3, "out_dim": 5, "hidden": 16, "n_layers": 2} and net.latent_dim == 3
    z = torch.randn(12, 3, generator=torch.Generator().manual_seed(1))
    x = net(z)
    assert x.shape == (12, 5) and x.dtype == torch.float32
    assert torch.equal(round_trip(net, MLPGenerator)(z), x)
    # Row-wise (no batch statistics): one batch of 12 == two batches of 5 and 7, up to the float32 rounding of
    # BLAS kernels that block a matrix product differently by batch size (bit-equal here; 7e-9 apart on a 16-core
    # Xeon). Mixing rows would move them by O(1).
    torch.testing.assert_close(torch.cat([net(z[:5]), net(z[5:])]), x, rtol=1e-6, atol=1e-7)
    # sample(): z ~ N(0, I) from the generator, on the parameters' dtype.
    a = net.double().sample(6, generator=torch.Generator().manual_seed(2))
    b = net(torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=DT))
    assert a.dtype == DT and torch.equal(a, b)
    with pytest.raises(ValueError):
        net(torch.randn(4, 2, dtype=DT))
    with pytest.raises(ValueError):
        MLPGenerator(0, 2)


@pytest.mark.parametrize("shape, stages", [((1, 8, 8), 1), ((1, 28, 28), 2), ((3, 32, 32), 3), ((2, 30, 20), 2)])
def test_conv_generator_shapes_range_round_trip_and_rows(shape, stages, tmp_path, round_trip):
    torch.manual_seed(0)
    net = ConvGenerator(8, shape, base_channels=8)
    assert net.n_stages == stages and net.latent_dim == 8 and net.image_shape == shape
    assert net.model_args == {"latent_dim": 8, "shape": list(shape), "base_channels": 8}
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    x = net(z)
    c, h, w = shape
    assert x.shape == (5, c * h * w)
    assert (x > 0).all() and (x < 1).all() and x.std() > 1e-3  # sigmoid: images in (0, 1), not constant
    assert torch.equal(round_trip(net, ConvGenerator)(z), x)
    # GroupNorm, not BatchNorm: each sample depends on its own latent only (N workers == 1 worker).
    torch.testing.assert_close(torch.cat([net(z[:2]), net(z[2:])]), x, rtol=1e-6, atol=1e-7)
    assert net.double()(z.double()).dtype == DT


def test_conv_generator_validation_and_mmd_training_step():
    with pytest.raises(ValueError):
        ConvGenerator(8, (8, 8))
    with pytest.raises(ValueError):
        ConvGenerator(8, (1, 0, 8))
    with pytest.raises(ValueError):
        ConvGenerator(8, (1, 8, 8))(torch.randn(3, 7))
    # A few MMD steps against a fixed batch of "images" (bright left half) reduce the loss.
    torch.manual_seed(1)
    net = ConvGenerator(8, (1, 8, 8), base_channels=8)
    data = torch.zeros(64, 1, 8, 8)
    data[..., :4] = 0.9
    data = (data + 0.05 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))).reshape(64, 64)
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    loss_fn = get_mmd_loss_fn(get_kernel_fn(bandwidth=2.0))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    start = loss_fn(net(z), data)[0].item()
    for _ in range(15):
        opt.zero_grad(set_to_none=True)
        loss_fn(net(z), data)[0].backward()
        opt.step()
    assert loss_fn(net(z), data)[0].item() < 0.5 * start


def test_fixed_kernel_sum_of_imq():
    # get_kernel_fn(bandwidth=h) is sum_s IMQ(s h, beta): check one Gram entry by hand.
    k = get_kernel_fn(scales=(1.0, 2.0), bandwidth=0.5)(torch.zeros(1, 2))
    x, y = torch.tensor([[0.0, 0.0]], dtype=DT), torch.tensor([[0.3, 0.4]], dtype=DT)  # r^2 = 0.25
    expected = (0.25 + 0.25) ** -0.5 + (1.0 + 0.25) ** -0.5
    torch.testing.assert_close(k(x, y), torch.tensor([[expected]], dtype=DT))
    assert isinstance(k.kernels[0], IMQ)
