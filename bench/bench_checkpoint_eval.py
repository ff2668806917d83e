"""Evaluating a pipeline's training checkpoints: one after another in this process vs fanned out as Ray tasks.

Both call :func:`tasks.stages.evaluate.metrics.evaluate_checkpoint` (sample ``evaluate.checkpoints.n_samples`` chains from the
checkpoint with the pipeline's sampler settings, compute the checkpoint metrics) on the checkpoints the train
stage wrote to ``models/<pipeline>/checkpoints`` (run the pipeline first). The serial loop uses all cores' threads
in one process; the Ray path runs one single-threaded task per core at a time, as the evaluate stage does, and is
timed including ``ray.init`` and the workers' start-up. Both must give the same metrics (same seeds; the
largest relative difference is reported).

    python bench/bench_checkpoint_eval.py [--pipeline gmm2d] [--json bench/out/checkpoint_eval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="gmm2d")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "checkpoint_eval.json")
    args = ap.parse_args()

    os.chdir(REPO)
    import ray
    import torch

    from flows.registry import get_pipeline
    from tasks.infra.ray_client import init_ray, ray_map
    from tasks.stages.evaluate.inputs import EvalInputs
    from tasks.stages.evaluate.metrics import evaluate_checkpoint
    from tasks.infra.runtime import RuntimeSettings, apply_offline_env

    apply_offline_env()
    spec = get_pipeline(args.pipeline)
    cfg = spec.load_config(REPO)
    ev = cfg.evaluate
    if ev.checkpoints is None:
        raise SystemExit(f"{spec.config_file}: evaluate.checkpoints is not set")
    p = spec.paths(REPO)
    ckpts = sorted(p.checkpoints.glob("step_*.pt"))
    if not ckpts:
        raise SystemExit(f"no checkpoints in {p.checkpoints}: run `stein run {args.pipeline}` first")
    inputs = EvalInputs.from_paths(p)
    kwargs = {"cfg": ev.model_dump(), "sampler": getattr(cfg, ev.checkpoints.sampler).model_dump(), "inputs": inputs}
    cores = os.cpu_count() or 1

    t0 = time.perf_counter()
    serial = [evaluate_checkpoint(c, threads=cores, **kwargs) for c in ckpts]
    t_serial = time.perf_counter() - t0

    t0 = time.perf_counter()
    init_ray(RuntimeSettings(num_workers=1, use_gpu=False), REPO, threads=1)
    t_init = time.perf_counter() - t0
    fanned = [None] * len(ckpts)
    for i, row in ray_map(evaluate_checkpoint, ckpts, num_cpus=1, desc="ray", threads=1, **kwargs):
        fanned[i] = row
    t_ray = time.perf_counter() - t0
    ray.shutdown()

    # same seeds; only the thread count differs (reductions may round differently)
    rel = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for a, b in zip(serial, fanned) for k in a)
    result = {
        "pipeline": args.pipeline, "checkpoints": len(ckpts), "n_samples": ev.checkpoints.n_samples,
        "metrics": ev.checkpoints.metrics, "serial_seconds": t_serial, "ray_seconds": t_ray,
        "ray_init_seconds": t_init, "speedup": t_serial / t_ray, "max_relative_difference": rel,
        "machine": f"{platform.processor() or platform.machine()}, {cores} cores", "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
