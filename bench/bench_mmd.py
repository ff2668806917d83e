"""The MMD² U-statistic (``stein_core.discrepancies.mmd``) beside a plain ``torch.cdist`` implementation.

Three implementations timed side by side in one process, interleaved round by round (the median of the rounds
and the minimum of the rounds are reported: a noisy neighbour only adds time, so the minimum is the cleaner
estimate on a shared machine; compare the ratios, not the seconds across runs):

- ``blocked``: ``discrepancies._mmd_radial_blocked``, the path ``mmd`` takes for a radial kernel when
  ``(n + m)^2 > _MMD_DENSE_ELEMENTS`` (row blocks of the pooled sample, no Gram matrix);
- ``cdist``: ``k = phi(torch.cdist(a, b).pow(2))`` for the three Gram matrices, then the U-statistic (the
  plain reference of issue 24);
- ``dense``: ``mmd`` on the same kernel wrapped as a plain callable, i.e. its dense path (three Gram
  matrices from ``sq_dists``), which is what ``mmd`` computed for every input before the blocked path.

The three values are checked to agree (relative 1e-4 in float32). Sizes are ``n = m`` with ``d`` features.

    python bench/bench_mmd.py [--sizes 1000x64 4096x64 16384x64] [--kernels rbf imq] [--repeats 5] [--threads 1]
                              [--device cuda]

On a CPU shared with other jobs, ``--threads 1`` gives the steadier ratios: an op split over several OpenMP
threads waits for the slowest one, and a descheduled thread stalls each of the blocked path's many small
element-wise passes far more than the few large ones of the dense forms (measured here at load 4 on 2 cores:
``neg`` of a ``[128, 8192]`` block 0.34 ms on one thread, 8 to 11 ms on two).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cdist_mmd(x, y, kernel):
    """U-statistic MMD² from three ``torch.cdist`` Gram matrices (the plain reference)."""
    import torch

    n, m = x.shape[-2], y.shape[-2]
    kxx = kernel.phi(torch.cdist(x, x).pow(2))
    kyy = kernel.phi(torch.cdist(y, y).pow(2))
    kxy = kernel.phi(torch.cdist(x, y).pow(2))
    sxx = kxx.sum() - kxx.diagonal().sum()
    syy = kyy.sum() - kyy.diagonal().sum()
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * kxy.mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1000x64", "4096x64", "16384x64"], help="n x d, n = m")
    ap.add_argument("--kernels", nargs="+", default=["rbf", "imq"], choices=["rbf", "imq"])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (3 at most for n > 8192, which "
                    "also skip the warm-up call)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["blocked", "cdist", "dense"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings then wait for the device)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import stein_core.discrepancies as disc
    from stein_core.kernels import IMQ, RBF

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"# torch {torch.__version__}, {dev}, {torch.get_num_threads()} threads, float32, block 2^"
          f"{disc._BLOCK_ELEMENTS.bit_length() - 1} elements, dense path while (n+m)^2 <= "
          f"2^{disc._MMD_DENSE_ELEMENTS.bit_length() - 1}")
    for size in args.sizes:
        n, d = map(int, size.split("x"))
        gen = torch.Generator().manual_seed(n + d)
        x = torch.randn(n, d, generator=gen).to(dev)
        y = (torch.randn(n, d, generator=gen) + 0.1).to(dev)
        for name in args.kernels:
            kernel = RBF(float(d) ** 0.5) if name == "rbf" else IMQ(c=float(d) ** 0.5, beta=-0.5)
            fns = {
                "blocked": lambda: disc._mmd_radial_blocked(x, y, kernel, "u"),
                "cdist": lambda: cdist_mmd(x, y, kernel),
                "dense": lambda: disc.mmd(x, y, lambda a, b: kernel(a, b)),
            }
            fns = {k: f for k, f in fns.items() if k not in args.skip}
            rounds = min(args.repeats, 3) if n > 8192 else args.repeats
            times = {k: [] for k in fns}
            values = {}
            with torch.no_grad():
                if n <= 8192:
                    for k, f in fns.items():  # warm-up (allocator, lazy inits) and value
                        values[k] = float(f())
                for _ in range(rounds):
                    for k, f in fns.items():
                        sync()
                        t0 = time.perf_counter()
                        value = f()
                        sync()
                        times[k].append(time.perf_counter() - t0)
                        values.setdefault(k, float(value))  # large n: no separate warm-up call
            med = {k: statistics.median(v) for k, v in times.items()}
            best = {k: min(v) for k, v in times.items()}
            ref = values.get("cdist", next(iter(values.values())))
            agree = all(abs(v - ref) <= 1e-4 * abs(ref) + 1e-7 for v in values.values())
            shown = "  ".join(f"{k} {1000 * t:7.1f} ms (min {1000 * best[k]:7.1f})" for k, t in med.items())
            ratios = "  ".join(f"{k}/blocked {t / med['blocked']:.2f} (min {best[k] / best['blocked']:.2f})"
                               for k, t in med.items() if k != "blocked" and "blocked" in med)
            print(f"n=m={n:6d} d={d:3d} {name}: {shown}  | {ratios}  | mmd2 "
                  + " ".join(f"{k} {v:.7g}" for k, v in values.items()) + f"  agree={agree}", flush=True)


if __name__ == "__main__":
    main()
