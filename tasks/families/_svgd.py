"""``sampler: svgd`` for every family whose model has a score (``Family.has_score``): the family's model, loaded as
usual, wrapped so that it samples by Stein variational gradient descent on its ``score`` (Liu & Wang, NeurIPS 2016;
``stein_core.samplers.svgd``). :func:`tasks.families.loading.load_model` does the wrapping; a family needs nothing of its own.
"""

from __future__ import annotations

import math

from tasks.families.base import Model


class SVGDModel(Model):
    """``base``'s score sampled by SVGD with the sample section ``section`` (``tasks.config.sections.SVGDSample``):
    each ``sample(n)`` call is one run of ``n`` particles (the sample stage's batch), from
    ``x_0 ~ N(0, init_scale² I)`` drawn from the caller's generator, ``n_steps`` steps, one progress tick each.
    Particles are ``[n, d]`` (examples flattened, as ``Model.score`` takes them)."""

    def __init__(self, base: Model, section, *, device="cpu"):
        self.base, self.section, self.device = base, section, device
        self.shape = tuple(base.shape)
        self.dim = math.prod(self.shape)

    def score(self, x):
        return self.base.score(x)

    def ticks(self, n: int) -> int:
        return self.section.n_steps

    def sample(self, n: int, *, generator, callback=None):
        import torch

        from stein_core.samplers import run_chain, svgd

        s = self.section
        x0 = s.init_scale * torch.randn(n, self.dim, generator=generator, device=self.device)  # init: normal
        run = run_chain(*svgd(self.base.score, s.step_size, adaptive=s.adaptive), x0, s.n_steps, thin=s.n_steps,
                        generator=generator, callback=None if callback is None else (lambda i, _state: callback(1)))
        return run.state.position
