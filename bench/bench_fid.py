"""Fréchet distance at d=2048 (Inception pool3 size): stein_core.frechet_distance vs scipy.linalg.sqrtm on the
same covariances, side by side in one process.

    python bench/bench_fid.py [--d 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, 2 * d)) / np.sqrt(2 * d)
    return a @ a.T + 1e-3 * np.eye(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import scipy.linalg

    from stein_core.metrics import frechet_distance

    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=args.d), rng.normal(size=args.d)
    c1, c2 = random_spd(args.d, rng), random_spd(args.d, rng)

    def ours():
        return float(frechet_distance(*(torch.from_numpy(a) for a in (mu1, c1, mu2, c2))))

    def scipy_sqrtm():
        covmean = scipy.linalg.sqrtm(c1 @ c2)
        covmean = covmean.real if np.iscomplexobj(covmean) else covmean
        return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))

    times, values = {}, {}
    for name, fn in (("stein_core.frechet_distance", ours), ("scipy.linalg.sqrtm", scipy_sqrtm)):
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            values[name] = fn()
            ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, d={args.d}")
    for name in times:
        print(f"{name:<30} {times[name]:7.2f} s (median of {args.repeats})   FID {values[name]:.10g}")
    a, b = values.values()
    print(f"ratio {times['scipy.linalg.sqrtm'] / times['stein_core.frechet_distance']:.1f}x, relative difference {abs(a - b) / abs(b):.1e}")


if __name__ == "__main__":
    main()
