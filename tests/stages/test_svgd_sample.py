"""``sampler: svgd``: SVGD on the score of any family's model that has one, through ``load_model`` and the sample
stage; refused, naming the key, for a family without a score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tasks.config.sections import ConfigError, SVGDSample, load_config
from tasks.config.pipelines import GenerativeConfig

REPO = Path(__file__).resolve().parents[2]


def _section(**kw) -> SVGDSample:
    return SVGDSample(sampler="svgd", **{"n_steps": 15, "step_size": 0.05, "init_scale": 2.0, **kw})


@pytest.mark.parametrize("adaptive", [False, True])
def test_svgd_samples_a_score_network_through_load_model(tmp_path, mlp_checkpoint, adaptive):
    """An ncsn model (whose own samplers are the Langevin ones) loads with a svgd section as the family's model
    wrapped: same score, and samples that are the SVGD particles of stein_core on that score from
    x_0 ~ N(0, init_scale² I), one progress tick per step."""
    from stein_core.samplers import run_chain, svgd
    from tasks.families.loading import load_model
    from tasks.families._svgd import SVGDModel

    path = mlp_checkpoint(tmp_path / "m.pt")
    section = _section(adaptive=adaptive)
    model = load_model(path, sampler=section)
    base = load_model(path)  # the family's default
    assert isinstance(model, SVGDModel) and model.shape == (2,) and model.ticks(40) == 15
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.score(x), base.score(x), rtol=0, atol=0)
    ticks = []
    out = model.sample(40, generator=torch.Generator().manual_seed(3), callback=ticks.append)
    assert out.shape == (40, 2) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert ticks == [1] * 15
    x0 = 2.0 * torch.randn(40, 2, generator=torch.Generator().manual_seed(3))
    ref = run_chain(*svgd(base.score, 0.05, adaptive=adaptive), x0, 15).state.position
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.allclose(out, x0)  # it moved


def test_svgd_samples_images_flattened(tmp_path):
    """A conv score network's examples are (C, H, W): the particles are the flattened [n, C·H·W] rows."""
    from stein_core import NoiseConditionalConvNet
    from tasks.data.io import save_torch
    from tasks.families import module_checkpoint
    from tasks.families.loading import load_model

    torch.manual_seed(0)
    net = NoiseConditionalConvNet(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2))
    save_torch(tmp_path / "m.pt", module_checkpoint("ncsn", {"score": net}, shape=[1, 8, 8], sigmas=[1.0, 0.1]))
    model = load_model(tmp_path / "m.pt", sampler=_section(n_steps=3))
    out = model.sample(6, generator=torch.Generator().manual_seed(0))
    assert model.shape == (1, 8, 8) and out.shape == (6, 64) and torch.isfinite(out).all()


def test_svgd_sample_stage_is_reproducible_and_records_its_settings(project, mlp_checkpoint):
    """The sample stage with a svgd section: 90 samples in independent runs of 40, 40 and 10 particles drawn from
    one seeded generator; the same bytes twice, the settings in the metadata."""
    from tasks.data.io import read_dataset
    from tasks.stages.sample import sample_model

    model = mlp_checkpoint(project / "models" / "m.pt")
    cfg = _section(seed=4, n_samples=90, batch_size=40)
    a, b = project / "a.parquet", project / "b.parquet"
    info = sample_model.fn(cfg, model_path=model, out_path=a)
    sample_model.fn(cfg, model_path=model, out_path=b)
    da = read_dataset(a)
    np.testing.assert_array_equal(da.x, read_dataset(b).x)
    assert da.x.shape == (90, 2) and np.isfinite(da.x).all() and info["samples_per_s"] > 0
    assert da.metadata["source"] == "svgd" and da.metadata["sampler"]["n_steps"] == 15
    assert da.metadata["sampler"]["adaptive"] is False and da.metadata["sampler"]["init"] == "normal"


def _config(pipeline: str, tmp_path: Path, sample: dict) -> Path:
    raw = yaml.safe_load((REPO / "conf" / f"{pipeline}.yaml").read_text())
    raw["sample"] = sample
    path = tmp_path / "svgd.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_config_samples_a_score_network_with_svgd(tmp_path):
    """gmm2d's ncsn model with ``sampler: svgd`` (its training checkpoints too: evaluate.checkpoints.sampler names
    the same section) validates; the section's numbers are bounded like every other."""
    path = _config("gmm2d", tmp_path, {"sampler": "svgd", "seed": 2, "n_samples": 2000, "batch_size": 500,
                                       "n_steps": 500, "step_size": 0.5, "adaptive": True, "init": "normal",
                                       "init_scale": 5.0})
    cfg = load_config(path, GenerativeConfig)
    assert isinstance(cfg.sample, SVGDSample) and cfg.sample.adaptive and cfg.sample.init_scale == 5.0
    for key, value, fragment in [("batch_size", 1, "greater than or equal to 2"), ("step_size", 0.0, "greater than 0"),
                                 ("init", "uniform", "'normal'"), ("batch_size", 20_000, "less than or equal")]:
        bad = _config("gmm2d", tmp_path, {"sampler": "svgd", key: value})
        with pytest.raises(ConfigError) as info:
            load_config(bad, GenerativeConfig)
        assert f"key 'sample.{key}'" in str(info.value) and fragment in str(info.value), str(info.value)


def test_a_family_without_a_score_refuses_svgd(tmp_path):
    """agd's generator has no score: ``sampler: svgd`` fails at validation naming sample.sampler and why, and
    load_model refuses it for an agd checkpoint, naming the file and the key."""
    from stein_core import MLPGenerator
    from tasks.data.io import save_torch
    from tasks.families import module_checkpoint
    from tasks.families.loading import load_model

    path = _config("ring8-agd", tmp_path, {"sampler": "svgd"})
    with pytest.raises(ConfigError) as info:
        load_config(path, GenerativeConfig)
    msg = str(info.value)
    assert str(path) in msg and "key 'sample.sampler'" in msg, msg
    assert "svgd runs on the model's score, and a agd model has none" in msg and "options: generator" in msg, msg
    ckpt = tmp_path / "agd.pt"
    save_torch(ckpt, module_checkpoint("agd", {"generator": MLPGenerator(4, 2, hidden=8, n_layers=1)}, shape=[2]))
    with pytest.raises(ConfigError) as info:
        load_model(ckpt, sampler=_section())
    assert str(ckpt) in str(info.value) and "key 'sampler'" in str(info.value) and "has none" in str(info.value)
