"""Family ``lsd``: an unnormalised model learned by minimising the learned Stein discrepancy (Grathwohl, Wang,
Jacobsen, Duvenaud & Zemel, "Learning the Stein Discrepancy for Training and Evaluating Energy-Based Models
without Sampling", ICML 2020; the math in ``stein_core.lsd``).

A critic f_φ: ℝᴰ → ℝᴰ (an MLP, ``critic``) maximises

    L(θ, φ) = E_q[s_θ(x)ᵀ f_φ(x) + tr ∇f_φ(x)] − λ E_q‖f_φ(x)‖²,

and the model (its score s_θ) minimises the same value at the current critic: only E[s_θᵀ f_φ] depends on θ, so
the model's update descends that term alone, with f_φ(x) a value (the same gradient, without the trace's second
backward pass). One loop step takes
``critic_steps`` critic updates, each on its own global batch (``ctx.draw()`` after the step's batch), then one
model update on another; each module has its own Adam (``critic_optimizer``; the model's is ``lr``). The trace is
exact up to ``exact_trace_max_dim`` dimensions (one backward pass per dimension) and Hutchinson's estimate with
Gaussian probes above (one pass; the probes drawn from the step's generator for the global batch, so that ranks
and resumed runs draw the same ones).

Distributed: every loss is a mean of per-example terms on this rank's slice; the modules are not DDP-wrapped (the
trace makes the critic's loss a double backward) and the gradients are averaged over the ranks
(``ctx.average_gradients``), what DDP computes.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from tasks.families._critic import OptimizerSection, adam
from tasks.families._stein import SteinFamily, SteinTrain, model_score
from tasks.families.base import StepContext, TrainState


class LSDTrain(SteinTrain):
    family: Literal["lsd"]
    lam: float = Field(0.5, gt=0, le=1e6, description="λ, the weight of the critic's L2 penalty E‖f‖²")
    critic_steps: int = Field(5, ge=1, le=100_000, description="critic updates per model update")
    critic_hidden: int = Field(300, ge=1, le=65536, description="width of the critic MLP's hidden layers")
    critic_layers: int = Field(2, ge=1, le=64, description="hidden layers of the critic MLP")
    critic_optimizer: OptimizerSection = OptimizerSection(lr=1e-3, beta1=0.9, beta2=0.999)
    exact_trace_max_dim: int = Field(20, ge=0, le=100_000, description="tr ∇f exact up to this dimension, "
                                     "Hutchinson's estimate above")


class LSDFamily(SteinFamily):
    name = "lsd"
    config = LSDTrain
    loss_key = "lsd"
    ddp = False

    def build(self, cfg: LSDTrain, shape) -> dict[str, Any]:
        from stein_core.critics import MLPCritic

        dim = math.prod(shape)
        return super().build(cfg, shape) | {
            "critic": MLPCritic(dim, out_dim=dim, hidden=cfg.critic_hidden, n_layers=cfg.critic_layers)}

    def optimizers(self, cfg: LSDTrain, modules) -> dict[str, Any]:
        import torch

        return {"model": torch.optim.Adam(modules["model"].parameters(), lr=cfg.lr),
                "critic": adam(modules["critic"], cfg.critic_optimizer)}

    def lr_schedule(self, cfg: LSDTrain, name: str) -> str:
        return cfg.lr_schedule if name == "model" else cfg.critic_optimizer.lr_schedule

    def step(self, state: TrainState, batch, ctx: StepContext, cfg: LSDTrain) -> dict[str, Any]:
        import torch

        from stein_core.lsd import lsd_objective

        model, critic = state.modules["model"], state.modules["critic"]
        opt = state.optimizers
        exact = batch.shape[-1] <= cfg.exact_trace_max_dim

        def probes(global_x):  # Hutchinson's probes for the global batch, this rank's rows (None: exact trace)
            return None if exact else ctx.local(torch.randn(global_x.shape, generator=ctx.generator,
                                                            device=global_x.device, dtype=global_x.dtype))

        values, steins = [], []
        for i in range(cfg.critic_steps):
            global_x = batch if i == 0 else ctx.draw()
            noise, x = probes(global_x), ctx.local(global_x)
            with torch.no_grad():  # the critic's update needs the model's score as a value only
                score = model_score(model, x, cfg.model.kind, create_graph=False)
            value, stein = lsd_objective(x, score.detach(), critic, cfg.lam, noise=noise)
            opt["critic"].zero_grad(set_to_none=True)
            (-value).backward()  # ascent in the critic
            ctx.average_gradients(critic)
            opt["critic"].step()
            values.append(value.detach())
            steins.append(stein.detach())
        # the model's update at the current critic: of the objective only mean(s_θᵀ f) depends on θ, so its gradient
        # is that of mean(s_θ(x)ᵀ f(x)) with f a value (no trace, no second backward pass)
        x = ctx.local(ctx.draw())
        with torch.no_grad():
            f = critic(x)
        loss = (model_score(model, x, cfg.model.kind) * f).sum(-1).mean()
        opt["model"].zero_grad(set_to_none=True)
        loss.backward()
        ctx.average_gradients(model)
        opt["model"].step()
        return {"lsd": torch.stack(values), "stein": torch.stack(steins), "model_stein_term": loss.detach()}


#: The family this module registers.
FAMILY = LSDFamily()
