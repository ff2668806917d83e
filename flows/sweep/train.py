"""Stage flow: every cell of one method of a sweep (DVC stage ``<p>-train-<method>``)."""

from __future__ import annotations

from prefect import flow

from flows.registry import StageContext, run_stage
from tasks.config.sweep import SweepPaths
from tasks.stages.sweep.train import train_cells


@flow(name="sweep-train", log_prints=True)
def train_flow(pipeline: str = "ica-small", config: str | None = None, stage: str = "train-ksd") -> dict:
    """Every cell of one method: a Ray Train run and an MLflow run (child of this stage's run) each."""

    def compute(ctx: StageContext, run) -> dict:
        import mlflow

        from tasks.tracking.log import tracking_uri

        method = ctx.stage.section.split(".", 1)[1]
        mlflow.set_tag("stein.family", ctx.section.family)
        code = [ctx.root / p for p in ctx.spec.stage_code(ctx.root, stage, ctx.section.family)]
        info = train_cells(ctx.cfg, method, sp=SweepPaths(ctx.paths), pipeline=pipeline, root=ctx.root, code=code,
                           parent_run=run, tracking_uri=tracking_uri(ctx.root), settings=ctx.settings,
                           config_file=config or ctx.spec.config_file)
        return info | {"compute_seconds": info["train_loop_seconds"]}

    return run_stage(pipeline, config, stage, compute=compute, outputs=lambda ctx: {})
