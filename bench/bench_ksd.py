"""KSD U-statistic speed and memory: time vs its floor and the naive reference, scaling in n and d, and the
peak memory of an MNIST-sized problem (n=16384, d=784).

Each size runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own.

    python bench/bench_ksd.py [--quick] [--json bench/out/ksd.json]
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

CHILD = """
import json, resource, sys, torch
from tasks.tools.bench import time_ksd
n, d, naive, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
out = time_ksd(n, d, naive=naive, repeats=3 if n * d > 4096 * 64 else 5, device=device)
out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
if device.startswith("cuda"):
    out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
print(json.dumps(out))
"""


def run(n: int, d: int, naive: bool, device: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(n), str(d), "1" if naive else "0", device],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"n={n} d={d} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller grid (a smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "ksd.json")
    args = ap.parse_args()
    headline = [(4096, 64, True)]
    scaling_n = [(n, 64, False) for n in ((512, 1024, 2048) if args.quick else (512, 1024, 2048, 8192))]
    scaling_d = [(4096, d, False) for d in ((8, 256) if args.quick else (8, 16, 256, 784))]
    mnist = [] if args.quick else [(16384, 784, False)]
    rows = []
    for n, d, naive in headline + scaling_n + scaling_d + mnist:
        r = run(n, d, naive, args.device)
        rows.append(r)
        extra = f"  naive {r['naive_seconds']:.3f} s ({r['speedup_vs_naive']:.0f}x slower)" if "naive_seconds" in r else ""
        print(f"n={n:>6} d={d:>4}: ksd {r['seconds']:.4f} s, floor {r['floor_seconds']:.4f} s, ratio {r['ratio_to_floor']:.2f}, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB{extra}", flush=True)
    out = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores", "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
