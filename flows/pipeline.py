"""The pipeline flow: reproduce a named pipeline through DVC, grouped under one MLflow run.

DVC decides what is stale (content hashes of deps, params and outs); this flow only calls ``dvc repro`` on the
pipeline's last stage, with ``STEIN_PARENT_RUN_ID`` set so each stage's MLflow run becomes a child of the
pipeline run. The pipeline run is named ``<pipeline> <short commit> <time>`` (or as the caller chose) and carries
the pipeline's config as flat params; afterwards it gets the headline metrics, the plots, the registered model
version and, when no stage ran, the tag ``stein.cached=true`` (:func:`tasks.tracking.log.fill_pipeline_run`). A Prefect
deployment that schedules this flow (``stein schedule``, :mod:`flows.schedule`) reproduces the pipeline with
exactly the same semantics.

Retries are for I/O only: opening, filling and closing the MLflow pipeline run (a tracking server can drop a
request) retry; ``dvc repro`` does not (a stage that failed on bad input fails the same way again, and a stage
that crashed is rerun by the next ``stein run`` or scheduled run, which DVC makes resume where it stopped).

One ``dvc repro`` per project: ``stein run`` holds the project lock (:func:`flows.local.project_lock`) around this
flow. A run started by a deployment (on a worker) has no such caller, so it takes the same lock itself, waiting up
to ``project_lock_wait`` seconds for a ``stein run`` or a scheduled run of another pipeline of the project.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from flows.local import STAGE_ERROR_ENV, ProjectBusy, StageFailed, dvc, project_lock, read_stage_error, tool_env
from flows.registry import get_pipeline
from tasks.config.sections import EVERY_KEY
from tasks.infra.runtime import project_root
from tasks.tracking.log import PARENT_ENV, create_pipeline_run, fill_pipeline_run, setup_mlflow, tracking_uri

#: Waits between the tries of an I/O task (MLflow calls): three retries spread over about 45 s.
IO_RETRY_DELAYS = [5, 10, 30]


def _io_task(name: str):
    """A Prefect task that only does I/O, hence may simply be tried again: retried after each of IO_RETRY_DELAYS."""
    return task(name=name, cache_policy=NO_CACHE, retries=len(IO_RETRY_DELAYS), retry_delay_seconds=IO_RETRY_DELAYS)


@task(name="dvc-repro", cache_policy=NO_CACHE)
def dvc_repro(targets: list[str], *, root: Path, parent_run_id: str, force: bool = False) -> None:
    """``dvc repro`` of ``targets``. A failing stage records its error (:func:`flows.local.record_stage_error`),
    and that error, not DVC's generic exit status, is what this raises: the stage's own message and exit code."""
    args = ["repro", *(["--force"] if force else []), *targets]
    with tempfile.TemporaryDirectory(prefix="stein-repro-") as d, _shared_ray(root) as ray_env:
        errfile = Path(d) / "stage-error.json"
        env = tool_env({PARENT_ENV: parent_run_id, STAGE_ERROR_ENV: str(errfile)} | ray_env)
        proc = dvc(*args, root=root, env=env)
        if proc.returncode != 0:
            stage_error = read_stage_error(errfile)
            if stage_error is not None:
                raise stage_error
            errors = [ln for ln in (proc.stderr or "").splitlines() if ln.startswith("ERROR")]
            cause = errors[-1] if errors else f"exit code {proc.returncode}"
            raise StageFailed(f"`dvc {' '.join(args)}`: {cause}")


def _shared_ray(root: Path) -> contextlib.AbstractContextManager[dict[str, str]]:
    """The pipeline's one local Ray (:func:`tasks.infra.cluster.pipeline_ray`), started in the background for the
    stages to join, or nothing (an empty environment) when they join a cluster (``RAY_ADDRESS``) or
    ``STEIN_PIPELINE_RAY=false`` asks each stage to start its own."""
    from tasks.infra.cluster import pipeline_ray
    from tasks.infra.runtime import load_settings

    settings = load_settings()
    if settings.resolved_ray_address() or not settings.pipeline_ray:
        return contextlib.nullcontext({})
    return pipeline_ray(root, num_cpus=max(os.cpu_count() or 1, settings.num_workers))


def _client(root: Path):
    setup_mlflow(root)  # creates the project's .stein/ for the default SQLite store
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri(root))


@_io_task("open-pipeline-run")
def open_pipeline_run(pipeline: str, config: dict, *, root: Path, name: str | None = None) -> str:
    """Create the MLflow run the stages' runs become children of, with the config as params; returns its id."""
    return create_pipeline_run(_client(root), pipeline, config=config, root=root, name=name)


@_io_task("fill-pipeline-run")
def log_pipeline_results(run_id: str, spec, seconds: float, *, root: Path) -> dict:
    """Log the pipeline's headline metrics (its DVC metrics file), wall time, plots and model version on the
    pipeline run; returns them with the stages that ran."""
    paths = spec.paths(root)
    return fill_pipeline_run(_client(root), run_id, metrics_file=paths.metrics, plots_dir=paths.plots,
                             model_name=paths.source, model_file=paths.model, seconds=seconds)


@_io_task("close-pipeline-run")
def close_pipeline_run(run_id: str, status: str, *, root: Path) -> None:
    _client(root).set_terminated(run_id, status=status)


@contextlib.contextmanager
def _project_exclusion(root: Path, wait: float | None, pipeline: str) -> Iterator[None]:
    """Hold the project lock, waiting up to ``wait`` seconds for it (polling every second: ``flock`` has no
    timeout); with ``wait=None`` the caller (``stein run``) holds it already. Raises ProjectBusy, naming the holder,
    on timeout."""
    if wait is None:
        yield
        return
    try:
        log = get_run_logger()
    except MissingContextError:  # called outside a flow run
        log = logging.getLogger("stein")
    deadline = time.monotonic() + wait
    with contextlib.ExitStack() as stack:
        waiting = False
        while True:
            try:
                stack.enter_context(project_lock(root, holder=f"a scheduled run of {pipeline!r}"))
                break
            except ProjectBusy as exc:
                if time.monotonic() >= deadline:
                    raise ProjectBusy(f"gave up after waiting {wait:.0f} s: {exc}") from None
                if not waiting:
                    log.info("pipeline %r waits for the project lock: %s", pipeline, exc)
                    waiting = True
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if waiting:
            log.info("pipeline %r got the project lock", pipeline)
        yield


@flow(name="reproduce-pipeline", log_prints=True)
def reproduce_flow(pipeline: str = "gmm2d", force: bool = False, project_lock_wait: float | None = None,
                   run_name: str | None = None) -> dict:
    """Reproduce ``pipeline`` with ``dvc repro`` and log its results on one MLflow pipeline run.

    ``project_lock_wait``: None when the caller holds the project lock (``stein run``); a number of seconds to
    wait for it otherwise (a deployment's run: see :mod:`flows.schedule`). ``run_name``: the pipeline run's name
    (default ``<pipeline> <short commit> <time>``). Returns ``{"metrics", "stages_run", "model_version",
    "run_id", "run_name"}``."""
    spec = get_pipeline(pipeline)
    root = project_root()
    with _project_exclusion(root, project_lock_wait, pipeline):
        # a deployment's run validates here, so bad input fails before DVC; `stein run` validated before the lock
        cfg = spec.validate_all(root) if project_lock_wait is not None else spec.load_config(root)
        run_id = open_pipeline_run(pipeline, cfg.model_dump(context=EVERY_KEY), root=root, name=run_name)
        try:
            t0 = time.perf_counter()
            dvc_repro([spec.final_stage], root=root, parent_run_id=run_id, force=force)
            results = log_pipeline_results(run_id, spec, time.perf_counter() - t0, root=root)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort and at once (no retries): the error is what matters
                close_pipeline_run.fn(run_id, "FAILED", root=root)
            raise
        close_pipeline_run(run_id, "FINISHED", root=root)
    return results | {"run_id": run_id, "run_name": _client(root).get_run(run_id).info.run_name}
