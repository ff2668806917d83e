"""Family ``fce``: an energy-based model learned by flow contrastive estimation (Gao, Nijkamp, Kingma, Xu, Dai & Wu,
"Flow Contrastive Estimation of Energy-Based Models", CVPR 2020).

NCE (Gutmann & Hyvärinen, AISTATS 2010; the ``nce`` family) with ν = 1 and a normalising flow q_α as the noise,
trained against the energy-based model p_θ(x) = exp(−E(x) − c) (energy network ``energy``, learnable
log-normaliser ``log_normaliser``) on one value function (``stein_core.ebm.fce_value``)

    V(θ, α) = E_data[log D(x)] + E_{q_α}[log(1 − D(y))],   D(u) = p_θ(u) / (p_θ(u) + q_α(u)),

with log D = −softplus(−G) and log(1 − D) = −softplus(G), G = log p_θ − log q_α: V = −J, J the NCE loss with ν = 1
and the flow as the noise. Each loop step takes

- **one EBM update** ascending V in (θ, c) (the loss −V) on this rank's slice of the step's minibatch against as
  many samples of the flow, detached (for the EBM they are noise like any other);
- then **flow_steps flow updates** descending V in α, each on a batch of its own (``ctx.draw()``): V's gradient in
  α is taken through both the flow's density at the data and at its own samples and through the samples
  themselves (y = T_α(z), the reparameterised, pathwise gradient of E_{q_α}), i.e. the gradient of V as written.
  At the game's equilibrium the flow minimises the Jensen-Shannon divergence between (p_data + p_θ)/2 and q_α
  (Gao et al., sec. 3), which keeps it a hard but informative noise for the EBM.

``freeze_flow: true`` skips the flow updates: FCE with a frozen flow is NCE with ν = 1 and the flow as the noise.

The flow (``flow``: :func:`flow_noise_class`, a neural spline flow of ``zuko``, Durkan et al., NeurIPS 2019, with
coupling layers, ``passes=2``, so that sampling is one pass per layer as in Glow, the paper's flow) acts on the
data standardised per coordinate. Its shift and scale are buffers of the module set at step 0 from the step's
global minibatch and 8 more global draws (the same on every rank; saved and resumed with the weights): zuko's
splines transform [−5, 5] only, and data far outside it would be left to the base Gaussian.

Randomness: zuko draws its samples from torch's global RNG; here the flow never samples itself: the base normals
z are drawn for the global batch from the step's generator, each rank takes its slice and pushes it through the
flow's inverse transform with its log-Jacobian, so every draw is a pure function of (seed, step).

Distributed: the modules are not DDP-wrapped (two optimisers, and the flow update backpropagates through the energy
without updating it); every loss is a mean of per-example terms over this rank's rows, and after each backward the
updated modules' gradients are averaged over the ranks (``ctx.average_gradients``): what DDP computes.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

from pydantic import Field

from tasks.families._energy import EnergyFamily, EnergyTrain
from tasks.families.base import StepContext, TrainState

#: Global minibatches drawn at step 0, besides the step's own, to fit the flow's standardisation (9 B rows in all).
STANDARDISE_BATCHES = 8
#: Bins of each rational-quadratic spline (zuko's default).
SPLINE_BINS = 8


class FCETrain(EnergyTrain):
    family: Literal["fce"]
    flow_transforms: int = Field(3, ge=1, le=32, description="spline coupling layers of the flow")
    flow_hidden: int = Field(64, ge=1, le=4096, description="width of the 2 hidden layers of each layer's conditioner")
    flow_lr: float = Field(1e-3, gt=0, le=10, description="Adam learning rate of the flow (the energy and c use lr)")
    flow_steps: int = Field(1, ge=1, le=1000, description="flow updates per EBM update")
    freeze_flow: bool = Field(False, description="never update the flow: NCE with ν = 1 and the initial flow as noise")


def nsf_weight_count(dim: int, transforms: int, hidden: int, bins: int = SPLINE_BINS) -> int:
    """The trainable numbers of ``zuko.flows.NSF(dim, transforms=transforms, hidden_features=[hidden, hidden])``:
    per layer, a masked MLP dim -> hidden -> hidden -> dim (3 bins - 1) (widths, heights and inner derivatives of
    each coordinate's spline), with biases. A lower bound of its state (the masks are buffers of the same shapes)."""
    out = dim * (3 * bins - 1)
    return transforms * (dim * hidden + hidden + hidden * hidden + hidden + hidden * out + out)


@functools.cache
def flow_noise_class():
    """The ``flow`` module's class (built on first use: the family's module imports no torch)."""
    import torch
    from torch import nn

    class FlowNoise(nn.Module):
        """A normalising flow q(x) on ``[n, dim]`` rows: x = shift + scale ⊙ T⁻¹(z), z ~ N(0, I), T a zuko neural
        spline flow of ``transforms`` coupling layers with conditioners of 2 hidden layers of width ``hidden``;
        ``shift``/``scale`` ``[dim]`` are buffers (:meth:`standardise_`)."""

        def __init__(self, dim: int, transforms: int = 3, hidden: int = 64) -> None:
            super().__init__()
            import zuko

            from tasks.families.base import MAX_PARAMETERS

            self.model_args = {"dim": int(dim), "transforms": int(transforms), "hidden": int(hidden)}
            if min(dim, transforms, hidden) < 1:
                raise ValueError("dim, transforms and hidden must be >= 1")
            self.dim = int(dim)
            self.register_buffer("shift", torch.zeros(dim))
            self.register_buffer("scale", torch.ones(dim))

            def build():
                return zuko.flows.NSF(features=dim, transforms=transforms, hidden_features=[hidden, hidden],
                                      bins=SPLINE_BINS, passes=2)

            if self.shift.device.type != "meta":
                self.flow = build()
                return
            # On the meta device (sizes measured before anything is allocated): zuko computes its masks from values
            # (torch.unique, nonzero), which meta tensors lack. A flow too large for any machine is stood in for by
            # one tensor of its weight count, which base.too_large refuses; another is built on the CPU and moved.
            n = nsf_weight_count(dim, transforms, hidden)
            if n > MAX_PARAMETERS:
                self.flow = nn.ParameterDict({"weights": nn.Parameter(torch.empty(n))})
                return
            with torch.device("cpu"):
                self.flow = build()
            self.flow.to("meta")

        @torch.no_grad()
        def standardise_(self, x) -> None:
            """Set ``shift``/``scale`` to the mean and standard deviation of ``x [n, dim]`` per coordinate (a
            coordinate that is constant in ``x`` keeps scale 1)."""
            x64 = x.detach().to(torch.float64)
            std = x64.std(0)
            self.shift.copy_(x64.mean(0))
            self.scale.copy_(torch.where(std > 1e-12 * float(std.max().clamp_min(1e-300)), std, 1.0))

        def log_prob(self, x):
            """log q(x) ``[n]`` at ``x [n, dim]``."""
            u = (x - self.shift) / self.scale
            dist = self.flow()
            z, ladj = dist.transform.call_and_ladj(u)  # [n, dim], [n]
            return dist.base.log_prob(z) + ladj - self.scale.log().sum()

        def forward(self, x):
            return self.log_prob(x)

        def sample_and_log_prob(self, z):
            """The flow's samples of base normals ``z [n, dim]`` and their log q: ``([n, dim], [n])``, differentiable
            in the flow's weights through both (the pathwise gradient)."""
            dist = self.flow()
            u, ladj = dist.transform.inv.call_and_ladj(z)  # ladj = log|det ∂u/∂z|
            return self.shift + self.scale * u, dist.base.log_prob(z) - ladj - self.scale.log().sum()

    return FlowNoise


def _base_normals(ctx: StepContext, rows: int, dim: int, like):
    """``[rows, dim]`` standard normals for the global batch from the step's generator, this rank's slice."""
    import torch

    return ctx.local(torch.randn(rows, dim, generator=ctx.generator, device=ctx.generator.device,
                                 dtype=like.dtype).to(like.device))


class FCEFamily(EnergyFamily):
    name = "fce"
    config = FCETrain
    loss_key = "fce_value"
    ddp = False

    def build(self, cfg: FCETrain, shape) -> dict[str, Any]:
        from stein_core.critics import Scalar

        return {**super().build(cfg, shape), "log_normaliser": Scalar(0.0),
                "flow": flow_noise_class()(math.prod(shape), cfg.flow_transforms, cfg.flow_hidden)}

    def optimizers(self, cfg: FCETrain, modules) -> dict[str, Any]:
        """One Adam for the EBM (energy and c) at ``lr``, one for the flow at ``flow_lr`` (none with
        ``freeze_flow``); both follow ``lr_schedule`` (the default :meth:`lr_schedule`)."""
        import torch

        ebm = [*modules["energy"].parameters(), *modules["log_normaliser"].parameters()]
        flow = {} if cfg.freeze_flow else {"flow": torch.optim.Adam(modules["flow"].parameters(), lr=cfg.flow_lr)}
        return {"energy": torch.optim.Adam(ebm, lr=cfg.lr), **flow}

    def step(self, state: TrainState, batch, ctx: StepContext, cfg: FCETrain) -> dict[str, Any]:
        import torch

        from stein_core.ebm import fce_value

        energy, c, flow = (state.modules[k] for k in ("energy", "log_normaliser", "flow"))
        opt = state.optimizers
        big, dim = batch.shape
        if ctx.step == 0:
            rows = torch.cat([batch, *(ctx.draw() for _ in range(STANDARDISE_BATCHES))])
            if not bool(torch.isfinite(rows).all()):
                raise ValueError(f"the {rows.shape[0]} data rows drawn at step 0 to standardise the flow hold "
                                 "non-finite values: the training data must be finite")
            flow.standardise_(rows)

        def value(x, y, log_q_x, log_q_y):
            e = energy(torch.cat([x, y])).squeeze(-1)  # [b + b]
            b = x.shape[0]
            return fce_value(-e[:b] - c(), log_q_x, -e[b:] - c(), log_q_y)

        # the EBM ascends V against the flow's samples (detached)
        x = ctx.local(batch)
        with torch.no_grad():
            y, log_q_y = flow.sample_and_log_prob(_base_normals(ctx, big, dim, batch))
            log_q_x = flow.log_prob(x)
        v = value(x, y, log_q_x, log_q_y)
        opt["energy"].zero_grad(set_to_none=True)
        (-v).backward()
        ctx.average_gradients(energy, c)
        opt["energy"].step()
        out = {"fce_value": v.detach(), "log_normaliser": c().detach().clone()}
        if cfg.freeze_flow:
            return out
        # the flow descends V, each update on a batch of its own
        weights = list(flow.parameters())
        flow_values = []
        for _ in range(cfg.flow_steps):
            x = ctx.local(ctx.draw())
            y, log_q_y = flow.sample_and_log_prob(_base_normals(ctx, big, dim, batch))
            v_flow = value(x, y, flow.log_prob(x), log_q_y)
            opt["flow"].zero_grad(set_to_none=True)
            v_flow.backward(inputs=weights)  # the energy and c are held fixed
            ctx.average_gradients(flow)
            opt["flow"].step()
            flow_values.append(v_flow.detach())
        return out | {"flow_value": torch.stack(flow_values)}

    def load_flow(self, ckpt, *, device="cpu"):
        """The trained flow of a checkpoint (the noise the EBM was last contrasted with), on ``device``."""
        from tasks.families.base import build_from_checkpoint

        return build_from_checkpoint(ckpt, "flow", (flow_noise_class(),)).to(device).eval()


#: The family this module registers.
FAMILY = FCEFamily()
