"""Stage flow: train (DVC stage ``<pipeline>-train``), distributed with Ray Train."""

from __future__ import annotations

from prefect import flow

from flows.registry import run_stage
from tasks.tracking import tracking_uri
from tasks.train import train_ncsn


@flow(name="train", log_prints=True)
def train_flow(pipeline: str = "gmm2d", config: str | None = None, stage: str = "train") -> dict:
    def compute(ctx, run):
        import mlflow

        settings = ctx.settings
        mlflow.log_params({"runtime.num_workers": settings.num_workers, "runtime.use_gpu": settings.resolved_use_gpu()})
        info = train_ncsn(
            ctx.section,
            data_path=ctx.paths.train,
            model_path=ctx.paths.model,
            checkpoints_dir=ctx.paths.checkpoints,
            loss_csv=ctx.paths.plots / "train_loss.csv",
            pipeline=pipeline,
            mlflow_run_id=run.info.run_id,  # Ray worker rank 0 logs the loss curve into this run
            mlflow_tracking_uri=tracking_uri(ctx.root),
            settings=settings,
        )
        return info | {"compute_seconds": info["train_loop_seconds"]}

    return run_stage(
        pipeline, config, stage, compute=compute,
        inputs=lambda ctx: {"train": ctx.paths.train}, outputs=lambda ctx: {"model": ctx.paths.model},
        artifacts=lambda ctx: [(ctx.paths.model, "model"), (ctx.paths.plots / "train_loss.csv", "plots")],
    )
