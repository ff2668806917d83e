"""MLflow conventions: one run per stage execution, grouped under the pipeline run that ``stein run`` creates.

The store is SQLite inside the project (``.stein/mlflow.db``, ignored by git) unless ``MLFLOW_TRACKING_URI``
points elsewhere: a tracking server (``stein server``, or a cluster's) that every stage, and Ray rank 0, then logs
to over HTTP, with the credentials in ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` when it
requires them. Every stage run is tagged with the pipeline, the DVC stage,
the git commit and the MD5 of each input file (the hash DVC records), so a run in the UI traces back to its
exact inputs. A pipeline run passes its id to the stages in ``STEIN_PARENT_RUN_ID``; stage runs become its
children (and carry ``stein.pipeline_run_id``), so one pipeline run reads as one group in the UI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tasks.runtime import project_root, state_dir

PARENT_ENV = "STEIN_PARENT_RUN_ID"

log = logging.getLogger("stein")


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir(root) / 'mlflow.db'}"


def artifact_root(root: Path | None = None) -> str:
    return (state_dir(root) / "mlartifacts").as_uri()


def git_commit(root: Path | None = None) -> tuple[str, bool]:
    """(commit, dirty) of the project's git checkout; ("unknown", False) outside git."""
    root = root or project_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root, capture_output=True, text=True, check=True,
            ).stdout.strip()
        )
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def setup_mlflow(root: Path | None = None):
    """Point MLflow at the project's store (creating its folder) and return the module."""
    import mlflow

    state_dir(root).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(root))
    return mlflow


def is_server(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (HTTP) rather than a store this process opens itself."""
    return uri.split(":", 1)[0].lower() in ("http", "https")


def experiment_id(name: str, root: Path | None = None) -> str:
    """The experiment of a pipeline, created on first use: with a project-local artifact location when the store
    is local; on a tracking server at the server's own location (``mlflow-artifacts:/...`` when it proxies
    artifacts, as ``stein server`` does), so that clients upload artifacts through it instead of writing to a path
    that exists only on their own machine."""
    mlflow = setup_mlflow(root)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if is_server(tracking_uri(root)) and exp.artifact_location.startswith("file:"):
            log.warning("experiment %r on %s keeps its artifacts at %s (it was created by a local run): they are "
                        "written there directly, not through the server", name, tracking_uri(root), exp.artifact_location)
        return exp.experiment_id
    location = None if is_server(tracking_uri(root)) else f"{artifact_root(root)}/{name}"
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another stage process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def base_tags(pipeline: str, root: Path | None = None) -> dict[str, str]:
    commit, dirty = git_commit(root)
    return {"stein.pipeline": pipeline, "stein.git_commit": commit, "stein.git_dirty": str(dirty).lower()}


@contextlib.contextmanager
def stage_run(
    pipeline: str,
    stage: str,
    *,
    params: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str | Path] | None = None,
    outputs: Mapping[str, str | Path] | None = None,
    root: Path | None = None,
) -> Iterator[Any]:
    """Start the MLflow run of one stage execution (a child of the pipeline run when there is one).

    ``inputs`` and ``outputs`` name files whose MD5 (DVC's hash) is recorded as a tag: inputs at the start,
    outputs when the block succeeds.
    """
    mlflow = setup_mlflow(root)
    exp = experiment_id(pipeline, root)
    from tasks.io import file_md5

    tags = base_tags(pipeline, root) | {"stein.stage": stage, "stein.dvc_stage": f"{pipeline}-{stage}"}
    for name, path in (inputs or {}).items():
        if Path(path).is_file():
            tags[f"stein.input.{name}.md5"] = file_md5(path)
    parent = os.environ.get(PARENT_ENV) or None
    if parent:
        tags["stein.pipeline_run_id"] = parent
    with mlflow.start_run(experiment_id=exp, run_name=stage, parent_run_id=parent, tags=tags) as run:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        yield run
        for name, path in (outputs or {}).items():
            if Path(path).is_file():
                mlflow.set_tag(f"stein.output.{name}.md5", file_md5(path))
