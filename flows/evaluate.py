"""Stage flow: evaluate (DVC stage ``<pipeline>-evaluate``), the same for every pipeline.

The config's ``evaluate`` section lists the sample sets, metrics and plots; the flow resolves the files they read,
runs :func:`tasks.stages.evaluate.task.evaluate_samples`, logs the metrics (and, when checkpoints were evaluated, each
metric's history over the training steps) to the stage's MLflow run with the JSON and the plots as artifacts.
"""

from __future__ import annotations

from prefect import flow

from flows.registry import StageContext, run_stage
from tasks.stages.evaluate.task import evaluate_samples
from tasks.stages.evaluate.inputs import EvalInputs, plot_files, required_inputs


def sample_paths(ctx: StageContext) -> dict:
    return {name: ctx.paths.samples_of(name) for name in ctx.section.sample_sets}


def _inputs(ctx: StageContext) -> dict:
    ins = EvalInputs.from_paths(ctx.paths)
    return {**sample_paths(ctx), **{name: getattr(ins, name) for name in sorted(required_inputs(ctx.section))}}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(pipeline: str = "gmm2d", config: str | None = None, stage: str = "evaluate") -> dict:
    """Evaluate a pipeline's samples with the metrics and plots its config lists."""

    def compute(ctx: StageContext, run) -> dict:
        import mlflow

        cfg = ctx.section
        sampler = getattr(ctx.cfg, cfg.checkpoints.sampler) if cfg.checkpoints is not None else None
        metrics, rows = evaluate_samples(
            cfg, sample_paths=sample_paths(ctx), inputs=EvalInputs.from_paths(ctx.paths), metrics_path=ctx.paths.metrics,
            plots_dir=ctx.paths.plots, config_path=config or ctx.spec.config_file, sampler=sampler,
            settings=ctx.settings, device=ctx.device,
        )
        for row in rows:  # metric histories over training: MLflow draws them against the step
            mlflow.log_metrics({f"checkpoint/{k}": v for k, v in row.items() if k != "step"}, step=int(row["step"]))
        return metrics

    return run_stage(
        pipeline, config, stage, compute=compute, inputs=_inputs,
        outputs=lambda ctx: {"metrics": ctx.paths.metrics},
        artifacts=lambda ctx: [(ctx.paths.metrics, None), *((ctx.paths.plots / f, "plots") for f in plot_files(ctx.section))],
    )
