"""Stage flow: the ICA datasets of a sweep (DVC stage ``<p>-prepare``)."""

from __future__ import annotations

from prefect import flow

from flows.registry import run_stage
from tasks.config.sweep import SweepPaths
from tasks.stages.sweep.prepare import prepare_ica


@flow(name="sweep-prepare", log_prints=True)
def prepare_flow(pipeline: str = "ica-small", config: str | None = None, stage: str = "prepare") -> dict:
    """The ICA datasets of every (dimension, seed)."""
    return run_stage(pipeline, config, stage, compute=lambda ctx, run: prepare_ica(ctx.section, SweepPaths(ctx.paths).data),
                     outputs=lambda ctx: {})
