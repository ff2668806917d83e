"""Learning unnormalised models by minimising Stein discrepancies: the ICA model and data (``stein_core.ica``), the
learned Stein discrepancy (``stein_core.lsd``), and the KSD / SKSD losses the ``ksd`` and ``maxsksd`` families
descend, at and away from the true model."""

from __future__ import annotations

import math

import pytest
import torch

from stein_core.discrepancies import ksd, median_rbf, sksd
from stein_core.ica import ICAModel, random_mixing, sample_ica, source_log_prob, true_log_likelihood
from stein_core.lsd import divergence, lsd_objective


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------- ICA


@pytest.mark.parametrize("source", ["student_t", "laplace"])
def test_ica_score_is_autograd_of_the_log_density(source):
    d = 5
    model = ICAModel(d, source=source).double()
    with torch.no_grad():
        model.unmixing.copy_(random_mixing(d, generator=_gen(0)))
    x = torch.randn(64, d, generator=_gen(1), dtype=torch.float64).requires_grad_(True)
    (auto,) = torch.autograd.grad(model.log_prob(x).sum(), x)
    torch.testing.assert_close(model.score(x), auto, rtol=1e-12, atol=1e-12)


def test_ica_log_density_is_normalised_in_one_and_two_dimensions():
    # ∫ p = 1 by quadrature on a grid wide enough for the Student-t(5) tails (mass beyond |z| = 60: < 1e-6):
    # a missing log|det V| or a wrong constant of the source density moves the integral by a factor.
    for d, v in ((1, [[0.7]]), (2, [[1.2, 0.3], [-0.4, 0.9]])):
        model = ICAModel(d).double()
        with torch.no_grad():
            model.unmixing.copy_(torch.tensor(v, dtype=torch.float64))
        t = torch.linspace(-80, 80, 4001 if d == 1 else 1601, dtype=torch.float64)
        h = float(t[1] - t[0])
        grid = t[:, None] if d == 1 else torch.cartesian_prod(t, t)
        with torch.no_grad():
            mass = float(model.log_prob(grid).exp().sum()) * h ** d
        assert mass == pytest.approx(1.0, abs=2e-3)


def test_true_mixing_beats_a_random_one_and_equals_the_model_at_its_inverse():
    d = 10
    w = random_mixing(d, generator=_gen(0))
    assert float(torch.linalg.cond(w)) <= 4.0 + 1e-9  # the documented bound on the condition number
    x = sample_ica(5000, w, generator=_gen(1))
    truth = true_log_likelihood(x, w)
    wrong = true_log_likelihood(x, random_mixing(d, generator=_gen(2)))
    # per-point log-likelihoods average over 5,000 points; a random W loses several nats per point here
    assert float(truth.mean()) > float(wrong.mean()) + 1.0
    model = ICAModel(d).double()
    with torch.no_grad():
        model.unmixing.copy_(torch.linalg.inv(w))  # the test's reference; the library never inverts
        torch.testing.assert_close(model.log_prob(x), truth, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("source", "variance"), [("student_t", 5 / 3), ("laplace", 2.0)])
def test_ica_sources_have_their_law(source, variance):
    # the recovered sources W⁻¹x: variance ν/(ν−2) = 5/3 for Student-t(5), 2 for the standard Laplace. With
    # n·d = 200,000 draws the sample variance's sd is sqrt((μ4 − σ⁴)/N): for Laplace μ4 = 24, so 0.010; for t5
    # the fourth moment is infinite and the sd is larger but the mean of 200,000 squares is within a few percent
    w = random_mixing(10, generator=_gen(3))
    z = torch.linalg.solve(w, sample_ica(20000, w, source=source, generator=_gen(4)).T).T
    assert float(z.var()) == pytest.approx(variance, rel=0.05)
    assert abs(float(z.mean())) < 0.02  # sd of the mean: sqrt(2 / 200,000) = 0.003
    # and the density matches: the mean log-density of the draws is the source's entropy, within sampling error
    lp = source_log_prob(z, source)
    # h(t_ν) = (ν+1)/2 [ψ((ν+1)/2) − ψ(ν/2)] + log(√ν B(ν/2, 1/2)) = 1.627 nats at ν = 5; h(Laplace) = 1 + log 2
    nu = torch.tensor(5.0, dtype=torch.float64)
    h_t = (nu + 1) / 2 * (torch.digamma((nu + 1) / 2) - torch.digamma(nu / 2)) + 0.5 * torch.log(nu) \
        + torch.lgamma(nu / 2) + torch.lgamma(torch.tensor(0.5, dtype=torch.float64)) - torch.lgamma((nu + 1) / 2)
    entropy = {"student_t": float(h_t), "laplace": 1.0 + math.log(2.0)}[source]
    assert float(-lp.mean()) == pytest.approx(entropy, abs=0.02)


# ------------------------------------------------------------------------------------------------------- LSD


def test_exact_divergence_is_the_jacobian_trace_and_hutchinson_is_unbiased():
    from stein_core.critics import MLPCritic

    torch.manual_seed(0)
    critic = MLPCritic(4, out_dim=4, hidden=16, n_layers=2).double()
    x = torch.randn(8, 4, generator=_gen(5), dtype=torch.float64)
    _, div = divergence(critic, x)
    jac = torch.autograd.functional.jacobian(lambda z: critic(z).sum(0), x)  # [4, 8, 4]
    torch.testing.assert_close(div, torch.diagonal(jac, dim1=0, dim2=2).sum(-1), rtol=1e-10, atol=1e-12)
    # Hutchinson's estimate averaged over 20,000 Gaussian probes per row: the estimator's sd per probe is at
    # most sqrt(2)·‖J‖_F; 6 standard errors of the mean bound the error
    probes = torch.randn(20000, 8, 4, generator=_gen(6), dtype=torch.float64)
    est = torch.stack([divergence(critic, x, noise=p, create_graph=False)[1] for p in probes[:2000]])
    jf = torch.linalg.matrix_norm(torch.stack([jac[:, i, :] for i in range(8)]))
    assert torch.all((est.mean(0) - div).abs() <= 6 * math.sqrt(2) * jf / math.sqrt(2000))


def test_lsd_critic_optimum_is_the_score_difference_over_two_lambda():
    """For data q = N(μ_q, Σ_q) and a model p = N(μ_p, Σ_p) the score difference is affine, so a linear critic
    f(x) = A x + b reaches the supremum: f* = (s_p − s_q)/(2λ) and LSD = E_q‖s_p − s_q‖²/(4λ) (Stein's identity
    under q: E_q[s_pᵀf + tr ∇f] = E_q[(s_p − s_q)ᵀ f])."""
    lam, n = 0.5, 40000
    mu_q, mu_p = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 0.0])
    cov_q = torch.tensor([[1.0, 0.4], [0.4, 0.8]])
    cov_p = torch.tensor([[1.5, 0.0], [0.0, 0.5]])
    prec_q, prec_p = torch.linalg.inv(cov_q).double(), torch.linalg.inv(cov_p).double()
    mu_q, mu_p, cov_q = mu_q.double(), mu_p.double(), cov_q.double()
    x = mu_q + torch.randn(n, 2, generator=_gen(7), dtype=torch.float64) @ torch.linalg.cholesky(cov_q).T
    s_p = lambda z: -(z - mu_p) @ prec_p  # noqa: E731 (symmetric precision)
    s_q = lambda z: -(z - mu_q) @ prec_q  # noqa: E731
    critic = torch.nn.Linear(2, 2).double()
    opt = torch.optim.LBFGS(critic.parameters(), lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        value, _ = lsd_objective(x, s_p(x), critic, lam)
        (-value).backward()
        return -value

    opt.step(closure)
    value, _ = lsd_objective(x, s_p(x), critic, lam)
    # closed form: D = prec_q − prec_p, s_p − s_q = D x + c with c = prec_p μ_p − prec_q μ_q
    dmat, c = prec_q - prec_p, prec_p @ mu_p - prec_q @ mu_q
    fisher = float(torch.trace(dmat @ cov_q @ dmat.T) + ((dmat @ mu_q + c) ** 2).sum())
    # the sample estimate of a quadratic functional: relative sd ~ sqrt(2/n) ≈ 0.7%; 3% leaves room
    assert float(value) == pytest.approx(fisher / (4 * lam), rel=0.03)
    test = torch.randn(100, 2, generator=_gen(8), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(critic(test), (s_p(test) - s_q(test)) / (2 * lam), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------- KSD and SKSD losses


def _batch_losses(w, v, loss, *, n_batches=300, n=100, seed=9):
    """The loss and its gradient in the unmixing matrix V over ``n_batches`` independent batches of ICA data."""
    x = sample_ica(n_batches * n, w, generator=_gen(seed)).reshape(n_batches, n, -1)
    model = ICAModel(w.shape[0]).double()
    with torch.no_grad():
        model.unmixing.copy_(v)
    values, grads = [], []
    for xb in x:
        model.zero_grad()
        value = loss(xb, model.score(xb))
        value.backward()
        values.append(float(value))
        grads.append(model.unmixing.grad.clone())
    return torch.tensor(values), torch.stack(grads)


@pytest.mark.parametrize("kind", ["ksd", "sksd"])
def test_stein_losses_and_their_gradients_vanish_in_expectation_at_the_true_model(kind):
    """The U-statistics are unbiased: at V = W⁻¹ the mean of the loss over independent batches is 0 and so is
    the mean of its V-gradient (each within 4 standard errors of the batch means); at a perturbed V the loss's mean
    is positive and the gradient's is not 0, beyond the same bounds (what a biased V-statistic or a wrong score
    would fail)."""
    d = 3
    w = random_mixing(d, generator=_gen(10))
    g = torch.nn.functional.normalize(torch.randn(d, d, generator=_gen(11), dtype=torch.float64), dim=-1)
    if kind == "ksd":
        loss = lambda xb, s: ksd(xb, s, median_rbf(xb), statistic="u")  # noqa: E731
    else:  # fixed random slices: an SKSD U-statistic (maxSKSD at frozen directions)
        loss = lambda xb, s: sksd(xb, s, median_rbf, r=torch.eye(d, dtype=torch.float64), g=g)  # noqa: E731
    truth = torch.linalg.inv(w)
    values, grads = _batch_losses(w, truth, loss)
    se = values.std() / math.sqrt(len(values))
    assert abs(float(values.mean())) < 4 * float(se)
    gse = grads.std(0) / math.sqrt(len(grads))
    assert torch.all(grads.mean(0).abs() < 4 * gse + 1e-12)
    off_values, off_grads = _batch_losses(w, truth + 0.3 * torch.eye(d, dtype=torch.float64), loss)
    assert float(off_values.mean()) > 4 * float(off_values.std() / math.sqrt(len(off_values)))
    off_gse = off_grads.std(0) / math.sqrt(len(off_grads))
    assert torch.any(off_grads.mean(0).abs() > 4 * off_gse)
