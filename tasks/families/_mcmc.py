"""``sampler: mcmc`` for every energy-based family (``Family.unnormalised``): the family's model, loaded as usual,
wrapped so that it samples by MCMC on its energy with ``stein_core.samplers`` (ULA, MALA, HMC or kinetic Langevin,
:func:`stein_core.samplers.by_name` and :func:`~stein_core.samplers.run_chain`).
:func:`tasks.families.loading.load_model` does the wrapping; a family needs nothing of its own.
"""

from __future__ import annotations

import math

from tasks.config.sections import ConfigError
from tasks.families.base import Model


class MCMCModel(Model):
    """``base``'s density exp(−E(x)/T) sampled by the chain the sample section ``section`` names
    (``tasks.config.sections.MCMCSample``): each ``sample(n)`` call runs ``n`` chains for ``n_steps`` steps, one
    progress tick per step, and returns their final states ``[n, d]``. ``base.log_prob(x) = −E(x)`` must be
    differentiable in ``x``."""

    def __init__(self, base: Model, section, *, device="cpu"):
        self.base, self.section, self.device = base, section, device
        self.shape = tuple(base.shape)
        self.dim = math.prod(self.shape)
        self.log_normaliser, self.chain_start = base.log_normaliser, base.chain_start
        self._accepted = self._proposed = 0
        if section.start == "buffer" and base.chain_start is None:
            raise ConfigError("sample", "start", "buffer: this model was trained without a replay buffer (only "
                              "ebm with negatives: pcd keeps one); start from noise")

    def score(self, x):
        return self.base.score(x)

    def energy(self, x):
        return self.base.energy(x)

    def diagnostics(self) -> dict[str, float]:
        return {"accept_rate": self._accepted / self._proposed} if self._proposed else {}

    def ticks(self, n: int) -> int:
        return self.section.n_steps

    def start(self, n: int, generator):
        import torch

        s = self.section
        if s.start == "buffer":
            pool = self.chain_start.to(self.device)
            return pool[torch.randint(len(pool), (n,), generator=generator, device=generator.device).to(self.device)]
        return s.init_scale * torch.randn(n, self.dim, generator=generator, device=self.device)

    def sample(self, n: int, *, generator, callback=None):
        from stein_core.samplers import by_name, run_chain

        s = self.section
        t = s.temperature
        log_prob = self.base.log_prob if t == 1.0 else (lambda x: self.base.log_prob(x) / t)
        chain = by_name(s.method, log_prob, s.step_size, friction=s.friction, n_leapfrog=s.leapfrog_steps)
        run = run_chain(*chain, self.start(n, generator), s.n_steps, thin=s.n_steps, generator=generator,
                        callback=None if callback is None else (lambda i, _state: callback(1)))
        if s.method in ("mala", "hmc"):  # the chains' own acceptance count (a low rate: the chains barely moved)
            self._accepted += int(run.state.n_accepted.sum())
            self._proposed += n * s.n_steps
        return run.state.position.detach()
