"""Stage flow: prepare (DVC stage ``<pipeline>-prepare``)."""

from __future__ import annotations

import time

from prefect import flow

from flows.registry import load_stage
from tasks.config import ImagePrepare
from tasks.prepare import prepare_gmm, prepare_images
from tasks.tracking import stage_run


@flow(name="prepare", log_prints=True)
def prepare_flow(pipeline: str = "gmm2d", config: str | None = None, stage: str = "prepare") -> dict:
    ctx = load_stage(pipeline, config, stage)
    paths = ctx.paths
    outputs = {"train": paths.train, "test": paths.test}
    with stage_run(pipeline, stage, params=ctx.section.model_dump(), outputs=outputs) as run:
        import mlflow

        t0 = time.perf_counter()
        task = prepare_images if isinstance(ctx.section, ImagePrepare) else prepare_gmm
        info = task(ctx.section, paths.train, paths.test)
        mlflow.log_metrics({k: float(v) for k, v in info.items()} | {"compute_seconds": time.perf_counter() - t0})
    return info | {"mlflow_run_id": run.info.run_id}
