"""Overhead of the generic training loop (``tasks.stages.train.loop.fit``, every family) against the NCSN-only loop it
replaced (``bench/legacy_ncsn_loop.py``, commit 8ba88d8), on gmm2d's data and train section, in one process.

Both train the same network with the same optimiser, schedule and batch size; they differ in what the generic
loop adds: the (seed, step) batch generator, the family's step, the non-finite guard on every metric and weight,
the metric dictionaries. Runs are interleaved (legacy, generic, legacy, ...) and the median of each is reported
with their ratio, so machine load affects both alike.

    python bench/bench_training_loop.py [--steps 1000] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    import legacy_ncsn_loop
    from flows.registry import get_pipeline
    from tasks.families import FAMILIES
    from tasks.data.io import Dataset
    from tasks.stages.prepare import mixture_spec
    from tasks.stages.train.loop import fit
    from stein_core.distributions import GaussianMixture

    torch.set_num_threads(args.threads)
    cfg = get_pipeline("gmm2d").load_config(REPO)
    train = cfg.train.model_copy(update={"n_steps": args.steps, "checkpoint_every": args.steps})
    spec = mixture_spec(cfg.prepare)
    x, _ = GaussianMixture(spec["weights"], spec["means"], spec["stds"]).sample(
        cfg.prepare.n_train, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    legacy_cfg = SimpleNamespace(**{k: v for k, v in train.model_dump().items() if k != "net"},
                                 hidden=train.net.hidden, n_layers=train.net.n_layers)
    dataset = Dataset(x.numpy(), None, {"shape": [2]})

    times: dict[str, list[float]] = {"legacy": [], "generic": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        legacy_ncsn_loop.fit_ncsn(legacy_cfg, dataset, device="cpu")
        times["legacy"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fit(FAMILIES["ncsn"], train, x, (2,), device="cpu")
        times["generic"].append(time.perf_counter() - t0)
    leg, gen = statistics.median(times["legacy"]), statistics.median(times["generic"])
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s); gmm2d train section, {args.steps} steps, median of {args.repeats} interleaved runs")
    print("| loop | seconds | ms/step | all runs (s) |")
    print("|---|---|---|---|")
    for name, med in (("legacy NCSN loop (8ba88d8)", leg), ("generic loop, family ncsn", gen)):
        runs = times["legacy" if name.startswith("legacy") else "generic"]
        print(f"| {name} | {med:.2f} | {1000 * med / args.steps:.2f} | {', '.join(f'{t:.2f}' for t in runs)} |")
    print(f"ratio generic / legacy: {gen / leg:.3f}")


if __name__ == "__main__":
    main()
