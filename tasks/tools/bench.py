"""Timing harness for ``stein bench ksd`` and ``bench/bench_ksd.py``: the KSD U-statistic against its floor.

The floor is what any O(n²) KSD must at least do: one ``[n, d] × [d, n]`` matrix product and one element-wise
pass over ``[n, n]``, timed in the same process right beside the statistic (these machines are noisy: compare
ratios from one run). The naive reference is the textbook implementation that materialises the pairwise
differences ``[n, n, d]`` (computed in row blocks so that it fits in memory); it is timed only where its total
work stays below a budget.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

#: The naive reference is skipped above this many n²·d float operations (about a minute here).
NAIVE_BUDGET = 4096 * 4096 * 64 * 2


def _median_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up: allocator, kernels, lazy inits
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def naive_ksd_imq(x: torch.Tensor, score: torch.Tensor, c: float = 1.0, beta: float = -0.5, block: int = 256) -> torch.Tensor:
    """KSD² (U-statistic) with an IMQ kernel, written the straightforward way: per block of rows, materialise
    the pairwise differences ``[b, n, d]`` and form ∇_x k, ∇_y k and the cross-Hessian trace element-wise."""
    n, d = x.shape
    total = x.new_zeros(())
    for start in range(0, n, block):
        xb, sb = x[start:start + block], score[start:start + block]
        diff = xb[:, None, :] - x[None, :, :]  # [b, n, d]
        r2 = (diff * diff).sum(-1)  # [b, n]
        base = c * c + r2
        k = base ** beta
        dk = beta * base ** (beta - 1)  # dφ/dr²
        d2k = beta * (beta - 1) * base ** (beta - 2)
        grad_x = 2 * dk[..., None] * diff  # ∇_x k, [b, n, d]
        grad_y = -grad_x
        trace = -2 * d * dk - 4 * d2k * r2
        u = (sb @ score.T) * k + (sb[:, None, :] * grad_y).sum(-1) + (score[None, :, :] * grad_x).sum(-1) + trace
        rows = torch.arange(start, start + xb.shape[0], device=x.device)
        u[torch.arange(xb.shape[0], device=x.device), rows] = 0.0  # U-statistic: drop i == j
        total = total + u.sum()
    return total / (n * (n - 1))


def time_ksd(n: int, d: int, *, dtype: torch.dtype = torch.float32, device: str = "cpu", repeats: int = 5, seed: int = 0, naive: bool | None = None) -> dict:
    """Median seconds of ``stein_core.ksd`` (IMQ, standard-normal score, U-statistic) beside its floor and,
    where affordable, the naive reference (whose value is also checked against the fast one)."""
    from stein_core.discrepancies import ksd
    from stein_core.kernels import IMQ

    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=gen, device=device, dtype=dtype)
    score = -x  # ∇ log N(0, I)
    kernel = IMQ(c=1.0, beta=-0.5)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    one = torch.ones((), device=device, dtype=dtype)

    def floor():  # one [n, d] x [d, n] product (the +1 rides on the GEMM's beta) and one element-wise pass
        return torch.addmm(one, x, x.T).rsqrt_()

    with torch.no_grad():
        out = {"n": n, "d": d, "dtype": str(dtype).removeprefix("torch."), "device": device, "threads": torch.get_num_threads()}
        out["seconds"] = _median_time(lambda: ksd(x, score, kernel, statistic="u"), repeats, sync)
        out["floor_seconds"] = _median_time(floor, repeats, sync)
        out["ratio_to_floor"] = out["seconds"] / out["floor_seconds"]
        value = ksd(x, score, kernel, statistic="u").item()
        out["ksd"] = value
        if naive is None:
            naive = n * n * d <= NAIVE_BUDGET
        if naive:
            out["naive_seconds"] = _median_time(lambda: naive_ksd_imq(x, score), max(1, repeats // 2), sync)
            out["speedup_vs_naive"] = out["naive_seconds"] / out["seconds"]
            ref = naive_ksd_imq(x.double(), score.double()).item()
            out["abs_diff_vs_naive_f64"] = abs(ref - value)
    return out
