"""`stein eval fid|kid`: feature-space distances between two Parquet sample sets, through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from flows.cli import main
from tasks.data.io import save_checkpoint, write_dataset


def _eval(*args) -> dict:
    result = CliRunner().invoke(main, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_raw_fid_exact_cases(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    shift = np.array([0.5, -1.0, 2.0])
    for name, data in {"x": x, "shifted": x + shift, "small": x[:20]}.items():
        write_dataset(tmp_path / f"{name}.parquet", data)
    same = _eval("fid", "--real", str(tmp_path / "x.parquet"), "--fake", str(tmp_path / "x.parquet"))
    assert same["fid"] < 1e-8 and (same["n_real"], same["n_fake"], same["dim"]) == (400, 400, 3)
    # a translation leaves the covariance unchanged: FID = |shift|^2 exactly (float32 storage: ~1e-6)
    moved = _eval("fid", "--real", str(tmp_path / "x.parquet"), "--fake", str(tmp_path / "shifted.parquet"))
    assert moved["fid"] == pytest.approx(float(shift @ shift), rel=1e-5) and moved["method"] == "eigen"


def test_fid_of_a_set_with_itself_when_n_below_d_is_zero(tmp_path):
    x = np.random.default_rng(1).uniform(size=(10, 64))
    write_dataset(tmp_path / "x.parquet", x)
    out = _eval("fid", "--real", str(tmp_path / "x.parquet"), "--fake", str(tmp_path / "x.parquet"))
    assert out["method"] == "gram" and 0.0 <= out["fid"] < 1e-8


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    """A LeNet trained on 80% of sklearn's digits (the same recipe the evaluation issue ships)."""
    import torch

    from stein_core.features import accuracy
    from tasks.stages.classifier import train_classifier
    from tasks.data.sources import load_digits_8x8, split_train_test

    data = load_digits_8x8()
    x_tr, y_tr, x_te, y_te = split_train_test(data.x, data.labels, 0.2, seed=0)
    model, _ = train_classifier(torch.from_numpy(x_tr), torch.from_numpy(y_tr), shape=(1, 8, 8), epochs=10, lr=5e-3, seed=0)
    assert accuracy(model, torch.from_numpy(x_te), torch.from_numpy(y_te)) >= 0.9
    path = tmp_path_factory.mktemp("clf") / "classifier.pt"
    save_checkpoint(path, state_dict=model.state_dict(), model_args=model.model_args)
    return path, x_te


def test_classifier_fid_rises_monotonically_with_noise(tmp_path, digits_classifier):
    path, x_te = digits_classifier
    rng = np.random.default_rng(2)
    write_dataset(tmp_path / "real.parquet", x_te, shape=(1, 8, 8))
    fids = []
    for level in (0.0, 0.05, 0.1, 0.2, 0.4):
        noisy = np.clip(x_te + level * rng.normal(size=x_te.shape), 0.0, 1.0)
        write_dataset(tmp_path / "noisy.parquet", noisy, shape=(1, 8, 8))
        out = _eval("fid", "--real", str(tmp_path / "real.parquet"), "--fake", str(tmp_path / "noisy.parquet"),
                    "--features", f"classifier:{path}")
        fids.append(out["fid"])
    assert out["features"] == "lenet_classifier" and out["dim"] == 84 and len(out["fingerprint"]) == 64
    assert fids[0] < 1e-6 and all(a < b for a, b in zip(fids, fids[1:])), fids


def test_kid_orders_sets_and_reports_spread(tmp_path):
    rng = np.random.default_rng(3)
    write_dataset(tmp_path / "a.parquet", rng.normal(size=(300, 4)))
    write_dataset(tmp_path / "b.parquet", rng.normal(size=(300, 4)))
    write_dataset(tmp_path / "c.parquet", rng.normal(size=(300, 4)) + 1.0)
    near = _eval("kid", "--real", str(tmp_path / "a.parquet"), "--fake", str(tmp_path / "b.parquet"), "--subset-size", "100", "--subsets", "50")
    far = _eval("kid", "--real", str(tmp_path / "a.parquet"), "--fake", str(tmp_path / "c.parquet"), "--subset-size", "100", "--subsets", "50")
    assert abs(near["kid"]) < 3 * near["kid_std"] + 1e-3 and far["kid"] > 10 * max(abs(near["kid"]), near["kid_std"])


def test_bad_inputs_exit_2_and_name_the_file(tmp_path):
    write_dataset(tmp_path / "x.parquet", np.zeros((5, 2)))
    runner = CliRunner()
    missing = runner.invoke(main, ["eval", "fid", "--real", str(tmp_path / "x.parquet"), "--fake", str(tmp_path / "x.parquet"),
                                   "--features", f"inception:{tmp_path / 'weights.pth'}"])
    assert missing.exit_code == 2 and "weights.pth" in missing.output and "STEIN_INCEPTION_WEIGHTS" in missing.output
    bad_spec = runner.invoke(main, ["eval", "kid", "--real", str(tmp_path / "x.parquet"), "--fake", str(tmp_path / "x.parquet"), "--features", "vgg"])
    assert bad_spec.exit_code == 2 and "raw, classifier:PATH, inception:PATH or inception" in bad_spec.output
    # `inception` alone takes the weights from the environment, and says so when it is unset
    no_env = runner.invoke(main, ["eval", "fid", "--real", str(tmp_path / "x.parquet"), "--fake", str(tmp_path / "x.parquet"),
                                  "--features", "inception"], env={"STEIN_INCEPTION_WEIGHTS": ""})
    assert no_env.exit_code == 2 and "STEIN_INCEPTION_WEIGHTS" in no_env.output
    from_env = runner.invoke(main, ["eval", "fid", "--real", str(tmp_path / "x.parquet"), "--fake", str(tmp_path / "x.parquet"),
                                    "--features", "inception"], env={"STEIN_INCEPTION_WEIGHTS": str(tmp_path / "env.pth")})
    assert from_env.exit_code == 2 and "env.pth" in from_env.output
    absent = runner.invoke(main, ["eval", "fid", "--real", str(tmp_path / "none.parquet"), "--fake", str(tmp_path / "x.parquet")])
    assert absent.exit_code == 2 and "none.parquet" in absent.output
