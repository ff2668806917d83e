"""``stein compare`` on a real MLflow SQLite store, logged the way ``stein run`` logs.

Creating an MLflow SQLite store runs its migrations (seconds), so the store is written once per module and copied
into each test's temporary project. Two pipelines:

- ring8-agd: an older pipeline run (with its train child), the latest pipeline run (with its train child) and an
  even newer FAILED pipeline run that must be ignored;
- ring8-mmd: a pipeline run with a train child, then a later pipeline run that reran only sample and evaluate
  (its curves and training rows come from the earlier train run), then a standalone train run started after
  that pipeline run (a model nobody evaluated yet: not used).

The held-out MMD² decays as c / epoch² for agd and c / epoch for mmd, so every curve value can be checked against
the epoch it was paired with.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from flows.cli import main
from tasks.tracking import compare as cmp
from tasks.tracking.compare import TRAIN_KEYS, collect_curves, collect_table, latest_runs

STEPS_PER_EPOCH = 20000 / 256  # n_train / batch_size
N_STEPS, LOG_EVERY, HELDOUT_EVERY = 1000, 100, 200


def _log_train(client, exp: str, parent: str | None, *, start: int, family: str, c: float, power: int, sec_per_step: float) -> str:
    """A train run as flows/train.py and the Ray worker log it: the family tag, histories against the step
    (train/mmd_heldout only every HELDOUT_EVERY steps), and the single-value metrics of run_stage."""
    from mlflow.entities import Metric

    tags = {"stein.stage": "train", "stein.pipeline": exp, "stein.family": family}
    if parent:
        tags |= {"mlflow.parentRunId": parent, "stein.pipeline_run_id": parent}
    run = client.create_run(client.get_experiment_by_name(exp).experiment_id, start_time=start, run_name="train", tags=tags)
    rid = run.info.run_id
    history = []
    for step in range(LOG_EVERY, N_STEPS + 1, LOG_EVERY):
        epoch = step / STEPS_PER_EPOCH
        values = {"train/epoch": epoch, "train/elapsed_seconds": sec_per_step * step, "train/seconds_per_epoch": sec_per_step * STEPS_PER_EPOCH,
                  "train/samples_per_s": 256 / sec_per_step, f"train/{family}_loss": 1.0 / step}
        if step % HELDOUT_EVERY == 0:
            values["train/mmd_heldout"] = c / epoch**power
        history += [Metric(k, v, start + step, step) for k, v in values.items()]
    client.log_batch(rid, metrics=history)
    final = c / (N_STEPS / STEPS_PER_EPOCH) ** power
    for k, v in {"steps": N_STEPS, "seconds_per_step": sec_per_step, "seconds_per_epoch": sec_per_step * STEPS_PER_EPOCH,
                 "final_mmd_heldout": final, "fit_seconds": sec_per_step * N_STEPS + 3.0}.items():
        client.log_metric(rid, k, v)
    client.set_terminated(rid, "FINISHED", end_time=start + 50)
    return rid


def _log_pipeline(client, exp: str, *, start: int, metrics: dict[str, float], commit: str, train: dict | None, status: str = "FINISHED") -> str:
    """A pipeline run (tag stein.kind=pipeline, the headline metrics) with its stage children."""
    eid = client.get_experiment_by_name(exp).experiment_id
    run = client.create_run(eid, start_time=start, run_name=f"pipeline {exp}",
                            tags={"stein.kind": "pipeline", "stein.pipeline": exp, "stein.git_commit": commit, "stein.git_dirty": "false"})
    rid = run.info.run_id
    if train is not None:
        _log_train(client, exp, rid, start=start + 1, **train)
    for i, stage in enumerate(("sample", "evaluate")):
        child = client.create_run(eid, start_time=start + 60 + i, run_name=stage,
                                  tags={"stein.stage": stage, "stein.pipeline": exp, "mlflow.parentRunId": rid, "stein.pipeline_run_id": rid})
        client.set_terminated(child.info.run_id, "FINISHED", end_time=start + 70 + i)
    for k, v in metrics.items():
        client.log_metric(rid, k, v)
    client.set_terminated(rid, status, end_time=start + 100)
    return rid


AGD_OLD = {"mmd": 0.5, "ref_mmd": -1e-4, "ksd": 0.9, "modes_covered": 3.0, "pipeline_seconds": 10.0}
AGD = {"mmd": 2.5e-3, "ref_mmd": -1.2e-4, "ksd": 0.031, "log_likelihood": -3.41, "modes_covered": 8.0, "pipeline_seconds": 42.0}
AGD_FAILED = {"mmd": 99.0}
MMD_OLD = {"mmd": 0.3, "ref_mmd": -1e-4, "modes_covered": 5.0, "pipeline_seconds": 20.0}
MMD = {"mmd": 7.5e-3, "ref_mmd": -1.1e-4, "log_likelihood": -3.9, "modes_covered": 7.0, "pipeline_seconds": 5.5}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    for name in ("ring8-agd", "ring8-mmd"):
        client.create_experiment(name)
    agd = dict(family="agd", power=2, sec_per_step=0.01)
    ids = {
        "agd_old": _log_pipeline(client, "ring8-agd", start=1_000_000, metrics=AGD_OLD, commit="0" * 40, train=agd | {"c": 0.5}),
        "agd": _log_pipeline(client, "ring8-agd", start=2_000_000, metrics=AGD, commit="a1b2c3d" + "0" * 33, train=agd | {"c": 0.05}),
        "agd_failed": _log_pipeline(client, "ring8-agd", start=3_000_000, metrics=AGD_FAILED, commit="f" * 40, train=None, status="FAILED"),
        "mmd_old": _log_pipeline(client, "ring8-mmd", start=1_500_000, metrics=MMD_OLD, commit="b" * 40,
                                 train=dict(family="mmd", power=1, sec_per_step=0.004, c=0.05)),
        "mmd": _log_pipeline(client, "ring8-mmd", start=2_500_000, metrics=MMD, commit="c" * 40, train=None),
    }
    _log_train(client, "ring8-mmd", None, start=2_600_000, family="mmd", c=9.0, power=1, sec_per_step=1.0)
    return db, ids


@pytest.fixture
def store(project, template):
    """A temporary project whose MLflow store holds the module's runs: (project root, client, run ids)."""
    from mlflow import MlflowClient

    db, ids = template
    (project / ".stein").mkdir()
    shutil.copy(db, project / ".stein" / "mlflow.db")
    return project, MlflowClient(tracking_uri=f"sqlite:///{project / '.stein' / 'mlflow.db'}"), ids


def test_table_holds_the_latest_finished_runs_values(store):
    _, client, ids = store
    runs = [latest_runs(client, "ring8-agd"), latest_runs(client, "ring8-mmd")]
    # the latest FINISHED pipeline run wins (not the older one, not the newer FAILED one)
    assert [r.run.info.run_id for r in runs] == [ids["agd"], ids["mmd"]]
    assert runs[0].train_is_child and not runs[1].train_is_child
    table = collect_table(runs)
    assert table.keys[:4] == TRAIN_KEYS and table.keys[-1] == "pipeline_seconds"
    assert table.keys.index("mmd") < table.keys.index("ref_mmd") < table.keys.index("ksd")
    for pipeline, logged in (("ring8-agd", AGD), ("ring8-mmd", MMD)):
        for key, value in logged.items():
            assert table.cell(key, pipeline) == pytest.approx(value), (pipeline, key)
    assert table.cell("ksd", "ring8-mmd") is None  # ring8-mmd logged no ksd: a blank cell
    # training rows from each model's train run: agd's child; mmd's from its earlier pipeline run's train child
    assert table.cell("family", "ring8-agd") == "agd" and table.cell("family", "ring8-mmd") == "mmd"
    assert table.cell("steps", "ring8-mmd") == N_STEPS
    assert table.cell("seconds_per_epoch", "ring8-agd") == pytest.approx(0.01 * STEPS_PER_EPOCH)
    assert table.cell("seconds_per_epoch", "ring8-mmd") == pytest.approx(0.004 * STEPS_PER_EPOCH)  # not the later 1.0 s/step run
    assert table.cell("final_mmd_heldout", "ring8-agd") == pytest.approx(0.05 / (N_STEPS / STEPS_PER_EPOCH) ** 2)
    assert table.columns[0].header.startswith("a1b2c3d ")

    text = cmp.format_table(table).splitlines()
    assert text[0].split() == ["ring8-agd", "ring8-mmd"]
    ksd_row = next(line for line in text if line.startswith("ksd "))
    assert ksd_row.split() == ["ksd", "0.031"]
    assert len({len(line) for line in text if line.startswith(("mmd ", "ref_mmd ", "steps "))}) == 1  # aligned


def test_curves_pair_heldout_mmd_with_epoch_and_seconds(store):
    _, client, _ = store
    curves = collect_curves(client, [latest_runs(client, "ring8-agd"), latest_runs(client, "ring8-mmd")])
    agd, mmd = curves["ring8-agd"], curves["ring8-mmd"]
    heldout_steps = tuple(range(HELDOUT_EVERY, N_STEPS + 1, HELDOUT_EVERY))
    assert agd.step == heldout_steps and mmd.step == heldout_steps  # only the steps with a held-out value
    # the same step's epoch and seconds: c = mmd * epoch^power recovers the constant of the run logged
    assert [m * e**2 for m, e in zip(agd.mmd_heldout, agd.epoch)] == pytest.approx([0.05] * 5)  # latest run, not 0.5
    assert [m * e for m, e in zip(mmd.mmd_heldout, mmd.epoch)] == pytest.approx([0.05] * 5)  # earlier train run, not 9.0
    assert agd.seconds == pytest.approx([0.01 * s for s in heldout_steps])
    assert mmd.seconds == pytest.approx([0.004 * s for s in heldout_steps])


def test_metric_order():
    keys = ["pipeline_seconds", "zeta", "ref_mmd_p_value", "ksd", "mmd_p_value", "ref_mmd", "mmd", "steps",
            "family", "kid_std", "kid", "ref_kid", "n_eval"]
    assert sorted(keys, key=cmp.metric_sort_key) == [
        "family", "steps", "mmd", "ref_mmd", "mmd_p_value", "ref_mmd_p_value", "ksd", "kid", "ref_kid", "kid_std",
        "zeta", "n_eval", "pipeline_seconds"]


def test_cli_prints_the_table_and_writes_the_figure(store):
    import matplotlib.image

    root, _, _ = store
    result = CliRunner().invoke(main, ["compare", "ring8-agd", "ring8-mmd"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert next(line for line in lines if line.startswith("mmd ")).split() == ["mmd", "0.0025", "0.0075"]
    assert next(line for line in lines if line.startswith("family ")).split() == ["family", "agd", "mmd"]
    assert "wrote plots/compare/ring8-agd_vs_ring8-mmd.png" in lines
    assert "stein ui" in lines[-1] and "Compare" in lines[-1]
    png = root / "plots" / "compare" / "ring8-agd_vs_ring8-mmd.png"
    assert png.stat().st_size > 10_000
    h, w, _ = matplotlib.image.imread(png).shape
    assert w > 1000 and h > 400


def test_cli_json(store):
    root, _, ids = store
    out = root / "elsewhere" / "fig.png"
    result = CliRunner().invoke(main, ["compare", "ring8-agd", "ring8-mmd", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["pipelines"] == ["ring8-agd", "ring8-mmd"]
    assert data["runs"]["ring8-agd"]["run_id"] == ids["agd"] and data["runs"]["ring8-mmd"]["run_id"] == ids["mmd"]
    assert data["metrics"]["ring8-agd"]["mmd"] == pytest.approx(AGD["mmd"])
    assert data["metrics"]["ring8-mmd"]["log_likelihood"] == pytest.approx(MMD["log_likelihood"])
    assert "ksd" not in data["metrics"]["ring8-mmd"]
    assert data["curves"]["ring8-agd"]["step"] == list(range(HELDOUT_EVERY, N_STEPS + 1, HELDOUT_EVERY))
    assert data["figure"] == str(out.resolve()) and out.stat().st_size > 10_000
    assert not (root / "plots").exists()


def test_unknown_pipeline_or_no_runs_exits_2_and_writes_nothing(store, project):
    root, _, _ = store
    runner = CliRunner()
    unknown = runner.invoke(main, ["compare", "ring8-agd", "no-such-pipeline"])
    assert unknown.exit_code == 2
    assert unknown.output.startswith("error: ") and "unknown pipeline 'no-such-pipeline'" in unknown.output
    never_run = runner.invoke(main, ["compare", "ring8-agd", "digits"])
    assert never_run.exit_code == 2
    assert never_run.output.count("\n") == 1 and "'digits'" in never_run.output and "`stein run digits`" in never_run.output
    assert not (root / "plots").exists()


def test_no_store_yet_exits_2_and_creates_none(project):
    result = CliRunner().invoke(main, ["compare", "ring8-agd", "ring8-mmd"])
    assert result.exit_code == 2 and "`stein run ring8-agd` first" in result.output
    assert not (project / ".stein" / "mlflow.db").exists() and not (project / "plots").exists()


def test_compare_runs_named_by_id_or_name(store):
    """Two runs of one pipeline side by side, named by id prefix: each column is that run (not the latest), with
    its own train child's curve; the same name twice is told apart by the run id. A stage run's id stands for its
    pipeline run; an ambiguous or unknown reference exits 2."""
    root, client, ids = store
    runner = CliRunner()
    out = root / "two.png"
    result = runner.invoke(main, ["compare", ids["agd_old"][:8], ids["agd"], "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    labels = [f"pipeline ring8-agd {ids['agd_old'][:6]}", f"pipeline ring8-agd {ids['agd'][:6]}"]
    assert data["pipelines"] == labels
    assert [data["runs"][k]["run_id"] for k in labels] == [ids["agd_old"], ids["agd"]]
    assert data["metrics"][labels[0]]["mmd"] == pytest.approx(AGD_OLD["mmd"])
    assert data["metrics"][labels[1]]["mmd"] == pytest.approx(AGD["mmd"])
    epoch = HELDOUT_EVERY / STEPS_PER_EPOCH
    assert data["curves"][labels[0]]["mmd_heldout"][0] == pytest.approx(0.5 / epoch**2)  # the old run's own train
    assert data["curves"][labels[1]]["mmd_heldout"][0] == pytest.approx(0.05 / epoch**2)
    assert out.stat().st_size > 10_000

    train_child = client.search_runs([client.get_experiment_by_name("ring8-mmd").experiment_id],
                                     filter_string=f"tags.`mlflow.parentRunId` = '{ids['mmd_old']}' and tags.`stein.stage` = 'train'")[0]
    mixed = runner.invoke(main, ["compare", train_child.info.run_id, "ring8-agd", "--json", "--out", str(out)])
    assert mixed.exit_code == 0, mixed.output
    assert json.loads(mixed.output)["runs"]["pipeline ring8-mmd"]["run_id"] == ids["mmd_old"]

    for ref in ("zzzzzz", "pipeline ring8-xyz"):
        bad = runner.invoke(main, ["compare", ref, "ring8-agd"])
        assert bad.exit_code == 2 and "no pipeline run has that name or id" in bad.output
