"""What the generator-critic families (``gebm``, ``mmdgan``) share: the generator of the ``agd``/``mmd`` families, a
critic network (an MLP for vectors, a DCGAN-style conv net for images), one Adam per module with its own learning
rate, betas and schedule, and the alternating schedule: k critic updates per generator update, with bursts of
more at the start and periodically (Arbel et al. 2021's trainer; WGAN's before it).

Each module has its own optimiser section (``generator_optimizer``, ``critic_optimizer``); the one-optimiser keys
``lr``/``lr_schedule`` of the other families are not keys here (a config that sets them is refused by name).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field

from tasks.config.sections import TrainBase, _Section
from tasks.families._generator import ConvGeneratorNet, MLPGeneratorNet


class OptimizerSection(_Section):
    """One module's Adam: learning rate, betas and schedule (one scheduler step per loop step)."""

    lr: float = Field(2e-4, gt=0, le=10)
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam's β₁ (0.5 in GAN and GEBM training)")
    beta2: float = Field(0.999, ge=0, lt=1)
    lr_schedule: Literal["cosine", "constant"] = "constant"


class MLPCriticNet(_Section):
    kind: Literal["mlp"]
    hidden: int = Field(128, ge=1, le=65536)
    n_layers: int = Field(3, ge=1, le=64)


class ConvCriticNet(_Section):
    """A DCGAN-style critic without normalisation layers (``stein_core.critics.ConvCritic``) for (C, H, W) images."""

    kind: Literal["conv"]
    base_channels: int = Field(32, ge=4, le=4096)


CriticNet = Annotated[MLPCriticNet | ConvCriticNet, Field(discriminator="kind")]


class CriticTrain(TrainBase):
    """A generator (``net``, as the ``agd``/``mmd`` families build it) and a critic, trained in turn."""

    net: Annotated[MLPGeneratorNet | ConvGeneratorNet, Field(discriminator="kind")] = MLPGeneratorNet(kind="mlp")
    generator_optimizer: OptimizerSection = OptimizerSection()
    critic_optimizer: OptimizerSection = OptimizerSection()
    burst_steps: int = Field(100, ge=1, le=100_000, description="critic updates at a burst step")
    burst_every: int = Field(500, ge=0, le=100_000_000, description="a burst every this many generator steps, "
                             "step 0 included; 0: only at step 0")
    penalty: float = Field(0.1, ge=0, le=1e6, description="λ, the weight of the critic's gradient penalty (0: none)")


def critic_updates(step: int, every_step: int, burst_steps: int, burst_every: int) -> int:
    """The critic updates before generator step ``step`` (0-based): ``burst_steps`` at step 0 and at every
    multiple of ``burst_every`` (none after step 0 when it is 0), else ``every_step``. A function of the step
    number alone: a resumed run and every DDP rank follow the same schedule."""
    if step == 0 or (burst_every and step % burst_every == 0):
        return burst_steps
    return every_step


def build_critic(net: MLPCriticNet | ConvCriticNet, shape: tuple[int, ...], out_dim: int):
    from stein_core.critics import ConvCritic, MLPCritic

    if net.kind == "conv":
        if len(shape) != 3:
            raise ValueError(f"a convolutional critic needs (C, H, W) images, the data have shape {shape}")
        return ConvCritic(tuple(shape), out_dim=out_dim, base_channels=net.base_channels)
    return MLPCritic(math.prod(shape), out_dim=out_dim, hidden=net.hidden, n_layers=net.n_layers)


def adam(module, section: OptimizerSection):
    import torch

    return torch.optim.Adam(module.parameters(), lr=section.lr, betas=(section.beta1, section.beta2))


def global_normal(ctx, rows: int, cols: int, like) -> Any:
    """``[rows, cols]`` standard normals drawn from the step's generator (the global batch's, identical on every
    rank), then this rank's slice: what one worker draws, split."""
    import torch

    return ctx.local(torch.randn(rows, cols, generator=ctx.generator, device=like.device, dtype=like.dtype))


def global_uniform(ctx, rows: int, like) -> Any:
    """``[rows]`` U[0, 1) draws from the step's generator, this rank's slice (interpolation weights)."""
    import torch

    return ctx.local(torch.rand(rows, generator=ctx.generator, device=like.device, dtype=like.dtype))
