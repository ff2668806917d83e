"""Generator-critic training and latent sampling: seconds per base (generator) update and per energy (critic)
update against the batch size, for the GEBM and MMD-GAN families, and the throughput of latent Langevin
(chains x steps per second) for ULA, MALA and kinetic Langevin.

Each update is timed on its own through the family's real step with a schedule that isolates it: with one
critic update per step the step time is critic + base; with ``burst_steps`` = 11 at step 0 it is 11 critic + base,
so the critic update is the difference / 10 and the base update the rest. The networks are the shipped configs'
(ring8: MLPs of 3 x 128 on 2-D points; digits: the DCGAN-style conv generator and critic on 8x8 images).
Rounds rotate over the timed units (load hits all alike); medians are reported.

    nice -n 19 python bench/bench_critics.py [--quick] [--threads 2] [--json bench/out/critics.json]
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


def _config(family: str, data: str, batch: int, critic_updates: int) -> dict:
    import yaml

    raw = yaml.safe_load((REPO / "conf" / f"{data}-{family}.yaml").read_text())["train"]
    raw |= {"batch_size": batch, "n_steps": 1, "log_every": 1, "checkpoint_every": 1, "heldout_every": 0,
            "burst_steps": critic_updates, "burst_every": 0}
    return raw


def time_step(family: str, data: str, batch: int, critic_updates: int, repeats: int) -> float:
    """Median seconds of one loop step (step 0: ``critic_updates`` critic updates, then one base update)."""
    from tasks.families import FAMILIES
    from tasks.families.base import StepContext, TrainState
    from tasks.stages.train.loop import step_generator

    fam = FAMILIES[family]
    cfg = fam.config.model_validate(_config(family, data, batch, critic_updates))
    shape = (2,) if data == "ring8" else (1, 8, 8)
    x = torch.rand(4096, 2 if data == "ring8" else 64)
    torch.manual_seed(0)
    modules = fam.build(cfg, shape)
    state = TrainState(modules=modules, trained=modules, optimizers=fam.optimizers(cfg, modules),
                       objective=fam.objective(cfg, "cpu"))
    times = []
    for r in range(repeats + 1):
        gen = step_generator(0, 0, "cpu")
        draw = lambda gen=gen: x[torch.randint(len(x), (batch,), generator=gen)]  # noqa: E731
        ctx = StepContext(step=0, rank=0, world=1, generator=gen, device="cpu", draw=draw)
        t0 = time.perf_counter()
        fam.step(state, draw(), ctx, cfg)
        if r:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_latent(method: str, chains: int, steps: int) -> float:
    """Chains x steps per second of latent Langevin on the ring8-gebm networks (untrained weights: the cost does
    not depend on them)."""
    from tasks.config.sections import LatentLangevinSample
    from tasks.families import FAMILIES
    from tasks.families.gebm import GEBMModel

    fam = FAMILIES["gebm"]
    cfg = fam.config.model_validate(_config("gebm", "ring8", 256, 1))
    torch.manual_seed(0)
    mods = fam.build(cfg, (2,))
    for m in mods.values():
        for p in m.parameters():
            p.requires_grad_(False)
    s = LatentLangevinSample(sampler="latent_langevin", method=method, step_size=0.05, n_steps=steps)
    model = GEBMModel(mods["generator"], mods["energy"], (2,), s)
    t0 = time.perf_counter()
    model.sample(chains, generator=torch.Generator().manual_seed(0))
    return chains * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [64, 256] if args.quick else [64, 128, 256, 512]
    rows = []
    for data in ("ring8", "digits"):
        for family in ("gebm", "mmdgan"):
            for b in batches:
                one = time_step(family, data, b, 1, args.repeats)
                eleven = time_step(family, data, b, 11, args.repeats)
                critic = (eleven - one) / 10
                rows.append({"data": data, "family": family, "batch": b, "critic_update_s": critic,
                             "base_update_s": one - critic, "step_at_5_s": one + 4 * critic})
                print(f"{data:6s} {family:6s} batch {b:4d}: critic/energy update {critic * 1e3:7.1f} ms, base update "
                      f"{(one - critic) * 1e3:7.1f} ms, a step with 5 critic updates {(one + 4 * critic) * 1e3:7.1f} ms",
                      flush=True)
    latent = []
    for method in ("ula", "mala", "kinetic"):
        for chains in ([1000] if args.quick else [1000, 4000]):
            rate = time_latent(method, chains, 50)
            latent.append({"method": method, "chains": chains, "chain_steps_per_s": rate})
            print(f"latent {method:7s} {chains:5d} chains: {rate:,.0f} chain-steps/s", flush=True)
    out = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
           "steps": rows, "latent": latent}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
