"""Stage flow: the table of a sweep (DVC stage ``<p>-evaluate``)."""

from __future__ import annotations

from prefect import flow

from flows.registry import StageContext, run_stage
from tasks.config.sweep import SweepPaths
from tasks.stages.sweep.evaluate import cell_log_likelihoods, log_cells, summarise, write_metrics, write_table


@flow(name="sweep-evaluate", log_prints=True)
def evaluate_flow(pipeline: str = "ica-small", config: str | None = None, stage: str = "evaluate") -> dict:
    """Held-out log-likelihood of every cell and of the true model; ``metrics/<p>.json`` and the table."""

    def compute(ctx: StageContext, run) -> dict:
        from mlflow import MlflowClient

        from tasks.tracking.log import tracking_uri

        rows = cell_log_likelihoods(ctx.cfg, SweepPaths(ctx.paths))
        metrics, table = summarise(ctx.cfg, rows)
        write_table(table, ctx.paths.plots, title=f"{pipeline}: ICA by Stein discrepancies")
        write_metrics(ctx.paths.metrics, metrics)
        log_cells(MlflowClient(tracking_uri(ctx.root)), [run.info.experiment_id], pipeline, rows)
        for line in (ctx.paths.plots / "table.md").read_text().splitlines():
            print(line)
        return metrics

    return run_stage(
        pipeline, config, stage, compute=compute, outputs=lambda ctx: {"metrics": ctx.paths.metrics},
        artifacts=lambda ctx: [(ctx.paths.metrics, None),
                               *((ctx.paths.plots / f"table.{e}", "plots") for e in ("csv", "md", "png"))],
    )
