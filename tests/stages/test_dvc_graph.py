"""dvc.yaml agrees with what the stages read and write: a file a stage reads but DVC does not list would not
make it stale when the file changes, and a file it writes but DVC does not list would not be versioned."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.registry import PIPELINES
from tasks.stages.evaluate.inputs import EvalInputs, plot_files, required_inputs

REPO = Path(__file__).resolve().parents[2]
EVAL_CODE = {"stein_core/tests_stat.py", "stein_core/discrepancies.py", "tasks/config/sections.py", "tasks/data/io.py",
             "tasks/families/base.py", "tasks/stages/evaluate/features.py", "tasks/stages/evaluate/metrics.py",
             "tasks/stages/evaluate/task.py", "tasks/stages/evaluate/plots.py", "flows/evaluate.py"}


def _names(entries) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def test_dvc_yaml_is_what_the_registry_generates():
    """dvc.yaml is generated (`stein dvc-yaml`): a pipeline is one YAML file and a registry line, never a copied
    block of stages."""
    from flows.dvcgen import render

    assert (REPO / "dvc.yaml").read_text() == render(REPO), "dvc.yaml is stale: run `stein dvc-yaml`"


def test_every_pipeline_is_listed_with_its_stages():
    from click.testing import CliRunner

    from flows.cli import main

    out = CliRunner().invoke(main, ["run", "--list"]).output
    for name, spec in PIPELINES.items():
        assert name in out and " -> ".join(st.name for st in spec.stages) in out


@pytest.fixture(scope="module")
def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_evaluate_stage_lists_what_its_config_reads_and_writes(stages, name):
    spec = PIPELINES[name]
    cfg = spec.load_config(REPO).evaluate
    paths = spec.paths(Path("."))
    stage = stages[spec.dvc_stage("evaluate")]
    inputs = EvalInputs.from_paths(paths)
    needed = {str(paths.samples_of(s)) for s in cfg.sample_sets} | {str(getattr(inputs, k)) for k in required_inputs(cfg)}
    assert needed | EVAL_CODE <= set(stage["deps"]), needed | EVAL_CODE - set(stage["deps"])
    sections = {s for p in stage["params"] for s in p[spec.config_file]}
    assert "evaluate" in sections and (cfg.checkpoints is None or cfg.checkpoints.sampler in sections)
    assert {str(paths.plots / f) for f in plot_files(cfg)} <= _names(stage.get("plots"))
    assert _names(stage["metrics"]) == {str(paths.metrics)}


@pytest.mark.parametrize("name", sorted(p for p in PIPELINES if PIPELINES[p].upstream is None))
def test_train_stage_versions_every_checkpoint(stages, name):
    spec = PIPELINES[name]
    paths = spec.paths(Path("."))
    train = stages[spec.dvc_stage("train")]
    assert {str(paths.model), str(paths.checkpoints)} <= set(train["outs"])
    family = f"tasks/families/{spec.family(REPO)}.py"
    assert str(paths.train) in train["deps"] and {family, "tasks/stages/train/loop.py"} <= set(train["deps"])
