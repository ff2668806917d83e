"""The evaluate stage's task for every kind of pipeline (toy mixtures, several sample sets, images with and
without feature networks, training checkpoints over Ray), and its refusals of configs the data cannot support."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.config.sections import ConfigError, Evaluate
from tasks.stages.evaluate.task import evaluate_samples
from tasks.stages.evaluate.inputs import EvalInputs, required_inputs
from tasks.data.io import read_dataset, save_torch, write_dataset

SPEC = {"weights": [0.8, 0.2], "means": [[-5.0, -5.0], [5.0, 5.0]], "stds": [1.0, 1.0]}
TOY = ["ksd_target", "mmd", "mode_weight", "log_likelihood"]


def _mixture():
    from stein_core import GaussianMixture

    return GaussianMixture(SPEC["weights"], SPEC["means"], SPEC["stds"])


def _run(cfg: Evaluate, sets: dict[str, Path], inputs: EvalInputs, out: Path, **kw):
    return evaluate_samples.fn(cfg, sample_paths=sets, inputs=inputs, metrics_path=out / "metrics.json",
                               plots_dir=out / "plots", **kw)


@pytest.fixture
def toy(tmp_path, mlp_checkpoint):
    """A held-out set with its mixture recorded, exact samples, shifted samples, and a score network."""
    gen = torch.Generator().manual_seed(0)
    mix = _mixture()
    write_dataset(tmp_path / "test.parquet", mix.sample(2000, generator=gen)[0].numpy(), metadata={"mixture": SPEC})
    good = mix.sample(1000, generator=gen)[0]
    write_dataset(tmp_path / "good.parquet", good.numpy())
    write_dataset(tmp_path / "bad.parquet", (good + torch.tensor([1.5, 0.0])).numpy())
    blind = type(mix)([0.5, 0.5], SPEC["means"], SPEC["stds"]).sample(1000, generator=gen)[0]
    write_dataset(tmp_path / "blind.parquet", blind.numpy())
    return tmp_path, EvalInputs(test=tmp_path / "test.parquet", model=mlp_checkpoint(tmp_path / "m.pt"))


def test_toy_metrics_score_exact_samples_well_and_shifted_samples_badly(toy):
    d, inputs = toy
    cfg = Evaluate(metrics=TOY, plots=["samples", "score_field"], n_eval=1000, n_bootstrap=100)
    good, rows = _run(cfg, {"samples": d / "good.parquet"}, inputs, d / "good")
    bad, _ = _run(cfg, {"samples": d / "bad.parquet"}, inputs, d / "bad")
    assert rows == [] and json.loads((d / "good" / "metrics.json").read_text()) == pytest.approx(good)
    per_set = {"ksd", "ksd_p_value", "mmd", "mmd_p_value", "weight", "weight_error", "log_likelihood"}
    assert per_set | {f"ref_{k}" for k in per_set} | {"true_weight", "n_eval"} == set(good) == set(bad)
    # the weight of the heavy mode from 1000 exact samples: sd sqrt(0.8*0.2/1000) = 0.0126, so 4 sd
    assert good["weight_error"] < 0.05 and good["ref_weight_error"] < 0.05
    assert bad["ksd"] > 20 * max(abs(good["ksd"]), 1e-3) and bad["ksd_p_value"] < 0.02
    assert bad["mmd"] > 20 * max(abs(good["mmd"]), 1e-4)
    # mean log-density: sd of the mean ~0.05 for n=1000; the shift costs ~1.1 nats
    assert abs(good["log_likelihood"] - good["ref_log_likelihood"]) < 0.25 < good["log_likelihood"] - bad["log_likelihood"]
    for png in ("samples.png", "score_field.png"):
        assert (d / "good" / "plots" / png).stat().st_size > 10_000


def test_several_sample_sets_get_suffixed_keys_and_one_reference(toy):
    d, inputs = toy
    cfg = Evaluate(metrics=["mmd", "mode_weight"], n_eval=1000, n_bootstrap=50)
    m, _ = _run(cfg, {"annealed": d / "good.parquet", "langevin": d / "blind.parquet"}, inputs, d / "out")
    # a blind sampler: the right modes, equal weights (sd 0.016 at n=1000)
    assert m["weight_error_annealed"] < 0.06 and abs(m["weight_error_langevin"] - 0.3) < 0.06
    assert m["mmd_p_value_langevin"] == pytest.approx(1 / 51) and m["mmd_langevin"] > 10 * abs(m["mmd_annealed"])
    assert {"ref_mmd", "ref_weight", "true_weight"} <= set(m) and "mmd" not in m and "ref_mmd_annealed" not in m


def test_metrics_do_not_depend_on_which_others_are_listed(toy):
    """Each (metric, sample set) pair has its own seeded generator: adding a metric changes nothing else."""
    d, inputs = toy
    alone, _ = _run(Evaluate(metrics=["mmd"], plots=[], n_eval=500, n_bootstrap=50), {"samples": d / "good.parquet"}, inputs, d / "a")
    more, _ = _run(Evaluate(metrics=["ksd_target", "mmd"], plots=[], n_eval=500, n_bootstrap=50),
                   {"samples": d / "good.parquet"}, inputs, d / "b")
    for key in ("mmd", "mmd_p_value", "ref_mmd", "ref_mmd_p_value"):
        assert more[key] == alone[key], key


@pytest.mark.parametrize(
    ("update", "key", "fragment"),
    [
        ({"metrics": ["mmd"], "plots": ["nearest"]}, "evaluate.plots", "nearest shows images"),
        ({"metrics": ["inception_score"], "features": "raw"}, "evaluate.metrics", "needs class logits"),
        ({"metrics": ["fid"], "features": "classifier"}, "evaluate.features", "need images"),
        ({"metrics": ["ksd_model"], "plots": []}, "evaluate", "needs the model file"),
    ],
)
def test_unsupported_metric_or_plot_fails_before_compute_and_writes_nothing(toy, update, key, fragment):
    d, inputs = toy
    if key == "evaluate":
        inputs = EvalInputs(test=inputs.test, model=d / "missing.pt")
    with pytest.raises(ConfigError) as info:
        _run(Evaluate(**update), {"samples": d / "good.parquet"}, inputs, d / "out", config_path="conf/x.yaml")
    assert f"conf/x.yaml: key '{key}'" in str(info.value) and fragment in str(info.value)
    assert not (d / "out").exists()


def test_target_metrics_need_a_known_distribution(tmp_path):
    write_dataset(tmp_path / "test.parquet", np.zeros((50, 2), np.float32))  # no mixture in the metadata
    with pytest.raises(ConfigError, match="ksd_target needs the true distribution"):
        _run(Evaluate(metrics=["ksd_target"]), {"samples": tmp_path / "test.parquet"},
             EvalInputs(test=tmp_path / "test.parquet"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_inception_features_without_weights_name_the_setting(digits_split, tmp_path, monkeypatch):
    monkeypatch.delenv("STEIN_INCEPTION_WEIGHTS", raising=False)
    inputs = EvalInputs(test=digits_split / "test.parquet")
    with pytest.raises(ConfigError, match=r"key 'evaluate.inception_weights'.*STEIN_INCEPTION_WEIGHTS; nothing is downloaded"):
        _run(Evaluate(metrics=["fid"], features="inception"), {"samples": digits_split / "test.parquet"}, inputs, tmp_path)
    with pytest.raises(ConfigError, match=r"key 'evaluate.inception_weights'.*looked for '/nowhere/w.pth'"):
        _run(Evaluate(metrics=["fid"], features="inception", inception_weights="/nowhere/w.pth"),
             {"samples": digits_split / "test.parquet"}, inputs, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_pixel_metrics_and_model_ksd_for_images(tmp_path):
    from stein_core import NoiseConditionalConvNet
    from tasks.families import module_checkpoint

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = NoiseConditionalConvNet(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2))
    save_torch(tmp_path / "m.pt", module_checkpoint("ncsn", {"score": net}, shape=[1, 8, 8], sigmas=[1.0, 0.1]))
    real = rng.beta(0.5, 0.5, size=(300, 64)).astype(np.float32)
    sets = {"train": real[:100], "test": real[100:200], "good": real[200:], "bad": np.full((100, 64), 0.5, np.float32)}
    for name, x in sets.items():
        write_dataset(tmp_path / f"{name}.parquet", x, shape=(1, 8, 8))
    inputs = EvalInputs(test=tmp_path / "test.parquet", train=tmp_path / "train.parquet", model=tmp_path / "m.pt")
    cfg = Evaluate(metrics=["mmd", "ksd_model"], plots=["samples", "nearest"], reference="train", n_eval=100,
                   n_bootstrap=50, grid=4)
    out = {name: _run(cfg, {"samples": tmp_path / f"{name}.parquet"}, inputs, tmp_path / name)[0] for name in ("good", "bad")}
    # under the null the p-value is uniform; a constant grey image is beyond all 50 permutations: p = 1/51
    assert out["good"]["mmd_p_value"] > 0.01 and out["bad"]["mmd_p_value"] == pytest.approx(1 / 51)
    assert out["bad"]["mmd"] > 10 * abs(out["good"]["mmd"])
    # the held-out KSD depends on the model only, not on the samples
    assert out["good"]["ksd_model_heldout"] == out["bad"]["ksd_model_heldout"]
    assert {"ksd_model", "ksd_model_p_value", "ref_mmd", "ref_ksd_model"} <= set(out["good"])
    for png in ("samples.png", "nearest.png"):
        assert (tmp_path / "good" / "plots" / png).stat().st_size > 5_000


def test_classifier_features_separate_real_from_scrambled_digits(tmp_path, digits_split):
    """Held-out-like digits as 'samples' score like the train-vs-test reference; shuffled pixels score far worse."""
    from tasks.stages.classifier import train_feature_classifier
    from tasks.config.sections import ClassifierTrain

    train_feature_classifier.fn(
        ClassifierTrain(), train_path=digits_split / "train.parquet", test_path=digits_split / "test.parquet",
        model_path=tmp_path / "clf.pt", stats_path=tmp_path / "stats.pt",
    )
    train = read_dataset(digits_split / "train.parquet")
    rng = np.random.default_rng(0)
    real_like = train.x[rng.permutation(len(train))[:300]]
    for name, x in {"real": real_like, "scrambled": real_like[:, rng.permutation(64)]}.items():
        write_dataset(tmp_path / f"{name}.parquet", x, shape=(1, 8, 8))
    inputs = EvalInputs(test=digits_split / "test.parquet", train=digits_split / "train.parquet",
                        classifier=tmp_path / "clf.pt", reference_stats=tmp_path / "stats.pt")
    cfg = Evaluate(metrics=["fid", "kid", "inception_score", "precision_recall"], plots=[], reference="train",
                   kid_subset_size=100, kid_subsets=20)
    assert required_inputs(cfg) == {"test", "train", "classifier", "reference_stats"}
    out = {n: _run(cfg, {"samples": tmp_path / f"{n}.parquet"}, inputs, tmp_path / n)[0] for n in ("real", "scrambled")}
    real, bad = out["real"], out["scrambled"]
    # training images as samples are the reference itself, at the same size: FID within sampling noise of it
    assert real["fid"] < 2 * real["ref_fid"] + 1.0 and bad["fid"] > 10 * real["fid"]
    assert real["inception_score"] > 5 and real["precision"] > 0.7 and real["recall"] > 0.7
    assert bad["precision"] < real["precision"] and bad["kid"] > real["kid"]
    assert real["classifier_test_accuracy"] >= 0.9
    # the cached held-out statistics must come from the same classifier
    torch.save({**torch.load(tmp_path / "stats.pt", weights_only=True), "fingerprint": "other"}, tmp_path / "stats.pt")
    with pytest.raises(ConfigError, match="another classifier"):
        _run(cfg, {"samples": tmp_path / "real.parquet"}, inputs, tmp_path / "again")


@pytest.mark.slow
def test_checkpoints_are_sampled_and_evaluated_in_ray_tasks(toy):
    """Two checkpoints, untrained and trained (1000 steps of the bare DSM loop), each sampled and evaluated in its own Ray task:
    rows sorted by step, a CSV and a figure, and the trained checkpoint scoring better."""
    from tasks.config.sections import AnnealedLangevinSample
    from tasks.families import FAMILIES, model_payload
    from tasks.infra.runtime import RuntimeSettings
    from tasks.stages.train.task import checkpoint_name
    from tasks.stages.train.loop import Hooks, fit

    d, inputs = toy
    family = FAMILIES["ncsn"]
    cfg = family.config(family="ncsn", n_steps=1000, sigma_max=12.0, sigma_min=0.2, n_sigmas=6, batch_size=128,
                        net={"kind": "mlp", "hidden": 32, "n_layers": 2}, log_every=100, checkpoint_every=1000, lr=3e-3)
    data = torch.from_numpy(read_dataset(d / "good.parquet").x)
    states = {}
    fit(family, cfg, data, (2,), device="cpu", hooks=Hooks(on_checkpoint=lambda s, final: states.__setitem__(s["step"], s)))
    states[0] = fit(family, cfg, data, (2,), device="cpu", stop_after=0)  # the untrained network
    (d / "ck").mkdir()
    for step, s in states.items():
        save_torch(d / "ck" / checkpoint_name(step), model_payload(family, cfg, s))
    inputs = EvalInputs(test=inputs.test, model=d / "ck" / checkpoint_name(1000), checkpoints=d / "ck")
    ecfg = Evaluate(metrics=["mmd"], plots=[], n_eval=300, n_bootstrap=20,
                    checkpoints={"metrics": ["mmd", "mode_weight"], "n_samples": 300})
    sampler = AnnealedLangevinSample(sampler="annealed_langevin", n_samples=300, eps=1e-2, n_steps_each=50, batch_size=300)
    metrics, rows = _run(ecfg, {"samples": d / "good.parquet"}, inputs, d / "out", sampler=sampler,
                         settings=RuntimeSettings(num_workers=1, use_gpu=False, threads=1))
    assert [r["step"] for r in rows] == [0.0, 1000.0] and metrics["n_checkpoints"] == 2
    # the trained network recovers the 0.8 weight (sd 0.023 at n=300; 0.797 measured), the untrained one not
    assert rows[1]["mmd"] < rows[0]["mmd"] / 5 and rows[1]["weight_error"] < 0.08 < rows[0]["weight_error"]
    with open(d / "out" / "plots" / "checkpoints.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["step"] for t in table] == ["0", "1000"] and float(table[1]["mmd"]) == pytest.approx(rows[1]["mmd"])
    assert (d / "out" / "plots" / "checkpoints.png").stat().st_size > 10_000
    # a checkpoint folder without checkpoints is an error that names it, before anything is written
    (d / "empty").mkdir()
    with pytest.raises(ConfigError, match="no training checkpoints"):
        _run(ecfg, {"samples": d / "good.parquet"}, EvalInputs(test=inputs.test, model=inputs.model, checkpoints=d / "empty"),
             d / "out2", sampler=sampler)
    assert not (d / "out2").exists()


def test_mode_coverage_counts_modes_holding_a_quarter_of_their_share():
    """A ring of 8 equal modes (share 1/8 each; a mode counts from a quarter of that, 31.25 of 1000 samples):
    a collapsed generator covers 1, samples of the ring itself 8, and a set that starves two modes 6 - the
    mode holding 32 samples counts, the one holding 30 does not (a threshold of 0, or of a full share, fails)."""
    import math
    from types import SimpleNamespace

    from stein_core.distributions import GaussianMixture
    from tasks.stages.evaluate.metrics import SampleSet, _mode_coverage

    means = [[2 * math.cos(2 * math.pi * k / 8), 2 * math.sin(2 * math.pi * k / 8)] for k in range(8)]
    ring = GaussianMixture([1 / 8] * 8, means, [0.05] * 8)
    data = SimpleNamespace(mixture=ring, mixture_weights=[1 / 8] * 8)
    gen = torch.Generator().manual_seed(3)

    def covered(counts: list[int]) -> float:
        x = torch.cat([torch.tensor(means[k], dtype=torch.float64) + 0.05 * torch.randn(c, 2, generator=gen, dtype=torch.float64)
                       for k, c in enumerate(counts) if c])
        return _mode_coverage(data, SampleSet("s", x, x))["modes_covered"]

    assert covered([1000, 0, 0, 0, 0, 0, 0, 0]) == 1
    assert covered([125] * 8) == 8
    assert covered([160, 160, 160, 160, 160, 148, 32, 0]) == 7  # mode 6 (32 >= 31.25) counts, mode 7 (0) does not
    assert covered([160, 160, 160, 160, 160, 150, 30, 20]) == 6  # 30 and 20 < 31.25
    x = ring.sample(1000, generator=gen)[0].double()
    assert _mode_coverage(data, SampleSet("s", x, x))["modes_covered"] == 8


def test_ksd_smoothed_separates_the_mixing_proportions_that_ksd_is_blind_to(toy):
    """Samples with the right modes and the wrong weights (0.5/0.5 instead of 0.8/0.2): the plain KSD against the
    true score cannot tell them from exact samples (the scores differ only between the modes, 7 standard deviations
    from both), the noise-smoothed KSD over the default ladder (0.5, 1, 2) x 4.12 can."""
    d, inputs = toy
    cfg = Evaluate(metrics=["ksd_target", "ksd_smoothed"], plots=[], n_eval=1000, n_bootstrap=100)
    out = {name: _run(cfg, {"samples": d / f"{name}.parquet"}, inputs, d / name)[0] for name in ("good", "blind")}
    good, blind = out["good"], out["blind"]
    keys = {"ksd_smoothed", "ksd_smoothed_p_value"}
    assert keys | {f"ref_{k}" for k in keys} | {"ksd_smoothed_scale"} <= set(good) == set(blind)
    assert good["ksd_smoothed_scale"] == pytest.approx(17**0.5)  # sqrt(0.8 + 0.2 + (50 - 18) / 2)
    # plain KSD: blind (the blind set's p-value is distributed as exact samples' are, uniform; 0.54 and 0.95 measured)
    assert blind["ksd_p_value"] > 0.05 and good["ksd_p_value"] > 0.05
    # smoothed: the blind set lies beyond all 100 bootstrap draws, exact samples and the reference do not
    assert blind["ksd_smoothed_p_value"] == pytest.approx(1 / 101)
    assert good["ksd_smoothed_p_value"] > 0.05 and good["ref_ksd_smoothed_p_value"] > 0.05
    # the statistic sums 3 levels, each in units of its own bootstrap sd: under H0 its sd is at most 3 (1.7 and
    # -0.07 measured for exact samples and the reference), for the blind set 69.6
    assert blind["ksd_smoothed"] > 30 > 10 > max(abs(good["ksd_smoothed"]), abs(good["ref_ksd_smoothed"]))


def test_ksd_smoothed_needs_a_known_distribution(tmp_path):
    write_dataset(tmp_path / "test.parquet", np.zeros((50, 2), np.float32))  # no mixture in the metadata
    with pytest.raises(ConfigError, match="key 'evaluate.metrics': ksd_smoothed needs the true distribution"):
        _run(Evaluate(metrics=["mmd", "ksd_smoothed"]), {"samples": tmp_path / "test.parquet"},
             EvalInputs(test=tmp_path / "test.parquet"), tmp_path / "out", config_path="conf/x.yaml")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("value", "key", "fragment"),
    [
        ({"ksd_smoothed_sigmas": [1.0, 1.0]}, "evaluate.ksd_smoothed_sigmas", "a noise level is listed twice"),
        ({"ksd_smoothed_sigmas": [1.0, -0.5]}, "evaluate.ksd_smoothed_sigmas.1", "greater than or equal to 0"),
        ({"ksd_smoothed_sigmas": []}, "evaluate.ksd_smoothed_sigmas", "at least 1 item"),
        ({"ksd_smoothed_scale": 0.0}, "evaluate.ksd_smoothed_scale", "greater than 0"),
    ],
)
def test_ksd_smoothed_ladder_is_validated_naming_the_key(tmp_path, value, key, fragment):
    import yaml

    from flows.registry import PIPELINES
    from tasks.config.sections import load_config

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "conf" / "gmm2d.yaml").read_text())
    raw["evaluate"].update(metrics=["ksd_smoothed"], **value)
    path = tmp_path / "gmm2d.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(path, PIPELINES["gmm2d"].config_model)
    assert info.value.key.startswith(key) and fragment in str(info.value), str(info.value)
