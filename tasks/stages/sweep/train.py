"""Train stage of a sweep: every cell of one method, each through the one training loop on Ray Train and into
an MLflow run of its own (see the package's docstring)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tasks.config.sweep import SweepConfig, SweepPaths, cell_name
from tasks.data.io import atomic_path

log = logging.getLogger("stein")


def _staging(root: Path, pipeline: str, method: str) -> Path:
    from tasks.infra.runtime import state_dir

    return state_dir(root) / "sweeps" / pipeline / method


def train_cells(
    cfg: SweepConfig,
    method: str,
    *,
    sp: SweepPaths,
    pipeline: str,
    root: Path,
    code: list[Path],
    parent_run,
    tracking_uri: str,
    settings,
    config_file: str,
) -> dict[str, float]:
    """Train every cell of ``method`` (one Ray for all of them); write ``models/<p>/<method>/<cell>/model.pt``
    and its ``train_loss.csv``. Returns the number of cells trained and reused, and the loop's seconds."""
    import ray
    from mlflow import MlflowClient

    from tasks.infra.ray_client import init_ray
    from tasks.stages.train.task import train_model, training_run_name

    client = MlflowClient(tracking_uri)
    staging = _staging(root, pipeline, method)
    family = cfg.methods[method].family
    cells = cfg.cells(method)
    trained = reused = 0
    loop_seconds = 0.0
    started = init_ray(settings, root, settings.resolved_threads())
    try:
        for i, (d, s) in enumerate(cells):
            name = cell_name(d, s)
            train = cfg.cell_train(method, s)
            data = sp.train(d, s)
            run_name = training_run_name(f"{pipeline}-{method}-{name}", train, [data, *code], root)
            out = staging / name
            if (out / "run_name").is_file() and (out / "run_name").read_text() == run_name and (out / "model.pt").is_file():
                log.info("[%s %d/%d] %s: trained before with the same inputs, kept", method, i + 1, len(cells), name)
                reused += 1
                continue
            shutil.rmtree(out, ignore_errors=True)
            run = client.create_run(parent_run.info.experiment_id, run_name=f"{method} {name}", tags={
                "mlflow.parentRunId": parent_run.info.run_id, "stein.kind": "cell", "stein.pipeline": pipeline,
                "stein.cell": f"{method}/{name}", "stein.method": method, "stein.family": family,
                "stein.dim": str(d), "stein.seed": str(s)})
            for k, v in {"method": method, "family": family, "dim": d, "seed": s, "batch_size": train.batch_size,
                         "n_steps": train.n_steps}.items():
                client.log_param(run.info.run_id, k, v)
            log.info("[%s %d/%d] training %s on D=%d, seed %d (%d steps)", method, i + 1, len(cells), family, d, s,
                     train.n_steps)
            status = "FAILED"
            try:
                info = train_model(train, data_path=data, heldout_path=None, model_path=out / "model.pt",
                                   curves_dir=out, pipeline=f"{pipeline}-{method}", run_name=run_name,
                                   mlflow_run_id=run.info.run_id, mlflow_tracking_uri=tracking_uri,
                                   settings=settings, config_file=f"{config_file} (methods.{method})")
                status = "FINISHED"
            finally:
                client.set_terminated(run.info.run_id, status)
            (out / "run_name").write_text(run_name)
            loop_seconds += info["train_loop_seconds"]
            trained += 1
    finally:
        if started:
            ray.shutdown()
    with atomic_path(sp.models(method), directory=True) as tmp:
        for d, s in cells:
            name = cell_name(d, s)
            (tmp / name).mkdir()
            for f in ("model.pt", "train_loss.csv"):
                shutil.copy2(staging / name / f, tmp / name / f)
    shutil.rmtree(staging)  # exported: the staging folder only served an interrupted sweep
    return {"cells_trained": trained, "cells_reused": reused, "train_loop_seconds": loop_seconds}
