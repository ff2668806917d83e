"""Random-number helpers shared by every stochastic function of ``stein_core``.

All randomness goes through an explicit ``torch.Generator`` (or the caller's
global torch RNG when ``generator`` is ``None``). Draws are made on the
generator's device and then moved to the target device, so a CPU generator
can drive computation on any accelerator reproducibly.

A :class:`RowShard` stands in for a generator where a batch of independent chains is split over processes: each
draw is made for the whole batch and the shard's rows are returned, so the chains a process owns see the very
noise they would see in one process running every chain (data-parallel MCMC that is exact, not merely alike).
"""

from __future__ import annotations

import torch

__all__ = ["RowShard", "rand", "randn", "randint"]


class RowShard:
    """Rows ``[start, start + rows_here)`` of every draw made for ``total`` rows from ``generator``.

    Passed where a function takes a ``generator``, a draw of shape ``[b, ...]`` becomes a draw of
    ``[total, ...]`` of which rows ``[start, start + b)`` are returned: b chains of a ``total``-chain batch (this
    process's slice) get the numbers one process drawing for all of them would give those chains."""

    def __init__(self, generator: torch.Generator, total: int, start: int):
        self.generator, self.total, self.start = generator, int(total), int(start)
        self.device = generator.device

    def widen(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not shape or self.start + shape[0] > self.total:
            raise ValueError(f"a draw of shape {tuple(shape)} does not fit rows {self.start}.. of {self.total}")
        return (self.total, *shape[1:])

    def rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t[self.start:self.start + n]


def _gen_device(generator: torch.Generator | RowShard | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def _draw(fn, shape, generator, **kwargs) -> torch.Tensor:
    if isinstance(generator, RowShard):
        return generator.rows(fn(generator.widen(tuple(shape)), generator=generator.generator, **kwargs), shape[0])
    return fn(tuple(shape), generator=generator, **kwargs)


def rand(
    shape: tuple[int, ...] | torch.Size,
    *,
    like: torch.Tensor,
    generator: torch.Generator | RowShard | None = None,
) -> torch.Tensor:
    """``U[0, 1)`` draws of ``shape`` with the dtype and device of ``like``."""
    u = _draw(torch.rand, shape, generator, device=_gen_device(generator, like.device), dtype=like.dtype)
    return u.to(like.device)


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    like: torch.Tensor,
    generator: torch.Generator | RowShard | None = None,
) -> torch.Tensor:
    """Standard normal draws of ``shape`` with the dtype and device of ``like``."""
    z = _draw(torch.randn, shape, generator, device=_gen_device(generator, like.device), dtype=like.dtype)
    return z.to(like.device)


def randint(
    high: int,
    shape: tuple[int, ...] | torch.Size,
    *,
    device: torch.device,
    generator: torch.Generator | RowShard | None = None,
) -> torch.Tensor:
    """Uniform integers in ``[0, high)`` (dtype long) on ``device``."""
    draw = lambda size, **kw: torch.randint(0, high, size, **kw)  # noqa: E731
    i = _draw(draw, shape, generator, device=_gen_device(generator, device))
    return i.to(device)
