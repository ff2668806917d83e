"""Stage flow: sample (DVC stage ``<pipeline>-sample``)."""

from __future__ import annotations

import time

from prefect import flow

from flows.registry import load_stage
from tasks.sample import sample_annealed_langevin
from tasks.tracking import stage_run


@flow(name="sample", log_prints=True)
def sample_flow(pipeline: str = "gmm2d", config: str | None = None) -> dict:
    ctx = load_stage(pipeline, config)
    paths = ctx.paths
    with stage_run(
        pipeline, "sample", params=ctx.cfg.sample.model_dump(), inputs={"model": paths.model},
        outputs={"samples": paths.samples},
    ) as run:
        import mlflow

        t0 = time.perf_counter()
        info = sample_annealed_langevin(ctx.cfg.sample, model_path=paths.model, out_path=paths.samples, device=ctx.device)
        mlflow.log_metrics(info | {"compute_seconds": time.perf_counter() - t0})
    return info | {"mlflow_run_id": run.info.run_id}
