"""Generator training step: approximate gradient descent (Li 2017) vs direct MMD^2 minimisation, seconds per
step at equal batch and kernel, with the breakdown of each step.

One step is: x = G(z) for a batch of latents (an MLPGenerator, 2 hidden layers of 128), the loss against a data
batch of the same size (stein_core.generators, IMQ mixture at the median-heuristic bandwidth of the pooled
batch), backward, Adam update. The parts, timed on their own:

* kernel: the median heuristic (all pairs of the 2n pooled points) and the kernel matrices. AGD: Gram and
  summed kernel gradients of the generator batch, of the data batch, and between them (the two Stein
  gradient estimators); MMD: the three Gram matrices of the U-statistic (forward only). The median
  heuristic, shared by both, is also timed on its own ("of which median").
* solve: AGD's two n x n ridge systems (Cholesky factorisation and solve); MMD has none.
* generator: forward of G, backward of a fixed linear loss through G, Adam update (the same for both).
* rest: the full step minus the parts (MMD: mostly the backward through the Gram matrices; AGD: the small
  surrogate and glue).
* median before: :func:`median_heuristic_before`, a copy of ``stein_core.kernels.median_heuristic`` as it was
  before issue 24 (the pairs gathered with ``triu_indices``, a per-pair tolerance, ``median``), timed beside
  the current one on the same points; its value is checked to equal the current bandwidth bit for bit. The
  median's share of a step is reported for both: the current ``median / step`` and, for the copy, the step it
  would take, ``median_before / (step - median + median_before)``.

Each (n, d) runs every timed function once per round, in a rotating order, for ``--repeats`` rounds after a
warm-up round (so that a change in the load of a shared machine hits all alike), and reports medians; the
ratio of the fastest rounds is reported beside them (load only ever slows a round down). ``rest`` is a
difference of medians and can come out slightly negative when the parts' timings are noisy.

    nice -n 19 python bench/bench_generators.py [--quick] [--threads 2] [--json bench/out/generators.json]
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
PARTS = ("agd_step", "mmd_step", "agd_kernel", "agd_solve", "mmd_kernel", "median", "median_before", "generator")


def median_heuristic_before(x, y=None):
    """``stein_core.kernels.median_heuristic(x, y)`` as it was before issue 24 (no subsampling), for timing."""
    import torch

    from stein_core.kernels import _COINCIDE_ROUNDOFF, sq_dists

    z = (x if y is None else torch.cat([x, y], dim=-2)).detach()
    n, d = z.shape[-2], z.shape[-1]
    r2 = sq_dists(z, z)
    iu = torch.triu_indices(n, n, offset=1, device=z.device)
    pairs = r2[..., iu[0], iu[1]]
    zc = z - z.mean(dim=-2, keepdim=True)
    norm2 = (zc * zc).sum(-1)
    tol = (_COINCIDE_ROUNDOFF * d**0.5 * torch.finfo(z.dtype).eps) * (norm2[..., iu[0]] + norm2[..., iu[1]])
    coincide = pairs <= tol
    pairs = pairs.masked_fill(coincide, 0.0)
    med = pairs.median(dim=-1).values
    degenerate = med <= 0
    if bool(degenerate.any()):
        if bool(coincide.all(dim=-1).any()):
            raise ValueError("all points coincide")
        nonzero_med = pairs.masked_fill(coincide, float("nan")).nanmedian(dim=-1).values
        med = torch.where(degenerate, nonzero_med, med)
    return torch.sqrt(med / 2.0)


def make_timers(n: int, d: int, *, estimator: str, device: str) -> dict:
    """Closures, each running one timed unit and returning its wall-clock seconds."""
    import torch

    from stein_core.generators import get_agd_loss_fn, get_kernel_fn, get_mmd_loss_fn
    from stein_core.kernels import gram_and_grad_x_sum, median_heuristic
    from stein_core.nets import MLPGenerator
    from stein_core.score_estimators import _psd_solve, _ridge

    gen = torch.Generator(device=device).manual_seed(0)
    torch.manual_seed(0)
    net = MLPGenerator(d, d, hidden=128, n_layers=2).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    z = torch.randn(n, d, generator=gen, device=device)
    y = torch.randn(n, d, generator=gen, device=device) + 0.5
    probe = torch.randn(n, d, generator=gen, device=device)  # fixed linear loss for the generator part
    kernel_fn = get_kernel_fn()
    agd = get_agd_loss_fn(kernel_fn, estimator=estimator)
    mmd = get_mmd_loss_fn(kernel_fn)
    with torch.no_grad():
        x0 = net(z)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn):
        def run() -> float:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t0

        return run

    def step(loss_fn):
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(net(z), y)
        loss.backward()
        opt.step()

    def agd_kernel():
        with torch.no_grad():
            k = kernel_fn(x0, y)
            gram_and_grad_x_sum(k, x0, x0)  # in-sample, generator batch
            gram_and_grad_x_sum(k, y, y)  # fit on the data batch
            gram_and_grad_x_sum(k, y, x0)  # predict at the generator samples

    with torch.no_grad():
        k0 = kernel_fn(x0, y)
        systems = []
        for pts in (x0, y):
            gram_t, grad_sum = gram_and_grad_x_sum(k0, pts, pts)
            eye = torch.eye(n, dtype=pts.dtype, device=pts.device)
            systems.append((gram_t + _ridge(gram_t, None, 1.0) * eye, grad_sum))

    def agd_solve():
        with torch.no_grad():
            for a, b in systems:
                _psd_solve(a, b)

    def mmd_kernel():
        with torch.no_grad():
            k = kernel_fn(x0, y)
            k(x0, x0), k(y, y), k(x0, y)

    def median():
        kernel_fn(x0, y)  # the median heuristic of the pooled batch: the part of "kernel" both losses share

    if not torch.equal(median_heuristic_before(x0, y), median_heuristic(x0, y)):
        raise AssertionError(f"n={n} d={d}: the median heuristic's bandwidth differs from the copy before issue 24")

    def median_before():
        median_heuristic_before(x0, y)

    def generator():
        opt.zero_grad(set_to_none=True)
        (net(z) * probe).sum().backward()
        opt.step()

    return {
        "agd_step": timed(lambda: step(agd)),
        "mmd_step": timed(lambda: step(mmd)),
        "agd_kernel": timed(agd_kernel),
        "agd_solve": timed(agd_solve),
        "mmd_kernel": timed(mmd_kernel),
        "median": timed(median),
        "median_before": timed(median_before),
        "generator": timed(generator),
    }


def time_config(n: int, d: int, *, repeats: int, estimator: str, device: str) -> dict:
    timers = make_timers(n, d, estimator=estimator, device=device)
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    for p in PARTS:  # warm-up round
        timers[p]()
    for r in range(repeats):
        order = PARTS[r % len(PARTS):] + PARTS[: r % len(PARTS)]
        for p in order:
            times[p].append(timers[p]())
    ms = {p: 1e3 * statistics.median(times[p]) for p in PARTS}
    best = {p: 1e3 * min(times[p]) for p in PARTS}
    row = {"n": n, "d": d, "repeats": repeats, **{f"{p}_ms": ms[p] for p in PARTS},
           **{f"{p}_ms_min": best[p] for p in PARTS}}
    row["agd_rest_ms"] = ms["agd_step"] - ms["agd_kernel"] - ms["agd_solve"] - ms["generator"]
    row["mmd_rest_ms"] = ms["mmd_step"] - ms["mmd_kernel"] - ms["generator"]
    row["ratio_agd_mmd"] = ms["agd_step"] / ms["mmd_step"]
    for step in ("agd", "mmd"):  # the median heuristic's share of a step, now and with the copy from before
        t = ms[f"{step}_step"]
        row[f"median_share_{step}"] = ms["median"] / t
        row[f"median_before_share_{step}"] = ms["median_before"] / (t - ms["median"] + ms["median_before"])
    # On a loaded machine a unit is only ever slowed down: the fastest round is a second, load-robust estimate.
    row["ratio_agd_mmd_min"] = best["agd_step"] / best["mmd_step"]
    return row


def markdown(rows: list[dict]) -> str:
    """Medians in ms; the last column is the ratio of the fastest rounds."""
    head = ("| n | d | agd ms/step | mmd ms/step | agd / mmd | agd kernel | agd solve | agd generator | agd rest "
            "| mmd kernel | mmd generator | mmd rest | of which median | median before | agd / mmd (fastest) "
            "| median share of agd / mmd step | before |")
    lines = [head, "|" + "---|" * 17]
    for r in rows:
        cells = [r["agd_step_ms"], r["mmd_step_ms"]]
        parts = [r["agd_kernel_ms"], r["agd_solve_ms"], r["generator_ms"], r["agd_rest_ms"],
                 r["mmd_kernel_ms"], r["generator_ms"], r["mmd_rest_ms"], r["median_ms"], r["median_before_ms"]]
        lines.append(f"| {r['n']} | {r['d']} | " + " | ".join(f"{v:.2f}" for v in cells)
                     + f" | {r['ratio_agd_mmd']:.2f} | " + " | ".join(f"{v:.2f}" for v in parts)
                     + f" | {r['ratio_agd_mmd_min']:.2f}"
                     + f" | {100 * r['median_share_agd']:.1f}% / {100 * r['median_share_mmd']:.1f}%"
                     + f" | {100 * r['median_before_share_agd']:.1f}% / {100 * r['median_before_share_mmd']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="n in {100, 200}, d = 2, 3 rounds (a smoke run)")
    ap.add_argument("--batches", type=int, nargs="+", default=[100, 200, 500, 1000])
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 64])
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per configuration (median reported)")
    ap.add_argument("--estimator", default="stein", choices=["stein", "ssge"], help="AGD score estimator")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "generators.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    batches, dims, repeats = ([100, 200], [2], 3) if args.quick else (args.batches, args.dims, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"AGD estimator {args.estimator}", flush=True)
    rows = []
    for d in dims:
        for n in batches:
            r = time_config(n, d, repeats=repeats, estimator=args.estimator, device=args.device)
            rows.append(r)
            print(f"n={n:>5} d={d:>3}: agd {r['agd_step_ms']:.2f} ms, mmd {r['mmd_step_ms']:.2f} ms, "
                  f"ratio {r['ratio_agd_mmd']:.2f}; median {r['median_ms']:.2f} ms "
                  f"({100 * r['median_share_agd']:.1f}% / {100 * r['median_share_mmd']:.1f}% of a step), "
                  f"before {r['median_before_ms']:.2f} ms ({100 * r['median_before_share_agd']:.1f}% / "
                  f"{100 * r['median_before_share_mmd']:.1f}%)", flush=True)
    table = markdown(rows)
    print()
    print(table)
    out = {
        "load_average_1min": [load_start, os.getloadavg()[0]],  # at the start and at the end
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "config": {"generator": "MLPGenerator(d, d, hidden=128, n_layers=2)", "optimizer": "Adam",
                   "kernel": "IMQ mixture, scales (0.5, 1, 2, 4), beta -0.5, median of the pooled batch",
                   "estimator": args.estimator, "repeats": repeats, "statistic": "median"},
        "rows": rows,
        "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
