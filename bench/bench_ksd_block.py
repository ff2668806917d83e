"""The KSD U-statistic's row-block size on a device: ``stein_core.discrepancies._BLOCK_ELEMENTS`` (the most
``[block, n]`` elements one block holds, sized for a CPU cache) set to several values in one process, each timed
beside its matrix-product floor (``tasks.tools.bench.time_ksd``), with the statistic's value checked to stay the same.

It measures a proposed change before it is made (a stein_core change reruns every pipeline): on a GPU, small
blocks mean many small kernel launches.

    python bench/bench_ksd_block.py [--device cuda] [--sizes 4096x64 4096x256 16384x784] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", nargs="+", default=["4096x64", "4096x256", "16384x784"])
    ap.add_argument("--blocks", nargs="+", type=int, default=[20, 22, 24, 26], help="log2 of the block's elements")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    import stein_core.discrepancies as disc
    from tasks.tools.bench import time_ksd

    default = disc._BLOCK_ELEMENTS
    rows = []
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    print(f"# {name}, torch {torch.__version__}, default block 2^{default.bit_length() - 1}")
    try:
        for size in args.sizes:
            n, d = map(int, size.split("x"))
            values = []
            for log2 in args.blocks:
                disc._BLOCK_ELEMENTS = 1 << log2
                out = time_ksd(n, d, device=args.device, repeats=args.repeats, naive=False)
                values.append(out["ksd"])
                row = {"n": n, "d": d, "block_log2": log2, "seconds": out["seconds"],
                       "floor_seconds": out["floor_seconds"], "ratio_to_floor": out["ratio_to_floor"], "ksd": out["ksd"]}
                rows.append(row)
                print(f"n={n:6d} d={d:4d} block 2^{log2}: {1000 * out['seconds']:8.2f} ms  floor "
                      f"{1000 * out['floor_seconds']:7.2f} ms  ratio {out['ratio_to_floor']:6.1f}  ksd {out['ksd']:.6g}",
                      flush=True)
            spread = max(values) - min(values)
            print(f"  value spread across blocks: {spread:.3g} (float32 sums in another order)")
    finally:
        disc._BLOCK_ELEMENTS = default
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
