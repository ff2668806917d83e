"""Family ``mmdgan``: an MMD-GAN (Li, Chang, Cheng, Yang & Póczos, "MMD GAN: Towards Deeper Understanding of Moment
Matching Network", NeurIPS 2017; Bińkowski, Sutherland, Arbel & Gretton, "Demystifying MMD GANs", ICLR 2018).

A critic phi maps examples to ``features`` numbers; on them a fixed kernel k (a mixture of rational-quadratic
kernels plus a linear term, ``stein_core.critics.rq_mixture_kernel``) gives the unbiased MMD² between the data's and
the generator's features. The critic maximises it, minus ``penalty`` λ times the mean of (|∇w(x̂)| − 1)² for the
witness w(x) = mean_j k(phi(x), phi(y_j)) − mean_j k(phi(x), phi(G(z_j))) at random interpolates x̂ of data and
generator samples (Bińkowski et al.'s penalty on the witness); the generator minimises the MMD². The generator is
the one of the ``agd``/``mmd`` families, so the four generator methods differ only in their objective.

Distributed: both losses couple every row of the global batch (kernel matrices), and the penalty is a double
backward through a witness built from every row, so the modules are not DDP-wrapped: each rank computes its share
of the global loss, ``ctx.backward_coupled`` adds the cross-rank terms, and ``ctx.sum_gradients`` gives every rank
the gradient one worker computes with the global batch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from tasks.config.sections import _Section
from tasks.families._critic import (
    CriticNet,
    CriticTrain,
    MLPCriticNet,
    adam,
    build_critic,
    critic_updates,
    global_normal,
    global_uniform,
)
from tasks.families._generator import GeneratorFamily
from tasks.families.base import StepContext, TrainState


class RQKernel(_Section):
    """k(a, b) = Σ_α (1 + |a − b|²/(2α))^(−α) [+ ⟨a, b⟩] on the critic's features (Bińkowski et al.'s "rq*")."""

    alphas: list[Annotated[float, Field(gt=0, le=1e6)]] = Field(default_factory=lambda: [0.2, 0.5, 1.0, 2.0, 5.0],
                                                            min_length=1, max_length=32)
    linear: bool = Field(True, description="add the linear kernel ⟨a, b⟩")


class MMDGANTrain(CriticTrain):
    family: Literal["mmdgan"]
    critic: CriticNet = Field(MLPCriticNet(kind="mlp"), description="the critic network phi(x) -> features")
    features: int = Field(16, ge=1, le=4096, description="the critic's output size")
    kernel: RQKernel = RQKernel()
    critic_steps: int = Field(5, ge=1, le=100_000, description="critic updates per generator update")
    penalty: float = Field(1.0, ge=0, le=1e6, description="λ of the witness gradient penalty (0: none)")


class MMDGANFamily(GeneratorFamily):
    name = "mmdgan"
    config = MMDGANTrain
    loss_key = "mmd2"
    ddp = False

    def objective(self, cfg: MMDGANTrain, device):
        from stein_core.critics import rq_mixture_kernel

        return rq_mixture_kernel(tuple(cfg.kernel.alphas), linear=cfg.kernel.linear)

    def build(self, cfg: MMDGANTrain, shape):
        return {**super().build(cfg, shape), "critic": build_critic(cfg.critic, shape, cfg.features)}

    def optimizers(self, cfg: MMDGANTrain, modules):
        return {"generator": adam(modules["generator"], cfg.generator_optimizer),
                "critic": adam(modules["critic"], cfg.critic_optimizer)}

    def lr_schedule(self, cfg: MMDGANTrain, name: str) -> str:
        return (cfg.generator_optimizer if name == "generator" else cfg.critic_optimizer).lr_schedule

    def step(self, state: TrainState, batch, ctx: StepContext, cfg: MMDGANTrain) -> dict[str, Any]:
        import torch

        from stein_core.critics import gradient_penalty, interpolates, mmd2_u, mmd_witness

        gen, critic = state.modules["generator"], state.modules["critic"]
        kernel, opt = state.objective, state.optimizers
        big, latent = batch.shape[0], gen.latent_dim
        critic_mmd2, penalties = [], []
        for i in range(critic_updates(ctx.step, cfg.critic_steps, cfg.burst_steps, cfg.burst_every)):
            x = ctx.local(batch if i == 0 else ctx.draw())
            with torch.no_grad():
                xg = gen(global_normal(ctx, big, latent, batch))
            x_hat = interpolates(x, xg, global_uniform(ctx, big, batch))
            seen: dict[str, torch.Tensor] = {}

            def share(f, x_hat=x_hat, seen=seen):
                # this rank's share of -MMD²(f_data, f_gen) + λ mean_i (|∇w(x̂_i)| - 1)² over the global batch
                fd, fg = f
                mmd2 = mmd2_u(fd, fg, kernel)
                seen["mmd2"] = mmd2.detach()
                loss = -mmd2 / ctx.world
                if cfg.penalty > 0:
                    gp = gradient_penalty(lambda v: mmd_witness(critic, v, fd, fg, kernel), x_hat, target=1.0)
                    seen["penalty"] = gp.detach()
                    loss = loss + cfg.penalty * gp * (x_hat.shape[0] / big)
                return loss

            opt["critic"].zero_grad(set_to_none=True)
            ctx.backward_coupled([critic(x), critic(xg)], share)
            ctx.sum_gradients(critic)
            opt["critic"].step()
            critic_mmd2.append(seen["mmd2"])
            if "penalty" in seen:
                penalties.append(seen["penalty"])
        # the generator step, on its own batch
        x = ctx.local(ctx.draw())
        with torch.no_grad():
            fd = critic(x)
        fg = critic(gen(global_normal(ctx, big, latent, batch)))
        seen = {}

        def gen_share(f, seen=seen):
            mmd2 = mmd2_u(f[0], f[1], kernel)
            seen["mmd2"] = mmd2.detach()
            return mmd2 / ctx.world

        opt["generator"].zero_grad(set_to_none=True)
        ctx.backward_coupled([fd, fg], gen_share)
        ctx.sum_gradients(gen)
        opt["generator"].step()
        out = {"mmd2": seen["mmd2"], "critic_mmd2": torch.stack(critic_mmd2)}
        if penalties:
            out["critic_penalty"] = torch.stack(penalties)
        return out


#: The family this module registers (``tasks.families.FAMILY_MODULES``).
FAMILY = MMDGANFamily()
