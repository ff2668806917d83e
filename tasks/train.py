"""Train stage: a noise-conditional score network by denoising score matching, distributed with Ray Train.

The driver (this process) starts or joins Ray, creates nothing itself but the trainer, and after ``fit`` copies
the final checkpoint to the stage's output atomically. Each Ray worker runs
:func:`tasks.train_worker.train_loop_per_worker`:
DDP through ``ray.train.torch.prepare_model``, its own seeded minibatch stream, checkpoints reported to Ray
(so a failed worker group restarts from the last one), and, on rank 0, loss curves logged into the MLflow run
the driver created (the driver passes the run id and an absolute tracking URI).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import ConvNCSNTrain, NCSNTrain
from tasks.io import atomic_path, save_checkpoint
from tasks.runtime import OFFLINE_ENV, RuntimeSettings, project_root, state_dir
from tasks.train_worker import STATE_FILE, train_loop_per_worker

log = logging.getLogger("stein")

def ray_runtime_env(settings: RuntimeSettings, root: Path, threads: int) -> dict[str, Any]:
    """Environment of the Ray workers: the project importable, offline, thread counts capped."""
    env = dict(OFFLINE_ENV) | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p),
    }
    runtime_env: dict[str, Any] = {"env_vars": env}
    if settings.ray_ship_code:
        runtime_env["working_dir"] = str(root)
        runtime_env["excludes"] = [".venv", ".stein", ".git", ".dvc/cache", "data", "models", "samples", "plots"]
    return runtime_env


def init_ray(settings: RuntimeSettings, root: Path, threads: int) -> bool:
    """Join ``RAY_ADDRESS`` if set, else start a local Ray sized to this machine. Returns True if started here
    (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = settings.resolved_ray_address()
    runtime_env = ray_runtime_env(settings, root, threads)
    t0 = time.perf_counter()
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # A local Ray turns on token auth by default; nothing but this process talks to it.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # No dashboard (it needs ray[default]); without it Train's placement-group cleaner cannot reach the
        # state API and warns every few seconds, so Ray's own worker logs are kept to errors. Our progress
        # lines are printed, not logged, and still reach the driver.
        ray.init(
            num_cpus=max(os.cpu_count() or 1, settings.num_workers),
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
            logging_config=ray.LoggingConfig(log_level="ERROR"),
        )
    log.info("Ray %s in %.1f s", f"joined at {address}" if address else "started locally", time.perf_counter() - t0)
    return True


@task(name="train-ncsn", cache_policy=NO_CACHE)
def train_ncsn(
    cfg: NCSNTrain | ConvNCSNTrain,
    *,
    data_path: Path,
    model_path: Path,
    loss_csv: Path,
    pipeline: str,
    mlflow_run_id: str | None,
    mlflow_tracking_uri: str | None,
    settings: RuntimeSettings | None = None,
) -> dict[str, float]:
    """Train with Ray Train's TorchTrainer and write the final checkpoint and the loss curve (CSV)."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    settings = settings or RuntimeSettings()
    root = project_root()
    threads = settings.resolved_threads()
    use_gpu = settings.resolved_use_gpu()
    t_init = time.perf_counter()
    started = init_ray(settings, root, threads)
    ray_init_seconds = time.perf_counter() - t_init
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "train": cfg.model_dump(),
                "train_class": type(cfg).__name__,
                "data_path": str(Path(data_path).resolve()),  # workers change directory: absolute paths
                "threads": threads,
                "mlflow_run_id": mlflow_run_id,
                "mlflow_tracking_uri": mlflow_tracking_uri,
            },
            scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=use_gpu),
            run_config=RunConfig(
                # A unique name: Train V2 resumes from any snapshot found under the same name, which would
                # silently continue a stale run after the config changed.
                name=f"{pipeline}-train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                storage_path=str(state_dir(root) / "ray_results"),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=1),
            ),
        )
        log.info("training on %d Ray worker(s), use_gpu=%s", settings.num_workers, use_gpu)
        t0 = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    # Sampling uses the moving average of the weights where one was kept (NCSNv2); the raw weights stay too.
    weights = state["ema"]["shadow"] if "ema" in state else state["model"]
    save_checkpoint(
        model_path,
        state_dict=weights,
        model_args=state["model_args"],
        model_class=state.get("model_class", "NoiseConditionalMLP"),
        shape=state.get("shape"),
        sigmas=state["sigmas"],
        step=state["step"],
        train_config=cfg.model_dump(),
        **({"raw_state_dict": state["model"], "ema_decay": state["ema"]["decay"]} if "ema" in state else {}),
    )
    with atomic_path(loss_csv) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "dsm_loss"])
        w.writerows(state["history"])
    final_loss = state["history"][-1][1] if state["history"] else float("nan")
    return {
        "final_dsm_loss": float(final_loss),
        "steps": int(state["step"]),
        "ray_init_seconds": ray_init_seconds,
        "fit_seconds": fit_seconds,
        # time inside the workers' training loop (of the last attempt); fit_seconds minus this is Ray Train's
        # own overhead: controller and worker actors, process group, checkpoint reporting
        "train_loop_seconds": float(state.get("loop_seconds", float("nan"))),
    }
