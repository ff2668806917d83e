"""What the implicit-generator families share: x = G(z), z ~ N(0, I), an MLP for vectors or a DCGAN-style conv
generator for images, a kernel over samples (the IMQ mixture at median-heuristic bandwidths), and one training
step around a batch objective ``loss_fn(x_gen, y_data) -> (loss, metrics)`` from ``stein_core.generators``.

The objectives couple the examples of a batch (kernel matrices over all of them), so a step gathers the global
generator batch (``StepContext.gather``: this rank's rows live) and scales the loss by the world size: DDP's
average of the ranks' partial gradients is the gradient one worker computes on the global batch.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field

from tasks.config.sections import OneOptimizerTrain, _Section
from tasks.families.base import Family, Model, StepContext, TrainState, build_from_checkpoint


class MLPGeneratorNet(_Section):
    kind: Literal["mlp"]
    latent_dim: int = Field(8, ge=1, le=4096)
    hidden: int = Field(128, ge=1, le=65536)
    n_layers: int = Field(3, ge=1, le=64)


class ConvGeneratorNet(_Section):
    """A DCGAN-style generator sized to the data's (C, H, W), sigmoid output (pixels in [0, 1])."""

    kind: Literal["conv"]
    latent_dim: int = Field(32, ge=1, le=4096)
    base_channels: int = Field(32, ge=4, le=4096)


class GeneratorKernel(_Section):
    """k = Σ_s IMQ(c = s·h, β) with h the median-heuristic bandwidth of the pooled batch (or a fixed ``bandwidth``)."""

    scales: list[Annotated[float, Field(gt=0, le=1e6)]] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0],
                                                             min_length=1, max_length=32)
    beta: float = Field(-0.5, lt=0, ge=-10)
    bandwidth: Annotated[float, Field(gt=0, le=1e6)] | Literal["median"] = "median"

    def make(self):
        from stein_core.generators import get_kernel_fn

        return get_kernel_fn(scales=tuple(self.scales), beta=self.beta, bandwidth=self.bandwidth)


class GeneratorTrain(OneOptimizerTrain):
    net: Annotated[MLPGeneratorNet | ConvGeneratorNet, Field(discriminator="kind")] = MLPGeneratorNet(kind="mlp")
    kernel: GeneratorKernel = GeneratorKernel()


_NET_CLASSES = ("MLPGenerator", "ConvGenerator")


class GeneratorModel(Model):
    """x = G(z), z ~ N(0, I) from the caller's generator."""

    def __init__(self, net, shape, device="cpu"):
        self.net, self.shape, self.device = net, tuple(shape), device

    def sample(self, n: int, *, generator, callback=None):
        import torch

        z = torch.randn(n, self.net.latent_dim, generator=generator, device=self.device)
        with torch.no_grad():
            x = self.net(z)
        if callback is not None:
            callback(1)
        return x


class GeneratorFamily(Family):
    """Base of the generator families: a subclass sets name/config/loss_key and ``objective(cfg)``."""

    samplers = frozenset({"generator"})

    def objective(self, cfg, device):
        """``loss_fn(x_gen [B, d], y_data [B, d]) -> (loss, metrics)`` of this family."""
        raise NotImplementedError

    def build(self, cfg: GeneratorTrain, shape):
        from stein_core.nets import ConvGenerator, MLPGenerator

        net = cfg.net
        if net.kind == "conv":
            if len(shape) != 3:
                raise ValueError(f"a convolutional generator needs (C, H, W) images, the data have shape {shape}")
            return {"generator": ConvGenerator(net.latent_dim, tuple(shape), base_channels=net.base_channels)}
        return {"generator": MLPGenerator(net.latent_dim, math.prod(shape), hidden=net.hidden, n_layers=net.n_layers)}

    def step(self, state: TrainState, batch, ctx: StepContext, cfg) -> dict[str, Any]:
        import torch

        gen = state.trained["generator"]
        latent = state.modules["generator"].latent_dim
        z = torch.randn(batch.shape[0], latent, generator=ctx.generator, device=batch.device, dtype=batch.dtype)
        x = ctx.gather(gen(ctx.local(z)))  # [B, d], this rank's rows live
        loss, metrics = state.objective(x, batch)
        opt = state.optimizers["generator"]
        opt.zero_grad(set_to_none=True)
        (loss * ctx.world).backward()
        opt.step()
        return {k: v.detach() for k, v in metrics.items()}

    def load(self, ckpt, *, device="cpu", sampler=None) -> GeneratorModel:
        net = build_from_checkpoint(ckpt, "generator", _NET_CLASSES)
        net.to(device).eval()
        return GeneratorModel(net, ckpt["shape"], device)

    def live_model(self, state: TrainState, cfg, shape) -> GeneratorModel:
        net = state.modules["generator"]
        return GeneratorModel(net, shape, next(net.parameters()).device)
