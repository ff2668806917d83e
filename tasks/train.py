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
import shutil
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.cluster import init_ray
from tasks.config import ConvNCSNTrain, NCSNTrain
from tasks.io import atomic_path, save_checkpoint
from tasks.runtime import RuntimeSettings, project_root, state_dir
from tasks.train_worker import STATE_FILE, train_loop_per_worker

log = logging.getLogger("stein")

def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def export_model(state: dict, path: Path, cfg: NCSNTrain | ConvNCSNTrain) -> None:
    """A training state -> a sampling checkpoint: the moving average of the weights where one was kept
    (NCSNv2), the raw weights beside them, the model class, its arguments, the noise ladder and the step."""
    weights = state["ema"]["shadow"] if "ema" in state else state["model"]
    save_checkpoint(
        path,
        state_dict=weights,
        model_args=state["model_args"],
        model_class=state.get("model_class", "NoiseConditionalMLP"),
        shape=state.get("shape"),
        sigmas=state["sigmas"],
        step=state["step"],
        train_config=cfg.model_dump(),
        **({"raw_state_dict": state["model"], "ema_decay": state["ema"]["decay"]} if "ema" in state else {}),
    )


@task(name="train-ncsn", cache_policy=NO_CACHE)
def train_ncsn(
    cfg: NCSNTrain | ConvNCSNTrain,
    *,
    data_path: Path,
    model_path: Path,
    loss_csv: Path,
    pipeline: str,
    checkpoints_dir: Path | None = None,
    mlflow_run_id: str | None,
    mlflow_tracking_uri: str | None,
    settings: RuntimeSettings | None = None,
) -> dict[str, float]:
    """Train with Ray Train's TorchTrainer; write the final model, every intermediate checkpoint (into
    ``checkpoints_dir`` as ``step_NNNNNN.pt``, same format) and the loss curve (CSV)."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
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
                checkpoint_config=CheckpointConfig(num_to_keep=None),
                failure_config=FailureConfig(max_failures=1),
                # Train's INFO lines (two per reported checkpoint) would drown the workers' progress lines; its
                # system log files under the Ray session keep every level.
                logging_config=LoggingConfig(log_level="WARNING"),
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
    # Every checkpoint Ray kept (all of them: num_to_keep=None) becomes a sampling checkpoint, so that the
    # evaluate stage can follow the metrics along training; the last one is the stage's model.
    states = {}
    for ckpt, _metrics in result.best_checkpoints or [(result.checkpoint, {})]:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        states[int(state["step"])] = state
    state = states[max(states)]
    if checkpoints_dir is not None:
        with atomic_path(checkpoints_dir, directory=True) as tmp:
            for step, s in sorted(states.items()):
                export_model(s, tmp / checkpoint_name(step), cfg)
    export_model(state, model_path, cfg)
    if result.path and Path(result.path).is_dir():
        shutil.rmtree(result.path, ignore_errors=True)  # exported above; Ray's copies only served resumption
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
