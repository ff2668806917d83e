"""Stage flows that sample from a trained score network: annealed Langevin (``sample``) and plain Langevin at
the smallest noise level (``sample-langevin``, the blindness baseline)."""

from __future__ import annotations

import time

from prefect import flow

from flows.registry import load_stage
from tasks.sample import sample_annealed_langevin, sample_langevin
from tasks.tracking import stage_run


def _run(pipeline: str, config: str | None, stage: str, task) -> dict:
    ctx = load_stage(pipeline, config, stage)
    out = ctx.paths.samples_of(ctx.stage.output)
    with stage_run(
        pipeline, stage, params=ctx.section.model_dump(), inputs={"model": ctx.paths.model}, outputs={"samples": out},
    ) as run:
        import mlflow

        t0 = time.perf_counter()
        info = task(ctx.section, model_path=ctx.paths.model, out_path=out, device=ctx.device)
        mlflow.log_metrics(info | {"compute_seconds": time.perf_counter() - t0})
    return info | {"mlflow_run_id": run.info.run_id}


@flow(name="sample", log_prints=True)
def sample_flow(pipeline: str = "gmm2d", config: str | None = None, stage: str = "sample") -> dict:
    """Annealed Langevin dynamics (NCSN) from the pipeline's score network."""
    return _run(pipeline, config, stage, sample_annealed_langevin)


@flow(name="sample-langevin", log_prints=True)
def langevin_flow(pipeline: str = "gmm2d-blindness", config: str | None = None, stage: str = "sample-langevin") -> dict:
    """Plain Langevin dynamics with the score at the smallest noise level only."""
    return _run(pipeline, config, stage, sample_langevin)
