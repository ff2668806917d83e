"""Stage flow: train (DVC stage ``<pipeline>-train``), any model family, distributed with Ray Train."""

from __future__ import annotations

from prefect import flow

from flows.registry import run_stage
from tasks.tracking.log import tracking_uri
from tasks.stages.train.task import train_model, training_run_name


@flow(name="train", log_prints=True)
def train_flow(pipeline: str = "gmm2d", config: str | None = None, stage: str = "train") -> dict:
    def compute(ctx, run):
        import mlflow

        settings = ctx.settings
        mlflow.log_params({"runtime.num_workers": settings.workers_spec, "runtime.use_gpu": settings.resolved_use_gpu()})
        mlflow.set_tag("stein.family", ctx.section.family)
        inputs = [ctx.paths.train, *([ctx.paths.test] if ctx.section.heldout_every else [])]
        # the Ray Train run is named after everything DVC would rerun this stage for: a killed training resumes
        # when the stage reruns with the same inputs, and only then
        code = ctx.spec.stage_code(ctx.root, stage, ctx.section.family)
        run_name = training_run_name(pipeline, ctx.section, [*inputs, *(ctx.root / p for p in code)], ctx.root)
        mlflow.set_tag("stein.ray_train_run", run_name)
        info = train_model(
            ctx.section,
            data_path=ctx.paths.train,
            heldout_path=ctx.paths.test if ctx.section.heldout_every else None,
            model_path=ctx.paths.model,
            checkpoints_dir=ctx.paths.checkpoints,
            curves_dir=ctx.paths.plots,
            pipeline=pipeline,
            run_name=run_name,
            mlflow_run_id=run.info.run_id,  # Ray worker rank 0 logs the step metrics into this run
            mlflow_tracking_uri=tracking_uri(ctx.root),
            settings=settings,
            config_file=config or ctx.spec.config_file,
        )
        return info | {"compute_seconds": info["train_loop_seconds"]}

    def artifacts(ctx):
        curves = [ctx.paths.train_curve] + ([ctx.paths.heldout_curve] if ctx.section.heldout_every else [])
        return [(ctx.paths.model, "model"), *((c, "plots") for c in curves)]

    return run_stage(
        pipeline, config, stage, compute=compute,
        inputs=lambda ctx: {"train": ctx.paths.train, **({"test": ctx.paths.test} if ctx.section.heldout_every else {})},
        outputs=lambda ctx: {"model": ctx.paths.model}, artifacts=artifacts,
    )
