"""Sampler throughput: chain steps x particles per second for ULA, MALA and HMC (also per leapfrog
step) on a correlated d-dimensional Gaussian (closed-form log-density and score), d in {2, 64},
1k and 10k particles (parallel chains), through ``stein_core.samplers.run_chain``.

    python bench/bench_samplers.py [--quick] [--device cpu] [--threads N] [--json bench/out/samplers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from stein_core.samplers import hmc, mala, run_chain, ula

REPO = Path(__file__).resolve().parents[1]
N_LEAPFROG = 10


def gaussian(d: int, dtype: torch.dtype, device: str):
    """N(mu, S) with S_ij = 0.8^|i-j| scaled to unit variances, mu_i = 1: log p [n, d] -> [n], score -> [n, d]."""
    idx = torch.arange(d, dtype=torch.float64)
    cov = 0.8 ** (idx[:, None] - idx[None, :]).abs()
    prec = torch.linalg.inv(cov).to(dtype=dtype, device=device)
    mu = torch.ones(d, dtype=dtype, device=device)

    def log_p(x):
        r = x - mu
        return -0.5 * ((r @ prec) * r).sum(-1)

    def score(x):
        return -(x - mu) @ prec

    return log_p, score


def time_sampler(name: str, d: int, n: int, *, device: str, dtype: torch.dtype, budget_s: float) -> dict:
    log_p, score = gaussian(d, dtype, device)
    # Step sizes scaled as d^(-1/3) (MALA) / d^(-1/4) (HMC) for a useful acceptance rate.
    sampler = {
        "ula": lambda: ula(score, 0.05),
        "mala": lambda: mala(log_p, 0.3 * d ** (-1 / 3), score_fn=score),
        "hmc": lambda: hmc(log_p, 0.25 * d ** (-1 / 4), N_LEAPFROG, score_fn=score),
    }[name]()
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(n, d, generator=gen, device=device, dtype=dtype)  # [n, d]
    state = run_chain(*sampler, x0, 3, generator=gen).state  # warm-up

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    t = time.perf_counter()
    state = run_chain(*sampler, state, 5, thin=5, generator=gen).state
    sync()
    per_step = (time.perf_counter() - t) / 5
    n_steps = max(5, int(budget_s / per_step))
    best = float("inf")
    for _ in range(3):
        sync()
        t = time.perf_counter()
        res = run_chain(*sampler, state, n_steps, thin=n_steps, generator=gen)
        sync()
        best = min(best, time.perf_counter() - t)
        state = res.state
    row = {
        "sampler": name, "d": d, "particles": n, "steps": n_steps, "seconds": best,
        "steps_per_s": n_steps / best, "particle_steps_per_s": n_steps * n / best,
        "accept_rate": res.mean_accept_rate,
    }
    if name == "hmc":
        row["leapfrog_particle_steps_per_s"] = row["particle_steps_per_s"] * N_LEAPFROG
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short timings (a smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "samplers.json")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    for name in ("ula", "mala", "hmc"):
        for d in (2, 64):
            for n in (1000, 10000):
                rows.append(time_sampler(name, d, n, device=args.device, dtype=dtype,
                                         budget_s=0.1 if args.quick else 0.5))
    print("| sampler | d | particles | steps/s | particle-steps/s | leapfrog particle-steps/s | accept |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lf = f"{r['leapfrog_particle_steps_per_s']:.3g}" if "leapfrog_particle_steps_per_s" in r else ""
        acc = f"{r['accept_rate']:.2f}" if r["accept_rate"] is not None else ""
        print(f"| {r['sampler']} | {r['d']} | {r['particles']} | {r['steps_per_s']:.0f} | "
              f"{r['particle_steps_per_s']:.3g} | {lf} | {acc} |")
    out = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "device": args.device, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "n_leapfrog": N_LEAPFROG, "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
