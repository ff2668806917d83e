"""Family ``maxsksd``: an unnormalised model learned by minimising the maximum sliced kernelized Stein discrepancy
(Gong, Li & Hernández-Lobato, "Sliced Kernelized Stein Discrepancy", ICLR 2021, Sec. 3.3 and 5.3).

The loss is SKSD(q, p_θ; r, g) = Σ_k D²_{r_k, g_k}, the sum over slices of 1-D KSD² U-statistics of the data
batch (``stein_core.discrepancies.sksd``; an RBF kernel at each projection's median-heuristic bandwidth). The
slice directions are parameters of their own module (``directions``: g, and r with ``variant: rg``), optimised by
gradient *ascent* alongside θ's descent, one Adam step each per loop step and renormalised to the unit sphere
after it (projected ascent, as ``stein_core.discrepancies.maxsksd`` does in its inner loop): the min-max of the
paper, in the alternating form its model-learning experiments use. ``variant: g`` fixes r to the standard basis
(R = D slices) and learns each g_r; ``variant: rg`` learns ``n_slices`` pairs (r, g), initialised at the first
basis vectors. The directions' state is a module: saved, restored and guarded like the model.

Distributed: as in ``ksd``, the scores of this rank's rows carry θ's gradient (``ctx.sum_gradients`` adds the
ranks' parts); the directions act on every row, so their gradient is already the global one on every rank.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

from pydantic import Field, model_validator

from tasks.families._stein import SteinFamily, SteinTrain, model_score
from tasks.families.base import StepContext, TrainState


class MaxSKSDTrain(SteinTrain):
    family: Literal["maxsksd"]
    variant: Literal["g", "rg"] = Field("g", description="g: r the standard basis, each g_r learned; rg: n_slices (r, g) learned")
    n_slices: int | None = Field(None, ge=1, le=100_000, description="slices of variant rg (null: the dimension)")
    directions_lr: float = Field(0.1, gt=0, le=10, description="Adam learning rate of the slice directions' ascent "
                                 "(at 1e-3 they lag behind the model, which then exploits them: ICA D = 10 ended below its start)")

    @model_validator(mode="after")
    def _slices_of_rg(self):
        if self.variant == "g" and self.n_slices is not None:
            raise ValueError("n_slices is for variant rg (variant g has one slice per dimension): remove it")
        return self


@functools.cache
def slice_directions_class():
    """The ``directions`` module's class (built on first use: the family's module imports no torch)."""
    import torch
    from torch import nn

    class SliceDirections(nn.Module):
        """Slice directions ``r, g [R, dim]``, initialised at the first R standard basis vectors with g = r;
        ``learn_r`` makes r a parameter too (else a buffer). :meth:`normalise_` projects them onto the sphere."""

        def __init__(self, dim: int, n_slices: int, learn_r: bool) -> None:
            super().__init__()
            self.model_args = {"dim": int(dim), "n_slices": int(n_slices), "learn_r": bool(learn_r)}
            basis = torch.eye(dim)[:n_slices]
            self.g = nn.Parameter(basis.clone())
            if learn_r:
                self.r = nn.Parameter(basis.clone())
            else:
                self.register_buffer("r", basis.clone())

        @torch.no_grad()
        def normalise_(self) -> None:
            for t in (self.g, self.r):
                t.div_(t.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    return SliceDirections


class MaxSKSDFamily(SteinFamily):
    name = "maxsksd"
    config = MaxSKSDTrain
    loss_key = "maxsksd"
    ddp = False

    def build(self, cfg: MaxSKSDTrain, shape) -> dict[str, Any]:
        modules = super().build(cfg, shape)
        dim = math.prod(shape)
        slices = dim if cfg.variant == "g" else min(cfg.n_slices or dim, dim)
        return modules | {"directions": slice_directions_class()(dim, slices, cfg.variant == "rg")}

    def optimizers(self, cfg: MaxSKSDTrain, modules) -> dict[str, Any]:
        import torch

        return {"model": torch.optim.Adam(modules["model"].parameters(), lr=cfg.lr),
                # ascent: Adam maximises the discrepancy in the directions
                "directions": torch.optim.Adam(modules["directions"].parameters(), lr=cfg.directions_lr, maximize=True)}

    def lr_schedule(self, cfg: MaxSKSDTrain, name: str) -> str:
        return cfg.lr_schedule if name == "model" else "constant"

    def step(self, state: TrainState, batch, ctx: StepContext, cfg: MaxSKSDTrain) -> dict[str, Any]:
        from stein_core.discrepancies import median_rbf, sksd

        model, dirs = state.modules["model"], state.modules["directions"]
        score = ctx.gather(model_score(model, ctx.local(batch), cfg.model.kind))  # [B, d], this rank's rows live
        unit = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731 - the objective at unit directions
        loss = sksd(batch, score, median_rbf, r=unit(dirs.r), g=unit(dirs.g), statistic="u")
        for opt in state.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        ctx.sum_gradients(model)  # the directions' gradient is already global: they see every row
        for opt in state.optimizers.values():
            opt.step()
        dirs.normalise_()
        return {"maxsksd": loss.detach()}


#: The family this module registers.
FAMILY = MaxSKSDFamily()
