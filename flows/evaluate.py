"""Stage flows that evaluate samples: metrics JSON (DVC metrics), plots, the same in MLflow."""

from __future__ import annotations

import time

from prefect import flow

from flows.registry import load_stage
from tasks.evaluate import evaluate_blindness, evaluate_gmm, evaluate_images
from tasks.tracking import stage_run


@flow(name="evaluate", log_prints=True)
def evaluate_flow(pipeline: str = "gmm2d", config: str | None = None, stage: str = "evaluate") -> dict:
    ctx = load_stage(pipeline, config, stage)
    paths = ctx.paths
    with stage_run(
        pipeline, stage, params=ctx.section.model_dump(),
        inputs={"samples": paths.samples, "test": paths.test, "model": paths.model},
        outputs={"metrics": paths.metrics},
    ) as run:
        import mlflow

        t0 = time.perf_counter()
        metrics = evaluate_gmm(
            ctx.section, samples_path=paths.samples, test_path=paths.test, model_path=paths.model,
            metrics_path=paths.metrics, plots_dir=paths.plots,
        )
        mlflow.log_metrics(metrics | {"compute_seconds": time.perf_counter() - t0})
        mlflow.log_artifact(str(paths.metrics))
        for png in ("samples.png", "score_field.png"):
            mlflow.log_artifact(str(paths.plots / png), artifact_path="plots")
    return metrics | {"mlflow_run_id": run.info.run_id}


@flow(name="evaluate-blindness", log_prints=True)
def blindness_flow(pipeline: str = "gmm2d-blindness", config: str | None = None, stage: str = "evaluate") -> dict:
    """Annealed vs plain Langevin samples of one score network, evaluated side by side."""
    ctx = load_stage(pipeline, config, stage)
    paths = ctx.paths
    samples = {name: paths.samples_of(name) for name in ("annealed", "langevin")}
    with stage_run(
        pipeline, stage, params=ctx.section.model_dump(), inputs={**samples, "test": paths.test},
        outputs={"metrics": paths.metrics},
    ) as run:
        import mlflow

        t0 = time.perf_counter()
        metrics = evaluate_blindness(
            ctx.section, samples_paths=samples, test_path=paths.test, metrics_path=paths.metrics,
            plot_path=paths.plots / "samples.png",
        )
        mlflow.log_metrics(metrics | {"compute_seconds": time.perf_counter() - t0})
        mlflow.log_artifact(str(paths.metrics))
        mlflow.log_artifact(str(paths.plots / "samples.png"), artifact_path="plots")
    return metrics | {"mlflow_run_id": run.info.run_id}


@flow(name="evaluate-images", log_prints=True)
def images_flow(pipeline: str = "digits", config: str | None = None, stage: str = "evaluate") -> dict:
    """Samples of an image score network against held-out images (pixel-space MMD, the model's KSD)."""
    ctx = load_stage(pipeline, config, stage)
    paths = ctx.paths
    with stage_run(
        pipeline, stage, params=ctx.section.model_dump(),
        inputs={"samples": paths.samples, "test": paths.test, "train": paths.train, "model": paths.model,
                "classifier": paths.classifier, "reference_stats": paths.reference_stats},
        outputs={"metrics": paths.metrics},
    ) as run:
        import mlflow

        t0 = time.perf_counter()
        metrics = evaluate_images(
            ctx.section, samples_path=paths.samples, test_path=paths.test, train_path=paths.train,
            model_path=paths.model, metrics_path=paths.metrics, plots_dir=paths.plots,
            classifier_path=paths.classifier, stats_path=paths.reference_stats,
        )
        mlflow.log_metrics(metrics | {"compute_seconds": time.perf_counter() - t0})
        mlflow.log_artifact(str(paths.metrics))
        for png in ("samples.png", "nearest.png"):
            mlflow.log_artifact(str(paths.plots / png), artifact_path="plots")
    return metrics | {"mlflow_run_id": run.info.run_id}
