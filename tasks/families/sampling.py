"""Batched drawing, shared by the sample stage and the Ray tasks that evaluate training checkpoints."""

from __future__ import annotations

from collections.abc import Callable


def draw_in_batches(n: int, batch_size: int, run_chains: Callable):
    """``run_chains(m) -> [m, d]`` on consecutive batches of at most ``batch_size`` -> ``[n, d]`` on the CPU (the
    batches draw from whatever generator ``run_chains`` holds, in order)."""
    import torch

    return torch.cat([run_chains(min(batch_size, n - start)).detach().cpu() for start in range(0, n, batch_size)])
