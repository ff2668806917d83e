"""Samplers: Langevin step, annealed Langevin, and the (init_fn, step_fn) MCMC samplers with run_chain."""

import math

import pytest
import torch

from stein_core import GaussianMixture, annealed_langevin, geometric_sigmas, langevin_step, score_from_log_prob
from stein_core.kernels import IMQ
from stein_core.samplers import (
    hmc,
    mala,
    run_chain,
    rwmh,
    svgd,
    svgd_direction,
    svgd_median_kernel,
    tempered,
    ula,
    underdamped_langevin,
)


# Recommended settings (see the annealed_langevin docstring).
SIGMAS = dict(sigma_max=20.0, sigma_min=0.1, n_levels=10)
EPS, T = 2e-3, 100


def test_langevin_step_formula_dtype_and_no_mutation():
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_copy = x.clone()
    a = 0.05
    out = langevin_step(lambda y: -y, x, a, generator=torch.Generator().manual_seed(1))
    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(out, x - a * x + math.sqrt(2 * a) * z, rtol=1e-15, atol=1e-15)
    assert out.dtype == torch.float64 and torch.equal(x, x_copy)


def test_ula_stationary_variance():
    # ULA on N(0, v): x' = (1 - a/v) x + sqrt(2a) z has stationary variance v / (1 - a / (2v)).
    # Chains start at 0; after 400 steps (1 - a/v)^800 ~ 1e-18, negligible.
    v, a, n = 2.0, 0.2, 20000
    gen = torch.Generator().manual_seed(2)
    x = torch.zeros(n, 1, dtype=torch.float64)
    for _ in range(400):
        x = langevin_step(lambda y: -y / v, x, a, generator=gen)
    target = v / (1 - a / (2 * v))  # 2.105 (vs 2.0 without the ULA bias)
    # SE of a Gaussian sample variance: target * sqrt(2 / n) = 0.021; allow 4 SE.
    assert abs(x.var().item() - target) < 4 * target * math.sqrt(2 / n)
    assert abs(x.mean().item()) < 4 * math.sqrt(target / n)


def exact_annealed_moments(m, s, sigmas, eps, n_steps, mean0, var0):
    """Mean/variance of annealed ULA on N(m, s^2) with its exact perturbed score.

    Each step is linear: x' - m = r (x - m) + sqrt(2 a) z with r = 1 - a / (s^2 + sigma^2).
    """
    mu, var = mean0, var0
    sl = float(sigmas[-1])
    for sg in sigmas.tolist():
        a = eps * sg**2 / sl**2
        r = 1 - a / (s**2 + sg**2)
        for _ in range(n_steps):
            mu, var = m + r * (mu - m), r * r * var + 2 * a
    return mu, var


def test_annealed_langevin_1d_gaussian_moments():
    m, s, n = 2.0, 1.0, 20000
    sigmas = geometric_sigmas(**SIGMAS, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x0 = 16 * torch.rand(n, 1, generator=gen, dtype=torch.float64) - 8  # U[-8, 8]: var 64/3
    x = annealed_langevin(
        lambda y, sg: -(y - m) / (s**2 + sg**2), x0, sigmas, eps=EPS, n_steps_each=T, generator=gen
    )
    mean, var = x.mean().item(), x.var().item()
    exp_mean, exp_var = exact_annealed_moments(m, s, sigmas, EPS, T, 0.0, 64 / 3)
    # 1) Exact finite-step moments (1.044 here): SE of mean sqrt(var/n) = 0.0072,
    #    of variance var sqrt(2/n) = 0.0104; allow 4 SE.
    assert abs(mean - exp_mean) < 4 * math.sqrt(exp_var / n)
    assert abs(var - exp_var) < 4 * exp_var * math.sqrt(2 / n)
    # 2) Against the target N(m, s^2): the chain ends at sigma_L = 0.1 (variance
    #    s^2 + 0.01) and lags the shrinking noise levels by a further ~3%, so the
    #    bias is ~4.4%: allow 4 SE + 5%.
    assert abs(mean - m) < 4 * math.sqrt(s**2 / n)
    assert abs(var - s**2) < 4 * s**2 * math.sqrt(2 / n) + 0.05 * s**2


def mixture():
    return GaussianMixture([0.8, 0.2], [[-5.0, -5.0], [5.0, 5.0]], [1.0, 1.0])


def test_annealed_langevin_mixture_weights():
    gmm, n = mixture(), 10000
    sigmas = geometric_sigmas(**SIGMAS)
    gen = torch.Generator().manual_seed(4)
    x0 = 16 * torch.rand(n, 2, generator=gen) - 8
    x = annealed_langevin(gmm.perturbed_score, x0, sigmas, eps=EPS, n_steps_each=T, generator=gen)
    comp = gmm.nearest_component(x)
    frac = comp.eq(0).float().mean().item()
    # Sampling SE is sqrt(0.16 / n) = 0.004; annealed Langevin itself biases the weights
    # (measured ~0.787 +- 0.003 over seeds with these settings). Spec: within 0.03.
    assert abs(frac - 0.8) < 0.03
    for k, mu in enumerate([-5.0, 5.0]):
        xk = x[comp == k].double()
        assert (xk.mean(0) - mu).abs().max() < 0.1
        # Target variance 1 + sigma_L^2 = 1.01 plus a few % lag (see the 1-D test).
        assert (xk.var(0) - 1.0).abs().max() < 0.1


def test_annealed_langevin_reproducible_dtype_callback_denoise():
    gmm = mixture()
    sigmas = geometric_sigmas(10.0, 0.5, 3)
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x0_copy = x0.clone()
    calls = []

    def run(seed, **kw):
        return annealed_langevin(
            gmm.perturbed_score, x0, sigmas, eps=1e-2, n_steps_each=5,
            generator=torch.Generator().manual_seed(seed), **kw,
        )

    a = run(0, callback=lambda i, x: calls.append((i, x.shape)))
    assert a.dtype == torch.float64 and a.shape == (50, 2) and not a.requires_grad
    assert calls == [(0, (50, 2)), (1, (50, 2)), (2, (50, 2))]
    assert torch.equal(a, run(0))
    assert not torch.equal(a, run(1))
    assert torch.equal(x0, x0_copy)
    # denoise=True adds the Tweedie step x + sigma_L^2 s(x, sigma_L) to the same chain.
    den = run(0, denoise=True)
    torch.testing.assert_close(den, a + 0.25 * gmm.perturbed_score(a, 0.5), rtol=1e-14, atol=1e-14)


def test_annealed_langevin_accepts_autograd_score():
    gmm = mixture()
    sigmas = geometric_sigmas(10.0, 0.5, 3)
    x0 = torch.randn(40, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    auto = score_from_log_prob(lambda y, sg: gmm.perturbed(float(sg)).log_prob(y))
    kw = dict(eps=1e-2, n_steps_each=5)
    a = annealed_langevin(auto, x0, sigmas, generator=torch.Generator().manual_seed(0), **kw)
    b = annealed_langevin(gmm.perturbed_score, x0, sigmas, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # A score using autograd without enabling it itself also works (no global no_grad).

    def raw(y, sg):
        y = y.detach().requires_grad_(True)
        return torch.autograd.grad(gmm.perturbed(float(sg)).log_prob(y).sum(), y)[0]

    c = annealed_langevin(raw, x0, sigmas, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(c, b, rtol=1e-10, atol=1e-10)


def test_annealed_langevin_validation():
    x0 = torch.zeros(3, 1)
    with pytest.raises(ValueError):
        annealed_langevin(lambda y, s: -y, x0, [1.0], eps=0.0, n_steps_each=1)
    with pytest.raises(ValueError):
        annealed_langevin(lambda y, s: -y, x0, [1.0], eps=0.1, n_steps_each=0)


# ---------------------------------------------------------------------------
# (init_fn, step_fn) samplers on a correlated 2-D Gaussian.
#
# Statistical design: C = 4000 independent chains start from N(0, I) (away from the
# target mean), run a burn-in and then T kept steps. For a statistic f, each chain's
# time average g_c = mean_t f(x_t) is independent of the other chains', so the pooled
# estimate mean_c g_c has standard error SE = std_c(g_c) / sqrt(C) whatever the
# autocorrelation inside a chain (batch means with one batch per chain; this SE is
# sqrt(var f * tau / (T C)) with tau the integrated autocorrelation time, i.e. it
# shrinks with the effective sample size). We check f = x (mean) and
# f = (x - m)(x - m)^T about the known stationary mean m (its expectation is exactly
# the stationary covariance) within 4.5 SE per entry, and require SE < 2% of the
# scale (sqrt(S_ii S_jj)) so that a loose, noisy check cannot pass by accident.
# ---------------------------------------------------------------------------
MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 1.6], [1.6, 4.0]], dtype=torch.float64)  # diag(1, 2) [[1, .8], [.8, 1]] diag(1, 2)
PREC = torch.linalg.inv(SIGMA)  # eigenvalues 0.213 and 3.257 (covariance eigenvalues 4.69 and 0.307)
N_CHAINS, N_SE, MAX_REL_SE = 4000, 4.5, 0.02


def gauss_log_p(x):
    """Unnormalised log N(x; MU, SIGMA): [*chains, 2] -> [*chains]."""
    d = x - MU.to(x)
    return -0.5 * ((d @ PREC.to(x)) * d).sum(-1)


def gauss_score(x):
    """Closed-form score -PREC (x - MU): [*chains, 2] -> [*chains, 2]."""
    return -(x - MU.to(x)) @ PREC.to(x)


def start(seed, n=N_CHAINS):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=gen, dtype=torch.float64), gen


def pooled_moments(samples, centre):
    """samples [T, C, d] -> (mean [d], SE [d], cov [d, d], SE [d, d]) from per-chain time averages."""
    d = samples - centre
    g_mean = samples.mean(0)  # [C, d]
    g_cov = (d[..., :, None] * d[..., None, :]).mean(0)  # [C, d, d]
    c = samples.shape[1]
    return (g_mean.mean(0), g_mean.std(0) / math.sqrt(c), g_cov.mean(0), g_cov.std(0) / math.sqrt(c))


def assert_moments(samples, mean, cov):
    m, m_se, c, c_se = pooled_moments(samples, mean)
    scale = cov.diagonal().sqrt()
    assert (m_se / scale).max() < MAX_REL_SE and (c_se / torch.outer(scale, scale)).max() < MAX_REL_SE
    assert ((m - mean).abs() / m_se).max() < N_SE, (m, mean, m_se)
    assert ((c - cov).abs() / c_se).max() < N_SE, (c, cov, c_se)
    return m, m_se, c, c_se


def test_ula_matches_its_exact_stationary_covariance():
    # ULA on N(mu, P^-1): x' - mu = (I - hP)(x - mu) + sqrt(2h) z, linear, so the stationary law is
    # N(mu, S_h) with S_h = (I - hP) S_h (I - hP) + 2h I. Everything commutes with P, hence
    # S_h = 2h (I - (I - hP)^2)^-1 = 2h (2hP - h^2 P^2)^-1 = (P (I - hP/2))^-1 (1-D: v / (1 - h / 2v)).
    # h = 0.2: S_h[0, 0] = 1.14 vs 1 for the target. Burn-in: the slowest mode contracts by
    # 1 - h * 0.213 per step, 0.957^200 = 2e-4 of an initial offset of ~3: negligible vs SE ~5e-3.
    h = 0.2
    s_h = torch.linalg.inv(PREC @ (torch.eye(2, dtype=torch.float64) - h * PREC / 2))
    x0, gen = start(10)
    res = run_chain(*ula(gauss_score, h), x0, 300, burn_in=200, generator=gen)
    assert res.samples.shape == (300, N_CHAINS, 2) and res.accept_rate is None
    _, _, c, c_se = assert_moments(res.samples, MU, s_h)
    # The check is sharp enough to see the O(h) bias: the target covariance is rejected (z ~ 30).
    assert ((c - SIGMA).abs() / c_se).max() > 10


def test_ula_sampler_is_langevin_step():
    # One implementation of the ULA update: the sampler's chain is the langevin_step chain.
    x0, _ = start(11, n=5)
    init, step = ula(gauss_score, 0.1)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    state, x = init(x0, generator=g1), x0
    for _ in range(5):
        state, x = step(state, generator=g1), langevin_step(gauss_score, x, 0.1, generator=g2)
    torch.testing.assert_close(state.position, x, rtol=0, atol=0)
    torch.testing.assert_close(state.score, gauss_score(x), rtol=0, atol=0)


def test_mala_matches_target_closed_form_and_autograd_score():
    x0, gen = start(12)
    res = run_chain(*mala(gauss_log_p, 0.3, score_fn=gauss_score), x0, 300, burn_in=200, generator=gen)
    assert_moments(res.samples, MU, SIGMA)
    assert res.accept_rate.shape == (N_CHAINS,)
    assert res.mean_accept_rate == pytest.approx(res.accept_rate.mean().item())
    assert 0.6 < res.mean_accept_rate < 0.95  # measured 0.79
    # The autograd score (score_from_log_prob) gives the same chain.
    auto = run_chain(*mala(gauss_log_p, 0.3), x0[:50], 20, generator=torch.Generator().manual_seed(0))
    ref = run_chain(*mala(gauss_log_p, 0.3, score_fn=gauss_score), x0[:50], 20,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(auto.samples, ref.samples, rtol=1e-12, atol=1e-12)


def test_mala_huge_step_low_acceptance_but_no_bias():
    # With h = 2 the ULA proposal alone is unstable (h > 2 / lambda_max(P) = 0.61), so almost all
    # proposals are rejected, but the MH correction keeps p invariant at any step. The chains start
    # from exact draws of p (a huge-step MALA started far away converges very slowly: a mixing
    # problem, not a bias), so any drift away from p would be a bias. The SE comes from the chains
    # as before and reflects the small effective sample size (SE ~1% of the scale with 10% acceptance).
    # Dropping the q(x|y) / q(y|x) correction makes this test fail with z ~ 30-50.
    gen = torch.Generator().manual_seed(13)
    x0 = MU + torch.randn(N_CHAINS, 2, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T
    res = run_chain(*mala(gauss_log_p, 2.0, score_fn=gauss_score), x0, 400, generator=gen)
    assert res.mean_accept_rate < 0.2  # measured 0.106 (0.79 at h = 0.3)
    assert res.accept_rate.max() < 0.5
    assert_moments(res.samples, MU, SIGMA)


def test_rwmh_matches_target():
    x0, gen = start(14)
    res = run_chain(*rwmh(gauss_log_p, 1.0), x0, 400, burn_in=300, generator=gen)
    assert_moments(res.samples, MU, SIGMA)
    assert 0.35 < res.mean_accept_rate < 0.65  # measured 0.50


def test_hmc_matches_target_with_high_acceptance():
    x0, gen = start(15)
    res = run_chain(*hmc(gauss_log_p, 0.3, 8, score_fn=gauss_score), x0, 150, burn_in=50, generator=gen)
    assert_moments(res.samples, MU, SIGMA)
    assert res.mean_accept_rate > 0.9  # measured 0.977
    # Near the leapfrog stability limit (eps = 1.0 vs 1.11) energy errors lower the acceptance but
    # the MH correction keeps p invariant: started from exact draws, the moments stay on target
    # (as for MALA below). Scaling |p'|^2 by 0.9 in the ratio fails here with z ~ 13.
    x0 = MU + torch.randn(N_CHAINS, 2, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T
    res = run_chain(*hmc(gauss_log_p, 1.0, 3, score_fn=gauss_score), x0, 200, generator=gen)
    assert res.mean_accept_rate < 0.85  # measured 0.74
    assert_moments(res.samples, MU, SIGMA)
    # A leapfrog step beyond the stability limit eps < 2 / sqrt(lambda_max(P)) = 1.11 is rejected.
    bad = run_chain(*hmc(gauss_log_p, 1.3, 8, score_fn=gauss_score), x0[:200], 20,
                    generator=torch.Generator().manual_seed(0))
    assert bad.mean_accept_rate < 0.05


def test_underdamped_langevin_exact_stationary_law():
    # BAOAB on a Gaussian target is a linear map z' = M z + N xi of z = (x - mu, p); its stationary
    # covariance solves the discrete Lyapunov equation S = M S M^T + N N^T, i.e.
    # vec S = (I - M kron M)^-1 vec(N N^T). For BAOAB the position block is exactly SIGMA (no
    # discretisation bias for Gaussians) and the momentum block is I - h^2 P / 4 (0.9375 here, vs 1).
    h, gamma = 0.3, 1.0
    eye, zero = torch.eye(2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
    c = math.exp(-gamma * h)
    b_ = torch.block_diag(eye, eye) + torch.cat([torch.cat([zero, zero], 1), torch.cat([-h / 2 * PREC, zero], 1)])
    a_ = torch.block_diag(eye, eye) + torch.cat([torch.cat([zero, h / 2 * eye], 1), torch.cat([zero, zero], 1)])
    o_ = torch.block_diag(eye, c * eye)
    m = b_ @ a_ @ o_ @ a_ @ b_
    n = b_ @ a_ @ torch.block_diag(zero, math.sqrt(1 - c * c) * eye)
    s = torch.linalg.solve(torch.eye(16, dtype=torch.float64) - torch.kron(m, m), (n @ n.T).reshape(-1)).reshape(4, 4)
    torch.testing.assert_close(s[:2, :2], SIGMA, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s[2:, 2:], eye - h**2 * PREC / 4, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s[:2, 2:], zero, rtol=0, atol=1e-10)

    # Per-chain momentum second moments, accumulated after burn-in through the callback.
    burn, n_keep = 200, 300
    pp = torch.zeros(N_CHAINS, 2, 2, dtype=torch.float64)

    def accumulate(i, state):
        if i > burn:
            pp.add_(state.momentum[:, :, None] * state.momentum[:, None, :])

    x0, gen = start(16)
    res = run_chain(*underdamped_langevin(gauss_score, h, gamma), x0, n_keep, burn_in=burn,
                    generator=gen, callback=accumulate)
    assert_moments(res.samples, MU, SIGMA)
    g = pp / n_keep  # [C, 2, 2]
    est, se = g.mean(0), g.std(0) / math.sqrt(N_CHAINS)
    assert ((est - s[2:, 2:]).abs() / se).max() < N_SE
    assert ((est - eye).abs() / se).max() > 10  # the momentum bias is resolved


def test_tempered_targets():
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(tempered(gauss_log_p, 0.25)(x), 0.25 * gauss_log_p(x), rtol=0, atol=0)
    gmm = mixture()
    torch.testing.assert_close(tempered(gmm.perturbed_score, 0.5)(x, 0.3), 0.5 * gmm.perturbed_score(x, 0.3))
    for beta in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError):
            tempered(gauss_log_p, beta)
    # p^beta for a Gaussian is N(MU, SIGMA / beta): MALA on the tempered pair targets 2 SIGMA.
    x0, gen = start(17)
    sampler = mala(tempered(gauss_log_p, 0.5), 0.4, score_fn=tempered(gauss_score, 0.5))
    res = run_chain(*sampler, x0, 300, burn_in=200, generator=gen)
    assert_moments(res.samples, MU, 2 * SIGMA)


def _all_samplers():
    return {
        "ula": lambda: ula(gauss_score, 0.1),
        "mala": lambda: mala(gauss_log_p, 0.3, score_fn=gauss_score),
        "mala_autograd": lambda: mala(gauss_log_p, 0.3),
        "rwmh": lambda: rwmh(gauss_log_p, 0.8),
        "hmc": lambda: hmc(gauss_log_p, 0.2, 3),
        "underdamped": lambda: underdamped_langevin(gauss_score, 0.2, 1.0),
    }


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(_all_samplers()))
def test_samplers_reproducible_keep_dtype_device_and_batch_shape(name, dtype, device):
    sampler = _all_samplers()[name]()
    # Chains over two leading dims: positions [4, 3, 2], log-densities [4, 3].
    x0 = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    x0_copy = x0.clone()

    def run(seed):
        return run_chain(*sampler, x0, 6, burn_in=2, thin=2, generator=torch.Generator().manual_seed(seed))

    a = run(0)
    assert torch.equal(a.samples, run(0).samples)
    assert not torch.equal(a.samples, run(1).samples)
    assert torch.equal(x0, x0_copy)
    assert a.samples.shape == (3, 4, 3, 2)
    for t in [a.samples, *[f for f in a.state if isinstance(f, torch.Tensor)]]:
        assert t.device.type == device and not t.requires_grad
        assert t.dtype == (torch.long if t is getattr(a.state, "n_accepted", None) else dtype)
    if hasattr(a.state, "n_accepted"):
        assert a.accept_rate.shape == (4, 3) and a.accept_rate.dtype == dtype
        assert a.state.log_prob.shape == (4, 3) and a.state.n_steps == 8


@pytest.mark.parametrize("name", ["mala", "rwmh", "hmc"])
def test_mh_samplers_read_event_dims_from_log_prob(name):
    # Positions [n, 2, 2] with a log-density summing over the last two dims are n chains in R^4:
    # the same chain as [n, 4] positions (the noise is drawn in the same order).
    prec = torch.eye(4, dtype=torch.float64) + 0.3
    flat_lp = lambda x: -0.5 * ((x @ prec) * x).sum(-1)  # noqa: E731
    make = {"mala": lambda lp: mala(lp, 0.3), "rwmh": lambda lp: rwmh(lp, 0.7), "hmc": lambda lp: hmc(lp, 0.3, 4)}[name]
    x0 = torch.randn(10, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    flat = run_chain(*make(flat_lp), x0, 15, generator=torch.Generator().manual_seed(3))
    mat = run_chain(*make(lambda x: flat_lp(x.flatten(-2))), x0.reshape(10, 2, 2), 15,
                    generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mat.samples.flatten(-2), flat.samples, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mat.accept_rate, flat.accept_rate, rtol=0, atol=0)
    assert 0 < flat.mean_accept_rate < 1


def test_run_chain_burn_in_thin_callback_and_resume():
    sampler = mala(gauss_log_p, 0.5, score_fn=gauss_score)
    x0, _ = start(18, n=6)
    calls = []
    res = run_chain(*sampler, x0, 7, burn_in=3, thin=2, generator=torch.Generator().manual_seed(0),
                    callback=lambda i, s: calls.append((i, s.n_steps)), callback_every=4)
    assert calls == [(4, 4), (8, 8), (10, 10)]
    # Reference loop: samples are the states after steps 5, 7, 9.
    gen = torch.Generator().manual_seed(0)
    state, kept, acc_at_burn = sampler.init_fn(x0, generator=gen), [], None
    for i in range(1, 11):
        if i == 4:
            acc_at_burn = state.n_accepted
        state = sampler.step_fn(state, generator=gen)
        if i in (5, 7, 9):
            kept.append(state.position)
    torch.testing.assert_close(res.samples, torch.stack(kept), rtol=0, atol=0)
    torch.testing.assert_close(res.accept_rate, (state.n_accepted - acc_at_burn).double() / 7, rtol=0, atol=0)
    # Continuing from the returned state with the same generator is the same chain.
    gen = torch.Generator().manual_seed(0)
    first = run_chain(*sampler, x0, 4, generator=gen)
    second = run_chain(*sampler, first.state, 6, generator=gen)
    whole = run_chain(*sampler, x0, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.cat([first.samples, second.samples]), whole.samples, rtol=0, atol=0)
    assert second.state.n_steps == 10


def test_sampler_validation():
    with pytest.raises(ValueError):
        ula(gauss_score, 0.0)
    with pytest.raises(ValueError):
        mala(gauss_log_p, -1.0)
    with pytest.raises(ValueError):
        rwmh(gauss_log_p, 0.0)
    with pytest.raises(ValueError):
        hmc(gauss_log_p, 0.1, 0)
    with pytest.raises(ValueError):
        underdamped_langevin(gauss_score, 0.1, 0.0)
    x0 = torch.zeros(5, 2)
    with pytest.raises(ValueError):
        run_chain(*ula(gauss_score, 0.1), x0, 3, thin=0)
    with pytest.raises(ValueError):
        run_chain(*ula(gauss_score, 0.1), x0, -1)
    with pytest.raises(ValueError):  # a log-density that does not return one value per chain
        mala(lambda x: gauss_log_p(x)[..., None], 0.1).init_fn(x0)


# ---------------------------------------------------------------------------
# SVGD (Liu & Wang 2016): a deterministic flow of interacting particles, so the checks are on one
# particle set (its moments, its mode shares) rather than on chain averages.
# ---------------------------------------------------------------------------
SVGD_MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SVGD_SIGMA = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=torch.float64)  # eigenvalues 2.21 and 0.29
SVGD_PREC = torch.linalg.inv(SVGD_SIGMA)


def svgd_gauss_score(x):
    """Score of N(SVGD_MU, SVGD_SIGMA): [..., n, 2] -> [..., n, 2]."""
    return -(x - SVGD_MU.to(x)) @ SVGD_PREC.to(x)


def _svgd_direction_loop(x, s, k):
    """phi(x_i) = (1/n) sum_j [k(x_j, x_i) s(x_j) + grad_{x_j} k(x_j, x_i)], one pair at a time, the kernel's
    gradient by autograd: x, s [n, d], k(a [d], b [d]) -> [] -> [n, d]."""
    n = x.shape[0]
    phi = torch.zeros_like(x)
    for i in range(n):
        for j in range(n):
            xj = x[j].clone().requires_grad_(True)
            kji = k(xj, x[i])
            (grad_j,) = torch.autograd.grad(kji, xj)
            phi[i] += kji.detach() * s[j] + grad_j
    return phi / n


def test_svgd_direction_matches_a_loop_with_autograd_kernel_gradients():
    # Float64, 2 independent sets of n = 7 particles in R^3 with an arbitrary score.
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64)
    s = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64)
    x_copy = x.clone()
    phi = svgd_direction(x, s)
    assert phi.shape == x.shape and phi.dtype == torch.float64 and torch.equal(x, x_copy)
    for b in range(2):
        # Liu & Wang's kernel written out: exp(-r^2 / h), h = med^2 / log n, med^2 the median squared distance
        # over the 21 pairs i < j (odd count: the median is the 11th smallest).
        r2 = sorted(float(((x[b, i] - x[b, j]) ** 2).sum()) for i in range(7) for j in range(i + 1, 7))
        h = r2[10] / math.log(7)
        ref = _svgd_direction_loop(x[b], s[b], lambda a, c, h=h: torch.exp(-((a - c) ** 2).sum() / h))
        torch.testing.assert_close(phi[b], ref, rtol=1e-12, atol=1e-12)
        # The bandwidth conversion to RBF's exp(-r^2 / (2 b^2)): at the median distance k = exp(-log n) = 1/n.
        kern = svgd_median_kernel(x[b])
        assert kern.phi(torch.tensor(r2[10], dtype=torch.float64)).item() == pytest.approx(1 / 7, rel=1e-12)
    # A fixed kernel (IMQ, k = (c^2 + r^2)^beta) is used as given.
    imq = IMQ(c=1.3, beta=-0.5)
    ref = _svgd_direction_loop(x[0], s[0], lambda a, c: (1.3**2 + ((a - c) ** 2).sum()) ** -0.5)
    torch.testing.assert_close(svgd_direction(x[0], s[0], imq), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("adaptive", "step_size", "n_steps"), [(False, 1.5, 300), (True, 0.02, 400)])
def test_svgd_matches_a_correlated_gaussian(adaptive, step_size, n_steps):
    # n = 300 particles from N(0, I), away from the target N((1, -2), [[2, .6], [.6, .5]]). The particles are not
    # i.i.d.: SVGD's fixed point is deterministic, and its moments are much closer than those of 300 i.i.d. draws
    # (SE of a mean sqrt(S_ii / n) = 0.058 sqrt(S_ii); of a covariance entry ~sqrt(2 / n) = 8% of sqrt(S_ii S_jj)).
    # Measured (this seed; seeds 0 and 1 alike): mean errors 0.0001 sqrt(S_ii) with plain steps and 0.006 with
    # adaptive ones (AdaGrad keeps every coordinate jittering by about step_size; 0.009 at worst over the seeds);
    # covariance entries (11, 12, 22) -3.7%, -2.3%, -3.4% of sqrt(S_ii S_jj) (plain) and -3.4%, -2.2%, -2.8%
    # (adaptive), -4.1% at worst: finite-n SVGD with the median bandwidth slightly contracts the law.
    # Bounds: mean within 0.03 sqrt(S_ii); covariance within [-7%, +2%]. They fail when the repulsive term is
    # dropped (the particles collapse: -100%, or the plain steps diverge), halved (-52%), doubled (+92%) or of
    # the wrong sign (-90%), and with the median bandwidth's log n left out (the plain steps diverge).
    x0 = torch.randn(300, 2, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    res = run_chain(*svgd(svgd_gauss_score, step_size, adaptive=adaptive), x0, n_steps, thin=n_steps)
    x = res.state.position
    assert res.samples.shape == (1, 300, 2) and torch.equal(res.samples[0], x) and res.state.n_steps == n_steps
    scale = SVGD_SIGMA.diagonal().sqrt()
    assert ((x.mean(0) - SVGD_MU).abs() / scale).max() < 0.03, x.mean(0)
    rel = (torch.cov(x.T, correction=0) - SVGD_SIGMA) / torch.outer(scale, scale)
    assert (rel > -0.07).all() and (rel < 0.02).all(), rel


def test_svgd_recovers_mixture_weights():
    # 0.8 N((-2, 0), I) + 0.2 N((2, 0), I): modes 4 standard deviations apart, so the density between them is low
    # but not negligible and SVGD moves mass between them. The share of points nearest the heavy mode is
    # P(x_1 < 0) = 0.8 Phi(2) + 0.2 Phi(-2) = 0.786 (the components overlap). n = 300 particles from N(0, 3^2 I),
    # 500 plain steps of 1.5 (float32). Measured share 0.783, 0.777, 0.790 (seeds 0-2; adaptive steps of 0.05:
    # 0.790, 0.787, 0.787), within 0.01 of 0.786, where 300 i.i.d. draws would have an SE of
    # sqrt(0.786 * 0.214 / 300) = 0.024. Bounds: share within 0.03; var(x_2) (each component's, 1) within 10%
    # (measured 0.964); mean(x_1) (-1.2) within 0.1 (measured -1.171). Without the repulsive term the particles
    # fall into the basin they start in (share 0.633, var(x_2) 0.009); with half of it var(x_2) is 0.48.
    gmm = GaussianMixture([0.8, 0.2], [[-2.0, 0.0], [2.0, 0.0]], 1.0)
    x0 = 3.0 * torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    x = run_chain(*svgd(gmm.score, 1.5), x0, 500, thin=500).state.position
    share = gmm.nearest_component(x).eq(0).double().mean().item()
    p_heavy = 0.8 * 0.5 * (1 + math.erf(2 / math.sqrt(2))) + 0.2 * 0.5 * (1 - math.erf(2 / math.sqrt(2)))
    assert abs(share - p_heavy) < 0.03, share
    assert abs(x[:, 1].var().item() - 1.0) < 0.1
    assert abs(x[:, 0].mean().item() + 1.2) < 0.1


def test_svgd_adaptive_step_is_the_reference_adagrad():
    # The authors' python/svgd.py: G = phi^2 at the first step, then G = alpha G + (1 - alpha) phi^2, and
    # x += eps phi / (fudge + sqrt(G)), per coordinate of every particle.
    x0 = torch.randn(2, 5, 2, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    eps, alpha, fudge = 0.1, 0.7, 1e-3
    init, step = svgd(svgd_gauss_score, eps, adaptive=True, alpha=alpha, fudge=fudge)
    state = init(x0)
    assert torch.equal(state.grad_sq, torch.zeros_like(x0)) and state.n_steps == 0
    x, g = x0, None
    for _ in range(3):
        phi = svgd_direction(x, svgd_gauss_score(x))
        g = phi**2 if g is None else alpha * g + (1 - alpha) * phi**2
        x = x + eps * phi / (fudge + g.sqrt())
        state = step(state)
    torch.testing.assert_close(state.position, x, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(state.grad_sq, g, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(state.score, svgd_gauss_score(x), rtol=1e-14, atol=1e-14)
    # Plain steps: x += eps phi, and no accumulator.
    init, step = svgd(svgd_gauss_score, eps)
    state = step(init(x0))
    assert state.grad_sq is None
    torch.testing.assert_close(state.position, x0 + eps * svgd_direction(x0, svgd_gauss_score(x0)), rtol=1e-14,
                               atol=1e-14)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_svgd_batches_independent_sets_keeps_dtype_device_and_ignores_generator(dtype, device):
    # [3, 6, 2]: three sets of 6 particles, each with its own median bandwidth: the same as running each alone.
    x0 = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(23), dtype=dtype).to(device)
    x0_copy = x0.clone()
    sampler = svgd(svgd_gauss_score, 0.5)
    a = run_chain(*sampler, x0, 4, thin=2, generator=torch.Generator().manual_seed(0))
    b = run_chain(*sampler, x0, 4, thin=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.samples, b.samples)  # deterministic: the generator is accepted and unused
    assert torch.equal(x0, x0_copy) and a.samples.shape == (2, 3, 6, 2)
    for t in (a.samples, a.state.position, a.state.score):
        assert t.dtype == dtype and t.device.type == device and not t.requires_grad
    for k in range(3):
        alone = run_chain(*sampler, x0[k], 4, thin=2)
        torch.testing.assert_close(a.samples[:, k], alone.samples, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-5 if dtype == torch.float32 else 1e-12)
    # One particle: k(x, x) = 1 and grad k(x, x) = 0, so phi = s(x): gradient ascent on log p, to the mode.
    lone = run_chain(*sampler, x0[0, :1], 60, thin=60).state.position
    torch.testing.assert_close(lone, SVGD_MU.to(lone)[None], rtol=0, atol=1e-3)


def test_svgd_validation():
    with pytest.raises(ValueError):
        svgd(svgd_gauss_score, 0.0)
    with pytest.raises(ValueError):
        svgd(svgd_gauss_score, 0.1, adaptive=True, alpha=1.0)
    with pytest.raises(ValueError):
        svgd(svgd_gauss_score, 0.1, adaptive=True, fudge=0.0)
    with pytest.raises(ValueError, match=r"\[\.\.\., n, d\]"):
        svgd(svgd_gauss_score, 0.1).init_fn(torch.zeros(2))
    with pytest.raises(ValueError, match="coincide"):  # no bandwidth from identical particles: pass a kernel
        svgd(svgd_gauss_score, 0.1).step_fn(svgd(svgd_gauss_score, 0.1).init_fn(torch.zeros(4, 2)))


@pytest.mark.parametrize("method", ["ula", "mala", "hmc", "kinetic"])
def test_chains_split_over_row_shards_run_as_one_batch_of_chains(method):
    """Data-parallel MCMC is exact: 6 chains run as two shards of 3 (``RowShard``: each shard draws for all 6 and
    keeps its rows) end where the 6 run in one batch end, every draw included (initial momenta, proposals, MH
    uniforms). Without the shard's widening, the second shard would see the first shard's numbers."""
    from stein_core._random import RowShard
    from stein_core.samplers import by_name, run_chain

    target = GaussianMixture([0.3, 0.7], [[-1.0, 0.0], [1.5, 0.5]], [0.6, 0.8])
    chain = by_name(method, target.log_prob, 0.2, friction=0.7, n_leapfrog=3)
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = run_chain(*chain, x0, 15, generator=torch.Generator().manual_seed(7)).state.position
    parts = []
    for start in (0, 3):
        shard = RowShard(torch.Generator().manual_seed(7), 6, start)
        parts.append(run_chain(*chain, x0[start:start + 3], 15, generator=shard).state.position)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12)
    alone = run_chain(*chain, x0[3:], 15, generator=torch.Generator().manual_seed(7)).state.position
    assert not torch.allclose(alone, whole[3:])  # a plain generator gives the second half other noise


def test_by_name_refuses_an_unknown_method():
    from stein_core.samplers import by_name

    with pytest.raises(ValueError, match="unknown MCMC method 'gibbs'"):
        by_name("gibbs", lambda x: -x.pow(2).sum(-1), 0.1)
