"""The MLflow pipeline run and the model registry (tasks/tracking/log.py) on a real SQLite store, without DVC or Prefect:
the run's name and flat params, what filling it logs, the cached tag, a registered model that loads back without
unpickling code, and the grouping of ``dvc exp run`` stages under one pipeline run per DVC experiment.

Creating an MLflow SQLite store runs its migrations (seconds), so one store is built per module; each test uses
its own experiment names."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A project folder (with a git commit, so runs are named after it) and an MLflow client on its store."""
    root = tmp_path_factory.mktemp("runs")
    (root / "dvc.yaml").write_text("stages: {}\n")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    for args in (["init", "-q"], ["add", "dvc.yaml"], ["commit", "-qm", "init"]):
        subprocess.run(["git", *args], cwd=root, check=True, env=env | {"PATH": "/usr/bin:/bin"})
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True, text=True).stdout.strip()
    mp = pytest.MonkeyPatch()
    mp.setenv("STEIN_PROJECT_ROOT", str(root))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / '.stein' / 'mlflow.db'}")
    for var in ("STEIN_PARENT_RUN_ID", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        mp.delenv(var, raising=False)
    from tasks.tracking.log import setup_mlflow

    client = setup_mlflow(root).MlflowClient()
    yield root, client, head
    mp.undo()


CONFIG = {"prepare": {"n_train": 3000}, "sample": {"eps": 0.002, "sampler": "annealed"},
          "evaluate": {"checkpoints": {"metrics": ["mmd", "ksd"], "n_samples": 100}}}


def _results(root, name: str, metrics: dict):
    (root / "metrics").mkdir(exist_ok=True)
    plots = root / "plots" / name
    plots.mkdir(parents=True, exist_ok=True)
    for png in ("samples.png", "checkpoints.png"):
        (plots / png).write_bytes(b"\x89PNG fake " + png.encode())
    (plots / "train_loss.csv").write_text("step,loss\n1,0.5\n")  # not a PNG: not logged on the pipeline run
    metrics_file = root / "metrics" / f"{name}.json"
    metrics_file.write_text(json.dumps(metrics))
    return metrics_file, plots


def test_pipeline_run_is_named_carries_the_config_and_marks_a_run_where_nothing_ran(store):
    from tasks.tracking.log import create_pipeline_run, fill_pipeline_run

    root, client, head = store
    run_id = create_pipeline_run(client, "p-cached", config=CONFIG, root=root)
    run = client.get_run(run_id)
    assert re.fullmatch(rf"p-cached {head[:7]} \d{{4}}-\d\d-\d\d \d\d:\d\d", run.info.run_name)
    assert run.data.params == {"prepare.n_train": "3000", "sample.eps": "0.002", "sample.sampler": "annealed",
                               "evaluate.checkpoints.metrics": "['mmd', 'ksd']", "evaluate.checkpoints.n_samples": "100"}
    assert run.data.tags["stein.kind"] == "pipeline" and run.data.tags["stein.git_commit"] == head
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "p-cached" and exp.tags["mlflow.experimentKind"] == "custom_model_development"

    metrics_file, plots = _results(root, "p-cached", {"mmd": 0.01, "ksd": 0.2})
    out = fill_pipeline_run(client, run_id, metrics_file=metrics_file, plots_dir=plots, model_name="p-cached",
                            model_file=root / "models" / "none.pt", seconds=3.5)
    assert out == {"metrics": {"mmd": 0.01, "ksd": 0.2}, "stages_run": [], "model_version": None}
    run = client.get_run(run_id)
    assert run.data.tags["stein.cached"] == "true" and run.data.tags["stein.stages_run"] == ""
    assert run.info.run_name.endswith(" (cached)") and "stein.model" not in run.data.tags
    assert run.data.metrics == {"mmd": 0.01, "ksd": 0.2, "pipeline_seconds": 3.5}
    assert sorted(a.path for a in client.list_artifacts(run_id, "plots")) == ["plots/checkpoints.png", "plots/samples.png"]
    assert "p-cached.json" in {a.path for a in client.list_artifacts(run_id)}
    # the experiment's run table view: the headline metrics as columns (no params differ with one run)
    view = json.loads(client.get_experiment(run.info.experiment_id).tags["mlflow.sharedViewState.stein"])
    assert view == {"selectedColumns": ["metrics.`mmd`", "metrics.`ksd`"]}


def test_many_params_and_a_named_run(store):
    from tasks.tracking.log import create_pipeline_run

    root, client, _ = store
    config = {"big": {f"k{i:03d}": i for i in range(250)}, "text": {"long": "x" * 7000}}  # > 100 params: 3 batches
    run = client.get_run(create_pipeline_run(client, "p-many", config=config, root=root, name="my run"))
    assert run.info.run_name == "my run"
    assert len(run.data.params) == 251 and run.data.params["big.k249"] == "249"
    assert run.data.params["text.long"] == "x" * 6000  # MLflow's limit per value


def test_registered_model_loads_back_and_links_the_pipeline_runs(store, mlp_checkpoint):
    import torch

    from tasks.families.loading import load_model
    from tasks.data.io import file_md5
    from tasks.tracking.log import (
        create_pipeline_run, fill_pipeline_run, load_registered_model, model_version_of, register_model,
    )

    root, client, _ = store
    model = mlp_checkpoint(root / "models" / "p-reg" / "model.pt")
    pipeline_id = create_pipeline_run(client, "p-reg", config=CONFIG, root=root)
    exp = client.get_run(pipeline_id).info.experiment_id
    train = client.create_run(exp, run_name="train", tags={"mlflow.parentRunId": pipeline_id, "stein.dvc_stage": "p-reg-train"})
    client.log_artifact(train.info.run_id, str(model), "model")  # what the train stage flow logs
    v1 = register_model(client, train.info.run_id, "p-reg", model)
    assert int(v1.version) == 1 and v1.run_id == train.info.run_id and v1.tags["model_md5"] == file_md5(model)
    card = json.loads(Path(client.download_artifacts(train.info.run_id, "model/model.json", str(root))).read_text())
    assert card["family"] == "ncsn" and card["classes"] == {"score": "NoiseConditionalMLP"}
    assert card["model_args"]["score"]["hidden"] == 16 and card["md5"] == file_md5(model)

    metrics_file, plots = _results(root, "p-reg", {"mmd": 0.5})
    out = fill_pipeline_run(client, pipeline_id, metrics_file=metrics_file, plots_dir=plots, model_name="p-reg", model_file=model)
    assert out["stages_run"] == ["p-reg-train"] and out["model_version"] == "p-reg/1"
    run = client.get_run(pipeline_id)
    assert run.data.tags["stein.cached"] == "false" and run.data.tags["stein.model"] == "p-reg/1"
    assert client.get_run(train.info.run_id).data.tags["stein.model"] == "p-reg/1"

    # a second training run with other weights: version 2; each file finds its own version
    other = root / "models" / "p-reg-2" / "model.pt"
    torch.manual_seed(1)
    from stein_core import NoiseConditionalMLP
    from tasks.families import module_checkpoint
    from tasks.data.io import save_torch

    save_torch(other, module_checkpoint("ncsn", {"score": NoiseConditionalMLP(dim=2, hidden=16, n_layers=2, embed_dim=8)},
                                        shape=[2], sigmas=[3.0, 1.0, 0.3]))
    train2 = client.create_run(exp, run_name="train")
    client.log_artifact(train2.info.run_id, str(other), "model")
    assert int(register_model(client, train2.info.run_id, "p-reg", other).version) == 2
    assert int(model_version_of(client, "p-reg", model).version) == 1
    assert int(model_version_of(client, "p-reg", other).version) == 2

    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    for version, path in ((1, model), ("latest", other)):
        loaded = load_registered_model("p-reg", version, root=root)
        assert torch.equal(loaded.score(x), load_model(path).score(x))
    assert not torch.equal(load_registered_model("p-reg", 1, root=root).score(x), load_model(other).score(x))


def test_dvc_experiment_stages_share_one_pipeline_run_per_experiment(store, monkeypatch):
    """What each stage of a `dvc exp run` does first (flows/registry.run_stage): find or create its experiment's
    pipeline run. Two stages of one experiment share it (reopened as RUNNING); another experiment, or the same
    name from another baseline commit, gets its own; under `stein run` (a parent run id set) it does nothing."""
    from tasks.tracking.log import experiment_group_run

    root, client, _ = store
    assert experiment_group_run(client, "p-exp", config=CONFIG, root=root) is None  # not in an experiment
    monkeypatch.setenv("DVC_EXP_NAME", "eps-small")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    first = experiment_group_run(client, "p-exp", config=CONFIG, root=root)
    client.set_terminated(first, "FINISHED")  # what the stage does when it ends
    again = experiment_group_run(client, "p-exp", config=CONFIG, root=root)
    assert again == first and client.get_run(first).info.status == "RUNNING"
    run = client.get_run(first)
    assert run.info.run_name == "p-exp eps-small" and run.data.params["sample.eps"] == "0.002"
    assert run.data.tags["stein.dvc_exp"] == "eps-small" and run.data.tags["stein.kind"] == "pipeline"
    monkeypatch.setenv("DVC_EXP_NAME", "eps-large")
    assert experiment_group_run(client, "p-exp", config=CONFIG, root=root) not in (None, first)
    monkeypatch.setenv("DVC_EXP_NAME", "eps-small")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "b" * 40)
    assert experiment_group_run(client, "p-exp", config=CONFIG, root=root) not in (None, first)
    monkeypatch.setenv("STEIN_PARENT_RUN_ID", first)
    assert experiment_group_run(client, "p-exp", config=CONFIG, root=root) is None


def test_stein_runs_fast_reader_equals_mlflow(store):
    """`stein runs` reads the SQLite store's tables directly (no MLflow import); it must return exactly what
    MLflow's client returns, for every pipeline run this module logged (and none of the stage runs), in the same
    order, with `--last` applied per pipeline."""
    from tasks.tracking.runs import recent_runs, recent_runs_sqlite, sqlite_store
    from tasks.tracking.log import create_pipeline_run, tracking_uri

    root, client, _ = store
    for i in range(3):  # same start millisecond is possible: MLflow breaks ties by run id, so must the reader
        create_pipeline_run(client, "p-order", config={"sample": {"eps": 10.0 ** -i}}, root=root, name=f"r{i}")
    from tasks.tracking.log import fill_pipeline_run

    metrics_file, plots = _results(root, "p-order", {"mmd": 0.25})
    fill_pipeline_run(client, create_pipeline_run(client, "p-order", config={}, root=root, name="c"),
                      metrics_file=metrics_file, plots_dir=plots, model_name="p-order", model_file=root / "none.pt")
    deleted = create_pipeline_run(client, "p-order", config={}, root=root, name="deleted")
    client.delete_run(deleted)
    db = sqlite_store(tracking_uri(root))
    pipelines = ["p-cached", "p-many", "p-reg", "p-exp", "p-order", "no-such-experiment"]
    for last in (1, 2, 100):
        reference = recent_runs(client, pipelines, last=last)
        assert recent_runs_sqlite(db, pipelines, last=last) == reference
    mine = [r for r in reference if r.pipeline == "p-order"]
    assert sorted(r.name for r in mine) == ["c (cached)", "r0", "r1", "r2"]  # the deleted run is not listed
    cached = next(r for r in mine if r.cached)
    assert cached.metrics == {"mmd": 0.25} and cached.stages_run == ()
    assert next(r for r in mine if r.name == "r2").params == {"sample.eps": "0.01"}
    # the run table view of the experiment: the metric and the one param that differs (runs without params, like
    # the cached one here, are left out of the comparison)
    view = json.loads(client.get_experiment_by_name("p-order").tags["mlflow.sharedViewState.stein"])
    assert view == {"selectedColumns": ["metrics.`mmd`", "params.`sample.eps`"]}
