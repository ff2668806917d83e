"""What the energy-based families (``ebm``, ``nce``, ``fce``) share: an energy network E(x) (an MLP for vectors, a
conv net for images: ``stein_core.critics``' critic nets with one output), density p(x) ∝ exp(−E(x)), and the loaded
model: ``energy``, ``log_prob = −E`` (differentiable in x), ``score = −∇E``, the learned log-normaliser where the
family learns one (log p = −E − c), and no sampler of its own: ``sampler: mcmc`` draws from it
(:mod:`tasks.families._mcmc`), ``sampler: svgd`` too (a score), and ``model_log_likelihood`` normalises it on a grid.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tasks.config.sections import OneOptimizerTrain
from tasks.families._critic import CriticNet, MLPCriticNet, build_critic
from tasks.families.base import Family, Model, build_from_checkpoint


class EnergyTrain(OneOptimizerTrain):
    """An energy network (``energy``) trained with Adam at ``lr``."""

    energy: CriticNet = Field(MLPCriticNet(kind="mlp"), description="the energy network E(x) -> a scalar")


class EnergyModel(Model):
    """A trained energy E(x): density ∝ exp(−E(x)); ``log_normaliser`` the learned c where there is one."""

    def __init__(self, net, shape, *, log_normaliser: float | None = None, chain_start=None, device="cpu"):
        self.net, self.shape, self.device = net, tuple(shape), device
        self.log_normaliser, self.chain_start = log_normaliser, chain_start

    def log_prob(self, x):
        """−E(x) ``[n]``, differentiable in ``x`` (the MCMC target)."""
        return -self.net(x).squeeze(-1)

    def energy(self, x):
        import torch

        with torch.no_grad():
            return self.net(x.to(self.device)).squeeze(-1)

    def score(self, x):
        from stein_core.distributions import score_from_log_prob

        return score_from_log_prob(self.log_prob)(x.to(self.device)).detach()

    def sample(self, n: int, *, generator, callback=None):
        raise ValueError("an energy-based model samples by MCMC: give it a sample section with sampler: mcmc")


class EnergyFamily(Family):
    """Base of the energy-based families: one module ``energy`` (and what a subclass adds), Adam at ``lr``."""

    config = EnergyTrain
    samplers = frozenset()  # sampler: mcmc (ENERGY_SAMPLERS) and svgd (SCORE_SAMPLERS) wrap the loaded model
    has_score = True
    has_energy = True
    unnormalised = True

    def build(self, cfg: EnergyTrain, shape) -> dict[str, Any]:
        return {"energy": build_critic(cfg.energy, shape, 1)}

    def load(self, ckpt, *, device="cpu", sampler=None) -> Model:
        import torch

        from stein_core.critics import ConvCritic, MLPCritic

        net = build_from_checkpoint(ckpt, "energy", (MLPCritic, ConvCritic)).to(device).eval()
        for p in net.parameters():
            p.requires_grad_(False)  # chains and scores differentiate in x only
        c = ckpt["modules"].get("log_normaliser")
        start = ckpt.get("chain_start")
        return EnergyModel(net, ckpt["shape"], log_normaliser=None if c is None else float(c["value"]),
                           chain_start=None if start is None else torch.as_tensor(start), device=device)
