"""The pipeline flow: reproduce a named pipeline through DVC, grouped under one MLflow run.

DVC decides what is stale (content hashes of deps, params and outs); this flow only calls ``dvc repro`` on the
pipeline's last stage, with ``STEIN_PARENT_RUN_ID`` set so each stage's MLflow run becomes a child of the
pipeline run, and then logs the headline metrics on the pipeline run for side-by-side comparison. A Prefect
deployment that schedules this flow reproduces the pipeline on a cluster with exactly the same semantics.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.local import STAGE_ERROR_ENV, StageFailed, dvc, read_stage_error, tool_env
from flows.registry import get_pipeline
from tasks.runtime import project_root
from tasks.tracking import PARENT_ENV, base_tags, experiment_id, setup_mlflow


@task(name="dvc-repro", cache_policy=NO_CACHE)
def dvc_repro(targets: list[str], *, root: Path, parent_run_id: str, force: bool = False) -> None:
    """``dvc repro`` of ``targets``. A failing stage records its error (:func:`flows.local.record_stage_error`),
    and that error, not DVC's generic exit status, is what this raises: the stage's own message and exit code."""
    args = ["repro", *(["--force"] if force else []), *targets]
    with tempfile.TemporaryDirectory(prefix="stein-repro-") as d:
        errfile = Path(d) / "stage-error.json"
        proc = dvc(*args, root=root, env=tool_env({PARENT_ENV: parent_run_id, STAGE_ERROR_ENV: str(errfile)}))
        if proc.returncode != 0:
            stage_error = read_stage_error(errfile)
            if stage_error is not None:
                raise stage_error
            errors = [ln for ln in (proc.stderr or "").splitlines() if ln.startswith("ERROR")]
            cause = errors[-1] if errors else f"exit code {proc.returncode}"
            raise StageFailed(f"`dvc {' '.join(args)}`: {cause}")


@flow(name="reproduce-pipeline", log_prints=True)
def reproduce_flow(pipeline: str = "gmm2d", force: bool = False) -> dict[str, float]:
    """Reproduce ``pipeline`` with ``dvc repro`` and log its headline metrics on one MLflow pipeline run."""
    spec = get_pipeline(pipeline)
    root = project_root()
    paths = spec.paths(root)
    mlflow = setup_mlflow(root)
    exp = experiment_id(pipeline, root)
    tags = base_tags(pipeline, root) | {"stein.kind": "pipeline"}
    with mlflow.start_run(experiment_id=exp, run_name=f"pipeline {pipeline}", tags=tags) as run:
        t0 = time.perf_counter()
        dvc_repro([spec.final_stage], root=root, parent_run_id=run.info.run_id, force=force)
        metrics = json.loads(paths.metrics.read_text())
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()} | {"pipeline_seconds": time.perf_counter() - t0})
        mlflow.log_artifact(str(paths.metrics))
    return metrics
