"""Each stage's task logic, called through ``.fn()`` on small data (Ray Train for real in the train test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.config import AnnealedLangevinSample, GMMPrepare, NCSNTrain
from tasks.io import read_dataset
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


def test_sample_is_reproducible_and_tagged(project, mlp_checkpoint):
    model = mlp_checkpoint(project / "models" / "m.pt")
    cfg = AnnealedLangevinSample(seed=11, n_samples=300, eps=1e-3, n_steps_each=5, batch_size=128)
    a, b = project / "a.parquet", project / "b.parquet"
    info = sample_annealed_langevin.fn(cfg, model_path=model, out_path=a)
    sample_annealed_langevin.fn(cfg, model_path=model, out_path=b)
    da, db = read_dataset(a), read_dataset(b)
    assert da.x.shape == (300, 2) and np.isfinite(da.x).all()
    np.testing.assert_array_equal(da.x, db.x)  # the batches draw from one seeded generator
    assert da.metadata["sampler"]["n_steps_each"] == 5 and len(da.metadata["model_md5"]) == 32
    assert info["chain_steps_per_s"] > 0


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
        pipeline="test", checkpoints_dir=project / "checkpoints", mlflow_run_id=None, mlflow_tracking_uri=None,
        settings=RuntimeSettings(num_workers=1, use_gpu=False, threads=1),
    )
    assert info["steps"] == 60 and math.isfinite(info["final_dsm_loss"])
    ckpt = load_checkpoint(project / "model.pt")
    assert ckpt["step"] == 60 and len(ckpt["sigmas"]) == 4 and ckpt["model_args"]["hidden"] == 16
    # every checkpoint Ray Train kept is exported; the last is the stage's model, weight for weight
    kept = sorted(p.name for p in (project / "checkpoints").iterdir())
    assert kept == ["step_0000030.pt", "step_0000060.pt"]
    last, first = load_checkpoint(project / "checkpoints" / kept[-1]), load_checkpoint(project / "checkpoints" / kept[0])
    assert last["step"] == 60 and first["step"] == 30
    for k, v in ckpt["state_dict"].items():
        torch.testing.assert_close(last["state_dict"][k], v, rtol=0, atol=0)
    assert any(not torch.equal(first["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    rows = (project / "loss.csv").read_text().strip().splitlines()
    assert rows[0] == "step,dsm_loss" and [r.split(",")[0] for r in rows[1:]] == ["20", "40", "60"]


def test_langevin_sampler_is_reproducible_and_records_sigma(project, mlp_checkpoint):
    from tasks.config import LangevinSample
    from tasks.sample import sample_langevin

    model = mlp_checkpoint(project / "models" / "m.pt", sigmas=(3.0, 1.0, 0.3))
    cfg = LangevinSample(seed=5, n_samples=200, step_size=1e-2, n_steps=20, init_std=2.0, batch_size=128)
    a, b = project / "a.parquet", project / "b.parquet"
    sample_langevin.fn(cfg, model_path=model, out_path=a)
    sample_langevin.fn(cfg, model_path=model, out_path=b)
    da = read_dataset(a)
    np.testing.assert_array_equal(da.x, read_dataset(b).x)
    assert da.x.shape == (200, 2) and np.isfinite(da.x).all()
    assert da.metadata["source"] == "langevin" and da.metadata["sigma"] == pytest.approx(0.3)


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
