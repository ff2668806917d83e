"""Overhead of the generic training loop (``tasks.stages.train.loop.fit``, every family) against the NCSN-only loop it
replaced (``bench/legacy_ncsn_loop.py``, commit 8ba88d8), on gmm2d's data and train section, in one process.

Both train the same network with the same optimiser, schedule and batch size; they differ in what the generic
loop adds: the (seed, step) batch generator, the family's step, the non-finite guard on every metric and weight,
the metric dictionaries. Runs are interleaved (legacy, generic, legacy, ...) and the median of each is reported
with their ratio, so machine load affects both alike.

    python bench/bench_training_loop.py [--steps 1000] [--repeats 5] [--threads 1]

``--compile`` compares instead the generic loop with ``train.compile`` off and on, for ncsn's MLP on gmm2d's data
and train section and ncsn's conv U-Net on the 8x8 digits with digits' train section (``--setups mlp,conv``),
runs interleaved. Steps/s come from the loop's own step timer (``info['seconds']``: each step's wall time with the
sync of its boundary, without the log and checkpoint work), as the median of the log windows after the first,
so a burst of another process on a shared machine moves few windows; the first window holds the compilation,
and the compile time is that window's time less its steps at the median rate. Dynamo is reset before every
compiled run, so each run compiles in the process (Inductor's disk cache stays, warm after the first run).
``--modules`` adds the alternative the loop did not take: each module's forward compiled in place
(``nn.Module.compile``), the step eager.

    python bench/bench_training_loop.py --compile [--modules] [--setups mlp,conv] [--steps 300] [--repeats 2] [--device cuda]
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
    ap.add_argument("--compile", action="store_true", help="compare train.compile off and on (see the docstring)")
    ap.add_argument("--setups", default="mlp,conv", help="with --compile: mlp, conv or both")
    ap.add_argument("--modules", action="store_true", help="with --compile: also each module compiled in place")
    ap.add_argument("--device", default="cpu", help="with --compile: cpu or cuda")
    args = ap.parse_args()
    if args.compile:
        compare_compile(args)
        return

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


def _setup(name: str, steps: int):
    """(train section, data, shape) of a ``--compile`` setup: ncsn's MLP on gmm2d, ncsn's conv U-Net on digits."""
    import torch

    from flows.registry import get_pipeline

    if name == "mlp":
        from stein_core.distributions import GaussianMixture
        from tasks.stages.prepare import mixture_spec

        cfg = get_pipeline("gmm2d").load_config(REPO)
        spec = mixture_spec(cfg.prepare)
        x, _ = GaussianMixture(spec["weights"], spec["means"], spec["stds"]).sample(
            cfg.prepare.n_train, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
        shape, log_every = (2,), 10
    else:
        from tasks.data.sources import load_digits_8x8

        cfg = get_pipeline("digits").load_config(REPO)
        images = load_digits_8x8()
        x, shape, log_every = torch.from_numpy(images.x), images.shape, 5
    train = cfg.train.model_copy(update={"n_steps": steps, "checkpoint_every": steps, "log_every": log_every})
    return train, x, shape


class _ModulesCompiled:
    """ncsn with each module's forward compiled in place (``nn.Module.compile``) and its step eager."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def build(self, cfg, shape):
        modules = self.inner.build(cfg, shape)
        for m in modules.values():
            m.compile()
        return modules


def _timed_run(train, x, shape, mode: str, device: str = "cpu") -> tuple[float, float]:
    """One ``fit`` (mode: off, step or modules) -> (median seconds per step over the log windows after the first,
    compile seconds)."""
    import statistics

    import torch

    from tasks.families import FAMILIES
    from tasks.stages.train.loop import Hooks, fit

    torch._dynamo.reset()
    family = _ModulesCompiled(FAMILIES["ncsn"]) if mode == "modules" else FAMILIES["ncsn"]
    train = train.model_copy(update={"compile": mode == "step"})
    seconds = []  # the loop's cumulative step time at each log
    fit(family, train, x.to(device), shape, device=torch.device(device),
        hooks=Hooks(on_log=lambda s, m, info: seconds.append(info["seconds"])))
    windows = [b - a for a, b in zip([0.0, *seconds], seconds)]
    step = statistics.median(windows[1:]) / train.log_every
    return step, windows[0] - train.log_every * step


def compare_compile(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s), device {args.device}; family ncsn, {args.steps} steps per run, {args.repeats} interleaved runs each")
    print("| setup | compiled | steps/s (median of runs) | all runs (steps/s) | first window over the median (s) |")
    print("|---|---|---|---|---|")
    modes = ("off", "step", *(("modules",) if args.modules else ()))
    label = {"off": "nothing (train.compile: false)", "step": "the step (train.compile: true)",
             "modules": "each module (nn.Module.compile)"}
    for name in args.setups.split(","):
        train, x, shape = _setup(name, args.steps)
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode in modes:
                runs[mode].append(_timed_run(train, x, shape, mode, args.device))
        rates = {}
        for mode in modes:
            per = [1.0 / s for s, _ in runs[mode]]
            rates[mode] = statistics.median(per)
            print(f"| ncsn {name} | {label[mode]} | {rates[mode]:.1f} | {', '.join(f'{r:.1f}' for r in per)} | "
                  f"{', '.join(f'{c:.1f}' for _, c in runs[mode])} |")
        for mode in modes[1:]:
            print(f"| ncsn {name} | ratio {mode} / off | {rates[mode] / rates['off']:.3f} | | |")


if __name__ == "__main__":
    main()
