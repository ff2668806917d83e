"""Family ``nce``: an energy-based model learned by noise-contrastive estimation (Gutmann & Hyvärinen,
"Noise-contrastive estimation: A new estimation principle for unnormalized statistical models", AISTATS 2010;
JMLR 13, 2012).

The model is log p_m(x) = −E(x) − c, with the energy network E (``energy``) and the log-normaliser c a learnable
scalar of its own (``log_normaliser``). A classifier with the logit G(u) = log p_m(u) − log ν − log q(u) tells the
data x from ν times as many samples y of a noise q; its logistic loss (``stein_core.ebm.nce_loss``)

    J(E, c) = E_data[softplus(−G(x))] + ν E_q[softplus(G(y))]

is minimised in E and c together. Its minimiser is p_m = p_data with ∫ exp(−E − c) = 1: the normaliser is learned,
not computed, and c is what the model claims log ∫ exp(−E) to be (the loaded model's ``log_normaliser``; another
part of the pipeline checks it against a grid integral). c and the output bias of E are redundant as far as the
density exp(−E)/Z goes; the loss still fixes c as the normaliser of this particular E.

The noise q is a Gaussian with the data's mean and covariance (``stein_core.ebm.GaussianNoise``; JMLR 2012,
sec. 4), fitted at step 0 on the step's global minibatch and :data:`NOISE_FIT_BATCHES` more global draws (every
rank sees the same global batches, so every rank fits the same Gaussian). It is training state, not a module: an
extra-state object saved in every checkpoint and restored on resume, and written beside the weights of the model
checkpoint (``noise``: its mean and Cholesky factor).

Each step draws round(ν B) global noise samples from q with the step's generator (B the global batch size; ν B
must be a whole number, and a multiple of the workers) and takes this rank's slice of data and noise. The loss is a
mean of per-example terms over each, so DDP's average of the ranks' gradients is the gradient of the global loss.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tasks.families._energy import EnergyFamily, EnergyTrain
from tasks.families.base import StepContext, TrainState

#: Global minibatches drawn at step 0, besides the step's own, to fit the noise (9 B rows in all).
NOISE_FIT_BATCHES = 8


class NCETrain(EnergyTrain):
    family: Literal["nce"]
    noise_ratio: float = Field(1.0, gt=0, le=100, description="ν: noise samples per data point (ν × batch_size "
                               "noise samples a step, a whole number)")
    log_normaliser_init: float = Field(0.0, ge=-1e6, le=1e6, description="the initial log-normaliser c "
                                       "(log p = −E − c)")

    @model_validator(mode="after")
    def _whole_noise_count(self):
        m = self.noise_ratio * self.batch_size
        if abs(m - round(m)) > 1e-9 * max(1.0, m) or round(m) < 1:
            raise ValueError(f"noise_ratio × batch_size = {self.noise_ratio} × {self.batch_size} = {m:g} noise "
                             "samples a step: it must be a whole number of at least 1 (choose noise_ratio = k / "
                             "batch_size for a whole k)")
        return self

    @property
    def noise_count(self) -> int:
        """The global noise samples of a step, ν B."""
        return round(self.noise_ratio * self.batch_size)


class FittedNoise:
    """The NCE noise as training state: unfitted (``state_dict() == {}``) until step 0 fits a
    ``stein_core.ebm.GaussianNoise`` to data rows, then that Gaussian's ``{"mean", "scale_tril"}``."""

    def __init__(self):
        self.gaussian = None  # stein_core.ebm.GaussianNoise once fitted

    def fit(self, x) -> None:
        """Fit the Gaussian to ``x [n, d]`` (the global rows of step 0)."""
        import torch

        from stein_core.ebm import GaussianNoise

        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"the {x.shape[0]} data rows drawn at step 0 to fit the NCE noise hold non-finite "
                             "values: the training data must be finite")
        self.gaussian = GaussianNoise.fit(x)

    def fitted(self):
        if self.gaussian is None:
            from tasks.config.sections import ConfigError

            raise ConfigError("checkpoint", "extra.noise", "the NCE noise was never fitted (it is fitted at step 0 "
                              "and saved with every later checkpoint): start the training afresh")
        return self.gaussian

    def state_dict(self) -> dict[str, Any]:
        return {} if self.gaussian is None else dict(self.gaussian.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from stein_core.ebm import GaussianNoise

        self.gaussian = GaussianNoise(**state) if state else None


def _fit_rows(batch, ctx: StepContext):
    """Step 0's global batch and :data:`NOISE_FIT_BATCHES` more global draws ``[9 B, d]``, the same on every rank."""
    import torch

    return torch.cat([batch, *(ctx.draw() for _ in range(NOISE_FIT_BATCHES))])


class NCEFamily(EnergyFamily):
    name = "nce"
    config = NCETrain
    loss_key = "nce_loss"

    def build(self, cfg: NCETrain, shape) -> dict[str, Any]:
        from stein_core.critics import Scalar

        return {**super().build(cfg, shape), "log_normaliser": Scalar(cfg.log_normaliser_init)}

    def init_extra(self, cfg: NCETrain, modules) -> dict[str, Any]:
        return {"noise": FittedNoise()}

    def step(self, state: TrainState, batch, ctx: StepContext, cfg: NCETrain) -> dict[str, Any]:
        import torch

        from stein_core.ebm import nce_loss

        noise = state.extra["noise"]
        if ctx.step == 0:
            noise.fit(_fit_rows(batch, ctx))
        q = noise.fitted()
        m = cfg.noise_count
        if m % ctx.world:
            raise ValueError(f"{m} noise samples a step (noise_ratio × batch_size) do not split over {ctx.world} "
                             "workers: choose noise_ratio so that they do")
        x = ctx.local(batch)  # [b, d]
        y = ctx.local(q.sample(m, generator=ctx.generator))  # [m / world, d]
        e = state.trained["energy"](torch.cat([x, y])).squeeze(-1)  # [b + m / world], one forward for DDP
        c = state.trained["log_normaliser"]()
        b = x.shape[0]
        loss = nce_loss(-e[:b] - c, q.log_prob(x), -e[b:] - c, q.log_prob(y), nu=cfg.noise_ratio)
        for opt in state.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in state.optimizers.values():
            opt.step()
        return {"nce_loss": loss.detach(), "log_normaliser": c.detach().clone()}

    def export(self, cfg: NCETrain, state: dict) -> dict[str, Any]:
        """The weights, and the fitted noise (``noise``: ``{"mean": [d], "scale_tril": [d, d]}``)."""
        return {"weights": state["modules"], "noise": dict(state["extra"]["noise"])}


#: The family this module registers.
FAMILY = NCEFamily()
