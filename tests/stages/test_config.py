"""Bad configuration fails before any compute: exit code 2, the file and the key named, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from flows.cli import main
from flows.registry import PIPELINES
from tasks.config import ConfigError, GMM2dConfig, load_config

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
        assert set(values) == set(type(getattr(cfg, section)).model_fields), section


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
        load_config(path, GMM2dConfig)
    msg = str(info.value)
    assert str(path) in msg and f"key '{key}'" in msg and fragment in msg, msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml", GMM2dConfig)
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml", GMM2dConfig)


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
        load_config(path, GMM2dConfig)
    msg = str(info.value)
    assert str(path) in msg and "evaluate.checkpoints.sampler='train'" in msg and "options: sample" in msg, msg
