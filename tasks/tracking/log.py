"""MLflow conventions: one run per stage execution, grouped under the pipeline run that ``stein run`` creates.

The store is SQLite inside the project (``.stein/mlflow.db``, ignored by git) unless ``MLFLOW_TRACKING_URI``
points elsewhere: a tracking server (``stein server``, or a cluster's) that every stage, and Ray rank 0, then logs
to over HTTP, with the credentials in ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` when it
requires them. Every stage run is tagged with the pipeline, the DVC stage,
the git commit and the MD5 of each input file (the hash DVC records), so a run in the UI traces back to its
exact inputs. A pipeline run passes its id to the stages in ``STEIN_PARENT_RUN_ID``; stage runs become its
children (and carry ``stein.pipeline_run_id``), so one pipeline run reads as one group in the UI.

The pipeline run explains itself (:func:`create_pipeline_run`, :func:`fill_pipeline_run`): it is named
``<pipeline> <short commit> <time>`` (or what the user chose), carries the pipeline's whole config as flat params
(``sample.eps``), its headline metrics and plots, and the registered model version it evaluated; a run in which
no stage ran (all restored from DVC's run cache, or nothing stale) is tagged ``stein.cached=true``. Stages that
``dvc exp run`` starts (no ``STEIN_PARENT_RUN_ID``, but DVC's ``DVC_EXP_NAME``) are grouped the same way under a
pipeline run named after the DVC experiment (:func:`experiment_group_run`).

Every train stage registers its model (:func:`register_model`): registered model ``<pipeline>``, one version per
training run, whose files are the checkpoint ``model.pt`` (weights, class names and constructor arguments, loaded
with ``torch.load(weights_only=True)``: no code is unpickled) and a readable ``model.json``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tasks.infra.runtime import private_file, private_state_dir, project_root, state_dir

PARENT_ENV = "STEIN_PARENT_RUN_ID"
#: Set by ``dvc exp run`` in each stage's environment: the experiment's name and the commit it started from.
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
DVC_EXP_BASELINE_ENV = "DVC_EXP_BASELINE_REV"
#: What kind of experiment a pipeline's is: model training, not GenAI. MLflow 3.17's UI follows its own
#: GenAI/Model-training switch instead (the links ``stein ui`` prints set it); other MLflow UIs and clients read this.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: The run-table view the project keeps on each pipeline's experiment (an MLflow "shared view", an experiment tag):
#: the UI opens it with ``?viewStateShareKey=stein`` (what ``stein ui`` prints), showing the headline metrics and
#: the params that differ between pipeline runs as columns.
RUN_TABLE_VIEW = "stein"
#: MLflow's limits: params per ``log_batch`` call, and characters per param value.
_PARAMS_PER_BATCH = 100
_PARAM_VALUE_MAX = 6000

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

    state = private_state_dir(root)
    uri = tracking_uri(root)
    if uri == f"sqlite:///{state / 'mlflow.db'}":
        private_file(state / "mlflow.db")  # owner-only from the start: MLflow would create it 0644
    mlflow.set_tracking_uri(uri)
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
        if any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):  # created before the tag existed
            for k, v in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, k, v)
        if is_server(tracking_uri(root)) and exp.artifact_location.startswith("file:"):
            log.warning("experiment %r on %s keeps its artifacts at %s (it was created by a local run): they are "
                        "written there directly, not through the server", name, tracking_uri(root), exp.artifact_location)
        return exp.experiment_id
    location = None if is_server(tracking_uri(root)) else f"{artifact_root(root)}/{name}"
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
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
    parent_run_id: str | None = None,
) -> Iterator[Any]:
    """Start the MLflow run of one stage execution, a child of ``parent_run_id`` (default: the pipeline run named
    by ``STEIN_PARENT_RUN_ID``; a top-level run when neither is given).

    ``inputs`` and ``outputs`` name files whose MD5 (DVC's hash) is recorded as a tag: inputs at the start,
    outputs when the block succeeds.
    """
    mlflow = setup_mlflow(root)
    exp = experiment_id(pipeline, root)
    from tasks.data.io import file_md5

    tags = base_tags(pipeline, root) | {"stein.stage": stage, "stein.dvc_stage": f"{pipeline}-{stage}"}
    for name, path in (inputs or {}).items():
        if Path(path).is_file():
            tags[f"stein.input.{name}.md5"] = file_md5(path)
    parent = parent_run_id or os.environ.get(PARENT_ENV) or None
    if parent:
        tags["stein.pipeline_run_id"] = parent
    with mlflow.start_run(experiment_id=exp, run_name=stage, parent_run_id=parent, tags=tags) as run:
        if params:
            mlflow.log_params(config_params(params))
        yield run
        for name, path in (outputs or {}).items():
            if Path(path).is_file():
                mlflow.set_tag(f"stein.output.{name}.md5", file_md5(path))


# ------------------------------------------------------------------------------------------------ pipeline runs


def config_params(config: Mapping[str, Any]) -> dict[str, str]:
    """A nested config as MLflow params: flat dotted keys (``sample.eps``), values as text within MLflow's limit."""
    return {k: str(v)[:_PARAM_VALUE_MAX] for k, v in flatten(config).items()}


def log_params(client, run_id: str, params: Mapping[str, str]) -> None:
    """Log any number of params on ``run_id`` (MLflow takes at most 100 per request)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + _PARAMS_PER_BATCH])


def pipeline_run_name(pipeline: str, root: Path | None = None, *, when: dt.datetime | None = None) -> str:
    """``gmm2d 1a2b3c4 2026-11-30 14:05`` (``1a2b3c4-dirty`` with uncommitted changes to tracked files)."""
    commit, dirty = git_commit(root)
    short = "no-git" if commit == "unknown" else commit[:7] + ("-dirty" if dirty else "")
    return f"{pipeline} {short} {(when or dt.datetime.now()):%Y-%m-%d %H:%M}"


def create_pipeline_run(client, pipeline: str, *, config: Mapping[str, Any], root: Path | None = None,
                        name: str | None = None, tags: Mapping[str, str] | None = None) -> str:
    """The MLflow run that groups one reproduction of ``pipeline``: named ``name`` or :func:`pipeline_run_name`,
    with every key of the pipeline's ``config`` as a param. Returns its id."""
    all_tags = base_tags(pipeline, root) | {"stein.kind": "pipeline"} | dict(tags or {})
    run = client.create_run(experiment_id(pipeline, root), run_name=name or pipeline_run_name(pipeline, root),
                            tags=all_tags)
    log_params(client, run.info.run_id, config_params(config))
    return run.info.run_id


def experiment_group_run(client, pipeline: str, *, config: Mapping[str, Any], root: Path | None = None) -> str | None:
    """In a stage started by ``dvc exp run`` (``DVC_EXP_NAME`` set, no pipeline run of ``stein run`` above it):
    the pipeline run of that DVC experiment, named ``<pipeline> <experiment>``, created by the experiment's first
    stage and reopened (status RUNNING) by the next ones; None outside ``dvc exp run``."""
    name = os.environ.get(DVC_EXP_NAME_ENV)
    if not name or os.environ.get(PARENT_ENV):
        return None
    baseline = os.environ.get(DVC_EXP_BASELINE_ENV, "")
    exp = experiment_id(pipeline, root)
    # the baseline is a commit hash (safe in a filter); the name is matched here, whatever characters it has
    found = client.search_runs([exp], filter_string=f"tags.`stein.kind` = 'pipeline' and "
                               f"tags.`stein.dvc_exp_baseline` = '{baseline}'", max_results=1000)
    for run in found:
        if run.data.tags.get("stein.dvc_exp") == name:
            client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
    tags = {"stein.dvc_exp": name, "stein.dvc_exp_baseline": baseline}
    return create_pipeline_run(client, pipeline, config=config, root=root, name=f"{pipeline} {name}", tags=tags)


def stages_run(client, run) -> list[str]:
    """The DVC stages that ran under the pipeline run ``run`` (its child runs), in the order they started."""
    run_id = run.info.run_id
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
        order_by=["attributes.start_time ASC"], max_results=1000,
    )
    return [r.data.tags.get("stein.dvc_stage", r.info.run_name) for r in children]


def fill_pipeline_run(client, run_id: str, *, metrics_file: Path, plots_dir: Path, model_name: str,
                      model_file: Path, seconds: float | None = None) -> dict[str, Any]:
    """What the pipeline run shows once its stages are done: the headline metrics (the pipeline's DVC metrics
    file, also as an artifact) and ``pipeline_seconds``, every PNG of the pipeline's plots folder under
    ``plots/``, the stages that ran (tag ``stein.stages_run``), ``stein.cached=true`` and " (cached)" after the
    name when none ran (every stage unchanged or restored from DVC's run cache: no new result), and the
    registered version of the model it evaluated (tag ``stein.model``: ``<name>/<version>``). The experiment's run
    table view is then brought up to date (:func:`update_run_table_view`).

    Returns ``{"metrics": {...}, "stages_run": [...], "model_version": "<name>/<version>" or None}``."""
    from mlflow.entities import Metric, RunTag

    metrics = {k: float(v) for k, v in json.loads(metrics_file.read_text()).items()}
    now = int(dt.datetime.now().timestamp() * 1000)
    logged = metrics | ({"pipeline_seconds": seconds} if seconds is not None else {})
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in logged.items()])
    client.log_artifact(run_id, str(metrics_file))
    for png in sorted(plots_dir.glob("*.png")):
        client.log_artifact(run_id, str(png), "plots")
    run = client.get_run(run_id)
    ran = stages_run(client, run)
    tags = {"stein.stages_run": ",".join(ran), "stein.cached": str(not ran).lower()}
    version = model_version_of(client, model_name, model_file)
    if version is not None:
        tags["stein.model"] = f"{model_name}/{version.version}"
    if not ran and not run.info.run_name.endswith(" (cached)"):  # a retry of this task finds it renamed already
        tags["mlflow.runName"] = f"{run.info.run_name} (cached)"
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    update_run_table_view(client, run.data.tags["stein.pipeline"])
    return {"metrics": metrics, "stages_run": ran, "model_version": tags.get("stein.model")}


def update_run_table_view(client, pipeline: str) -> list[str]:
    """Set the experiment's shared view :data:`RUN_TABLE_VIEW`: as columns, the headline metrics of its pipeline
    runs and the params whose values differ between them (runs logged before params existed are left out of the
    comparison). Returns the columns, in MLflow's ``metrics.`key``` form."""
    from tasks.tracking.runs import differing_params, headline_keys, recent_runs

    rows = recent_runs(client, [pipeline], last=100)
    with_params = [r for r in rows if r.params]
    columns = [f"metrics.`{k}`" for k in headline_keys(rows)] + [f"params.`{k}`" for k in differing_params(with_params)]
    exp = client.get_experiment_by_name(pipeline)
    client.set_experiment_tag(exp.experiment_id, f"mlflow.sharedViewState.{RUN_TABLE_VIEW}",
                              json.dumps({"selectedColumns": columns}))
    return columns


def run_table_url(base: str, experiment_id: str) -> str:
    """The address of an experiment's run table in the MLflow UI at ``base``: the classic (model training) view,
    not MLflow 3's GenAI view, with the project's columns (:func:`update_run_table_view`)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={RUN_TABLE_VIEW}"


# ------------------------------------------------------------------------------------------------ model registry

#: The artifact folder of a train run that holds its model, and what a registered version's files are.
MODEL_ARTIFACT = "model"
MODEL_FILE = "model.pt"
MODEL_CARD = "model.json"


def model_card(model_file: Path) -> dict[str, Any]:
    """What a reader (or another tool) needs to rebuild the model without this project's pickles: the family,
    each module's class and constructor arguments, the example shape, the training step, the file's MD5."""
    from tasks.data.io import file_md5, load_checkpoint

    ckpt = load_checkpoint(model_file)  # weights_only=True
    return {
        "family": ckpt.get("family"), "classes": ckpt.get("classes"), "model_args": ckpt.get("model_args"),
        "shape": ckpt.get("shape"), "step": ckpt.get("step"), "file": MODEL_FILE, "md5": file_md5(model_file),
        "load": "tasks.families.loading.load_model(path_to_model.pt); or torch.load(path, weights_only=True): "
                "modules[name] is the state_dict of classes[name](**model_args[name])",
    }


def register_model(client, run_id: str, name: str, model_file: Path) -> Any:
    """Register the model the train run ``run_id`` logged under ``model/`` as a new version of registered model
    ``name`` (created on first use), with its card ``model.json`` beside it; tags the version with the model's
    MD5 (how a later pipeline run finds the version it evaluated) and the run with ``stein.model``."""
    import tempfile

    from mlflow.exceptions import MlflowException

    card = model_card(model_file)
    with tempfile.TemporaryDirectory(prefix="stein-model-") as d:
        path = Path(d) / MODEL_CARD
        path.write_text(json.dumps(card, indent=2) + "\n")
        client.log_artifact(run_id, str(path), MODEL_ARTIFACT)
    try:
        client.create_registered_model(name, description=f"Models trained by the {name!r} pipeline (stein run {name})")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    version = client.create_model_version(
        name, source, run_id=run_id, await_creation_for=0,
        tags={"model_md5": card["md5"], "family": str(card["family"]), "step": str(card["step"])},
    )
    client.set_tag(run_id, "stein.model", f"{name}/{version.version}")
    return version


def model_version_of(client, name: str, model_file: Path) -> Any | None:
    """The newest registered version of ``name`` whose model is byte-identical to ``model_file`` (None: the file
    is missing, or no version holds it)."""
    from tasks.data.io import file_md5

    if not Path(model_file).is_file():
        return None
    md5 = file_md5(model_file)
    versions = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get("model_md5") == md5]
    return max(versions, key=lambda v: int(v.version), default=None)


def load_registered_model(name: str, version: str | int = "latest", *, root: Path | None = None,
                          device: str = "cpu", sampler=None):
    """The model of version ``version`` (a number, or ``latest``) of registered model ``name``, ready to sample:
    its files are downloaded from the tracking store and loaded with ``weights_only=True``."""
    import tempfile

    from mlflow.artifacts import download_artifacts

    from tasks.families.loading import load_model

    client = setup_mlflow(root).MlflowClient()
    if str(version) == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise LookupError(f"registered model {name!r} has no version in {tracking_uri(root)}")
        mv = max(versions, key=lambda v: int(v.version))
    else:
        mv = client.get_model_version(name, str(version))
    with tempfile.TemporaryDirectory(prefix="stein-model-") as d:
        local = Path(download_artifacts(artifact_uri=mv.source, dst_path=d, tracking_uri=tracking_uri(root)))
        return load_model(local / MODEL_FILE, device=device, sampler=sampler)
