"""KSD U-statistic speed and memory: its time as a multiple of ONE matrix product, beside the form it had before
issue 24, and the peak memory of each size (an MNIST-sized problem is n=16384, d=784).

The floor is a single ``[n, d] x [d, n]`` matrix product, ``x @ x.T`` (a fresh ``[n, n]`` output, as any caller
pays it): KSD's arithmetic is three such products (``r^2``, ``Phi S`` and ``Phi' X``), so the ratio ``ksd /
floor`` is about 3 for a KSD bound by its products and more where element-wise passes and per-call costs show.
The floor used before (``old floor``: that product plus one element-wise pass, ``addmm(1, x, x^T).rsqrt_()``)
is timed too, for comparison with older figures. ``before`` is ``stein_core.discrepancies.ksd`` with the form
it had before issue 24 at every ``n`` (``_KSD_EXACT_MAX_N`` raised past ``n``: the generic closed form that
inputs up to 1024 samples still take, bit for bit); its ratio is the ``before`` column. The kernel is IMQ
(``c = 1``, ``beta = -1/2``), the score that of N(0, I) at ``x ~ N(0, I)``, float32, ``no_grad``.

Timing: in each size's own process (so that its peak resident memory, ru_maxrss, is its own) the functions run
once to warm up, then ``--repeats`` rounds, each running every function once in a rotating order; the fastest
round of each is reported (these machines are shared: load only ever slows a run down), its median beside it.
The value is checked at every size: ``ksd`` and ``before`` in float32 against ``ksd`` in float64, as
``|value - f64| / max(|f64|, 1e-3 * scale)`` with ``scale`` the float64 mean of ``u_ii``'s largest term,
``phi(0) mean |s|^2``.

    nice -n 19 python bench/bench_ksd.py [--quick] [--sizes 2048x64 16384x784] [--repeats 5] [--no-before]
                                          [--threads 2] [--json bench/out/ksd.json]

``--quick``: n in 512, 1024, 2048, 4096, 8192 at d = 64 and n in 512 .. 4096 at d = 784 (16384 x 64 and
16384 x 784 take seconds per run: name them with ``--sizes``, once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, statistics, sys, time, torch
import stein_core.discrepancies as disc
from stein_core.kernels import IMQ
n, d, repeats, before, threads, device = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1",
                                          int(sys.argv[5]), sys.argv[6])
torch.set_num_threads(threads)
gen = torch.Generator(device=device).manual_seed(0)
x = torch.randn(n, d, generator=gen, device=device)
score = -x  # the score of N(0, I)
kernel = IMQ(c=1.0, beta=-0.5)
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
one = torch.ones((), device=device)
exact_max = disc._KSD_EXACT_MAX_N


def ksd_before(x, s):
    disc._KSD_EXACT_MAX_N = 1 << 62  # the form before issue 24 at every n
    try:
        return disc.ksd(x, s, kernel, statistic="u")
    finally:
        disc._KSD_EXACT_MAX_N = exact_max


fns = {"ksd": lambda: disc.ksd(x, score, kernel, statistic="u"), "floor": lambda: x @ x.T,
       "old_floor": lambda: torch.addmm(one, x, x.T).rsqrt_()}
if before:
    fns["before"] = lambda: ksd_before(x, score)
times = {k: [] for k in fns}
names = list(fns)
last = {}
with torch.no_grad():
    for k, f in fns.items():
        last[k] = f()
    sync()
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    # float64 reference: ksd itself in float64 (the form before issue 24 up to 1024 samples, the upper-triangle
    # form above; both equal the float64 matrix form to ~1e-13 relative, tests/unit/test_discrepancies.py)
    ref = disc.ksd(x.double(), score.double(), kernel, statistic="u").item()
    scale = (score.double() ** 2).sum(-1).mean().item()  # phi(0) = 1: the mean of the largest term of u_ii
    value = last["ksd"].item()
    out = {"n": n, "d": d, "threads": torch.get_num_threads(), "device": device, "repeats": repeats}
    for k in names:
        out[f"{k}_s"] = min(times[k])
        out[f"{k}_median_s"] = statistics.median(times[k])
    out["ratio"] = out["ksd_s"] / out["floor_s"]
    out["ratio_old_floor"] = out["ksd_s"] / out["old_floor_s"]
    out["ksd"], out["ksd_f64"] = value, ref
    out["rel_err"] = abs(value - ref) / max(abs(ref), 1e-3 * scale)
    if before:
        out["ratio_before"] = out["before_s"] / out["floor_s"]
        b = last["before"].item()
        out["ksd_before"], out["rel_err_before"] = b, abs(b - ref) / max(abs(ref), 1e-3 * scale)
out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
if device.startswith("cuda"):
    out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
print(json.dumps(out))
"""


def run(n: int, d: int, repeats: int, before: bool, threads: int, device: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(n), str(d), str(repeats), "1" if before else "0",
                           str(threads), device], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"n={n} d={d} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the grid up to n = 8192 (d = 64) and 4096 (d = 784)")
    ap.add_argument("--sizes", nargs="+", help="NxD sizes instead of the grid, e.g. 16384x784")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-before", action="store_true", help="do not time the form before issue 24")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "ksd.json")
    args = ap.parse_args()
    if args.sizes:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    elif args.quick:
        sizes = [(n, 64) for n in (512, 1024, 2048, 4096, 8192)] + [(n, 784) for n in (512, 1024, 2048, 4096)]
    else:
        sizes = [(n, d) for d in (64, 784) for n in (512, 1024, 2048, 4096, 8192, 16384)]
    rows = []
    for n, d in sizes:
        r = run(n, d, args.repeats, not args.no_before, args.threads, args.device)
        rows.append(r)
        before = (f", before {r['before_s']:.4f} s (x{r['ratio_before']:.2f}, rel. err. {r['rel_err_before']:.1e})"
                  if "before_s" in r else "")
        print(f"n={n:>6} d={d:>4}: ksd {r['ksd_s']:.4f} s = x{r['ratio']:.2f} the floor {r['floor_s']:.4f} s "
              f"(x{r['ratio_old_floor']:.2f} the old floor), rel. err. vs f64 {r['rel_err']:.1e}{before}, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    out = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
           "load_average_1min_end": os.getloadavg()[0], "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
