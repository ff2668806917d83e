"""Train stage: any model family, through the one training loop (:mod:`tasks.training`) on Ray Train.

The driver (this process) starts or joins Ray, creates nothing itself but the trainer, and after ``fit`` exports
every checkpoint Ray kept as a model checkpoint (``models/<pipeline>/checkpoints/step_NNNNNNN.pt``) and the last
one as the stage's model, atomically; the training curves go to CSV files for ``dvc plots``. Rank 0 of the
workers logs every metric of the family's step into the MLflow run the driver created (the driver passes the run
id and an absolute tracking URI).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.cluster import init_ray, local_torch_config
from tasks.families import FAMILIES, model_payload
from tasks.io import atomic_path, save_torch, write_rows
from tasks.runtime import RuntimeSettings, check_batch_split, project_root, state_dir
from tasks.training import STATE_FILE, TrainingDiverged, fatal_error, train_loop_per_worker

log = logging.getLogger("stein")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


@task(name="train", cache_policy=NO_CACHE)
def train_model(
    cfg,
    *,
    data_path: Path,
    heldout_path: Path | None,
    model_path: Path,
    curves_dir: Path,
    pipeline: str,
    checkpoints_dir: Path | None = None,
    mlflow_run_id: str | None,
    mlflow_tracking_uri: str | None,
    settings: RuntimeSettings | None = None,
) -> dict[str, float]:
    """Train the family ``cfg.family`` names with Ray Train's TorchTrainer; write the final model, every kept
    checkpoint and the curves (``train_loss.csv``: the step metrics; ``heldout.csv``: the held-out MMD against
    step, epoch and seconds, when ``heldout_every`` is set)."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    family = FAMILIES[cfg.family]
    settings = settings or RuntimeSettings()
    check_batch_split(cfg, settings)
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
                "family": family.name,
                "train": cfg.model_dump(),
                "data_path": str(Path(data_path).resolve()),  # workers change directory: absolute paths
                "heldout_path": str(Path(heldout_path).resolve()) if heldout_path else None,
                "threads": threads,
                "mlflow_run_id": mlflow_run_id,
                "mlflow_tracking_uri": mlflow_tracking_uri,
            },
            scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=use_gpu),
            torch_config=local_torch_config(),  # a local Ray: the rendezvous store on 127.0.0.1 too
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
        log.info("training %s on %d Ray worker(s), use_gpu=%s", family.name, settings.num_workers, use_gpu)
        t0 = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    fatal = fatal_error(result.metrics)
    if isinstance(fatal, TrainingDiverged):
        raise TrainingDiverged(f"{fatal}; Ray kept its checkpoints under {result.path}")
    if fatal is not None:
        if result.path and Path(result.path).is_dir():
            shutil.rmtree(result.path, ignore_errors=True)  # nothing to resume: the input was bad
        raise fatal
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint: {result.error}")
    # Every checkpoint Ray kept (all of them: num_to_keep=None) becomes a model checkpoint, so that the evaluate
    # stage can follow the metrics along training; the last one is the stage's model.
    states = {}
    for ckpt, _metrics in result.best_checkpoints or [(result.checkpoint, {})]:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        states[int(state["step"])] = state
    state = states[max(states)]
    if checkpoints_dir is not None:
        with atomic_path(checkpoints_dir, directory=True) as tmp:
            for step, s in sorted(states.items()):
                save_torch(tmp / checkpoint_name(step), model_payload(family, cfg, s))
    save_torch(model_path, model_payload(family, cfg, state))
    if result.path and Path(result.path).is_dir():
        shutil.rmtree(result.path, ignore_errors=True)  # exported above; Ray's copies only served resumption
    write_rows(Path(curves_dir) / "train_loss.csv", state["history"])
    if cfg.heldout_every:
        write_rows(Path(curves_dir) / "heldout.csv", state["heldout"])
    last = state["history"][-1] if state["history"] else {}
    steps = int(state["step"])
    out = {f"final_{k}": float(v) for k, v in last.items() if k != "step"}
    if state["heldout"]:
        out["final_mmd_heldout"] = float(state["heldout"][-1]["mmd_heldout"])
    return out | {
        "steps": steps,
        "ray_init_seconds": ray_init_seconds,
        "fit_seconds": fit_seconds,
        # time inside the workers' training steps (all attempts); fit_seconds minus this is Ray Train's own
        # overhead: controller and worker actors, process group, checkpoint reporting, held-out evaluations
        "train_loop_seconds": float(state["train_seconds"]),
        "seconds_per_step": float(state["train_seconds"]) / max(steps, 1),
        "seconds_per_epoch": float(state["train_seconds"]) / max(steps, 1) * state["n_train"] / cfg.batch_size,
    }
