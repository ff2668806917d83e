"""Family ``ebm``: an energy-based model p(x) ∝ exp(−E(x)) trained by maximum likelihood with MCMC negatives.

The gradient of the negative log-likelihood is E_data[∇θE(x)] − E_p[∇θE(x)] (∇θ log Z = −E_p[∇θE]), so the loss
is ``stein_core.ebm.cd_loss``: mean E(x⁺) − mean E(x⁻) over data x⁺ and detached negatives x⁻ from a Langevin
chain on p, plus ``l2`` times the mean squared energies (Du & Mordatch, NeurIPS 2019). The chain is
``stein_core.samplers``' ULA or MALA on exp(−E(x)/T): ULA's step x ← x − α∇E(x)/T + √(2α) ξ ties the step α and the
noise by the temperature T (T = 1: Langevin on the model itself; T < 1 sharpens it, the "lower noise" of the EBM
literature stated as a target rather than a hack). ``negatives``:

- ``cd``: contrastive divergence, CD-k (Hinton, Neural Computation 2002): k = ``mcmc_steps`` steps from the data;
- ``short_run``: k steps from noise N(0, init_scale² I) every step (Nijkamp, Hill, Zhu & Wu, NeurIPS 2019);
- ``pcd``: persistent chains (Tieleman, ICML 2008) kept in a replay buffer (Du & Mordatch 2019): each step a chain
  continues from a buffer entry, or from noise with probability ``reinit``; its end goes back to the entry.

The buffer holds ``buffer_size`` states as ``buffer_size / batch_size`` generations of ``batch_size`` slots: the
chain of global row i always continues slot i of a generation drawn for it. With N workers rank r owns the slots
of its rows (its slice of the batch) in every generation, its chains get the noise one process would give them
(``stein_core._random.RowShard``), and its part of the buffer is per-rank training state
(:class:`ReplayBuffer`, saved from every rank, resharded for another worker count): N workers and a resumed run
continue the chains of one uninterrupted worker exactly.

Sampling: ``sampler: mcmc`` (any chain, from noise or from the replay buffer saved with the model).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tasks.families._energy import EnergyFamily, EnergyTrain
from tasks.families.base import StepContext, TrainState


class EBMTrain(EnergyTrain):
    family: Literal["ebm"]
    negatives: Literal["cd", "pcd", "short_run"] = Field("pcd", description="where the negative chains start")
    mcmc: Literal["ula", "mala"] = Field("ula", description="the chain: unadjusted Langevin, or MALA (exact target)")
    mcmc_steps: int = Field(20, ge=1, le=100_000, description="k, chain steps per training step")
    step_size: float = Field(1e-2, gt=0, le=10, description="α of x ← x − α∇E(x)/T + √(2α) ξ")
    temperature: float = Field(1.0, gt=0, le=1e6, description="T: the chain targets exp(−E(x)/T)")
    init_scale: float = Field(1.0, gt=0, le=1e6, description="noise starts: N(0, init_scale² I)")
    buffer_size: int = Field(10_000, ge=1, le=10_000_000, description="pcd: chain states kept (a multiple of batch_size)")
    reinit: float = Field(0.05, ge=0, le=1, description="pcd: share of chains restarted from noise each step")
    l2: float = Field(0.0, ge=0, le=1e6, description="weight of the mean squared energies of data and negatives")

    @model_validator(mode="after")
    def _buffer_of_whole_generations(self):
        if self.negatives == "pcd" and self.buffer_size % self.batch_size:
            raise ValueError(f"buffer_size {self.buffer_size} must be a multiple of batch_size {self.batch_size}: the "
                             "buffer holds generations of one chain per row of the batch")
        return self


class ReplayBuffer:
    """A rank's part of the persistent chains: ``x [b, K, d]``, the K generations of the b slots of its rows.

    ``per_rank``: the loop saves every rank's ``state_dict`` and gives each its own back; :meth:`reshard` rebuilds a
    rank's part for another worker count from all of them (the slots are the global batch's rows, in rank order)."""

    per_rank = True

    def __init__(self, generations: int):
        self.generations = generations
        self.x = None  # filled at the first step, from the step's generator

    def state_dict(self) -> dict[str, Any]:
        import torch

        return {"x": self.x if self.x is not None else torch.empty(0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        x = state["x"]
        self.x = x.clone() if x.numel() else None

    @staticmethod
    def reshard(states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        import torch

        parts = [s["x"] for s in states]
        if any(p.numel() == 0 for p in parts):
            return {"x": torch.empty(0)}
        every = torch.cat(parts)  # [B, K, d]: the slots of the global batch in rank order
        b = every.shape[0] // world
        return {"x": every[rank * b:(rank + 1) * b]}

    def chains(self) -> Any:
        """Every state of this part ``[b·K, d]`` (the model's chain starts for ``sampler: mcmc, start: buffer``)."""
        return self.x.reshape(-1, self.x.shape[-1])


def _noise(ctx: StepContext, rows: int, dim: int, scale: float, like, shard) -> Any:
    from stein_core._random import randn

    return scale * randn((rows, dim), like=like, generator=shard)


class EBMFamily(EnergyFamily):
    name = "ebm"
    config = EBMTrain
    loss_key = "cd_loss"

    def init_extra(self, cfg: EBMTrain, modules) -> dict[str, Any]:
        return {"buffer": ReplayBuffer(cfg.buffer_size // cfg.batch_size)} if cfg.negatives == "pcd" else {}

    def step(self, state: TrainState, batch, ctx: StepContext, cfg: EBMTrain) -> dict[str, Any]:
        import torch

        from stein_core._random import RowShard, rand, randint
        from stein_core.ebm import cd_loss
        from stein_core.samplers import by_name, run_chain

        big, dim = batch.shape
        x_pos = ctx.local(batch)
        b = x_pos.shape[0]
        shard = RowShard(ctx.generator, big, ctx.rank * b)  # this rank's rows of every global draw
        net = state.modules["energy"]
        if cfg.negatives == "cd":
            x0 = x_pos
        elif cfg.negatives == "short_run":
            x0 = _noise(ctx, b, dim, cfg.init_scale, x_pos, shard)
        else:
            buf = state.extra["buffer"]
            if buf.x is None:  # the first step: every generation of every slot starts as noise
                start = _noise(ctx, b, dim * buf.generations, cfg.init_scale, x_pos, shard)
                buf.x = start.reshape(b, buf.generations, dim)
            slot = randint(buf.generations, (b,), device=x_pos.device, generator=shard)
            restart = rand((b,), like=x_pos, generator=shard) < cfg.reinit
            x0 = torch.where(restart[:, None], _noise(ctx, b, dim, cfg.init_scale, x_pos, shard),
                             buf.x[torch.arange(b, device=x_pos.device), slot])
        t = cfg.temperature
        chain = by_name(cfg.mcmc, lambda x: -net(x).squeeze(-1) / t, cfg.step_size)
        run = run_chain(*chain, x0, cfg.mcmc_steps, thin=cfg.mcmc_steps, generator=shard)
        x_neg = run.state.position.detach()
        if cfg.negatives == "pcd":
            buf.x[torch.arange(b, device=x_pos.device), slot] = x_neg
        energies = state.trained["energy"](torch.cat([x_pos, x_neg])).squeeze(-1)  # one forward: DDP's one pass
        e_pos, e_neg = energies[:b], energies[b:]
        loss = cd_loss(e_pos, e_neg, l2=cfg.l2)
        opt = state.optimizers["energy"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out = {"cd_loss": loss.detach(), "energy_pos": e_pos.detach().mean(), "energy_neg": e_neg.detach().mean()}
        if cfg.mcmc == "mala":
            out["accept_rate"] = run.state.n_accepted.to(x_neg.dtype).mean() / cfg.mcmc_steps
        return out

    def export(self, cfg: EBMTrain, state: dict) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {"weights": state["modules"]}
        saved = state["extra"].get("buffer")
        if saved is not None and all(s["x"].numel() for s in saved["ranks"]):
            every = torch.cat([s["x"] for s in saved["ranks"]])  # [B, K, d]
            out["chain_start"] = every.reshape(-1, every.shape[-1])
        return out

    def live_model(self, state: TrainState, cfg: EBMTrain, shape):
        return None  # sampling by MCMC along training would cost more than the training


#: The family this module registers (``tasks.families.FAMILY_MODULES``).
FAMILY = EBMFamily()
