"""Stage flow: prepare (DVC stage ``<pipeline>-prepare``)."""

from __future__ import annotations

import time

from prefect import flow

from flows.registry import get_pipeline
from tasks.prepare import prepare_gmm
from tasks.runtime import project_root
from tasks.tracking import stage_run


@flow(name="prepare", log_prints=True)
def prepare_flow(pipeline: str = "gmm2d", config: str | None = None) -> dict:
    spec = get_pipeline(pipeline)
    root = project_root()
    cfg = spec.load_config(root, config)
    paths = spec.paths(root)
    outputs = {"train": paths.train, "test": paths.test}
    with stage_run(pipeline, "prepare", params=cfg.prepare.model_dump(), outputs=outputs) as run:
        import mlflow

        t0 = time.perf_counter()
        info = prepare_gmm(cfg.prepare, paths.train, paths.test)
        mlflow.log_metric("compute_seconds", time.perf_counter() - t0)
        mlflow.log_metrics({k: float(v) for k, v in info.items()})
    return info | {"mlflow_run_id": run.info.run_id}
