"""Energy-based model estimators (``stein_core.ebm``): the CD gradient against the exact maximum-likelihood gradient
of a Gaussian EBM, NCE learning a normaliser, the stable logistic loss at extreme logits, FCE as minus NCE, the
fitted Gaussian noise against ``torch.distributions``, and the grid log-normaliser against a closed form.

Tolerances are derived from the sample sizes next to each assertion ("se" is a standard error: the per-sample
standard deviation of the estimated quantity divided by sqrt(sample size)); 5 se makes a spurious failure of one
comparison a ~6e-7 event, while a wrong formula moves the estimate by O(1).
"""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from stein_core.ebm import (
    GaussianNoise,
    cd_loss,
    fce_value,
    grid_box,
    grid_log_normaliser,
    log_density,
    nce_logits,
    nce_loss,
)

DT = torch.float64
LOG_2PI = math.log(2 * math.pi)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- contrastive divergence


def _gaussian_energy(x, mu, chol):
    """E(x) = ½ (x - μ)ᵀ P (x - μ) with P = L Lᵀ: ½ |Lᵀ (x - μ)|², x [n, 2] -> [n]."""
    r = (x - mu) @ chol  # [n, 2], rows are (Lᵀ r_i)ᵀ
    return 0.5 * (r * r).sum(-1)


def test_cd_gradient_with_exact_negatives_is_the_maximum_likelihood_gradient():
    """NLL(θ) = mean_data E_θ(x) + log Z(θ), log Z = (d/2) log 2π - ½ log det P = log 2π - Σ log L_ii (d = 2).
    Its gradient is mean_data ∇E - E_{p_θ}[∇E]; cd_loss with m = 200,000 exact samples of p_θ replaces the expectation
    by a sample mean, so the two gradients differ by a mean of m i.i.d. terms whose se is sd(∇θ E) / sqrt(m),
    measured per component from per-sample gradients (torch.func). Assert within 5 se per component (μ: 2, L: 3)."""
    mu = torch.tensor([0.3, -0.5], dtype=DT, requires_grad=True)
    chol_raw = torch.tensor([[1.2, 0.0], [-0.4, 0.7]], dtype=DT, requires_grad=True)  # P = L Lᵀ, correlated
    mask = torch.ones(2, 2, dtype=DT).tril()
    chol = lambda: chol_raw * mask  # noqa: E731 (only the lower triangle is a parameter)

    g = _gen(0)
    data = torch.randn(1000, 2, generator=g, dtype=DT) * torch.tensor([1.5, 0.5], dtype=DT) + 1.0  # another Gaussian
    m = 200_000
    with torch.no_grad():  # x = μ + L^{-T} z ~ N(μ, (L Lᵀ)^{-1}) = p_θ, detached
        z = torch.randn(m, 2, generator=g, dtype=DT)
        neg = mu + torch.linalg.solve_triangular(chol().mT, z.mT, upper=True).mT  # [m, 2]

    grad_cd = torch.autograd.grad(cd_loss(_gaussian_energy(data, mu, chol()), _gaussian_energy(neg, mu, chol())),
                                  [mu, chol_raw])
    log_z = LOG_2PI - chol().diagonal().log().sum()
    grad_ml = torch.autograd.grad(_gaussian_energy(data, mu, chol()).mean() + log_z, [mu, chol_raw])

    # per-sample ∇θ E at the negatives: their sd over the m samples sets the se of the Monte Carlo mean
    per_sample = torch.func.vmap(torch.func.grad(lambda p, l, x: _gaussian_energy(x[None], p, l * mask).sum(),
                                                 argnums=(0, 1)), in_dims=(None, None, 0))
    g_mu, g_chol = per_sample(mu.detach(), chol_raw.detach(), neg)  # [m, 2], [m, 2, 2]
    for cd, ml, samples in [(grad_cd[0], grad_ml[0], g_mu), (grad_cd[1], grad_ml[1], g_chol)]:
        se = samples.std(0) / math.sqrt(m)
        assert torch.all((cd - ml).abs() <= 5 * se + 1e-12), (cd, ml, se)
    # the check has power: ∇L log Z = -diag(1 / L_ii) is O(1), hundreds of se (∇μ log Z = 0: μ is a location, so a
    # cd_loss without its negatives term would pass on μ but fail on L)
    dlogz_dl = torch.autograd.grad(LOG_2PI - chol().diagonal().log().sum(), chol_raw)[0]
    assert float(dlogz_dl.abs().max()) > 100 * float((g_chol.std(0) / math.sqrt(m)).max())


def test_cd_loss_l2_term_by_hand():
    """e_pos = (1, 2, 3), e_neg = (0, -2): means 2 and -1 give 3; mean squares 14/3 and 2, so with l2 = 0.1 the
    loss is 3 + 0.1 · 20/3 = 11/3."""
    e_pos, e_neg = torch.tensor([1.0, 2.0, 3.0], dtype=DT), torch.tensor([0.0, -2.0], dtype=DT)
    assert float(cd_loss(e_pos, e_neg)) == pytest.approx(3.0, abs=1e-15)
    assert float(cd_loss(e_pos, e_neg, l2=0.1)) == pytest.approx(11.0 / 3.0, abs=1e-14)
    with pytest.raises(ValueError, match="l2"):
        cd_loss(e_pos, e_neg, l2=-1.0)


# ---------------------------------------------------------------------------------------------- NCE and FCE


def test_nce_learns_the_normaliser():
    """Data N(0, 1) (n = 50,000), noise N(0, 4) (m = 50,000, ν = 1), model log p_m = -x²/2 + c: the minimiser of
    the NCE loss is consistent for c* = -log √(2π). Its asymptotic se is an M-estimator's sandwich (one parameter,
    dG/dc = 1): se = sqrt(Var_x(1 - h(x)) / n + Var_y(h(y)) / m) / (E_x[h(1 - h)] + E_y[h(1 - h)]), h = sigmoid(G),
    measured at the fit: ~0.0028, so the brief's 0.02 is ~7 se; assert 5 se (and that 5 se is below 0.02)."""
    g = _gen(1)
    n = m = 50_000
    x = torch.randn(n, generator=g, dtype=DT)  # data
    y = 2.0 * torch.randn(m, generator=g, dtype=DT)  # noise, variance 4
    log_noise = lambda u: -u * u / 8 - math.log(2.0) - 0.5 * LOG_2PI  # noqa: E731
    c = torch.zeros((), dtype=DT, requires_grad=True)
    log_model = lambda u: -u * u / 2 + c  # noqa: E731
    opt = torch.optim.LBFGS([c], lr=1, max_iter=100, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nce_loss(log_model(x), log_noise(x), log_model(y), log_noise(y), nu=1.0)
        loss.backward()
        return loss

    opt.step(closure)
    c_hat, c_star = c.detach().item(), -0.5 * LOG_2PI
    with torch.no_grad():
        hx, hy = torch.sigmoid(log_model(x) - log_noise(x)), torch.sigmoid(log_model(y) - log_noise(y))
        se = math.sqrt(float((1 - hx).var()) / n + float(hy.var()) / m) / float((hx * (1 - hx)).mean()
                                                                                + (hy * (1 - hy)).mean())
    assert 5 * se < 0.02
    assert abs(c_hat - c_star) < 5 * se
    assert 0.98 <= math.exp(c_hat) * math.sqrt(2 * math.pi) <= 1.02  # the learned density integrates to 1 within 2%


def test_nce_logits_subtract_log_nu_and_check_shapes():
    lm, ln = torch.tensor([1.0, -2.0], dtype=DT), torch.tensor([0.5, 0.25], dtype=DT)
    assert torch.allclose(nce_logits(lm, ln, 4.0), lm - ln - math.log(4.0), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="shape"):
        nce_logits(lm, ln[:, None], 1.0)  # [2] vs [2, 1] would broadcast to [2, 2]
    with pytest.raises(ValueError, match="nu"):
        nce_logits(lm, ln, 0.0)


def test_nce_loss_is_stable_at_extreme_logits_and_equals_the_naive_form():
    # G(x) = ±1e4 at the data and at the noise (ν = 1): the data term is softplus(-1e4) + softplus(1e4) = 1e4 over
    # 2 points, and likewise the noise term; the total is 1e4 exactly. The naive -log sigmoid(-1e4) is inf.
    lm_x = torch.tensor([1e4, -1e4], dtype=DT, requires_grad=True)
    lm_y = torch.tensor([1e4, -1e4], dtype=DT, requires_grad=True)
    zeros = torch.zeros(2, dtype=DT)
    loss = nce_loss(lm_x, zeros, lm_y, zeros)
    assert loss.item() == pytest.approx(1e4, rel=1e-12)
    assert math.isinf(float(-torch.log(torch.sigmoid(lm_x.detach())).mean()))  # what the stable form avoids
    gx, gy = torch.autograd.grad(loss, [lm_x, lm_y])
    # d/dG softplus(-G) = -(1 - sigmoid(G)): 0 and -1, halved by the mean; d/dG softplus(G) = sigmoid(G): 1 and 0
    assert torch.equal(gx, torch.tensor([0.0, -0.5], dtype=DT)) and torch.equal(gy, torch.tensor([0.5, 0.0], dtype=DT))
    # float32 too
    loss32 = nce_loss(lm_x.detach().float(), zeros.float(), lm_y.detach().float(), zeros.float(), nu=3.0)
    assert torch.isfinite(loss32)

    g = _gen(2)
    a, b, c, d = (3 * torch.randn(k, generator=g, dtype=DT) for k in (7, 7, 11, 11))
    nu = 2.5
    gx, gy = a - b - math.log(nu), c - d - math.log(nu)
    naive = -torch.log(torch.sigmoid(gx)).mean() - nu * torch.log(1 - torch.sigmoid(gy)).mean()
    assert float(nce_loss(a, b, c, d, nu=nu)) == pytest.approx(float(naive), rel=1e-12)


def test_fce_value_is_minus_two_log_two_at_equality_and_minus_nce():
    g = _gen(3)
    lp_x, lp_y = torch.randn(9, generator=g, dtype=DT), torch.randn(13, generator=g, dtype=DT)
    # p = q: D = 1/2 everywhere, V = log ½ + log ½
    assert float(fce_value(lp_x, lp_x, lp_y, lp_y)) == pytest.approx(-2 * math.log(2), abs=1e-12)
    a, b, c, d = (torch.randn(k, generator=g, dtype=DT) for k in (9, 9, 13, 13))
    assert torch.equal(fce_value(a, b, c, d), -nce_loss(a, b, c, d, nu=1.0))
    # and it is the paper's V = E log D(x) + E log(1 - D(y)), D = p / (p + q)
    dx, dy = a.exp() / (a.exp() + b.exp()), c.exp() / (c.exp() + d.exp())
    assert float(fce_value(a, b, c, d)) == pytest.approx(float(dx.log().mean() + (1 - dy).log().mean()), rel=1e-12)


# ---------------------------------------------------------------------------------------------- Gaussian noise


def _correlated_3d(n: int, g: torch.Generator, dtype=DT):
    chol = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.5, 0.4]], dtype=dtype)
    return torch.randn(n, 3, generator=g, dtype=dtype) @ chol.mT + torch.tensor([1.0, -2.0, 0.5], dtype=dtype)


def test_gaussian_noise_fit_and_log_prob_match_torch():
    x = _correlated_3d(2000, _gen(4))
    noise = GaussianNoise.fit(x)
    assert torch.allclose(noise.mean, x.mean(0), rtol=0, atol=1e-13)
    assert torch.allclose(noise.covariance, torch.cov(x.mT), rtol=0, atol=1e-13)  # unbiased covariance
    ref = MultivariateNormal(x.mean(0), covariance_matrix=torch.cov(x.mT))
    pts = _correlated_3d(50, _gen(5)) * 2.0  # some points in the tails
    assert torch.allclose(noise.log_prob(pts), ref.log_prob(pts), rtol=0, atol=1e-10)
    assert noise.log_prob(pts[None].expand(4, 50, 3)).shape == (4, 50)  # [..., n, d]
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        noise.log_prob(pts[:, :2])
    # float32 data: parameters come back in float32
    assert GaussianNoise.fit(x.float()).mean.dtype == torch.float32


def test_gaussian_noise_samples_have_the_fitted_moments_and_are_seeded():
    """n = 200,000 draws: se of a mean is sqrt(Σ_jj / n); of a sample covariance, sqrt((Σ_jj Σ_kk + Σ_jk²) / n)
    (Gaussian fourth moments). Assert each entry within 5 se."""
    noise = GaussianNoise.fit(_correlated_3d(500, _gen(6)))
    n = 200_000
    s = noise.sample(n, generator=_gen(7))
    assert s.shape == (n, 3) and s.dtype == DT
    cov = noise.covariance
    var = cov.diagonal()
    assert torch.all((s.mean(0) - noise.mean).abs() <= 5 * (var / n).sqrt())
    se_cov = ((var[:, None] * var[None, :] + cov * cov) / n).sqrt()
    assert torch.all((torch.cov(s.mT) - cov).abs() <= 5 * se_cov)
    assert torch.equal(noise.sample(n, generator=_gen(7)), s)  # same seed, same draws
    assert not torch.equal(noise.sample(n, generator=_gen(8)), s)


def test_gaussian_noise_state_dict_jitter_and_to():
    noise = GaussianNoise.fit(_correlated_3d(100, _gen(9)))
    pts = _correlated_3d(5, _gen(10))
    rebuilt = GaussianNoise(**noise.state_dict())
    assert torch.equal(rebuilt.log_prob(pts), noise.log_prob(pts))
    other = GaussianNoise(torch.zeros(3, dtype=DT), torch.eye(3, dtype=DT)).load_state_dict(noise.state_dict())
    assert torch.equal(other.log_prob(pts), noise.log_prob(pts))
    with pytest.raises(ValueError, match="dimension"):
        GaussianNoise(torch.zeros(2, dtype=DT), torch.eye(2, dtype=DT)).load_state_dict(noise.state_dict())
    with pytest.raises(ValueError, match="lower triangular"):
        GaussianNoise(torch.zeros(2), torch.ones(2, 2))
    assert noise.to(dtype=torch.float32) is noise and noise.scale_tril.dtype == torch.float32

    # collinear data (rank 1 in 3-D): the covariance is singular; jitter · trace / d on the diagonal makes it PD
    t = torch.randn(50, 1, generator=_gen(11), dtype=DT)
    x = t * torch.tensor([1.0, 2.0, -1.0], dtype=DT)
    cov = torch.cov(x.mT)
    fitted = GaussianNoise.fit(x, jitter=1e-6)
    ridge = 1e-6 * float(cov.trace()) / 3
    assert torch.allclose(fitted.covariance, cov + ridge * torch.eye(3, dtype=DT), rtol=0, atol=1e-12)
    assert torch.isfinite(fitted.log_prob(x)).all()
    with pytest.raises(ValueError, match="positive definite"):
        GaussianNoise.fit(x, jitter=0.0)


# ---------------------------------------------------------------------------------------------- grid normaliser


def test_grid_log_normaliser_of_a_gaussian():
    """E(x) = ½ xᵀ P x: log Z = log 2π - ½ log det P. On ±8 sd the truncated mass is ~1e-15 and the midpoint
    rule at h = sd / 25 is spectrally accurate for a Gaussian, so 1e-3 is loose for right code; forgetting the
    cell area or the sign of E misses by O(1)."""
    prec = torch.tensor([[2.0, 0.9], [0.9, 0.7]], dtype=DT)
    sd = torch.linalg.inv(prec).diagonal().sqrt()  # marginal sds, from the covariance P^{-1}
    energy = lambda x: 0.5 * ((x @ prec) * x).sum(-1)  # noqa: E731
    log_z = LOG_2PI - 0.5 * float(torch.logdet(prec))
    lo, hi = (-8 * sd).tolist(), (8 * sd).tolist()
    assert grid_log_normaliser(energy, lo, hi, n=400) == pytest.approx(log_z, abs=1e-3)
    # an off-centre box that truncates half the mass along axis 0 gives log Z - log 2
    assert grid_log_normaliser(energy, [0.0, lo[1]], hi, n=400) == pytest.approx(log_z - math.log(2), abs=1e-3)
    # log_density with the exact log Z is the Gaussian's log-density; an energy network's [k, 1] is accepted
    x = torch.randn(20, 2, generator=_gen(12), dtype=DT)
    ref = MultivariateNormal(torch.zeros(2, dtype=DT), precision_matrix=prec).log_prob(x)
    assert torch.allclose(log_density(lambda u: energy(u)[:, None], x, log_z), ref, rtol=0, atol=1e-12)
    assert log_density(lambda u: energy(u.double()).float(), x.float(), log_z).dtype == DT


def test_grid_log_normaliser_rejects_non_finite_energy_and_bad_boxes():
    def energy(x):  # infinite on part of the plane: exp(-E) would silently drop it
        e = 0.5 * (x * x).sum(-1)
        return torch.where(x[:, 0] > 3.0, torch.full_like(e, float("nan")), e)

    with pytest.raises(ValueError, match="non-finite"):
        grid_log_normaliser(energy, [-5.0, -5.0], [5.0, 5.0], n=50)
    assert math.isfinite(grid_log_normaliser(energy, [-5.0, -5.0], [2.9, 5.0], n=50))
    with pytest.raises(ValueError, match="hi > lo"):
        grid_log_normaliser(energy, [1.0, -1.0], [-1.0, 1.0])
    with pytest.raises(ValueError, match=r"\[k\]"):
        grid_log_normaliser(lambda x: x, [-1.0, -1.0], [1.0, 1.0], n=4)


def test_grid_box_pads_the_bounding_box():
    pts = torch.tensor([[0.0, -1.0], [2.0, 3.0], [1.0, 0.0]], dtype=DT)
    lo, hi = grid_box(pts, pad=0.25)  # widths 2 and 4: pads 0.5 and 1
    assert lo == pytest.approx((-0.5, -2.0)) and hi == pytest.approx((2.5, 4.0))
    assert grid_box(pts, pad=0.0) == ((0.0, -1.0), (2.0, 3.0))
    with pytest.raises(ValueError, match="zero width"):
        grid_box(torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
