"""Stage flow: prepare (DVC stage ``<pipeline>-prepare``)."""

from __future__ import annotations

from prefect import flow

from flows.registry import run_stage
from tasks.config.sections import ImagePrepare
from tasks.stages.prepare import prepare_images, prepare_mixture


@flow(name="prepare", log_prints=True)
def prepare_flow(pipeline: str = "gmm2d", config: str | None = None, stage: str = "prepare") -> dict:
    def compute(ctx, run):
        task = prepare_images if isinstance(ctx.section, ImagePrepare) else prepare_mixture
        return task(ctx.section, ctx.paths.train, ctx.paths.test)

    return run_stage(pipeline, config, stage, compute=compute, outputs=lambda ctx: {"train": ctx.paths.train, "test": ctx.paths.test})
