"""Random-number helpers shared by every stochastic function of ``stein_core``.

All randomness goes through an explicit ``torch.Generator`` (or the caller's
global torch RNG when ``generator`` is ``None``). Draws are made on the
generator's device and then moved to the target device, so a CPU generator
can drive computation on any accelerator reproducibly.
"""

from __future__ import annotations

import torch

__all__ = ["randn", "randint"]


def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    like: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Standard normal draws of ``shape`` with the dtype and device of ``like``."""
    z = torch.randn(
        tuple(shape),
        generator=generator,
        device=_gen_device(generator, like.device),
        dtype=like.dtype,
    )
    return z.to(like.device)


def randint(
    high: int,
    shape: tuple[int, ...] | torch.Size,
    *,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform integers in ``[0, high)`` (dtype long) on ``device``."""
    i = torch.randint(
        0, high, tuple(shape), generator=generator, device=_gen_device(generator, device)
    )
    return i.to(device)
