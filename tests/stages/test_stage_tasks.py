"""Each stage's task logic, called through ``.fn()`` on small data (Ray Train for real in the train test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.config.sections import AnnealedLangevinSample, MixturePrepare, RingPrepare
from tasks.data.io import read_dataset
from tasks.stages.prepare import prepare_mixture
from tasks.stages.sample import sample_model


def test_prepare_writes_seeded_mixture(project):
    cfg = MixturePrepare(source="mixture", seed=5, n_train=4000, n_test=400)
    train, test = project / "data" / "train.parquet", project / "data" / "test.parquet"
    info = prepare_mixture.fn(cfg, train, test)
    assert info == {"n_train": 4000, "n_test": 400, "dim": 2}
    ds = read_dataset(train)
    assert ds.x.shape == (4000, 2) and ds.x.dtype == np.float32
    assert ds.metadata["split"] == "train" and ds.metadata["seed"] == 5
    assert ds.metadata["mixture"]["weights"] == [0.8, 0.2]
    # component frequencies: binomial, sd = sqrt(0.8*0.2/4000) = 0.0063; 4 sd
    assert abs((ds.label == 0).mean() - 0.8) < 4 * math.sqrt(0.16 / 4000)
    # same seed, same bytes; another seed, other data
    again = project / "again.parquet"
    prepare_mixture.fn(cfg, again, project / "again_test.parquet")
    np.testing.assert_array_equal(read_dataset(again).x, ds.x)


def test_prepare_ring_records_its_mixture(project):
    """A ring of 8: means at angles 2πk/8 on the circle, equal weights; each mode's share of 8000 points is
    binomial, sd sqrt(1/8 · 7/8 / 8000) = 0.0037, so 4 sd = 0.015."""
    cfg = RingPrepare(source="ring", n_train=8000, n_test=400, radius=3.0, std=0.1)
    prepare_mixture.fn(cfg, project / "tr.parquet", project / "te.parquet")
    ds = read_dataset(project / "tr.parquet")
    spec = ds.metadata["mixture"]
    means = np.array(spec["means"])
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), 3.0, rtol=1e-12)
    np.testing.assert_allclose(np.arctan2(means[:, 1], means[:, 0]) % (2 * np.pi), 2 * np.pi * np.arange(8) / 8, atol=1e-12)
    assert spec["weights"] == [0.125] * 8 and spec["stds"] == [0.1] * 8 and ds.metadata["source"] == "ring"
    shares = np.bincount(ds.label, minlength=8) / len(ds)
    assert np.abs(shares - 0.125).max() < 4 * math.sqrt(0.125 * 0.875 / 8000)
    # every point lies near its mode: |x - mean| ~ 0.1·chi_2, beyond 0.6 has probability exp(-18)
    assert np.linalg.norm(ds.x - means[ds.label], axis=1).max() < 0.6


def test_sample_is_reproducible_and_tagged(project, mlp_checkpoint):
    model = mlp_checkpoint(project / "models" / "m.pt")
    cfg = AnnealedLangevinSample(sampler="annealed_langevin", seed=11, n_samples=300, eps=1e-3, n_steps_each=5, batch_size=128)
    a, b = project / "a.parquet", project / "b.parquet"
    info = sample_model.fn(cfg, model_path=model, out_path=a)
    sample_model.fn(cfg, model_path=model, out_path=b)
    da, db = read_dataset(a), read_dataset(b)
    assert da.x.shape == (300, 2) and np.isfinite(da.x).all()
    np.testing.assert_array_equal(da.x, db.x)  # the batches draw from one seeded generator
    assert da.metadata["sampler"]["n_steps_each"] == 5 and len(da.metadata["model_md5"]) == 32
    assert info["samples_per_s"] > 0


def test_langevin_sampler_is_reproducible_and_records_its_settings(project, mlp_checkpoint):
    from tasks.config.sections import LangevinSample

    model = mlp_checkpoint(project / "models" / "m.pt", sigmas=(3.0, 1.0, 0.3))
    cfg = LangevinSample(sampler="langevin", seed=5, n_samples=200, step_size=1e-2, n_steps=20, init_std=2.0, batch_size=128)
    a, b = project / "a.parquet", project / "b.parquet"
    sample_model.fn(cfg, model_path=model, out_path=a)
    sample_model.fn(cfg, model_path=model, out_path=b)
    da = read_dataset(a)
    np.testing.assert_array_equal(da.x, read_dataset(b).x)
    assert da.x.shape == (200, 2) and np.isfinite(da.x).all()
    assert da.metadata["source"] == "langevin" and da.metadata["sampler"]["step_size"] == pytest.approx(1e-2)


def test_prepare_digits_split_and_shape(project):
    from tasks.config.sections import ImagePrepare
    from tasks.stages.prepare import prepare_images

    info = prepare_images.fn(ImagePrepare(source="digits", seed=3, test_fraction=0.2), project / "tr.parquet", project / "te.parquet")
    tr, te = read_dataset(project / "tr.parquet"), read_dataset(project / "te.parquet")
    assert info["n_train"] + info["n_test"] == 1797 and abs(info["n_test"] - 0.2 * 1797) <= 1
    assert tr.shape == (1, 8, 8) and tr.x.shape[1] == 64 and 0.0 <= tr.x.min() and tr.x.max() <= 1.0
    assert te.shape == tr.shape and len(te) == info["n_test"] and te.metadata["split"] == "test"
    assert set(np.unique(tr.label)) == set(range(10))


def test_prepare_mnist_without_files_names_the_folder(project):
    from tasks.config.sections import ConfigError, ImagePrepare
    from tasks.stages.prepare import prepare_images

    cfg = ImagePrepare(source="mnist", path=str(project / "no-mnist-here"))
    with pytest.raises(ConfigError) as info:
        prepare_images.fn(cfg, project / "tr.parquet", project / "te.parquet")
    assert "no-mnist-here" in str(info.value) and not (project / "tr.parquet").exists()


def test_classifier_stage_reaches_accuracy_and_caches_reference_stats(tmp_path, digits_split):
    from tasks.stages.classifier import train_feature_classifier
    from tasks.config.sections import ClassifierTrain
    from tasks.data.io import load_checkpoint

    info = train_feature_classifier.fn(
        ClassifierTrain(), train_path=digits_split / "train.parquet", test_path=digits_split / "test.parquet",
        model_path=tmp_path / "clf.pt", stats_path=tmp_path / "stats.pt",
    )
    assert info["test_accuracy"] >= 0.9
    stats = torch.load(tmp_path / "stats.pt", weights_only=True)
    assert stats["fingerprint"] == info["fingerprint"] == load_checkpoint(tmp_path / "clf.pt")["fingerprint"]
    assert int(stats["moments"]["n"]) == len(read_dataset(digits_split / "test.parquet"))


def test_classifier_stage_fails_below_min_accuracy_and_writes_nothing(tmp_path, digits_split):
    from tasks.stages.classifier import ClassifierTooWeak, train_feature_classifier
    from tasks.config.sections import ClassifierTrain

    with pytest.raises(ClassifierTooWeak, match="min_accuracy"):
        train_feature_classifier.fn(
            ClassifierTrain(epochs=1, min_accuracy=0.999), train_path=digits_split / "train.parquet",
            test_path=digits_split / "test.parquet", model_path=tmp_path / "clf.pt", stats_path=tmp_path / "stats.pt",
        )
    assert not (tmp_path / "clf.pt").exists() and not (tmp_path / "stats.pt").exists()
