"""Bad configuration fails before any compute: exit code 2, the file and the key named, nothing written."""

from __future__ import annotations

import copy
import functools
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from flows.cli import main
from flows.registry import PIPELINES
from tasks.config.sections import ConfigError, load_config
from tasks.config.pipelines import GenerativeConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_shipped_config_builds(name):
    """Configs are tested by building them: each conf/<pipeline>.yaml validates into its typed model."""
    spec = PIPELINES[name]
    cfg = spec.load_config(REPO)
    assert isinstance(cfg, spec.config_model)
    # the YAML sets every key explicitly (no silent defaults), and nothing unknown
    raw = yaml.safe_load((REPO / spec.config_file).read_text())
    for section, values in raw.items():
        model = getattr(cfg, section)
        if isinstance(model, dict):  # a sweep's methods: each a family's train section, its seed the cell's
            for method, keys in values.items():
                assert set(keys) == set(type(model[method]).model_fields) - {"seed"}, f"{section}.{method}"
        else:
            assert set(values) == set(type(model).model_fields), section


@pytest.mark.parametrize("family", ["ncsn", "agd", "mmd"])
def test_every_family_config_builds_with_its_defaults(family):
    """Each family's train section validates from its name alone, and its modules build for vectors (and, with
    a conv net, for images)."""
    from tasks.families import FAMILIES

    fam = FAMILIES[family]
    cfg = fam.config(family=family)
    modules = fam.build(cfg, (2,))
    assert modules and all(hasattr(m, "model_args") for m in modules.values())
    conv = fam.config(family=family, net={"kind": "conv"})
    assert fam.build(conv, (1, 8, 8))


@pytest.mark.parametrize("pipeline", ["ring8-agd", "digits-mmd"])
def test_a_family_without_a_score_refuses_ksd_model(project, pipeline):
    """ksd_model needs the model's score: a generator has none, and the config fails at validation, naming the
    key; the stage command exits 2 before it writes anything."""
    raw = yaml.safe_load((REPO / "conf" / f"{pipeline}.yaml").read_text())
    raw["evaluate"]["metrics"].append("ksd_model")
    path = project / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["stage", "prepare", "--pipeline", pipeline, "--config", str(path)])
    assert result.exit_code == 2 and "key 'evaluate.metrics'" in result.output, result.output
    assert not (project / "data").exists()
    with pytest.raises(ConfigError) as info:
        load_config(path, GenerativeConfig)
    msg = str(info.value)
    assert "key 'evaluate.metrics'" in msg and "ksd_model needs the model's score" in msg and "ncsn" in msg, msg


def _write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((REPO / "conf" / "gmm2d.yaml").read_text())
    mutate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("mutate", "key", "fragment"),
    [
        (lambda r: r["train"].update(learning_rate=0.1), "train.learning_rate", "unknown key"),
        (lambda r: r["sample"].update(n_steps_each="many"), "sample.n_steps_each", "valid integer"),
        (lambda r: r["sample"].update(eps=-1e-4), "sample.eps", "greater than 0"),
        (lambda r: r["train"].update(sigma_max=0.05, sigma_min=0.1), "train", "must be larger than sigma_min"),
        (lambda r: r["train"].update(family="gan"), "train.family", "'ncsn', 'agd', 'mmd'"),
        (lambda r: r["train"].pop("family"), "train.family", "(missing)"),
        (lambda r: r["train"]["net"].update(kind="conv", hidden=3), "train.net.hidden", "unknown key"),
        (lambda r: r.update(sample={"sampler": "generator"}), "sample.sampler", "cannot be sampled with 'generator'"),
        (lambda r: r["prepare"].update(weights=[0.5, 0.4]), "prepare", "sum to 1"),
        (lambda r: r.update(sampel={"seed": 1}), "sampel", "unknown key"),
        (lambda r: r["evaluate"].update(metrics=["ksd_target", "fld"]), "evaluate.metrics.1", "'fid'"),
        (lambda r: r["evaluate"].update(metrics=["mmd", "mmd"]), "evaluate", "listed twice: mmd"),
        (lambda r: r["evaluate"]["checkpoints"].update(metrics=[]), "evaluate.checkpoints.metrics", "at least 1"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, mutate, key, fragment):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as info:
        load_config(path, GenerativeConfig)
    msg = str(info.value)
    assert str(path) in msg and f"key '{key}'" in msg and fragment in msg, msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml", GenerativeConfig)
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml", GenerativeConfig)


def test_cli_exits_2_and_writes_nothing(project):
    shutil.copytree(REPO / "conf", project / "conf")
    bad = _write(project, lambda r: r["sample"].update(eps=-1.0))
    result = CliRunner().invoke(main, ["stage", "prepare", "--config", str(bad)])
    assert result.exit_code == 2
    assert "sample.eps" in result.output and str(bad) in result.output
    assert not (project / "data").exists()
    result = CliRunner().invoke(main, ["run", "no-such-pipeline"])
    assert result.exit_code == 2 and "unknown pipeline" in result.output


def test_cli_help_and_list():
    runner = CliRunner()
    out = runner.invoke(main, ["--help"]).output
    for cmd in ("run", "stage", "ui"):
        assert cmd in out
    listing = runner.invoke(main, ["run", "--list"])
    assert listing.exit_code == 0 and "gmm2d" in listing.output


def test_checkpoint_sampler_must_name_an_annealed_section(tmp_path):
    path = _write(tmp_path, lambda r: r["evaluate"]["checkpoints"].update(sampler="train"))
    with pytest.raises(ConfigError) as info:
        load_config(path, GenerativeConfig)
    msg = str(info.value)
    assert str(path) in msg and "key 'evaluate.checkpoints.sampler'" in msg and "options: sample" in msg, msg


def test_a_second_stein_run_fails_at_once_naming_the_first(project):
    """While one `stein run` holds the project (DVC reproduces one pipeline at a time), a second one exits 1 at once
    with the holder in its last line, before it starts a server or touches DVC; the lock goes with its holder."""
    import fcntl
    import time

    from flows.local import project_lock

    shutil.copytree(REPO / "conf", project / "conf")
    with project_lock(project):
        t0 = time.perf_counter()
        result = CliRunner().invoke(main, ["run", "gmm2d"])
        assert result.exit_code == 1, result.output
        assert result.output.strip().splitlines()[-1].startswith(f"error: `stein run` (pid {os.getpid()}) is reproducing")
        assert time.perf_counter() - t0 < 10
    with open(project / ".stein" / "run.lock") as f:  # released: a new holder gets it at once
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _numbers_without_upper_bound(model, seen=None, bounds=None) -> list[str]:
    """Dotted names of the int/float fields (also inside lists, unions and nested sections) reachable from
    ``model`` that have no ``le``/``lt`` bound (or none of ``bounds``, annotated_types classes)."""
    import typing

    import annotated_types
    from pydantic import BaseModel

    seen = set() if seen is None else seen
    bounds = bounds or (annotated_types.Le, annotated_types.Lt)
    if model in seen:
        return []
    seen.add(model)
    missing = []

    def walk(tp, metadata, where):
        bounded = any(isinstance(m, bounds) for m in metadata)
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            base, *meta = typing.get_args(tp)
            for m in meta:
                if hasattr(m, "metadata"):  # a FieldInfo
                    meta = [*meta, *m.metadata]
            walk(base, [*metadata, *meta], where)
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            for arg in typing.get_args(tp):
                walk(arg, metadata, where)
        elif origin is list:
            walk(typing.get_args(tp)[0], [], f"{where}[]")
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            missing.extend(f"{where}.{m}" for m in _numbers_without_upper_bound(tp, seen, bounds))
        elif tp in (int, float) and not bounded:
            missing.append(where)

    for name, field in model.model_fields.items():
        walk(field.annotation, field.metadata, name)
    return missing


def test_every_number_of_every_section_has_an_upper_bound():
    """`n_samples: 1e11` must fail at validation, not run for days: every int and float of every config section
    (every family's too) is bounded above."""
    from tasks.families import FAMILIES
    from tasks.config.pipelines import GenerativeConfig, ResampleConfig
    from tasks.infra.runtime import RuntimeSettings

    missing = []
    for root in (GenerativeConfig, ResampleConfig, RuntimeSettings, *(f.config for f in FAMILIES.values())):
        missing += [f"{root.__name__}: {m}" for m in _numbers_without_upper_bound(root)]
    assert not missing, missing


def _roots():
    from tasks.config.pipelines import GenerativeConfig, ResampleConfig
    from tasks.families import FAMILIES
    from tasks.infra.runtime import RuntimeSettings

    return (GenerativeConfig, ResampleConfig, RuntimeSettings, *(f.config for f in FAMILIES.values()))


def test_every_number_of_every_section_has_a_lower_bound():
    """`sample.n_samples: 0` or a negative step size must fail at validation, not deep inside a stage: every int
    and float of every config section (every family's too) is bounded below."""
    import annotated_types

    missing = []
    for root in _roots():
        missing += [f"{root.__name__}: {m}" for m in _numbers_without_upper_bound(root, bounds=(annotated_types.Ge, annotated_types.Gt))]
    assert not missing, missing


def _numeric_leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numeric_leaves(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numeric_leaves(v, f"{prefix}{i}.")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix[:-1]


def _set(tree, dotted: str, value):
    tree = copy.deepcopy(tree)
    *path, last = dotted.split(".")
    node = tree
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return tree


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_shipped_number_refuses_a_value_below_its_bound(name, tmp_path):
    """Each number of each shipped config, set far below any sensible value (a huge negative, then 0 where the
    shipped value is a positive integer: a count or a size), fails validation naming that key (a list entry: its
    list)."""
    raw = yaml.safe_load((REPO / "conf" / f"{name}.yaml").read_text())
    spec = PIPELINES[name]
    leaves = list(_numeric_leaves(raw))
    assert leaves
    for key in leaves:
        value = functools.reduce(lambda n, p: n[int(p)] if isinstance(n, list) else n[p], key.split("."), raw)
        # 0 is a value for a seed, for heldout_every ("no held-out curve"), burst_every ("no bursts") and
        # exact_trace_max_dim ("Hutchinson's estimate in every dimension")
        zero_ok = key.endswith(("seed", "heldout_every", "burst_every", "exact_trace_max_dim"))
        for bad in ([-1e12] if isinstance(value, float) else [-10**12]) + ([0] if isinstance(value, int) and value > 0 and not zero_ok else []):
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(_set(raw, key, bad)))
            named = ".".join(p for p in key.split(".") if not p.isdigit())
            with pytest.raises(ConfigError) as err:
                load_config(path, spec.config_model)
            assert err.value.key is not None and err.value.key.startswith(named), (key, bad, str(err.value))


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_pipeline_has_a_tiny_config_that_builds(name, tiny_config, tmp_path):
    """The generic tiny settings (tests/conftest.py) give every pipeline a valid config, the one its end-to-end
    check runs with: a new pipeline whose keys they break fails here, in seconds."""
    raw = yaml.safe_load((REPO / "conf" / f"{name}.yaml").read_text())
    small = tiny_config(raw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(small))
    cfg = load_config(path, PIPELINES[name].config_model)
    for train in [cfg.train] if getattr(cfg, "train", None) is not None else list(getattr(cfg, "methods", {}).values()):
        assert train.n_steps <= 40 and train.checkpoint_every <= train.n_steps
    if getattr(cfg, "methods", None):  # a sweep: one dimension, one seed
        assert len(cfg.prepare.dims) == 1 and len(cfg.prepare.seeds) == 1
    else:
        assert cfg.evaluate.n_eval <= 100


@pytest.mark.parametrize("name", sorted(p for p, spec in PIPELINES.items()
                                         if spec.upstream is None and spec.config_model is GenerativeConfig))
def test_a_config_is_validated_by_its_familys_model_and_pickles(name):
    """``GenerativeConfig.model_validate`` picks the model of the config's family (no union of every family: a
    stage imports its own family only); the result pickles (into Ray workers) and its train section dumps whole."""
    import pickle

    from tasks.config.pipelines import generative_config
    from tasks.families import FAMILIES

    cfg = PIPELINES[name].load_config(REPO)
    family = cfg.train.family
    assert type(cfg) is generative_config(family) and isinstance(cfg, GenerativeConfig)
    assert type(cfg.train) is FAMILIES[family].config
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    dumped = cfg.model_dump()["train"]  # the family's own section, every key of it (not TrainBase's alone) ...
    # ... but `compile: false`, which a dump leaves out (model files and run names stay as before the option)
    assert dumped == cfg.train.model_dump() and set(dumped) == set(FAMILIES[family].config.model_fields) - {"compile"}
    assert type(cfg.train).model_validate(dumped) == cfg.train
    assert cfg.train.model_copy(update={"compile": True}).model_dump()["compile"] is True
    bad = yaml.safe_load((REPO / "conf" / f"{name}.yaml").read_text())
    bad["train"]["family"] = "nope"
    known = ", ".join(repr(f) for f in FAMILIES)  # the registered families, each module of tasks/families/
    assert known.startswith("'ncsn', 'agd', 'mmd', 'ebm', 'fce', 'gebm'")
    with pytest.raises(ValueError, match=f"must be one of {known}, got 'nope'"):
        GenerativeConfig.model_validate(bad)


@pytest.mark.parametrize("estimator,key,value,fragment", [
    ("stein", "n_eigen", 8, "has no effect with estimator: stein (it is the 'ssge' estimator's)"),
    ("stein", "eigen_threshold", 0.9, "has no effect with estimator: stein"),
    ("ssge", "eta", 0.1, "has no effect with estimator: ssge (it is the 'stein' estimator's)"),
    ("ssge", "eta_rel", 2.0, "has no effect with estimator: ssge"),
])
def test_a_key_that_does_nothing_under_the_chosen_estimator_is_an_error(tmp_path, estimator, key, value, fragment):
    """`n_eigen` beside `estimator: stein` was accepted and did nothing: the user meant something by it."""
    raw = yaml.safe_load((REPO / "conf" / "ring8-agd.yaml").read_text())
    for k in ("eta", "eta_rel", "n_eigen", "eigen_threshold"):
        raw["train"].pop(k, None)
    raw["train"]["estimator"] = estimator
    path = tmp_path / "agd.yaml"
    path.write_text(yaml.safe_dump(raw))
    load_config(path, GenerativeConfig)  # the estimator alone is fine
    raw["train"][key] = value
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(path, GenerativeConfig)
    assert str(info.value).startswith(f"{path}: key 'train.{key}': {fragment}"), info.value
