"""dvc.yaml agrees with what the stages read and write: a file a stage reads but DVC does not list would not
make it stale when the file changes, and a file it writes but DVC does not list would not be versioned."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.registry import PIPELINES
from tasks.config.sweep import SweepConfig, SweepPaths
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


#: The pipelines of the generative shape (prepare -> train -> sample -> evaluate, or a resampling of one).
GENERATIVE = sorted(p for p, spec in PIPELINES.items() if spec.config_model is not SweepConfig)
SWEEPS = sorted(p for p, spec in PIPELINES.items() if spec.config_model is SweepConfig)


@pytest.mark.parametrize("name", GENERATIVE)
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


@pytest.mark.parametrize("name", sorted(p for p in GENERATIVE if PIPELINES[p].upstream is None))
def test_train_stage_versions_every_checkpoint(stages, name):
    spec = PIPELINES[name]
    paths = spec.paths(Path("."))
    train = stages[spec.dvc_stage("train")]
    assert {str(paths.model), str(paths.checkpoints)} <= set(train["outs"])
    family = f"tasks/families/{spec.family(REPO)}.py"
    assert str(paths.train) in train["deps"] and {family, "tasks/stages/train/loop.py"} <= set(train["deps"])


@pytest.mark.parametrize("name", SWEEPS)
def test_a_sweep_has_one_train_stage_per_method(stages, name):
    """A change to one method's section reruns that method's cells alone: each train stage reads its method's
    section (and depends on every method's family module: the whole config is validated by every stage); the
    evaluate stage reads every method's models and writes the metrics and the table."""
    spec = PIPELINES[name]
    cfg = spec.load_config(REPO)
    sp = SweepPaths(spec.paths(Path(".")))
    families = {m: f"tasks/families/{t.family}.py" for m, t in cfg.methods.items()}
    assert stages[spec.dvc_stage("prepare")]["outs"] == [str(sp.data)]
    for method, family in families.items():
        stage = stages[spec.dvc_stage(f"train-{method}")]
        assert stage["params"] == [{spec.config_file: [f"methods.{method}"]}]
        assert stage["outs"] == [str(sp.models(method))]
        assert {str(sp.data), *families.values(), "tasks/stages/train/loop.py"} <= set(stage["deps"])
    evaluate = stages[spec.dvc_stage("evaluate")]
    assert {str(sp.data), *(str(sp.models(m)) for m in cfg.methods)} <= set(evaluate["deps"])
    assert _names(evaluate["metrics"]) == {str(spec.paths(Path(".")).metrics)}
    assert {str(sp.table), str(sp.table.with_suffix(".png"))} <= _names(evaluate["plots"])
