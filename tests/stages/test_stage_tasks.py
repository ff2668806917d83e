"""Each stage's task logic, called through ``.fn()`` on small data (Ray Train for real in the train test)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tasks.config import AnnealedLangevinSample, GMMEvaluate, GMMPrepare, NCSNTrain
from tasks.evaluate import evaluate_gmm
from tasks.io import read_dataset, save_checkpoint, write_dataset
from tasks.prepare import prepare_gmm
from tasks.sample import sample_annealed_langevin


def test_prepare_writes_seeded_mixture(project):
    cfg = GMMPrepare(seed=5, n_train=4000, n_test=400)
    train, test = project / "data" / "train.parquet", project / "data" / "test.parquet"
    info = prepare_gmm.fn(cfg, train, test)
    assert info == {"n_train": 4000, "n_test": 400, "dim": 2}
    ds = read_dataset(train)
    assert ds.x.shape == (4000, 2) and ds.x.dtype == np.float32
    assert ds.metadata["split"] == "train" and ds.metadata["seed"] == 5
    assert ds.metadata["mixture"]["weights"] == [0.8, 0.2]
    # component frequencies: binomial, sd = sqrt(0.8*0.2/4000) = 0.0063; 4 sd
    assert abs((ds.label == 0).mean() - 0.8) < 4 * math.sqrt(0.16 / 4000)
    # same seed, same bytes; another seed, other data
    again = project / "again.parquet"
    prepare_gmm.fn(cfg, again, project / "again_test.parquet")
    np.testing.assert_array_equal(read_dataset(again).x, ds.x)


def _model(project, dim=2, sigmas=(3.0, 1.0, 0.3)):
    from stein_core import NoiseConditionalMLP

    torch.manual_seed(0)
    net = NoiseConditionalMLP(dim=dim, hidden=16, n_layers=2, embed_dim=8)
    path = project / "models" / "m.pt"
    save_checkpoint(path, state_dict=net.state_dict(), model_args=net.model_args, sigmas=list(sigmas))
    return path


def test_sample_is_reproducible_and_tagged(project):
    model = _model(project)
    cfg = AnnealedLangevinSample(seed=11, n_samples=300, eps=1e-3, n_steps_each=5, batch_size=128)
    a, b = project / "a.parquet", project / "b.parquet"
    info = sample_annealed_langevin.fn(cfg, model_path=model, out_path=a)
    sample_annealed_langevin.fn(cfg, model_path=model, out_path=b)
    da, db = read_dataset(a), read_dataset(b)
    assert da.x.shape == (300, 2) and np.isfinite(da.x).all()
    np.testing.assert_array_equal(da.x, db.x)  # the batches draw from one seeded generator
    assert da.metadata["sampler"]["n_steps_each"] == 5 and len(da.metadata["model_md5"]) == 32
    assert info["chain_steps_per_s"] > 0


def test_evaluate_scores_true_samples_well_and_shifted_samples_badly(project):
    from stein_core import GaussianMixture

    spec = {"weights": [0.8, 0.2], "means": [[-5.0, -5.0], [5.0, 5.0]], "stds": [1.0, 1.0]}
    mix = GaussianMixture(spec["weights"], spec["means"], spec["stds"])
    gen = torch.Generator().manual_seed(0)
    test_x, _ = mix.sample(2000, generator=gen)
    good_x, _ = mix.sample(1000, generator=gen)
    test = project / "test.parquet"
    write_dataset(test, test_x.numpy(), metadata={"mixture": spec})
    model = _model(project, sigmas=(3.0, 1.0, 0.3))
    cfg = GMMEvaluate(n_eval=1000)
    results = {}
    for name, x in {"good": good_x, "bad": good_x + torch.tensor([1.5, 0.0])}.items():
        path = project / f"{name}.parquet"
        write_dataset(path, x.numpy())
        results[name] = evaluate_gmm.fn(
            cfg, samples_path=path, test_path=test, model_path=model,
            metrics_path=project / "metrics" / f"{name}.json", plots_dir=project / "plots" / name,
        )
    good, bad = results["good"], results["bad"]
    on_disk = json.loads((project / "metrics" / "good.json").read_text())
    assert on_disk == pytest.approx(good)
    assert {"ksd", "mmd", "weight_error", "ref_ksd", "ref_mmd", "ref_weight_error"} <= set(good)
    # weight of the heavy mode from 1000 exact samples: sd 0.0126, so 4 sd
    assert good["weight_error"] < 0.05 and good["ref_weight_error"] < 0.05
    assert bad["ksd"] > 20 * max(abs(good["ksd"]), 1e-3)
    # the true log-likelihood: samples from the mixture match held-out data (sd of the mean ~0.05 for n=1000)
    assert abs(good["log_likelihood"] - good["ref_log_likelihood"]) < 0.25 < good["log_likelihood"] - bad["log_likelihood"]
    assert bad["mmd"] > 20 * max(abs(good["mmd"]), 1e-4)
    for png in ("samples.png", "score_field.png"):
        assert (project / "plots" / "good" / png).stat().st_size > 10_000


@pytest.mark.slow
def test_train_through_ray_train_writes_checkpoint_and_curve(project):
    """Real Ray Train (one local CPU worker) on a tiny problem; the loss curve and checkpoint are written."""
    from tasks.io import load_checkpoint
    from tasks.runtime import RuntimeSettings
    from tasks.train import train_ncsn

    prepare_gmm.fn(GMMPrepare(n_train=2000, n_test=100), project / "train.parquet", project / "test.parquet")
    cfg = NCSNTrain(n_steps=60, log_every=20, checkpoint_every=30, batch_size=64, hidden=16, n_layers=2, n_sigmas=4)
    info = train_ncsn.fn(
        cfg, data_path=project / "train.parquet", model_path=project / "model.pt", loss_csv=project / "loss.csv",
        pipeline="test", mlflow_run_id=None, mlflow_tracking_uri=None,
        settings=RuntimeSettings(num_workers=1, use_gpu=False, threads=1),
    )
    assert info["steps"] == 60 and math.isfinite(info["final_dsm_loss"])
    ckpt = load_checkpoint(project / "model.pt")
    assert ckpt["step"] == 60 and len(ckpt["sigmas"]) == 4 and ckpt["model_args"]["hidden"] == 16
    rows = (project / "loss.csv").read_text().strip().splitlines()
    assert rows[0] == "step,dsm_loss" and [r.split(",")[0] for r in rows[1:]] == ["20", "40", "60"]


def test_langevin_sampler_is_reproducible_and_records_sigma(project):
    from tasks.config import LangevinSample
    from tasks.sample import sample_langevin

    model = _model(project, sigmas=(3.0, 1.0, 0.3))
    cfg = LangevinSample(seed=5, n_samples=200, step_size=1e-2, n_steps=20, init_std=2.0, batch_size=128)
    a, b = project / "a.parquet", project / "b.parquet"
    sample_langevin.fn(cfg, model_path=model, out_path=a)
    sample_langevin.fn(cfg, model_path=model, out_path=b)
    da = read_dataset(a)
    np.testing.assert_array_equal(da.x, read_dataset(b).x)
    assert da.x.shape == (200, 2) and np.isfinite(da.x).all()
    assert da.metadata["source"] == "langevin" and da.metadata["sigma"] == pytest.approx(0.3)


def test_blindness_evaluation_keys_metrics_by_sampler(project):
    from stein_core import GaussianMixture
    from tasks.evaluate import evaluate_blindness

    spec = {"weights": [0.8, 0.2], "means": [[-5.0, -5.0], [5.0, 5.0]], "stds": [1.0, 1.0]}
    mix = GaussianMixture(spec["weights"], spec["means"], spec["stds"])
    gen = torch.Generator().manual_seed(1)
    write_dataset(project / "test.parquet", mix.sample(1000, generator=gen)[0].numpy(), metadata={"mixture": spec})
    right = mix.sample(500, generator=gen)[0]
    # a blind sampler: the right modes, equal weights
    blind = GaussianMixture([0.5, 0.5], spec["means"], spec["stds"]).sample(500, generator=gen)[0]
    paths = {"annealed": project / "annealed.parquet", "langevin": project / "langevin.parquet"}
    write_dataset(paths["annealed"], right.numpy())
    write_dataset(paths["langevin"], blind.numpy())
    m = evaluate_blindness.fn(
        GMMEvaluate(n_eval=500, n_bootstrap=50), samples_paths=paths, test_path=project / "test.parquet",
        metrics_path=project / "m.json", plot_path=project / "plots" / "samples.png",
    )
    # weight estimates from 500 points: sd sqrt(0.8*0.2/500) = 0.018
    assert m["weight_error_annealed"] < 0.06 and abs(m["weight_error_langevin"] - 0.3) < 0.06
    assert {"ksd_annealed", "mmd_langevin", "mmd_p_value_langevin", "ref_weight_error"} <= set(m)
    assert m["mmd_p_value_langevin"] < 0.05 < m["mmd_p_value_annealed"]
    assert (project / "plots" / "samples.png").stat().st_size > 10_000


def test_prepare_digits_split_and_shape(project):
    from tasks.config import ImagePrepare
    from tasks.prepare import prepare_images

    info = prepare_images.fn(ImagePrepare(seed=3, test_fraction=0.2), project / "tr.parquet", project / "te.parquet")
    tr, te = read_dataset(project / "tr.parquet"), read_dataset(project / "te.parquet")
    assert info["n_train"] + info["n_test"] == 1797 and abs(info["n_test"] - 0.2 * 1797) <= 1
    assert tr.shape == (1, 8, 8) and tr.x.shape[1] == 64 and 0.0 <= tr.x.min() and tr.x.max() <= 1.0
    assert te.shape == tr.shape and len(te) == info["n_test"] and te.metadata["split"] == "test"
    assert set(np.unique(tr.label)) == set(range(10))


def test_prepare_mnist_without_files_names_the_folder(project):
    from tasks.config import ConfigError, ImagePrepare
    from tasks.prepare import prepare_images

    cfg = ImagePrepare(source="mnist", path=str(project / "no-mnist-here"))
    with pytest.raises(ConfigError) as info:
        prepare_images.fn(cfg, project / "tr.parquet", project / "te.parquet")
    assert "no-mnist-here" in str(info.value) and not (project / "tr.parquet").exists()


def test_evaluate_images_metrics_and_grid(project):
    from stein_core import NoiseConditionalConvNet
    from tasks.config import ImageEvaluate
    from tasks.evaluate import evaluate_images

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = NoiseConditionalConvNet(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2))
    save_checkpoint(project / "m.pt", state_dict=net.state_dict(), model_args=net.model_args,
                    model_class="NoiseConditionalConvNet", shape=[1, 8, 8], sigmas=[1.0, 0.1])
    real = rng.beta(0.5, 0.5, size=(300, 64)).astype(np.float32)
    for name, x in {"train": real[:100], "test": real[100:200], "good": real[200:], "bad": np.full((100, 64), 0.5, np.float32)}.items():
        write_dataset(project / f"{name}.parquet", x, shape=(1, 8, 8))
    out = {}
    for name in ("good", "bad"):
        out[name] = evaluate_images.fn(
            ImageEvaluate(n_eval=100, n_bootstrap=50, grid=4), samples_path=project / f"{name}.parquet",
            test_path=project / "test.parquet", train_path=project / "train.parquet", model_path=project / "m.pt",
            metrics_path=project / f"{name}.json", plots_dir=project / "plots" / name,
        )
    # under the null the p-value is uniform: > 0.01 fails for 1% of seeds (this one gives 0.039); a constant
    # grey image is beyond every one of the 50 permutations: p = 1/51
    assert out["good"]["mmd_p_value"] > 0.01 and out["bad"]["mmd_p_value"] == pytest.approx(1 / 51)
    assert out["bad"]["mmd"] > 10 * abs(out["good"]["mmd"])
    assert {"ksd_model_test", "ksd_model_samples", "ref_mmd"} <= set(out["good"])
    assert (project / "plots" / "good" / "samples.png").stat().st_size > 5_000


@pytest.fixture(scope="module")
def digits_split(tmp_path_factory):
    from tasks.config import ImagePrepare
    from tasks.prepare import prepare_images

    d = tmp_path_factory.mktemp("digits")
    prepare_images.fn(ImagePrepare(seed=0), d / "train.parquet", d / "test.parquet")
    return d


def test_classifier_stage_reaches_accuracy_and_caches_reference_stats(tmp_path, digits_split):
    from tasks.classifier import train_feature_classifier
    from tasks.config import ClassifierTrain
    from tasks.io import load_checkpoint

    info = train_feature_classifier.fn(
        ClassifierTrain(), train_path=digits_split / "train.parquet", test_path=digits_split / "test.parquet",
        model_path=tmp_path / "clf.pt", stats_path=tmp_path / "stats.pt",
    )
    assert info["test_accuracy"] >= 0.9
    stats = torch.load(tmp_path / "stats.pt", weights_only=True)
    assert stats["fingerprint"] == info["fingerprint"] == load_checkpoint(tmp_path / "clf.pt")["fingerprint"]
    assert int(stats["moments"]["n"]) == len(read_dataset(digits_split / "test.parquet"))


def test_classifier_stage_fails_below_min_accuracy_and_writes_nothing(tmp_path, digits_split):
    from tasks.classifier import ClassifierTooWeak, train_feature_classifier
    from tasks.config import ClassifierTrain

    with pytest.raises(ClassifierTooWeak, match="min_accuracy"):
        train_feature_classifier.fn(
            ClassifierTrain(epochs=1, min_accuracy=0.999), train_path=digits_split / "train.parquet",
            test_path=digits_split / "test.parquet", model_path=tmp_path / "clf.pt", stats_path=tmp_path / "stats.pt",
        )
    assert not (tmp_path / "clf.pt").exists() and not (tmp_path / "stats.pt").exists()


def test_evaluate_images_with_classifier_features(tmp_path, digits_split):
    """Held-out digits as 'samples' score like the reference; shuffled-pixel digits score far worse."""
    from stein_core import NoiseConditionalConvNet
    from tasks.classifier import train_feature_classifier
    from tasks.config import ClassifierTrain, ImageEvaluate
    from tasks.evaluate import evaluate_images

    train_feature_classifier.fn(
        ClassifierTrain(), train_path=digits_split / "train.parquet", test_path=digits_split / "test.parquet",
        model_path=tmp_path / "clf.pt", stats_path=tmp_path / "stats.pt",
    )
    torch.manual_seed(0)
    net = NoiseConditionalConvNet(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2))
    save_checkpoint(tmp_path / "m.pt", state_dict=net.state_dict(), model_args=net.model_args,
                    model_class="NoiseConditionalConvNet", shape=[1, 8, 8], sigmas=[1.0, 0.1])
    train = read_dataset(digits_split / "train.parquet")
    rng = np.random.default_rng(0)
    real_like = train.x[rng.permutation(len(train))[:300]]
    scrambled = real_like[:, rng.permutation(64)]
    out = {}
    for name, x in {"real": real_like, "scrambled": scrambled}.items():
        write_dataset(tmp_path / f"{name}.parquet", x, shape=(1, 8, 8))
        out[name] = evaluate_images.fn(
            ImageEvaluate(n_eval=200, n_bootstrap=50, kid_subset_size=100, kid_subsets=20),
            samples_path=tmp_path / f"{name}.parquet", test_path=digits_split / "test.parquet",
            train_path=digits_split / "train.parquet", model_path=tmp_path / "m.pt",
            metrics_path=tmp_path / f"{name}.json", plots_dir=tmp_path / name,
            classifier_path=tmp_path / "clf.pt", stats_path=tmp_path / "stats.pt",
        )
    real, bad = out["real"], out["scrambled"]
    assert real["fid"] < 3 * real["fid_train_test"] + 1.0 and bad["fid"] > 10 * real["fid"]
    assert real["inception_score"] > 5 and real["precision"] > 0.7 and real["recall"] > 0.7
    assert bad["precision"] < real["precision"] and bad["kid"] > real["kid"]
    assert (tmp_path / "real" / "nearest.png").stat().st_size > 5_000
