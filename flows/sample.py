"""Stage flow: sample (DVC stages ``<pipeline>-sample*``) from any family's trained model, with the sampler its
sample section names (annealed or plain Langevin for a score network, x = G(z) for a generator)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.registry import run_stage
from tasks.stages.sample import sample_model


@flow(name="sample", log_prints=True)
def sample_flow(pipeline: str = "gmm2d", config: str | None = None, stage: str = "sample") -> dict:
    def samples(ctx) -> Path:
        return ctx.paths.samples_of(ctx.stage.output)

    def compute(ctx, run):
        return sample_model(ctx.section, model_path=ctx.paths.model, out_path=samples(ctx), device=ctx.device)

    return run_stage(
        pipeline, config, stage, compute=compute,
        inputs=lambda ctx: {"model": ctx.paths.model}, outputs=lambda ctx: {"samples": samples(ctx)},
    )
