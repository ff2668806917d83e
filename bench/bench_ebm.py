"""Energy-based models: seconds per training step against the MCMC steps per negative (k), the replay buffer's
overhead (pcd against short_run at the same k), the other estimators' steps (nce, fce), and MCMC sampler
throughput (chains x steps per second) on the digits energy for ULA, MALA, HMC and kinetic Langevin.

Steps go through the family's real step (``Family.step`` with a real ``StepContext``), on the shipped configs'
networks (ring8: an MLP of 3 x 128 on 2-D points; digits: an MLP of 3 x 256 on 64 pixels, and the conv energy of
digits-gebm for comparison). Rounds rotate over the timed units (load hits all alike); medians are reported.

    nice -n 19 python bench/bench_ebm.py [--quick] [--threads 2] [--json bench/out/ebm.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _config(pipeline: str, **kw) -> dict:
    import yaml

    raw = yaml.safe_load((REPO / "conf" / f"{pipeline}.yaml").read_text())["train"]
    return raw | {"n_steps": 1000, "log_every": 1, "checkpoint_every": 1000, "heldout_every": 0} | kw


def step_timer(pipeline: str, **kw):
    """A function that times one more loop step (after the first) of ``pipeline``'s family with ``kw`` set."""
    from tasks.families import FAMILIES
    from tasks.families.base import StepContext, TrainState
    from tasks.stages.train.loop import step_generator

    raw = _config(pipeline, **kw)
    fam = FAMILIES[raw["family"]]
    cfg = fam.config.model_validate(raw)
    shape = (2,) if pipeline.startswith("ring8") else (1, 8, 8)
    x = torch.rand(4096, 2 if len(shape) == 1 else 64)
    torch.manual_seed(0)
    modules = fam.build(cfg, shape)
    state = TrainState(modules=modules, trained=modules, optimizers=fam.optimizers(cfg, modules),
                       extra=fam.init_extra(cfg, modules), objective=fam.objective(cfg, "cpu"))
    step = [0]

    def run() -> float:
        gen = step_generator(0, step[0], "cpu")
        draw = lambda gen=gen: x[torch.randint(len(x), (cfg.batch_size,), generator=gen)]  # noqa: E731
        ctx = StepContext(step=step[0], rank=0, world=1, generator=gen, device="cpu", draw=draw)
        t0 = time.perf_counter()
        fam.step(state, draw(), ctx, cfg)
        step[0] += 1
        return time.perf_counter() - t0

    run()  # step 0 fills a buffer, fits a noise: not timed
    return run


def sampler_rate(method: str, chains: int, steps: int, energy: dict) -> float:
    """Chains x steps per second of ``sampler: mcmc`` on an untrained digits energy (the cost does not depend on
    the weights)."""
    from tasks.config.sections import MCMCSample
    from tasks.families._energy import EnergyModel
    from tasks.families._mcmc import MCMCModel
    from tasks.families._critic import build_critic
    from tasks.families._critic import ConvCriticNet, MLPCriticNet

    torch.manual_seed(0)
    section = (ConvCriticNet if energy["kind"] == "conv" else MLPCriticNet)(**energy)
    net = build_critic(section, (1, 8, 8), 1)
    for p in net.parameters():
        p.requires_grad_(False)
    s = MCMCSample(sampler="mcmc", method=method, step_size=1e-3, n_steps=steps,
                   **({"leapfrog_steps": 5} if method == "hmc" else {}))
    model = MCMCModel(EnergyModel(net, (1, 8, 8)), s)
    t0 = time.perf_counter()
    model.sample(chains, generator=torch.Generator().manual_seed(0))
    return chains * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [5, 20] if args.quick else [5, 10, 20, 40]
    units = {}
    for pipeline in ("ring8-ebm", "digits-ebm"):
        for k in ks:
            for neg in ("short_run", "pcd", "cd"):
                units[(pipeline, neg, k)] = step_timer(pipeline, negatives=neg, mcmc_steps=k)
    for pipeline in ("ring8-nce", "ring8-fce"):
        units[(pipeline, "-", 0)] = step_timer(pipeline)
    times: dict = {u: [] for u in units}
    for _ in range(args.repeats):  # rounds over every unit: a burst of load hits each of them alike
        for u, run in units.items():
            times[u].append(run())
    rows = []
    for (pipeline, neg, k), ts in times.items():
        med = statistics.median(ts)
        rows.append({"pipeline": pipeline, "negatives": neg, "mcmc_steps": k, "step_s": med})
        print(f"{pipeline:10s} {neg:9s} k={k:3d}: {med * 1e3:8.1f} ms/step", flush=True)
    sampling = []
    for energy in ({"kind": "mlp", "hidden": 256, "n_layers": 3}, {"kind": "conv", "base_channels": 32}):
        for method in ("ula", "mala", "hmc", "kinetic"):
            rate = sampler_rate(method, 500, 10 if args.quick else 30, energy)
            sampling.append({"energy": energy["kind"], "method": method, "chains": 500, "chain_steps_per_s": rate})
            print(f"digits {energy['kind']:4s} energy, {method:7s}: {rate:,.0f} chain-steps/s (500 chains)", flush=True)
    out = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
           "steps": rows, "sampling": sampling}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
