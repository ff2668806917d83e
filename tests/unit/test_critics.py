"""Generator-critic mathematics (``stein_core.critics``): KALE against closed forms on Gaussians, the GEBM base
gradient against dKL/dθ, the latent posterior sampled by Langevin against its analytic law, and the MMD-GAN
pieces (unbiased MMD², the witness gradient penalty, the kernel mixture) against references.

Tolerances are derived from the sample sizes next to each assertion ("sd" is the per-sample standard deviation of
the estimated quantity, divided by sqrt(n) for a mean).
"""

import math

import pytest
import torch
from torch import nn

from stein_core.critics import (
    ConvCritic,
    MLPCritic,
    gradient_penalty,
    interpolates,
    kale_base_loss,
    kale_divergence,
    kale_energy_loss,
    latent_log_prob,
    mmd2_u,
    optimal_log_partition,
    rq_mixture_kernel,
)
from stein_core.samplers import mala, ula

DT = torch.float64


def _gaussians(n: int, seed: int = 0, shift: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT) + shift


# ---------------------------------------------------------------------------------------------- KALE


def test_kale_of_a_quadratic_energy_family_is_the_kl_at_its_optimum():
    """P = N(0, 1), G = N(1, 1): -log dP/dG = x - 1/2 lies in {a x + b x² + A}, so KALE = KL(P‖G) = 1/2 and the
    optimum is (a, b, A) = (1, 0, -1/2). Fitted by L-BFGS on n = 100,000 draws of each: the estimate of F at the
    optimum has sd sqrt(Var_P(x) + Var_G(dP/dG)) / sqrt(n) = sqrt(1 + (e - 1)) / 316 = 0.005; 5 sd = 0.026."""
    p, g = _gaussians(100_000)
    theta = torch.zeros(3, dtype=DT, requires_grad=True)  # a, b, A
    energy = lambda x: theta[0] * x + theta[1] * x * x  # noqa: E731
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = kale_energy_loss(energy(p), energy(g), theta[2])
        loss.backward()
        return loss

    opt.step(closure)
    kale = -float(kale_energy_loss(energy(p), energy(g), theta[2]).detach())
    assert kale == pytest.approx(0.5, abs=0.026)
    a, b, big_a = theta.detach().tolist()
    assert a == pytest.approx(1.0, abs=0.05) and b == pytest.approx(0.0, abs=0.03) and big_a == pytest.approx(-0.5, abs=0.05)


def test_kale_of_a_suboptimal_energy_is_below_the_kl_and_the_optimal_a_is_log_mean_exp():
    """E(x) = c x with A at its optimum log E_G[exp(-c x)] = -c + c²/2 gives F = c - c²/2: 0.375 at c = 1/2, below
    KL = 1/2 (by sd 0.005 as above, and the gap is 0.125). The optimal A is what optimal_log_partition returns
    (sd of a log-mean-exp of exp(-x/2), x ~ N(1, 1): sqrt(e^{1/4} - 1) / sqrt(n) = 0.0017)."""
    p, g = _gaussians(100_000)
    c = 0.5
    a = optimal_log_partition(c * g)
    assert float(a) == pytest.approx(-c + c * c / 2, abs=0.01)
    kale = -float(kale_energy_loss(c * p, c * g, a))
    assert kale == pytest.approx(c - c * c / 2, abs=0.02) and kale < 0.5 - 0.1
    # every A is worse than the optimal one: F is concave in A with its maximum there
    for other in (a - 0.3, a + 0.3):
        assert -float(kale_energy_loss(c * p, c * g, other)) < kale


def test_kale_is_zero_for_the_zero_energy_and_nonnegative_at_its_optimum():
    """F(0, A) = -A - e^{-A} + 1 <= 0 with equality only at A = 0: KALE (a sup containing E = 0) is >= 0."""
    x = torch.randn(100, dtype=DT)
    zero = torch.zeros(100, dtype=DT)
    assert float(kale_energy_loss(zero, zero, torch.tensor(0.0, dtype=DT))) == pytest.approx(0.0, abs=1e-15)
    for a in (-1.0, 0.5, 2.0):
        assert float(kale_energy_loss(zero, x * 0, torch.tensor(a, dtype=DT))) > 0


def test_the_kale_metric_of_two_gaussians_is_the_kl_and_zero_for_equal_laws():
    """kale_divergence at n = 5,000: the held-out halves have 2,500 points, so F has sd about
    sqrt(1 + (e - 1)) / 50 = 0.033 at the optimal energy; a fitted energy adds a small bias. 3 sd = 0.1. For two
    samples of one law the held-out bound is 0 up to the same noise (and a fit of noise, which the held-out half
    pays: it can only lower the bound)."""
    p, g = _gaussians(5000, seed=1)
    gen = torch.Generator().manual_seed(0)
    kale = float(kale_divergence(p[:, None], g[:, None], generator=gen))
    assert kale == pytest.approx(0.5, abs=0.1)
    same = float(kale_divergence(p[:, None], _gaussians(5000, seed=2, shift=0.0)[1][:, None],
                                 generator=torch.Generator().manual_seed(0)))
    assert -0.1 < same < 0.05
    # a pure function of the inputs and the generator
    again = float(kale_divergence(p[:, None], g[:, None], generator=torch.Generator().manual_seed(0)))
    assert again == kale


def test_the_base_step_gradient_at_the_optimal_energy_is_the_gradient_of_the_kl():
    """P = N(0, 1), G_θ = N(θ, 1), θ = 0.8: KL(P‖G_θ) = θ²/2, dKL/dθ = θ. The optimal energy is E(x) = θ x with
    A = -θ²/2; the base loss's gradient at x = θ + z is E_z[θ exp(-E(x) - A)] = θ E_G[dP/dG], sd
    θ sqrt(e^{θ²} - 1) / sqrt(n) = 0.8 * 0.98 / 447 = 0.0018 at n = 200,000; 5 sd = 0.009."""
    th0 = 0.8
    g = torch.Generator().manual_seed(3)
    z = torch.randn(200_000, generator=g, dtype=DT)
    data = torch.randn(1000, generator=g, dtype=DT)
    theta = torch.tensor(th0, dtype=DT, requires_grad=True)
    energy = lambda x: th0 * x  # noqa: E731  (fixed at the optimum for the current θ)
    loss = kale_base_loss(energy(theta + z), torch.tensor(-th0 * th0 / 2, dtype=DT), energy(data).mean())
    (grad,) = torch.autograd.grad(loss, theta)
    assert float(grad) == pytest.approx(th0, abs=0.009)
    # and its value is the KALE estimate at that energy: F = KL = θ²/2 (sd of the data term 0.8/sqrt(1000) = 0.025)
    assert float(loss) == pytest.approx(th0 * th0 / 2, abs=0.1)


# ---------------------------------------------------------------------------------------------- latent Langevin


def _linear_gebm(beta: float):
    """x = W z + b (k = 2 -> d = 3) and E(x) = |x - c|²/2: the latent posterior is N(Λ⁻¹ β Wᵀ(c - b), Λ⁻¹) with
    Λ = I + β WᵀW."""
    w = torch.tensor([[1.0, 0.5], [-0.3, 1.2], [0.7, -0.4]], dtype=DT)
    b = torch.tensor([0.2, -0.1, 0.5], dtype=DT)
    c = torch.tensor([1.0, 2.0, -1.0], dtype=DT)
    lam = torch.eye(2, dtype=DT) + beta * w.T @ w
    cov = torch.linalg.inv(lam)
    mean = cov @ (beta * w.T @ (c - b))
    log_prob = latent_log_prob(lambda z: z @ w.T + b, lambda x: 0.5 * ((x - c) ** 2).sum(-1), beta)
    return log_prob, mean, cov, lam


def _run(chain, n_chains: int, n_steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    state = chain.init_fn(torch.randn(n_chains, 2, generator=g, dtype=DT), generator=g)
    for _ in range(n_steps):
        state = chain.step_fn(state, generator=g)
    return state.position


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_mala_in_the_latent_space_samples_the_analytic_posterior(beta):
    """4,000 independent chains of 400 MALA steps (step 0.1, acceptance ~0.9) from N(0, I); the slowest mode
    relaxes within ~1/λ_min(Λ) < 1 time unit, 40 units run. The mean of 4,000 draws has sd sqrt(Σ_ii)/63 <= 0.016;
    a covariance entry's sd is at most sqrt(2) max Σ_ii / 63 <= 0.022: tolerances 0.05 (3 sd)."""
    log_prob, mean, cov, _ = _linear_gebm(beta)
    z = _run(mala(log_prob, 0.1), 4000, 400, seed=1)
    torch.testing.assert_close(z.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), cov, atol=0.05, rtol=0)


def test_ula_in_the_latent_space_has_the_step_size_bias_of_its_theory():
    """ULA on a Gaussian with precision Λ is stationary at N(μ, (Λ(I - aΛ/2))⁻¹) (stein_core.samplers.ula): with
    β = 3 (Λ's eigenvalues 5.6 and 6.7, stable for a < 2/6.7) and a = 0.15 that covariance is off the exact Λ⁻¹ by
    0.148, and the chains match the biased law: entries of variance <= 0.31 from 4,000 chains have sd
    sqrt(2) 0.31 / 63 = 0.007, tolerance 0.03 (4 sd), while the MALA chains of the test above match the exact one."""
    beta, a = 3.0, 0.15
    log_prob, mean, cov, lam = _linear_gebm(beta)
    from stein_core.distributions import score_from_log_prob

    z = _run(ula(score_from_log_prob(log_prob), a), 4000, 400, seed=2)
    biased = torch.linalg.inv(lam @ (torch.eye(2, dtype=DT) - a * lam / 2))
    bias = float((biased - cov).abs().max())
    assert bias > 0.14  # the step-size bias, 20 sd of the sampling noise
    torch.testing.assert_close(torch.cov(z.T), biased, atol=0.03, rtol=0)
    torch.testing.assert_close(z.mean(0), mean, atol=0.03, rtol=0)  # the mean is unbiased for a Gaussian (sd 0.009)  # the mean is unbiased for a Gaussian


def test_the_gebm_model_samples_the_linear_posterior_through_its_generator():
    """The family's GEBMModel (tasks.families.gebm) with a linear base and quadratic energy: x = W z + b for z from
    the chain, so x ~ N(W μ + b, W Σ Wᵀ); MALA, 3,000 chains (tolerances 0.06 for the mean, 0.1 for the
    covariance: 3 sd of entries of variance up to 1.4)."""
    from tasks.config.sections import LatentLangevinSample
    from tasks.families.gebm import GEBMModel

    beta = 2.0
    _, mean, cov, _ = _linear_gebm(beta)
    w = torch.tensor([[1.0, 0.5], [-0.3, 1.2], [0.7, -0.4]], dtype=DT)
    b = torch.tensor([0.2, -0.1, 0.5], dtype=DT)
    c = torch.tensor([1.0, 2.0, -1.0], dtype=DT)

    class Linear(nn.Module):
        latent_dim = 2

        def forward(self, z):
            return z.to(DT) @ w.T + b

    class Quadratic(nn.Module):
        def forward(self, x):
            return 0.5 * ((x - c) ** 2).sum(-1, keepdim=True)

    s = LatentLangevinSample(sampler="latent_langevin", method="mala", beta=beta, step_size=0.1, n_steps=400)
    model = GEBMModel(Linear(), Quadratic(), (3,), s)
    x = model.sample(3000, generator=torch.Generator().manual_seed(4)).to(DT)
    assert 0.7 < model.diagnostics()["accept_rate"] < 0.99  # MALA at step 0.1 on this Gaussian: ~0.9
    torch.testing.assert_close(x.mean(0), w @ mean + b, atol=0.06, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), w @ cov @ w.T, atol=0.1, rtol=0)


# ---------------------------------------------------------------------------------------------- MMD-GAN


def test_the_critic_mmd_with_identity_features_and_a_gaussian_kernel_is_the_closed_form():
    """N(0, s²I) vs N(μ, s²I) in d = 2, Gaussian kernel exp(-|x-y|²/(2ℓ²)): MMD² = 2 r^{d/2} (1 - exp(-|μ|²/(2(ℓ²+2s²))))
    with r = ℓ²/(ℓ²+2s²) (Gaussian integrals). The unbiased estimator averaged over 40 independent batches of 250
    is within 4 SE of it."""
    s, ell, mu = 1.0, 1.5, torch.tensor([1.0, -0.5], dtype=DT)
    gauss = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / (2 * ell**2))  # noqa: E731
    r = ell**2 / (ell**2 + 2 * s**2)
    exact = 2 * r * (1 - math.exp(-float(mu @ mu) / (2 * (ell**2 + 2 * s**2))))
    g = torch.Generator().manual_seed(5)
    vals = torch.stack([mmd2_u(torch.randn(250, 2, generator=g, dtype=DT),
                               torch.randn(250, 2, generator=g, dtype=DT) + mu, gauss) for _ in range(40)])
    se = float(vals.std() / math.sqrt(len(vals)))
    assert abs(float(vals.mean()) - exact) < 4 * se and se < 0.2 * exact


def test_the_gradient_penalty_is_zero_for_a_unit_gradient_witness_and_grows_with_the_norm():
    x = torch.randn(50, 3, dtype=DT)
    u = torch.tensor([0.6, 0.0, 0.8], dtype=DT)  # |u| = 1
    assert float(gradient_penalty(lambda v: v @ u, x)) == pytest.approx(0.0, abs=1e-12)
    assert float(gradient_penalty(lambda v: v @ (2 * u), x)) == pytest.approx(1.0, abs=1e-9)  # (2 - 1)²
    assert float(gradient_penalty(lambda v: v @ (2 * u), x, target=None)) == pytest.approx(4.0, abs=1e-9)  # |∇|²
    # per row: f(x) = |x|²/2 has ∇f = x, so the penalty is mean (|x_i| - 1)²
    want = ((x.norm(dim=1) - 1) ** 2).mean()
    assert float(gradient_penalty(lambda v: 0.5 * (v * v).sum(1), x)) == pytest.approx(float(want), rel=1e-9)


def test_the_gradient_penalty_is_differentiable_in_the_critic_parameters():
    """Double backward: d/dw of (|w| - 1)² for f(x) = x @ w is 2(|w| - 1) w/|w|, checked against autograd's."""
    w = torch.tensor([1.5, -2.0], dtype=DT, requires_grad=True)
    x = torch.randn(10, 2, dtype=DT)
    (grad,) = torch.autograd.grad(gradient_penalty(lambda v: v @ w, x), w)
    norm = w.detach().norm()
    torch.testing.assert_close(grad, 2 * (norm - 1) * w.detach() / norm)


def test_rq_mixture_kernel_matches_a_loop_reference():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(5, 3, generator=g, dtype=DT)
    alphas = (0.2, 1.0, 5.0)
    want = torch.empty(4, 5, dtype=DT)
    for i in range(4):
        for j in range(5):
            r2 = float(((a[i] - b[j]) ** 2).sum())
            want[i, j] = sum((1 + r2 / (2 * al)) ** (-al) for al in alphas) + float(a[i] @ b[j])
    torch.testing.assert_close(rq_mixture_kernel(alphas)(a, b), want)
    torch.testing.assert_close(rq_mixture_kernel(alphas, linear=False)(a, b), want - a @ b.T)
    with pytest.raises(ValueError, match="positive"):
        rq_mixture_kernel((0.0,))


def test_interpolates_mix_each_row_by_its_weight():
    x, y = torch.ones(3, 2, dtype=DT), torch.zeros(3, 2, dtype=DT)
    out = interpolates(x, y, torch.tensor([0.0, 0.25, 1.0]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [0.25, 0.25], [1.0, 1.0]], dtype=DT))


@pytest.mark.parametrize("net", [MLPCritic(4, 3, hidden=8, n_layers=2), ConvCritic((1, 8, 8), 2, base_channels=4)])
def test_critics_act_row_by_row(net):
    """A data-parallel split of a batch gives the rows the whole batch gives (no batch statistics)."""
    x = torch.rand(6, 4 if isinstance(net, MLPCritic) else 64)
    whole = net(x)
    torch.testing.assert_close(torch.cat([net(x[:3]), net(x[3:])]), whole)
    assert whole.shape == (6, net.model_args["out_dim"])
    assert type(net)(**net.model_args).model_args == net.model_args  # rebuilt from its checkpoint's arguments
