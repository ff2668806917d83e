"""Stage flow: classifier (DVC stage ``<pipeline>-classifier``): the feature extractor for FID/KID/IS."""

from __future__ import annotations

import time

from prefect import flow

from flows.registry import load_stage
from tasks.classifier import train_feature_classifier
from tasks.tracking import stage_run


@flow(name="classifier", log_prints=True)
def classifier_flow(pipeline: str = "digits", config: str | None = None, stage: str = "classifier") -> dict:
    ctx = load_stage(pipeline, config, stage)
    paths = ctx.paths
    with stage_run(
        pipeline, stage, params=ctx.section.model_dump(), inputs={"train": paths.train, "test": paths.test},
        outputs={"classifier": paths.classifier, "reference_stats": paths.reference_stats},
    ) as run:
        import mlflow

        t0 = time.perf_counter()
        info = train_feature_classifier(
            ctx.section, train_path=paths.train, test_path=paths.test, model_path=paths.classifier,
            stats_path=paths.reference_stats,
        )
        mlflow.set_tag("stein.classifier_fingerprint", info["fingerprint"])
        mlflow.log_metrics({"test_accuracy": info["test_accuracy"], "final_train_loss": info["final_train_loss"],
                            "compute_seconds": time.perf_counter() - t0})
    return info | {"mlflow_run_id": run.info.run_id}
