"""`stein gof`: a goodness-of-fit test of a Parquet dataset against a named target, through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from flows.cli import main
from tasks.data.io import write_dataset


def _gof(path, *args):
    result = CliRunner().invoke(main, ["gof", "--data", str(path), "--n-bootstrap", "200", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("test", ["ksd", "sksd"])
def test_gof_accepts_the_truth_and_rejects_a_wrong_model(tmp_path, test):
    rng = np.random.default_rng(0)
    normal, laplace = tmp_path / "normal.parquet", tmp_path / "laplace.parquet"
    write_dataset(normal, rng.normal(size=(300, 3)))
    write_dataset(laplace, rng.laplace(size=(300, 3)))
    same = _gof(normal, "--test", test)
    # n: the rows the statistic saw (maxSKSD tests the half it did not fit its directions on)
    assert {"statistic", "p_value", "n", "d"} <= set(same) and (same["n"], same["d"]) == (300 if test == "ksd" else 150, 3)
    assert same["n_used"] == 300
    assert same["p_value"] > 0.05 and not same["reject"]
    wrong = _gof(laplace, "--test", test, "--target", "std_normal")
    assert wrong["p_value"] <= 0.01 and wrong["reject"]
    assert wrong["p_value"] >= 1 / 201  # the observed statistic is counted: never 0
    right = _gof(laplace, "--test", test, "--target", "std_laplace")
    assert right["p_value"] > 0.05


def test_gof_rbf_kernel_and_human_output(tmp_path):
    rng = np.random.default_rng(1)
    shifted = tmp_path / "shifted.parquet"
    write_dataset(shifted, rng.normal(size=(200, 2)) + [0.8, 0.0])
    result = CliRunner().invoke(main, ["gof", "--data", str(shifted), "--kernel", "rbf", "--n-bootstrap", "100"])
    assert result.exit_code == 0 and "reject H0" in result.output and "do not" not in result.output


def test_gof_missing_or_bad_file_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["gof", "--data", str(tmp_path / "none.parquet")])
    assert result.exit_code == 2 and "none.parquet" in result.output
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    result = CliRunner().invoke(main, ["gof", "--data", str(bad)])
    assert result.exit_code == 2 and "bad.parquet" in result.output


@pytest.mark.parametrize("test", ["ksd", "sksd"])
def test_gof_on_collapsed_samples_is_an_error_not_a_decision(tmp_path, test):
    """Every point the same: no median-heuristic bandwidth exists. Before, the RBF statistic was NaN and the test
    answered p = 1/(B+1), reject=True; now the command exits 2 naming the file."""
    path = tmp_path / "same.parquet"
    write_dataset(path, np.ones((50, 2)))
    result = CliRunner().invoke(main, ["gof", "--data", str(path), "--kernel", "rbf", "--test", test, "--json"])
    assert result.exit_code == 2, result.output
    assert f"{path}: key 'x': " in result.output and "points coincide" in result.output
    assert "p_value" not in result.output
