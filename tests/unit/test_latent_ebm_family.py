"""Family ``latent_ebm`` (Pang et al., NeurIPS 2020): training through the real loop (the reconstruction falls,
resume is exact, a NaN stops it), the maximum-likelihood sign of the prior's update and the posterior chain against
a linear-Gaussian model's closed form, and the latent sampler's law (β = 0: N(0, I); β = 1 with a linear energy:
a shifted Gaussian)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stein_core.critics import MLPCritic
from stein_core.nets import MLPGenerator
from tasks.config.sections import LatentLangevinSample
from tasks.families import FAMILIES, model_payload, module_checkpoint
from tasks.families.base import StepContext, TrainState
from tasks.families.latent_ebm import LatentEBMModel, training_chain
from tasks.stages.train.loop import TrainingDiverged, fit

FAMILY = FAMILIES["latent_ebm"]
# small nets and short chains: ~25 ms per step on 2 threads
SMALL = {"net": {"kind": "mlp", "latent_dim": 2, "hidden": 32, "n_layers": 2}, "prior": {"hidden": 32, "n_layers": 2},
         "posterior_steps": 10, "prior_steps": 20}


def _cfg(**kw):
    base = {"family": "latent_ebm", "seed": 1, "batch_size": 64, "n_steps": 20, "log_every": 10, "checkpoint_every": 10}
    return FAMILY.config.model_validate(base | SMALL | kw)


@pytest.fixture(scope="module")
def mixture():
    """1000 points of two well-separated Gaussians in the plane (means (±2, 0), sd 0.3) mapped into R^4 by a fixed
    linear map: data on a 2-D subspace, which a 2-D latent can reconstruct."""
    g = torch.Generator().manual_seed(0)
    label = torch.randint(2, (1000,), generator=g)
    u = 0.3 * torch.randn(1000, 2, generator=g) + torch.tensor([[-2.0, 0.0], [2.0, 0.0]])[label]  # [n, 2]
    embed = torch.tensor([[1.0, 0.5, -0.3, 0.2], [0.2, -0.4, 0.8, 1.0]])  # [2, 4]
    return u @ embed  # [n, 4]


def test_training_lowers_the_reconstruction_and_stays_finite(mixture):
    """At initialisation G(z) ≈ 0, so recon_loss ≈ E|x|²/(2σ²) ≈ 32 on these data (σ = 0.3); a model that has learned
    the 2-D subspace reconstructs x from a posterior sample z⁺ up to the posterior's own spread, a few units
    (about 1.5 after 200 steps in a trial run). Asking for a drop by 4x leaves a wide margin on either side: an
    untrained or broken generator update (a posterior chain ignoring x, a wrong sign) stays near 32."""
    cfg = _cfg(n_steps=150, log_every=25, checkpoint_every=150, generator_optimizer={"lr": 3e-3},
               prior_optimizer={"lr": 1e-3})
    state = fit(FAMILY, cfg, mixture, (4,), device="cpu")
    first, last = state["history"][0], state["history"][-1]
    assert set(last) == {"step", "recon_loss", "prior_loss", "energy_pos", "energy_neg"}
    assert first["recon_loss"] > 15  # the first 25 steps still average a poor fit
    assert last["recon_loss"] < first["recon_loss"] / 4, state["history"]
    for row in state["history"]:
        assert all(math.isfinite(v) for v in row.values()), row
    for sd in state["modules"].values():
        assert all(torch.isfinite(v).all() for v in sd.values())


@pytest.mark.parametrize("langevin", ["ula", "mala"])
def test_resume_ends_with_the_weights_and_optimiser_states_of_an_uninterrupted_run(mixture, langevin):
    """Stopped after step 7 (between two checkpoints and two logs) and resumed from that state, a run ends bit for bit
    where an uninterrupted one ends: the chains' starts and noise are drawn from the step's generator alone."""
    cfg = _cfg(langevin=langevin)
    uninterrupted = fit(FAMILY, cfg, mixture, (4,), device="cpu")
    stopped = fit(FAMILY, cfg, mixture, (4,), device="cpu", stop_after=7)
    assert stopped["step"] == 7
    resumed = fit(FAMILY, cfg, mixture, (4,), device="cpu", resume=stopped)
    assert resumed["step"] == uninterrupted["step"] == 20
    for name, sd in uninterrupted["modules"].items():
        for k, v in sd.items():
            assert torch.equal(resumed["modules"][name][k], v), f"{name}.{k}"
    for name, opt in uninterrupted["optimizers"].items():
        for i, s in opt["state"].items():
            for k, v in s.items():
                assert torch.equal(resumed["optimizers"][name]["state"][i][k], v), f"{name}.{i}.{k}"
    if langevin == "mala":  # the chains' acceptance is logged, and MALA at these steps accepts most proposals
        assert 0.5 < uninterrupted["history"][-1]["prior_accept_rate"] <= 1
        assert 0.5 < uninterrupted["history"][-1]["posterior_accept_rate"] <= 1


class _LinearGenerator(nn.Linear):
    """x = A z (no bias), with the ``latent_dim`` a generator of this project carries."""

    latent_dim = 2


def test_the_prior_update_has_the_sign_of_maximum_likelihood_and_the_posterior_its_closed_form():
    """A linear-Gaussian model where every quantity has a closed form. Generator x = A z with A = I, σ = 0.3, and
    every data row x₀ = (2, −1): the posterior is N(μ, P⁻¹ I) with P = 1 + 1/σ², μ = x₀ / (1 + σ²) = (1.83, −0.92).
    Prior energy E(z) = w·z + c with w = 0: a constant, so the prior chain targets N(0, I).

    The prior loss mean E(z⁺) − mean E(z⁻) has w-gradient mean z⁺ − mean z⁻ ≈ μ − 0 (per coordinate, standard error
    sqrt(1/256 + 1/(256 P)) ≈ 0.065: tolerance 0.3, ~4.6 s.e.), and c-gradient exactly 0. A sign error (z⁺ and z⁻
    swapped, or the loss negated) gives −μ, off by 2|μ_i| ≥ 1.8. Adam's first step then moves w by −lr·sign(grad):
    the energy falls towards the posterior's mass (w₁ < 0, w₂ > 0), as maximum likelihood wants.

    The reconstruction is checked too: ULA at step a on a Gaussian of precision P is stationary at N(μ, v I) with
    v = 1 / (P (1 − a P / 2)) (its mean is exact), and 100 steps at aP = 0.24 forget the start (0.76¹⁰⁰ ≈ 1e-12), so
    E[recon] = (|x₀ − μ|² + 2 v) / (2σ²) = 1.23; its standard error over 256 rows is 0.076 (tolerance 0.3). A chain
    that ignored x gives (|x₀|² + 2) / (2σ²) ≈ 39; a likelihood scaled by 1/σ instead of 1/σ² another μ and v."""
    sigma, a, b = 0.3, 0.02, 256
    cfg = _cfg(batch_size=b, obs_std=sigma, posterior_steps=100, posterior_step_size=a, prior_steps=50,
               prior_step_size=0.05)
    gen = _LinearGenerator(2, 2, bias=False)
    prior = nn.Linear(2, 1)
    with torch.no_grad():
        gen.weight.copy_(torch.eye(2))
        prior.weight.zero_()
        prior.bias.fill_(0.7)
    modules = {"generator": gen, "prior": prior}
    state = TrainState(modules=modules, trained=modules, optimizers=FAMILY.optimizers(cfg, modules))
    x0 = torch.tensor([2.0, -1.0])
    ctx = StepContext(step=0, rank=0, world=1, generator=torch.Generator().manual_seed(0), device="cpu")
    metrics = FAMILY.step(state, x0.expand(b, 2).clone(), ctx, cfg)

    p = 1 + 1 / sigma**2
    mu = x0 / (1 + sigma**2)
    torch.testing.assert_close(prior.weight.grad[0], mu, rtol=0, atol=0.3)
    assert float(prior.bias.grad) == 0.0
    lr = cfg.prior_optimizer.lr
    torch.testing.assert_close(prior.weight.detach()[0], -lr * torch.sign(mu), rtol=1e-3, atol=0)
    # a constant energy: both sides are 0.7, their difference 0
    assert float(metrics["energy_pos"]) == pytest.approx(0.7) and float(metrics["energy_neg"]) == pytest.approx(0.7)
    assert float(metrics["prior_loss"]) == 0.0
    v = 1 / (p * (1 - a * p / 2))
    expected = (float(((x0 - mu) ** 2).sum()) + 2 * v) / (2 * sigma**2)
    assert float(metrics["recon_loss"]) == pytest.approx(expected, abs=0.3)


def _model(beta: float, method: str, step_size: float, n_steps: int, prior=None) -> LatentEBMModel:
    torch.manual_seed(0)
    gen = MLPGenerator(2, 4, hidden=16, n_layers=2)
    if prior is None:  # a steep random energy: with β = 1 its law would be far from N(0, I)
        prior = MLPCritic(2, out_dim=1, hidden=16, n_layers=2)
        with torch.no_grad():
            prior.net[-1].weight.mul_(20.0)
    sampler = LatentLangevinSample(sampler="latent_langevin", method=method, beta=beta, step_size=step_size,
                                   n_steps=n_steps)
    if isinstance(prior, MLPCritic):  # through a checkpoint, as the sample stage loads it
        ckpt = module_checkpoint("latent_ebm", {"generator": gen, "prior": prior}, shape=[4])
        return FAMILY.load(ckpt, sampler=sampler)
    return LatentEBMModel(gen, prior, (4,), sampler)


def test_beta_zero_samples_the_gaussian_latent_whatever_the_energy():
    """β = 0: U(z) = |z|²/2, whatever E. ULA at step a from N(0, I) has variance v_t = (1 − a)² v_{t−1} + 2a, which
    after 100 steps at a = 0.01 is 1.004 (stationary 1/(1 − a/2) = 1.005). With n = 4000 chains in R², a coordinate's
    mean has standard error 1/sqrt(n) = 0.016 (tolerance 0.07) and its variance sqrt(2/n) = 0.022 (tolerance 0.1)."""
    model = _model(beta=0.0, method="ula", step_size=0.01, n_steps=100)
    n = 4000
    ticks = []
    z = model.latents(n, generator=torch.Generator().manual_seed(3), callback=ticks.append)
    assert z.shape == (n, 2) and ticks == [1] * model.ticks(n) == [1] * 100
    torch.testing.assert_close(z.mean(0), torch.zeros(2), rtol=0, atol=0.07)
    torch.testing.assert_close(z.var(0), torch.ones(2), rtol=0, atol=0.1)
    # the samples are G of those latents (the mean of p(x | z): no observation noise)
    x = model.sample(n, generator=torch.Generator().manual_seed(3))
    assert x.shape == (n, 4)
    with torch.no_grad():
        torch.testing.assert_close(x, model.generator(z), rtol=0, atol=0)
    assert model.diagnostics() == {}  # ULA: no acceptance to report
    # with β = 1 the same steep energy moves the chains far from N(0, I): β is not ignored
    steep = _model(beta=1.0, method="ula", step_size=0.01, n_steps=100)
    z1 = steep.latents(n, generator=torch.Generator().manual_seed(3))
    assert float((z1 - z).abs().max()) > 0.5


def test_beta_one_with_a_linear_energy_samples_the_shifted_gaussian():
    """E(z) = −m·z gives exp(−E(z) − |z|²/2) ∝ N(m, I): MALA (exact at any step) at step 0.2 for 200 steps from
    N(0, I) must land on mean m = (1.5, −1). Tolerances as above (n = 4000: s.e. 0.016 for the means, 0.022 for the
    variances). The wrong sign of the energy in U would give mean −m."""
    m = torch.tensor([1.5, -1.0])
    energy = nn.Linear(2, 1)
    with torch.no_grad():
        energy.weight.copy_(-m[None])
        energy.bias.zero_()
    model = _model(beta=1.0, method="mala", step_size=0.2, n_steps=200, prior=energy)
    z = model.latents(4000, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(z.mean(0), m, rtol=0, atol=0.07)
    torch.testing.assert_close(z.var(0), torch.ones(2), rtol=0, atol=0.1)
    assert 0.8 < model.diagnostics()["accept_rate"] <= 1.0


def test_a_checkpoint_samples_with_its_training_prior_chain(mixture):
    """Loaded without a sample section, a model draws with the short-run prior chain it was trained with (the paper's
    sampler); the live model of the loop does too."""
    cfg = _cfg(n_steps=2, langevin="mala", prior_steps=7, prior_step_size=0.05)
    state = fit(FAMILY, cfg, mixture, (4,), device="cpu")
    model = FAMILY.load(model_payload(FAMILY, cfg, state))
    assert model.s == training_chain(cfg) and (model.s.method, model.s.n_steps, model.s.step_size) == ("mala", 7, 0.05)
    assert model.sample(5, generator=torch.Generator().manual_seed(0)).shape == (5, 4)
    assert FAMILY.sampler_refusal("latent_langevin") is None and FAMILY.sampler_refusal("generator") is not None


def test_a_nan_in_the_data_stops_training(mixture):
    data = mixture.clone()
    data[:, 1] = float("nan")
    with pytest.raises(TrainingDiverged, match="step 1"):
        fit(FAMILY, _cfg(), data, (4,), device="cpu")
