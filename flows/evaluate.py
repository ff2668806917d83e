"""Stage flow: evaluate (DVC stage ``<pipeline>-evaluate``): metrics JSON, plots, the same in MLflow."""

from __future__ import annotations

import time

from prefect import flow

from flows.registry import load_stage
from tasks.evaluate import evaluate_gmm
from tasks.tracking import stage_run


@flow(name="evaluate", log_prints=True)
def evaluate_flow(pipeline: str = "gmm2d", config: str | None = None) -> dict:
    ctx = load_stage(pipeline, config)
    paths = ctx.paths
    with stage_run(
        pipeline, "evaluate", params=ctx.cfg.evaluate.model_dump(),
        inputs={"samples": paths.samples, "test": paths.test, "model": paths.model},
        outputs={"metrics": paths.metrics},
    ) as run:
        import mlflow

        t0 = time.perf_counter()
        metrics = evaluate_gmm(
            ctx.cfg.evaluate, samples_path=paths.samples, test_path=paths.test, model_path=paths.model,
            metrics_path=paths.metrics, plots_dir=paths.plots,
        )
        mlflow.log_metrics(metrics | {"compute_seconds": time.perf_counter() - t0})
        mlflow.log_artifact(str(paths.metrics))
        for png in ("samples.png", "score_field.png"):
            mlflow.log_artifact(str(paths.plots / png), artifact_path="plots")
    return metrics | {"mlflow_run_id": run.info.run_id}
