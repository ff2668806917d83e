"""Stage flows that sample from a trained score network: annealed Langevin (``sample``) and plain Langevin at
the smallest noise level (``sample-langevin``, the blindness baseline)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.registry import run_stage
from tasks.sample import sample_annealed_langevin, sample_langevin


def _run(pipeline: str, config: str | None, stage: str, task) -> dict:
    def samples(ctx) -> Path:
        return ctx.paths.samples_of(ctx.stage.output)

    def compute(ctx, run):
        return task(ctx.section, model_path=ctx.paths.model, out_path=samples(ctx), device=ctx.device)

    return run_stage(
        pipeline, config, stage, compute=compute,
        inputs=lambda ctx: {"model": ctx.paths.model}, outputs=lambda ctx: {"samples": samples(ctx)},
    )


@flow(name="sample", log_prints=True)
def sample_flow(pipeline: str = "gmm2d", config: str | None = None, stage: str = "sample") -> dict:
    """Annealed Langevin dynamics (NCSN) from the pipeline's score network."""
    return _run(pipeline, config, stage, sample_annealed_langevin)


@flow(name="sample-langevin", log_prints=True)
def langevin_flow(pipeline: str = "gmm2d-blindness", config: str | None = None, stage: str = "sample-langevin") -> dict:
    """Plain Langevin dynamics with the score at the smallest noise level only."""
    return _run(pipeline, config, stage, sample_langevin)
