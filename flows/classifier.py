"""Stage flow: classifier (DVC stage ``<pipeline>-classifier``): the feature extractor for FID/KID/IS."""

from __future__ import annotations

from prefect import flow

from flows.registry import run_stage
from tasks.stages.classifier import train_feature_classifier


@flow(name="classifier", log_prints=True)
def classifier_flow(pipeline: str = "digits", config: str | None = None, stage: str = "classifier") -> dict:
    def compute(ctx, run):
        import mlflow

        info = train_feature_classifier(
            ctx.section, train_path=ctx.paths.train, test_path=ctx.paths.test, model_path=ctx.paths.classifier,
            stats_path=ctx.paths.reference_stats,
        )
        mlflow.set_tag("stein.classifier_fingerprint", info["fingerprint"])
        return info

    return run_stage(
        pipeline, config, stage, compute=compute,
        inputs=lambda ctx: {"train": ctx.paths.train, "test": ctx.paths.test},
        outputs=lambda ctx: {"classifier": ctx.paths.classifier, "reference_stats": ctx.paths.reference_stats},
    )
