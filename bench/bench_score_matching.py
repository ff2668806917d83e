"""Training throughput of the score-matching objectives: samples/s of one full Adam step (loss, backward,
update) of an MLP score network, for DSM (one sigma), SSM (Gaussian projections), SSM-VR and exact SM,
as the data dimension d grows.

Song, Garg, Shi & Ermon (UAI 2019) show that sliced score matching costs about as much as denoising score
matching, while exact score matching (Hyvarinen 2005) needs d backward passes for the Jacobian trace and
slows down linearly in d. At each d the methods take steps round-robin (so that load from other processes
on a shared machine hits them alike) until each has spent about ``--budget`` seconds and ``--min-steps``
steps after a warm-up step (after a warm-up step longer than the budget, a single further step is the
measurement); throughput is the batch over the fastest step (the median is in the JSON too). Exact SM is
skipped at a d where its step, extrapolated linearly from the previous d, would exceed ``--max-step`` s.

    nice -n 19 python bench/bench_score_matching.py [--quick] [--json bench/out/score_matching.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("dsm", "ssm", "ssm_vr", "exact")


def mlp(d: int, hidden: int, n_layers: int):
    from torch import nn

    layers, width = [], d
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, d))


def make_step(method: str, d: int, *, batch: int, hidden: int, n_layers: int, device: str):
    """A closure running one full Adam step (loss, backward, update) of a fresh MLP score network."""
    import torch

    from stein_core.score_matching import get_score_matching_loss_fn

    torch.manual_seed(0)
    net = mlp(d, hidden, n_layers).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = get_score_matching_loss_fn(method, sigma=0.1 if method == "dsm" else None, n_projections=1)
    gen = torch.Generator(device=device).manual_seed(1)
    data = torch.randn(4, batch, d, generator=gen, device=device)  # [4, batch, d]: a few fixed batches
    count = [0]

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net, data[count[0] % 4], generator=gen)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        count[0] += 1
        return time.perf_counter() - t0

    return step


def time_methods(methods: list[str], d: int, *, batch: int, hidden: int, n_layers: int, budget: float,
                 min_steps: int, device: str) -> list[dict]:
    """Time the methods at one ``d`` round-robin, one step each per round, so that a change in the load
    of a shared machine hits all of them alike; a method stops once its timed steps reach ``budget``
    seconds and number at least ``min_steps``."""
    steps = {m: make_step(m, d, batch=batch, hidden=hidden, n_layers=n_layers, device=device) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    done = set()
    for m in methods:  # warm-up; past the budget, one more step is the whole measurement
        if steps[m]() >= budget:
            times[m].append(steps[m]())
            done.add(m)
    while True:
        active = [m for m in methods if m not in done and (sum(times[m]) < budget or len(times[m]) < min_steps)]
        if not active:
            break
        for m in active:
            times[m].append(steps[m]())
    rows = []
    for m in methods:
        # On a loaded machine a step is only ever slowed down, so the fastest step (as timeit reports)
        # estimates the cost; the median is kept as well.
        best, med = min(times[m]), statistics.median(times[m])
        rows.append({
            "method": m,
            "d": d,
            "steps": len(times[m]),
            "ms_per_step_min": 1e3 * best,
            "ms_per_step_median": 1e3 * med,
            "samples_per_s": batch / best,
            "samples_per_s_median": batch / med,
        })
    return rows


def markdown(rows: list[dict], dims: list[int]) -> str:
    by = {(r["d"], r["method"]): r for r in rows}
    head = "| d | " + " | ".join(f"{m} (samples/s)" for m in METHODS) + " | ssm / dsm | exact / dsm |"
    lines = [head, "|" + "---|" * (len(METHODS) + 3)]
    for d in dims:
        cells, dsm = [], by[(d, "dsm")]["samples_per_s"]
        for m in METHODS:
            r = by.get((d, m))
            cells.append(f"{r['samples_per_s']:,.0f}" if r else "skipped")
        ratio = lambda m: f"{by[(d, m)]['samples_per_s'] / dsm:.2f}" if (d, m) in by else "-"  # noqa: E731
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {ratio('ssm')} | {ratio('exact')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="d in {2, 32}, 0.3 s per config (a smoke run)")
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 128, 512])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2, help="hidden layers")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per configuration")
    ap.add_argument("--min-steps", type=int, default=12, help="timed steps per configuration, unless one step "
                    "takes longer than the budget")
    ap.add_argument("--max-step", type=float, default=30.0,
                    help="skip exact SM at a d whose predicted step (linear in d from the last one) exceeds this (s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "score_matching.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    dims = [2, 32] if args.quick else args.dims
    budget = 0.3 if args.quick else args.budget
    rows, skipped, last_exact = [], [], None
    for d in dims:
        methods = list(METHODS)
        if last_exact is not None:
            predicted = last_exact["ms_per_step_min"] / 1e3 * d / last_exact["d"]
            if predicted > args.max_step:
                methods.remove("exact")
                skipped.append({"method": "exact", "d": d, "predicted_s_per_step": predicted})
                print(f"d={d:>4}  exact: skipped (predicted {predicted:.0f} s/step)", flush=True)
        for r in time_methods(methods, d, batch=args.batch, hidden=args.hidden, n_layers=args.layers,
                              budget=budget, min_steps=3 if args.quick else args.min_steps, device=args.device):
            rows.append(r)
            if r["method"] == "exact":
                last_exact = r
            print(f"d={d:>4} {r['method']:>6}: {r['samples_per_s']:>10,.0f} samples/s "
                  f"({r['ms_per_step_min']:.1f} ms/step best, {r['ms_per_step_median']:.1f} median, "
                  f"{r['steps']} steps)", flush=True)
    table = markdown(rows, dims)
    print()
    print(table)
    out = {
        "load_average_1min": os.getloadavg()[0],
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": args.threads,
        "device": args.device,
        "config": {"batch": args.batch, "hidden": args.hidden, "layers": args.layers, "budget_s": budget,
                   "min_steps": args.min_steps, "max_step_s": args.max_step,
                   "optimizer": "Adam", "dsm_sigma": 0.1, "ssm_projections": 1, "projection": "gaussian"},
        "rows": rows,
        "skipped": skipped,
        "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
