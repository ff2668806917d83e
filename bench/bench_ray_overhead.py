"""Ray Train's overhead against a bare PyTorch loop on the same training.

Both run :func:`tasks.stages.train.loop.fit`, the one training loop of every family, on the same data, config and thread
count: once called directly in this process, once through ``tasks.stages.train.task.train_model`` (local Ray,
``TorchTrainer``, one worker, DDP, checkpoints reported to Ray). Ray's cost splits into a fixed part (``ray.init``
and Train's actor start-up and shutdown) and a per-step part (DDP hooks, reporting), so a run of a given length
can be extrapolated from one measurement:

    overhead(T) = fixed + (loop_ray / loop_bare - 1) * T

    python bench/bench_ray_overhead.py [--pipeline gmm2d] [--steps 3000] [--json bench/out/ray_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="gmm2d")
    ap.add_argument("--steps", type=int, default=3000, help="training steps of both runs")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "ray_overhead.json")
    args = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.chdir(REPO)
    import torch

    from flows.registry import get_pipeline
    from tasks.families import FAMILIES
    from tasks.data.io import read_dataset
    from tasks.stages.prepare import prepare_mixture
    from tasks.infra.runtime import RuntimeSettings, apply_offline_env
    from tasks.stages.train.task import train_model
    from tasks.stages.train.loop import fit

    apply_offline_env()
    spec = get_pipeline(args.pipeline)
    cfg = spec.load_config(REPO)
    train_cfg = cfg.train.model_copy(update={"n_steps": args.steps, "checkpoint_every": max(1, args.steps // 3)})
    settings = RuntimeSettings(num_workers=1, use_gpu=False)
    threads = settings.resolved_threads()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_mixture.fn(cfg.prepare, tmp / "train.parquet", tmp / "test.parquet")
        dataset = read_dataset(tmp / "train.parquet")

        t0 = time.perf_counter()
        fit(FAMILIES[train_cfg.family], train_cfg, torch.from_numpy(dataset.x), dataset.shape, device=torch.device("cpu"))
        bare = time.perf_counter() - t0
        print(f"[bench] bare loop: {bare:.1f} s", flush=True)

        t0 = time.perf_counter()
        info = train_model.fn(
            train_cfg, data_path=tmp / "train.parquet", heldout_path=None, model_path=tmp / "model.pt",
            curves_dir=tmp, pipeline="bench", mlflow_run_id=None, mlflow_tracking_uri=None, settings=settings,
        )
        ray_total = time.perf_counter() - t0

    loop = info["train_loop_seconds"]
    fixed = ray_total - loop
    per_step = loop / bare
    five_min = 300.0
    out = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores", "steps": args.steps,
        "threads": threads, "bare_seconds": bare, "ray_total_seconds": ray_total, "ray_loop_seconds": loop,
        "ray_init_seconds": info["ray_init_seconds"], "fixed_overhead_seconds": fixed,
        "loop_slowdown": per_step,
        "overhead_fraction_5min": (fixed + (per_step - 1.0) * five_min) / five_min,
        "overhead_fraction_this_run": (ray_total - bare) / bare,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"steps {args.steps}, {threads} threads: bare loop {bare:.1f} s; Ray Train {ray_total:.1f} s "
          f"(init {info['ray_init_seconds']:.1f} s, loop {loop:.1f} s, fixed overhead {fixed:.1f} s)")
    print(f"loop inside Ray / bare loop: {per_step:.3f}; overhead of this run: {100 * out['overhead_fraction_this_run']:.1f}%; "
          f"extrapolated to a 5-minute run: {100 * out['overhead_fraction_5min']:.1f}%")


if __name__ == "__main__":
    main()
