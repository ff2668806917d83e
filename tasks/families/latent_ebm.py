"""Family ``latent_ebm``: a generator with an energy-based prior on its latent space (Pang, Han, Nijkamp, Zhu & Wu,
"Learning Latent Space Energy-Based Prior Model", NeurIPS 2020).

Model: z ∈ R^k with prior p_α(z) ∝ exp(−E_α(z)) N(z; 0, I) (E_α an MLP on z, ``stein_core.critics.MLPCritic``) and
x = G_β(z) + σ ε, ε ~ N(0, I) (G the generator of the ``agd``/``mmd`` families: an MLP for vectors, the DCGAN-style
conv net for images; σ = ``obs_std``). The latent posterior is

    log p(z | x) = −E_α(z) − |z|²/2 − |x − G_β(z)|² / (2σ²) + const.

Training (one loop step = one update of each module, on the step's batch): for the local rows x, posterior samples
z⁺ by K₁ = ``posterior_steps`` Langevin steps on log p(z | x) from z ~ N(0, I), and prior samples z⁻ by K₀ =
``prior_steps`` Langevin steps on log p_α(z) = −E_α(z) − |z|²/2 from z ~ N(0, I) (``langevin``: ULA, or MALA with its
Metropolis correction; step z ← z + a ∇log p(z) + √(2a) ξ, so the authors' step s is a = s²/2). Both are detached.
By Fisher's identity ∇ log p(x) = E_{p(z|x)}[∇ log p(x, z)], for exact samples the losses' gradients are the
negative log-likelihood's:

- **prior loss** (``stein_core.ebm.cd_loss``): mean E_α(z⁺) − mean E_α(z⁻) (+ ``l2`` (mean E_α(z⁺)² + mean E_α(z⁻)²),
  0 by default): its α-gradient E_post[∇_α E_α] − E_prior[∇_α E_α] is −∇_α log p(x), since
  ∇_α log Z(α) = −E_{p_α}[∇_α E_α];
- **generator loss**: mean over the rows of |x − G_β(z⁺)|² / (2σ²) (a sum over coordinates per example), the
  negative log-density of x given z⁺ up to a constant: its β-gradient is −∇_β log p(x).

Both chains are short-run (non-convergent, Nijkamp et al. 2019): as in the paper, the model that is learned is the
short-run prior chain followed by G, and it is sampled the same way (``sampler: latent_langevin``: a chain on
U(z) = |z|²/2 + β E_α(z), then x = G(z), the mean of p(x | z); β = 1 the learned prior, β = 0 the Gaussian alone).

Defaults: the chains, σ, the prior net and Adam's betas are the authors' (``train_svhn.py`` of
github.com/bpucla/latent-space-EBM-prior: ``e_l_steps=60, e_l_step_size=0.4`` → a = 0.08;
``g_l_steps=20, g_l_step_size=0.1`` → a = 0.005; ``g_llhd_sigma=0.3``; E an MLP with two hidden layers of 200;
Adam β = (0.5, 0.999)). Their learning rates (prior 2e-5, generator 1e-4, decayed by 0.998 per epoch) are for
~150,000 steps of SVHN; the defaults here are for the few thousand steps of the small data sets of this project
(prior 1e-4, generator 1e-3: see :class:`LatentEBMTrain`). The authors' generator loss drops the 1/(2σ²) factor;
Adam is blind to a constant factor, so the updates differ only through Adam's ε.

Distributed: the modules are not DDP-wrapped (``ddp = False``). Every rank runs the chains of its rows of the global
batch: the starting normals and every step's noise are drawn for the global batch and sliced
(``stein_core._random.RowShard``), so a rank's chains are exactly those one process would run for those rows. Both
losses are means of per-example terms over the rank's rows, and each backward is followed by
``ctx.average_gradients(module)``: the global batch's gradient, as DDP would give it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import Field

from tasks.config.sections import ConfigError, LatentLangevinSample, TrainBase, _Section
from tasks.families._critic import OptimizerSection, adam
from tasks.families._generator import _NET_CLASSES, ConvGeneratorNet, GeneratorFamily, MLPGeneratorNet
from tasks.families.base import Model, StepContext, TrainState, build_from_checkpoint


class PriorNet(_Section):
    """The prior's energy E_α(z): an MLP on the latent (``stein_core.critics.MLPCritic``, SiLU activations; the
    authors' has two hidden layers of 200 units with GELU or LeakyReLU)."""

    hidden: int = Field(200, ge=1, le=65536)
    n_layers: int = Field(2, ge=1, le=64)


class LatentEBMTrain(TrainBase):
    """A generator ``net`` with an energy-based prior ``prior`` on its latent, each with its own Adam."""

    family: Literal["latent_ebm"]
    net: Annotated[MLPGeneratorNet | ConvGeneratorNet, Field(discriminator="kind")] = MLPGeneratorNet(kind="mlp")
    prior: PriorNet = PriorNet()
    obs_std: float = Field(0.3, gt=0, le=1e3, description="σ of x = G(z) + σ ε (the authors' g_llhd_sigma)")
    langevin: Literal["ula", "mala"] = Field("ula", description="both chains: unadjusted Langevin (the authors'), "
                                             "or MALA")
    posterior_steps: int = Field(20, ge=1, le=100_000, description="K₁, Langevin steps of the posterior chain")
    posterior_step_size: float = Field(5e-3, gt=0, le=10, description="a of z ← z + a∇log p(z|x) + √(2a) ξ "
                                       "(the authors' s = 0.1: a = s²/2)")
    prior_steps: int = Field(60, ge=1, le=100_000, description="K₀, Langevin steps of the prior chain")
    prior_step_size: float = Field(0.08, gt=0, le=10, description="a of z ← z + a∇log p_α(z) + √(2a) ξ "
                                   "(the authors' s = 0.4: a = s²/2)")
    prior_optimizer: OptimizerSection = Field(
        OptimizerSection(lr=1e-4), description="Adam of the prior's energy (the authors': lr 2e-5 over ~150k steps)")
    generator_optimizer: OptimizerSection = Field(
        OptimizerSection(lr=1e-3), description="Adam of the generator (the authors': lr 1e-4 over ~150k steps)")
    l2: float = Field(0.0, ge=0, le=1e6, description="weight of the mean squared prior energies (Du & Mordatch 2019)")


# ---------------------------------------------------------------------------------------------- latent densities


def prior_log_prob(energy: Callable, beta: float = 1.0) -> Callable:
    """``z [n, k] -> [n]``: log p(z) = −|z|²/2 − β E(z) + const (``energy``: ``[n, k] -> [n]``; β = 0: N(0, I) and
    the energy is not evaluated)."""

    def log_prob(z):
        gauss = -0.5 * (z * z).sum(-1)
        return gauss if beta == 0 else gauss - beta * energy(z)

    return log_prob


def posterior_log_prob(generator, energy: Callable, x, obs_std: float) -> Callable:
    """``z [n, k] -> [n]``: log p(z | x) = −E(z) − |z|²/2 − |x − G(z)|²/(2σ²) + const, row i with ``x [n, d]``'s
    row i (n independent posteriors)."""
    prior = prior_log_prob(energy)
    scale = 0.5 / obs_std**2

    def log_prob(z):
        r = x - generator(z)  # [n, d]
        return prior(z) - scale * (r * r).sum(-1)

    return log_prob


def _chain_end(method: str, log_prob: Callable, step_size: float, z0, n_steps: int, generator, *, friction=1.0,
               callback=None):
    """The final state of ``n_steps`` steps of the chain ``method`` from ``z0 [n, k]`` (``stein_core.samplers``)."""
    from stein_core.samplers import by_name, run_chain

    tick = None if callback is None else (lambda _i, _state: callback(1))
    run = run_chain(*by_name(method, log_prob, step_size, friction=friction), z0, n_steps, thin=n_steps,
                    generator=generator, callback=tick)
    return run.state


# ---------------------------------------------------------------------------------------------- model


class LatentEBMModel(Model):
    """x = G(z) with z from a Langevin chain (``sampler``, a :class:`LatentLangevinSample`) on
    U(z) = |z|²/2 + β E_α(z) from z₀ ~ N(0, I)."""

    def __init__(self, generator, prior, shape, sampler: LatentLangevinSample, device="cpu"):
        self.generator, self.prior, self.shape, self.s, self.device = generator, prior, tuple(shape), sampler, device
        self._accepted = self._proposed = 0  # MALA's proposals over every sample() call

    def diagnostics(self) -> dict[str, float]:
        return {"accept_rate": self._accepted / self._proposed} if self._proposed else {}

    def ticks(self, n: int) -> int:
        return self.s.n_steps

    def latents(self, n: int, *, generator, callback=None):
        """``[n, k]``: the chains' final states (one ``callback(1)`` per chain step)."""
        from stein_core._random import randn

        s = self.s
        like = next(self.generator.parameters()).detach().new_empty(())  # device and dtype of the networks
        z0 = randn((n, self.generator.latent_dim), like=like, generator=generator)
        energy = lambda z: self.prior(z).squeeze(-1)  # noqa: E731
        state = _chain_end(s.method, prior_log_prob(energy, s.beta), s.step_size, z0, s.n_steps, generator,
                           friction=s.friction, callback=callback)
        if s.method == "mala":  # the chain's own acceptance count (a low rate: the chains barely moved)
            self._accepted += int(state.n_accepted.sum())
            self._proposed += n * s.n_steps
        return state.position.detach()

    def sample(self, n: int, *, generator, callback=None):
        import torch

        z = self.latents(n, generator=generator, callback=callback)
        with torch.no_grad():
            return self.generator(z)


def training_chain(cfg: LatentEBMTrain) -> LatentLangevinSample:
    """The sample section of the prior chain the model was trained with: the paper's sampler."""
    return LatentLangevinSample(sampler="latent_langevin", method=cfg.langevin, beta=1.0,
                                step_size=cfg.prior_step_size, n_steps=cfg.prior_steps)


# ---------------------------------------------------------------------------------------------- family


class LatentEBMFamily(GeneratorFamily):
    name = "latent_ebm"
    config = LatentEBMTrain
    samplers = frozenset({"latent_langevin"})
    loss_key = "recon_loss"
    ddp = False

    def objective(self, cfg, device):
        return None

    def build(self, cfg: LatentEBMTrain, shape):
        from stein_core.critics import MLPCritic

        modules = super().build(cfg, shape)  # {"generator": G}, as the agd/mmd/gebm families build it
        latent = modules["generator"].latent_dim
        return {**modules, "prior": MLPCritic(latent, out_dim=1, hidden=cfg.prior.hidden, n_layers=cfg.prior.n_layers)}

    def optimizers(self, cfg: LatentEBMTrain, modules):
        return {"generator": adam(modules["generator"], cfg.generator_optimizer),
                "prior": adam(modules["prior"], cfg.prior_optimizer)}

    def lr_schedule(self, cfg: LatentEBMTrain, name: str) -> str:
        return (cfg.generator_optimizer if name == "generator" else cfg.prior_optimizer).lr_schedule

    def step(self, state: TrainState, batch, ctx: StepContext, cfg: LatentEBMTrain) -> dict[str, Any]:
        import torch

        from stein_core._random import RowShard, randn
        from stein_core.ebm import cd_loss

        gen, prior = state.modules["generator"], state.modules["prior"]
        energy = lambda z: prior(z).squeeze(-1)  # noqa: E731  [n, k] -> [n]
        x = ctx.local(batch)  # [b, d], this rank's rows of the global batch [B, d]
        b, k = x.shape[0], gen.latent_dim
        shard = RowShard(ctx.generator, batch.shape[0], ctx.rank * b)  # this rank's rows of every global draw
        z_pos0 = randn((b, k), like=x, generator=shard)  # [b, k] of the global [B, k]
        z_neg0 = randn((b, k), like=x, generator=shard)
        post = _chain_end(cfg.langevin, posterior_log_prob(gen, energy, x, cfg.obs_std), cfg.posterior_step_size,
                          z_pos0, cfg.posterior_steps, shard)
        neg = _chain_end(cfg.langevin, prior_log_prob(energy), cfg.prior_step_size, z_neg0, cfg.prior_steps, shard)
        z_pos, z_neg = post.position.detach(), neg.position.detach()
        opt = state.optimizers

        # generator: mean over the rows of |x − G(z⁺)|² / (2σ²)
        r = x - gen(z_pos)
        recon = (r * r).sum(-1).mean() * (0.5 / cfg.obs_std**2)
        opt["generator"].zero_grad(set_to_none=True)
        recon.backward()
        ctx.average_gradients(gen)
        opt["generator"].step()

        # prior: mean E(z⁺) − mean E(z⁻) (+ l2), the maximum-likelihood gradient
        e = energy(torch.cat([z_pos, z_neg]))  # [2b]
        e_pos, e_neg = e[:b], e[b:]
        loss = cd_loss(e_pos, e_neg, l2=cfg.l2)
        opt["prior"].zero_grad(set_to_none=True)
        loss.backward()
        ctx.average_gradients(prior)
        opt["prior"].step()

        e_pos, e_neg = e_pos.detach().mean(), e_neg.detach().mean()
        out = {"recon_loss": recon.detach(), "prior_loss": e_pos - e_neg, "energy_pos": e_pos, "energy_neg": e_neg}
        if cfg.langevin == "mala":
            out["posterior_accept_rate"] = post.n_accepted.to(x.dtype).mean() / cfg.posterior_steps
            out["prior_accept_rate"] = neg.n_accepted.to(x.dtype).mean() / cfg.prior_steps
        return out

    def load(self, ckpt, *, device="cpu", sampler=None) -> LatentEBMModel:
        from stein_core.critics import MLPCritic

        gen = build_from_checkpoint(ckpt, "generator", _NET_CLASSES).to(device).eval()
        prior = build_from_checkpoint(ckpt, "prior", (MLPCritic,)).to(device).eval()
        if prior.model_args["dim"] != gen.latent_dim or prior.model_args["out_dim"] != 1:
            raise ConfigError("checkpoint", "model_args.prior", f"an energy on R^{gen.latent_dim} (the generator's "
                              f"latent) is needed, got MLPCritic(dim={prior.model_args['dim']}, "
                              f"out_dim={prior.model_args['out_dim']})")
        for p in [*gen.parameters(), *prior.parameters()]:
            p.requires_grad_(False)  # the chain differentiates in z only
        return LatentEBMModel(gen, prior, ckpt["shape"], sampler or _checkpoint_chain(ckpt), device)

    def live_model(self, state: TrainState, cfg: LatentEBMTrain, shape) -> LatentEBMModel:
        gen = state.modules["generator"]
        return LatentEBMModel(gen, state.modules["prior"], shape, training_chain(cfg), next(gen.parameters()).device)


def _checkpoint_chain(ckpt) -> LatentLangevinSample:
    """The default sampler of a checkpoint: the prior chain of its training, or the section's defaults without one."""
    from pydantic import ValidationError

    saved = ckpt.get("train_config")
    if saved is None:
        return LatentLangevinSample(sampler="latent_langevin")
    try:
        return training_chain(LatentEBMTrain.model_validate(saved))
    except ValidationError as exc:
        raise ConfigError("checkpoint", "train_config", f"not a latent_ebm train section: {exc}") from None


#: The family this module registers (``tasks.families.FAMILY_MODULES``).
FAMILY = LatentEBMFamily()
