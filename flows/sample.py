"""Stage flow: sample (DVC stage ``<pipeline>-sample``)."""

from __future__ import annotations

import time

from prefect import flow

from flows.registry import get_pipeline
from tasks.runtime import RuntimeSettings, configure_threads, project_root
from tasks.sample import sample_annealed_langevin
from tasks.tracking import stage_run


@flow(name="sample", log_prints=True)
def sample_flow(pipeline: str = "gmm2d", config: str | None = None) -> dict:
    spec = get_pipeline(pipeline)
    root = project_root()
    cfg = spec.load_config(root, config)
    paths = spec.paths(root)
    settings = RuntimeSettings()
    configure_threads(settings.resolved_threads())
    device = "cuda" if settings.resolved_use_gpu() else "cpu"
    with stage_run(
        pipeline, "sample", params=cfg.sample.model_dump(), inputs={"model": paths.model},
        outputs={"samples": paths.samples},
    ) as run:
        import mlflow

        t0 = time.perf_counter()
        info = sample_annealed_langevin(cfg.sample, model_path=paths.model, out_path=paths.samples, device=device)
        mlflow.log_metric("compute_seconds", time.perf_counter() - t0)
        mlflow.log_metrics(info)
    return info | {"mlflow_run_id": run.info.run_id}
