"""Family ``ksd``: an unnormalised model learned by minimising the kernelized Stein discrepancy (Liu, Lee & Jordan,
ICML 2016; Chwialkowski, Strathmann & Gretton, ICML 2016) between the data and the model.

The loss is the U-statistic KSD²(q, p_θ) = 1/(B(B−1)) Σ_{i≠j} u_θ(x_i, x_j) of a data batch under an RBF kernel at
the median-heuristic bandwidth of that batch (``stein_core.discrepancies.ksd``, closed form; the bandwidth is
detached). The model enters through its score s_θ(x_i) alone; the U-statistic is an unbiased estimate of
KSD², zero in expectation at the true model, and so is its θ-gradient there.

Distributed: the scores of this rank's rows carry the gradient and the others' come by ``ctx.gather``, so each
rank's backward gives its rows' part of the global U-statistic's gradient and ``ctx.sum_gradients`` adds the
parts. The model is not DDP-wrapped (``ddp = False``): an energy model's score is itself a gradient, and the
loss's backward through it is a double backward, which DDP's reducer does not support.
"""

from __future__ import annotations

from typing import Any, Literal

from tasks.families._stein import SteinFamily, SteinTrain, model_score
from tasks.families.base import StepContext, TrainState


class KSDTrain(SteinTrain):
    family: Literal["ksd"]


class KSDFamily(SteinFamily):
    name = "ksd"
    config = KSDTrain
    loss_key = "ksd"
    ddp = False

    def step(self, state: TrainState, batch, ctx: StepContext, cfg: KSDTrain) -> dict[str, Any]:
        from stein_core.discrepancies import ksd, median_rbf

        model = state.modules["model"]
        score = ctx.gather(model_score(model, ctx.local(batch), cfg.model.kind))  # [B, d], this rank's rows live
        loss = ksd(batch, score, median_rbf(batch), statistic="u")
        opt = state.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ctx.sum_gradients(model)
        opt.step()
        return {"ksd": loss.detach()}


#: The family this module registers.
FAMILY = KSDFamily()
