"""Stage flows that evaluate samples: metrics JSON (DVC metrics), plots, the same in MLflow.

Every evaluate flow is :func:`_evaluate` with the inputs it reads and the task that computes its metrics."""

from __future__ import annotations

from collections.abc import Callable

from prefect import flow

from flows.registry import Paths, StageContext, run_stage
from tasks.evaluate import evaluate_blindness, evaluate_gmm, evaluate_images


def _evaluate(
    pipeline: str,
    config: str | None,
    stage: str,
    *,
    inputs: Callable[[Paths], dict],
    compute: Callable[[StageContext], dict],
    plots: tuple[str, ...],
) -> dict:
    """One evaluation: :func:`run_stage` with the metrics JSON as output and, with the plots, as artifacts."""
    return run_stage(
        pipeline, config, stage,
        compute=lambda ctx, run: compute(ctx),
        inputs=lambda ctx: inputs(ctx.paths),
        outputs=lambda ctx: {"metrics": ctx.paths.metrics},
        artifacts=lambda ctx: [(ctx.paths.metrics, None), *((ctx.paths.plots / png, "plots") for png in plots)],
    )


@flow(name="evaluate", log_prints=True)
def evaluate_flow(pipeline: str = "gmm2d", config: str | None = None, stage: str = "evaluate") -> dict:
    """Samples of a toy-mixture model against the true mixture and held-out data."""
    return _evaluate(
        pipeline, config, stage,
        inputs=lambda p: {"samples": p.samples, "test": p.test, "model": p.model},
        compute=lambda ctx: evaluate_gmm(
            ctx.section, samples_path=ctx.paths.samples, test_path=ctx.paths.test, model_path=ctx.paths.model,
            metrics_path=ctx.paths.metrics, plots_dir=ctx.paths.plots,
        ),
        plots=("samples.png", "score_field.png"),
    )


_BLINDNESS_SETS = ("annealed", "langevin")


@flow(name="evaluate-blindness", log_prints=True)
def blindness_flow(pipeline: str = "gmm2d-blindness", config: str | None = None, stage: str = "evaluate") -> dict:
    """Annealed vs plain Langevin samples of one score network, evaluated side by side."""
    return _evaluate(
        pipeline, config, stage,
        inputs=lambda p: {**{n: p.samples_of(n) for n in _BLINDNESS_SETS}, "test": p.test},
        compute=lambda ctx: evaluate_blindness(
            ctx.section, samples_paths={n: ctx.paths.samples_of(n) for n in _BLINDNESS_SETS},
            test_path=ctx.paths.test, metrics_path=ctx.paths.metrics, plot_path=ctx.paths.plots / "samples.png",
        ),
        plots=("samples.png",),
    )


@flow(name="evaluate-images", log_prints=True)
def images_flow(pipeline: str = "digits", config: str | None = None, stage: str = "evaluate") -> dict:
    """Samples of an image score network against held-out images: classifier-feature FID/KID/IS/PR,
    pixel-space MMD, the model's KSD."""
    return _evaluate(
        pipeline, config, stage,
        inputs=lambda p: {"samples": p.samples, "test": p.test, "train": p.train, "model": p.model,
                          "classifier": p.classifier, "reference_stats": p.reference_stats},
        compute=lambda ctx: evaluate_images(
            ctx.section, samples_path=ctx.paths.samples, test_path=ctx.paths.test, train_path=ctx.paths.train,
            model_path=ctx.paths.model, metrics_path=ctx.paths.metrics, plots_dir=ctx.paths.plots,
            classifier_path=ctx.paths.classifier, stats_path=ctx.paths.reference_stats,
        ),
        plots=("samples.png", "nearest.png"),
    )
