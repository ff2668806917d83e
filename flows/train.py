"""Stage flow: train (DVC stage ``<pipeline>-train``), distributed with Ray Train."""

from __future__ import annotations

from prefect import flow

from flows.registry import load_stage
from tasks.tracking import stage_run, tracking_uri
from tasks.train import train_ncsn


@flow(name="train", log_prints=True)
def train_flow(pipeline: str = "gmm2d", config: str | None = None, stage: str = "train") -> dict:
    ctx = load_stage(pipeline, config, stage)
    paths, settings = ctx.paths, ctx.settings
    with stage_run(
        pipeline, stage, params=ctx.section.model_dump(), inputs={"train": paths.train},
        outputs={"model": paths.model},
    ) as run:
        import mlflow

        mlflow.log_params({"runtime.num_workers": settings.num_workers, "runtime.use_gpu": settings.resolved_use_gpu()})
        info = train_ncsn(
            ctx.section,
            data_path=paths.train,
            model_path=paths.model,
            loss_csv=paths.plots / "train_loss.csv",
            pipeline=pipeline,
            mlflow_run_id=run.info.run_id,
            mlflow_tracking_uri=tracking_uri(ctx.root),
            settings=settings,
        )
        mlflow.log_metrics(info | {"compute_seconds": info["train_loop_seconds"]})
        mlflow.log_artifact(str(paths.model), artifact_path="model")
        mlflow.log_artifact(str(paths.plots / "train_loss.csv"), artifact_path="plots")
    return info | {"mlflow_run_id": run.info.run_id}
