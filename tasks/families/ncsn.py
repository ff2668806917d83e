"""Family ``ncsn``: a noise-conditional score network trained by denoising score matching over a geometric noise
ladder (Song & Ermon, "Generative Modeling by Estimating Gradients of the Data Distribution", NeurIPS 2019), an
MLP for vectors or a conv U-Net for images, optionally sampled with an exponential moving average of its weights
(Song & Ermon, "Improved Techniques for Training Score-Based Generative Models", NeurIPS 2020, technique 5).
Sampled by annealed Langevin dynamics, or by plain Langevin at the smallest noise level; its score is the
network at σ_L.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from tasks.config.sections import OneOptimizerTrain, _Section
from tasks.families.base import Family, Model, StepContext, TrainState


class MLPScoreNet(_Section):
    kind: Literal["mlp"]
    hidden: int = Field(128, ge=1, le=65536)
    n_layers: int = Field(3, ge=1, le=64)


class ConvScoreNet(_Section):
    """A noise-conditional U-Net (``stein_core.NoiseConditionalConvNet``) for (C, H, W) images."""

    kind: Literal["conv"]
    base_channels: int = Field(16, ge=4, le=4096)
    channel_mults: list[Annotated[int, Field(ge=1, le=64)]] = Field(default_factory=lambda: [1, 2, 2], min_length=1,
                                                                max_length=8)
    num_res_blocks: int = Field(1, ge=1, le=16)


class NCSNTrain(OneOptimizerTrain):
    """Denoising score matching over σ_1 > … > σ_L with λ(σ) = σ² (NCSN)."""

    family: Literal["ncsn"]
    sigma_max: float = Field(20.0, gt=0, le=1e6, description="σ_1, the largest noise level")
    sigma_min: float = Field(0.1, gt=0, le=1e6, description="σ_L, the smallest noise level")
    n_sigmas: int = Field(10, ge=1, le=10_000)
    embed_dim: int = Field(32, ge=2, le=4096)
    net: Annotated[MLPScoreNet | ConvScoreNet, Field(discriminator="kind")] = MLPScoreNet(kind="mlp")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="sample with an EMA of the weights; 0 turns it off")

    @model_validator(mode="after")
    def _check(self):
        if self.n_sigmas > 1 and not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max (σ_1={self.sigma_max}) must be larger than sigma_min (σ_L={self.sigma_min})")
        if self.n_sigmas == 1 and self.sigma_max != self.sigma_min:
            raise ValueError("with n_sigmas=1, sigma_max and sigma_min must be equal")
        return self


def _sigmas(cfg: NCSNTrain, device="cpu"):
    from stein_core.score_matching import geometric_sigmas

    return geometric_sigmas(cfg.sigma_max, cfg.sigma_min, cfg.n_sigmas, device=device)


def build_score_net(net_cfg: MLPScoreNet | ConvScoreNet, embed_dim: int, shape: tuple[int, ...]):
    from stein_core.nets import NoiseConditionalConvNet, NoiseConditionalMLP

    if net_cfg.kind == "conv":
        if len(shape) != 3:
            raise ValueError(f"a convolutional score network needs (C, H, W) images, the data have shape {shape}")
        c, h, w = shape
        return NoiseConditionalConvNet(
            in_channels=c, image_size=(h, w), base_channels=net_cfg.base_channels,
            channel_mults=tuple(net_cfg.channel_mults), num_res_blocks=net_cfg.num_res_blocks, embed_dim=embed_dim,
        )
    return NoiseConditionalMLP(dim=math.prod(shape), hidden=net_cfg.hidden, n_layers=net_cfg.n_layers, embed_dim=embed_dim)


#: the classes a checkpoint of this family may name (nothing else is instantiated from a file)
_NET_CLASSES = ("NoiseConditionalMLP", "NoiseConditionalConvNet")


class ScoreNetModel(Model):
    """A trained score network: annealed Langevin (or plain Langevin at σ_L) samples, and its score at σ_L."""

    def __init__(self, net, sigmas, shape, sampler=None):
        self.net, self.sigmas, self.shape, self.sampler = net, sigmas, tuple(shape), sampler
        self.dim = math.prod(self.shape)

    def score_at(self, x, sigma):
        import torch

        with torch.no_grad():
            return self.net(x, sigma)

    def score(self, x):
        return self.score_at(x, self.sigmas[-1])

    def ticks(self, n: int) -> int:
        s = self.sampler
        return len(self.sigmas) if s is None or s.sampler == "annealed_langevin" else s.n_steps

    def sample(self, n: int, *, generator, callback=None):
        import torch

        from stein_core.samplers import annealed_langevin, run_chain, ula

        s = self.sampler
        if s is None:
            raise ValueError("a score network samples with a sample section (annealed_langevin or langevin)")
        device = self.sigmas.device
        if s.sampler == "annealed_langevin":  # x_0 ~ N(0, σ_1² I) (NCSNv2)
            x0 = self.sigmas[0] * torch.randn(n, self.dim, generator=generator, device=device)
            return annealed_langevin(
                self.score_at, x0, self.sigmas, eps=s.eps, n_steps_each=s.n_steps_each, generator=generator,
                denoise=s.denoise, callback=None if callback is None else (lambda i, _x: callback(1)),
            )
        init_std = s.init_std if s.init_std is not None else float(self.sigmas[0])
        x0 = init_std * torch.randn(n, self.dim, generator=generator, device=device)
        run = run_chain(*ula(self.score, s.step_size), x0, s.n_steps, thin=s.n_steps, generator=generator,
                        callback=None if callback is None else (lambda i, _state: callback(1)))
        return run.state.position


class NCSNFamily(Family):
    name = "ncsn"
    config = NCSNTrain
    samplers = frozenset({"annealed_langevin", "langevin"})
    has_score = True
    noise_conditional = True
    loss_key = "dsm_loss"

    def build(self, cfg: NCSNTrain, shape):
        return {"score": build_score_net(cfg.net, cfg.embed_dim, shape)}

    def init_extra(self, cfg: NCSNTrain, modules):
        from stein_core.ema import EMA

        return {"ema": EMA(modules["score"], decay=cfg.ema_decay)} if cfg.ema_decay > 0 else {}

    def objective(self, cfg: NCSNTrain, device):
        from stein_core.score_matching import get_dsm_loss_fn

        return get_dsm_loss_fn(_sigmas(cfg, device))

    def step(self, state: TrainState, batch, ctx: StepContext, cfg: NCSNTrain) -> dict[str, Any]:
        import torch

        # the global batch's noise, drawn on every rank alike; each rank takes its rows
        levels = torch.randint(cfg.n_sigmas, (batch.shape[0],), generator=ctx.generator, device=batch.device)
        noise = torch.randn(batch.shape, generator=ctx.generator, device=batch.device, dtype=batch.dtype)
        loss = state.objective(state.trained["score"], ctx.local(batch), levels=ctx.local(levels), noise=ctx.local(noise))
        opt = state.optimizers["score"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if "ema" in state.extra:
            state.extra["ema"].update(state.modules["score"])
        return {"dsm_loss": loss.detach()}

    def export(self, cfg: NCSNTrain, state: dict) -> dict[str, Any]:
        out: dict[str, Any] = {"sigmas": _sigmas(cfg).tolist()}
        if "ema" in state["extra"]:  # sample with the moving average; keep the raw weights beside it
            out |= {"weights": {"score": state["extra"]["ema"]["shadow"]}, "raw_modules": state["modules"],
                    "ema_decay": state["extra"]["ema"]["decay"]}
        else:
            out["weights"] = state["modules"]
        return out

    def load(self, ckpt, *, device="cpu", sampler=None) -> ScoreNetModel:
        import torch

        from tasks.families.base import build_from_checkpoint

        net = build_from_checkpoint(ckpt, "score", _NET_CLASSES)  # weights loaded
        net.to(device).eval()
        sigmas = torch.tensor(ckpt["sigmas"], dtype=torch.float32, device=device)
        return ScoreNetModel(net, sigmas, ckpt["shape"], sampler)

    def live_model(self, state: TrainState, cfg: NCSNTrain, shape):
        return None  # annealed Langevin inside the training loop would cost more than the training itself


#: The family this module registers (``tasks.families.FAMILY_MODULES``).
FAMILY = NCSNFamily()
