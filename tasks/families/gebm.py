"""Family ``gebm``: a generalised energy-based model (Arbel, Zhou & Gretton, "Generalized Energy Based Models",
ICLR 2021): a base generator B(z), z ~ eta = N(0, I), and an energy E, with density dQ/dG = exp(-E - A) against
the base's law G (A the log-partition, a learnable scalar). Trained by alternating maximisation and minimisation
of the KALE bound (``stein_core.critics``)

    F(E, A; theta) = -E_P[E(x)] - A - E_eta[exp(-E(B_theta(z)) - A)] + 1   <=   KL(P || G_theta):

- **Energy step** (``energy_steps`` per base step, ``burst_steps`` at step 0 and every ``burst_every`` base steps,
  as in the authors' trainer: 100 every 500, else 5): minimise -F in E and A, plus ``penalty`` λ times the mean
  squared gradient norm of E at random interpolates of data and base samples (the authors' ``gradient_l2``
  penalty, at the interpolates of Gulrajani et al. 2017). A is initialised at step 0 to log E_eta[exp(-E(B(z)))]
  over the first batch (the optimal A for the initial energy), then learned with its own rate
  (``log_partition_lr``).
- **Base step**: descend F in theta at the current (E, A): the loss is ``kale_base_loss``, whose gradient
  E_eta[exp(-E(B(z)) - A) ∇E(B(z)) ∂B/∂theta] is, at the optimal energy, the gradient of KL(P || G_theta): the base
  descends KALE itself, not a GAN heuristic. Equation numbers of the paper could not be checked offline; the
  formulas above are derived in ``stein_core.critics`` and tested against closed forms.

Sampling (``sampler: latent_langevin``): a Langevin chain (ULA, MALA or kinetic) in the latent space on
U(z) = |z|²/2 + β·E(B(z)), then x = B(z); ``sampler: generator`` draws the base alone, which the pipelines
evaluate beside the GEBM so that the energy's contribution is measured.

Distributed: the modules are not DDP-wrapped (the penalty is a double backward); every loss is a mean of
per-example terms over this rank's slice of the global batch, and the gradients are averaged over the ranks
(``ctx.average_gradients``): what DDP computes, without its reducer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tasks.families._critic import (
    CriticNet,
    CriticTrain,
    MLPCriticNet,
    OptimizerSection,
    adam,
    build_critic,
    critic_updates,
    global_normal,
    global_uniform,
)
from tasks.families._generator import GeneratorFamily, GeneratorModel, _NET_CLASSES
from tasks.families.base import Model, StepContext, TrainState, build_from_checkpoint


class GEBMTrain(CriticTrain):
    family: Literal["gebm"]
    energy: CriticNet = Field(MLPCriticNet(kind="mlp"), description="the energy network E(x) -> a scalar")
    energy_steps: int = Field(5, ge=1, le=100_000, description="energy updates per base update")
    log_partition_lr: float = Field(2e-4, gt=0, le=10, description="Adam learning rate of the log-partition A")


class GEBMModel(Model):
    """x = B(z) with z from a Langevin chain on the latent posterior, and the energy E(x) for plots."""

    def __init__(self, generator, energy, shape, sampler, device="cpu"):
        self.generator, self.energy_net, self.shape, self.s, self.device = generator, energy, tuple(shape), sampler, device
        self._accepted = self._proposed = 0  # MALA's proposals over every sample() call

    def diagnostics(self) -> dict[str, float]:
        return {"accept_rate": self._accepted / self._proposed} if self._proposed else {}

    def energy(self, x):
        import torch

        with torch.no_grad():
            return self.energy_net(x).squeeze(-1)

    def ticks(self, n: int) -> int:
        return self.s.n_steps

    def sample(self, n: int, *, generator, callback=None):
        import torch

        from stein_core import samplers
        from stein_core.critics import latent_log_prob
        from stein_core.distributions import score_from_log_prob

        s = self.s
        log_prob = latent_log_prob(self.generator, lambda x: self.energy_net(x).squeeze(-1), s.beta)
        chain = samplers.by_name(s.method, log_prob, s.step_size, score_fn=score_from_log_prob(log_prob),
                                 friction=s.friction)
        z0 = torch.randn(n, self.generator.latent_dim, generator=generator, device=self.device)
        state = chain.init_fn(z0, generator=generator)
        for _ in range(s.n_steps):
            state = chain.step_fn(state, generator=generator)
            if callback is not None:
                callback(1)
        if s.method == "mala":  # the chain's own acceptance count (a low rate: the chains barely moved)
            self._accepted += int(state.n_accepted.sum())
            self._proposed += n * s.n_steps
        with torch.no_grad():
            return self.generator(state.position)


class GEBMFamily(GeneratorFamily):
    name = "gebm"
    config = GEBMTrain
    samplers = frozenset({"latent_langevin", "generator"})
    has_energy = True
    loss_key = "kale"
    ddp = False

    def objective(self, cfg, device):
        return None

    def build(self, cfg: GEBMTrain, shape):
        from stein_core.critics import Scalar

        return {**super().build(cfg, shape), "energy": build_critic(cfg.energy, shape, 1), "log_partition": Scalar(0.0)}

    def optimizers(self, cfg: GEBMTrain, modules):
        log_partition = OptimizerSection(lr=cfg.log_partition_lr, beta1=cfg.critic_optimizer.beta1,
                                         beta2=cfg.critic_optimizer.beta2, lr_schedule=cfg.critic_optimizer.lr_schedule)
        return {"generator": adam(modules["generator"], cfg.generator_optimizer),
                "energy": adam(modules["energy"], cfg.critic_optimizer),
                "log_partition": adam(modules["log_partition"], log_partition)}

    def lr_schedule(self, cfg: GEBMTrain, name: str) -> str:
        return (cfg.generator_optimizer if name == "generator" else cfg.critic_optimizer).lr_schedule

    def step(self, state: TrainState, batch, ctx: StepContext, cfg: GEBMTrain) -> dict[str, Any]:
        import torch

        from stein_core.critics import gradient_penalty, interpolates, kale_base_loss, kale_energy_loss, optimal_log_partition

        gen, energy, a = (state.modules[k] for k in ("generator", "energy", "log_partition"))
        opt = state.optimizers
        e = lambda x: energy(x).squeeze(-1)  # noqa: E731
        big, latent = batch.shape[0], gen.latent_dim
        if ctx.step == 0:  # A from the first batch: the optimal log-partition of the initial energy (global batch)
            with torch.no_grad():
                z = torch.randn(big, latent, generator=ctx.generator, device=batch.device, dtype=batch.dtype)
                a.value.copy_(optimal_log_partition(e(gen(z))))
        kale, penalties = [], []
        for i in range(critic_updates(ctx.step, cfg.energy_steps, cfg.burst_steps, cfg.burst_every)):
            x = ctx.local(batch if i == 0 else ctx.draw())
            with torch.no_grad():
                xg = gen(global_normal(ctx, big, latent, batch))
            loss = kale_energy_loss(e(x), e(xg), a())
            total = loss
            if cfg.penalty > 0:
                penalty = gradient_penalty(e, interpolates(x, xg, global_uniform(ctx, big, batch)), target=None)
                total = loss + cfg.penalty * penalty
                penalties.append(penalty.detach())
            opt["energy"].zero_grad(set_to_none=True)
            opt["log_partition"].zero_grad(set_to_none=True)
            total.backward()
            ctx.average_gradients(energy, a)
            opt["energy"].step()
            opt["log_partition"].step()
            kale.append(-loss.detach())
        # the base step, on its own batch
        x = ctx.local(ctx.draw())
        with torch.no_grad():
            e_data = e(x).mean()
        base_loss = kale_base_loss(e(gen(global_normal(ctx, big, latent, batch))), a(), e_data)
        opt["generator"].zero_grad(set_to_none=True)
        base_loss.backward()
        ctx.average_gradients(gen)
        opt["generator"].step()
        out = {"kale": torch.stack(kale), "kale_base_step": base_loss.detach(), "log_partition": a().detach().clone()}
        if penalties:
            out["energy_penalty"] = torch.stack(penalties)
        return out

    def load(self, ckpt, *, device="cpu", sampler=None) -> Model:
        from stein_core.critics import ConvCritic, MLPCritic

        gen = build_from_checkpoint(ckpt, "generator", _NET_CLASSES).to(device).eval()
        if sampler is None or sampler.sampler == "generator":
            return GeneratorModel(gen, ckpt["shape"], device)
        energy = build_from_checkpoint(ckpt, "energy", (MLPCritic, ConvCritic)).to(device).eval()
        for p in [*gen.parameters(), *energy.parameters()]:
            p.requires_grad_(False)  # the chain differentiates in z only
        return GEBMModel(gen, energy, ckpt["shape"], sampler, device)


#: The family this module registers (``tasks.families.FAMILY_MODULES``).
FAMILY = GEBMFamily()
