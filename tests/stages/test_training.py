"""The one training loop (``tasks.stages.train.loop.fit``) for every family: deterministic resume, the non-finite guard,
and N Ray Train workers computing what one worker computes with the same global batch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.families import FAMILIES
from tasks.stages.train.loop import Hooks, TrainingDiverged, fit

FAMILY_CFG = {
    "ncsn": {"net": {"kind": "mlp", "hidden": 16, "n_layers": 2}, "n_sigmas": 4, "ema_decay": 0.9},
    "agd": {"net": {"kind": "mlp", "latent_dim": 2, "hidden": 16, "n_layers": 2}},
    "mmd": {"net": {"kind": "mlp", "latent_dim": 2, "hidden": 16, "n_layers": 2}},
    # bursts of critic updates at steps 0, 8, 16, ...: the resume below restarts at 10, between two bursts
    "gebm": {"net": {"kind": "mlp", "latent_dim": 2, "hidden": 16, "n_layers": 2}, "energy": {"kind": "mlp", "hidden": 16},
             "energy_steps": 2, "burst_steps": 4, "burst_every": 8, "penalty": 0.5,
             "generator_optimizer": {"lr": 3e-3}, "critic_optimizer": {"lr": 3e-3}, "log_partition_lr": 3e-3},
    "mmdgan": {"net": {"kind": "mlp", "latent_dim": 2, "hidden": 16, "n_layers": 2}, "critic": {"kind": "mlp", "hidden": 16},
               "features": 4, "critic_steps": 2, "burst_steps": 4, "burst_every": 8,
               "generator_optimizer": {"lr": 3e-3}, "critic_optimizer": {"lr": 3e-3}},
    # unnormalised models by Stein discrepancies: an energy MLP's score (a double backward), the slice directions'
    # ascent, and the LSD critic's updates with Hutchinson probes (d = 2 > exact_trace_max_dim)
    "ksd": {"model": {"kind": "energy_mlp", "hidden": 16, "n_layers": 2}},
    "maxsksd": {"model": {"kind": "ica"}, "variant": "rg", "n_slices": 2, "directions_lr": 0.1},
    "lsd": {"model": {"kind": "ica"}, "critic_steps": 2, "critic_hidden": 16, "critic_layers": 2,
            "exact_trace_max_dim": 1, "critic_optimizer": {"lr": 3e-3}},
    # energy-based models: persistent MALA chains in a replay buffer (per-rank training state), NCE's fitted noise
    # (extra state fitted at step 0), FCE's flow trained in turn
    "ebm": {"energy": {"kind": "mlp", "hidden": 16, "n_layers": 2}, "negatives": "pcd", "mcmc": "mala", "mcmc_steps": 3,
            "buffer_size": 96},
    "nce": {"energy": {"kind": "mlp", "hidden": 16, "n_layers": 2}, "noise_ratio": 2.0},
    "fce": {"energy": {"kind": "mlp", "hidden": 16, "n_layers": 2}, "flow_transforms": 2, "flow_hidden": 16,
            "flow_steps": 2, "flow_lr": 3e-3},
    "latent_ebm": {"net": {"kind": "mlp", "latent_dim": 2, "hidden": 16, "n_layers": 2}, "prior": {"hidden": 16},
                   "posterior_steps": 3, "prior_steps": 3, "prior_optimizer": {"lr": 3e-3},
                   "generator_optimizer": {"lr": 3e-3}},
}


def _cfg(family: str, **kw):
    base = {"family": family, "n_steps": 40, "batch_size": 32, "log_every": 10, "checkpoint_every": 10}
    if not any(k.endswith("_optimizer") for k in FAMILY_CFG[family]) or family == "lsd":  # lsd: the model's own lr beside
        base["lr"] = 3e-3
    return FAMILIES[family].config.model_validate(base | FAMILY_CFG[family] | kw)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(500, 2, generator=g) * torch.tensor([1.0, 0.5]) + torch.tensor([1.0, -1.0])


def _assert_same_state(a: dict, b: dict, **tol) -> None:
    for group in ("modules", "extra"):
        for name, sd in a[group].items():
            for k, v in sd.items():
                if isinstance(v, torch.Tensor):
                    torch.testing.assert_close(b[group][name][k], v, **tol, msg=f"{group}.{name}.{k}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_resume_from_a_checkpoint_ends_with_the_weights_of_an_uninterrupted_run(family, data):
    """Stopped after step 17 and resumed from the checkpoint of step 10 (steps 11-17 are replayed), a run ends with
    exactly the weights, optimiser state and EMA of a run that was never interrupted: the minibatch and the noise
    of a step are a pure function of (seed, step), and the checkpoint carries every other state."""
    cfg = _cfg(family)
    uninterrupted = fit(FAMILIES[family], cfg, data, (2,), device="cpu")
    saved = {}
    fit(FAMILIES[family], cfg, data, (2,), device="cpu", stop_after=17,
        hooks=Hooks(on_checkpoint=lambda s, final: saved.__setitem__(s["step"], s)))
    assert sorted(saved) == [10]
    resumed = fit(FAMILIES[family], cfg, data, (2,), device="cpu", resume=saved[10])
    assert resumed["step"] == uninterrupted["step"] == 40
    _assert_same_state(uninterrupted, resumed, rtol=0, atol=0)
    assert resumed["history"] == uninterrupted["history"]
    # and training did something: the weights moved from their initial values
    initial = fit(FAMILIES[family], cfg, data, (2,), device="cpu", stop_after=0)
    assert any(not torch.equal(v, uninterrupted["modules"][n][k])
               for n, sd in initial["modules"].items() for k, v in sd.items())


def test_a_metric_is_averaged_over_the_updates_that_reported_it(data):
    """A step may report a metric as one value per update (a critic's k updates) or not at all (a generator-only
    metric on a step without one): the logged mean is over the reported values, not over loop steps. Here 'every'
    is 1 at each step, "burst" is [2, 4] on even steps only: its mean is 3 (averaged per loop step over all steps it
    would be 3 x 3 / 5 on a window of 5 steps with 3 even ones)."""

    inner = FAMILIES["agd"]

    class Reporting:
        def __getattr__(self, name):
            return getattr(inner, name)

        def step(self, state, batch, ctx, cfg):
            inner.step(state, batch, ctx, cfg)
            out = {"every": torch.tensor(1.0)}
            if ctx.step % 2 == 0:
                out["burst"] = torch.tensor([2.0, 4.0])
            return out

    logged = []
    fit(Reporting(), _cfg("agd", n_steps=10, log_every=5), data, (2,), device="cpu",
        hooks=Hooks(on_log=lambda step, m, info: logged.append((step, m))))
    assert logged == [(5, {"burst": 3.0, "every": 1.0}), (10, {"burst": 3.0, "every": 1.0})]


class _Poisoned:
    """A family that behaves like ``inner`` but, at step ``at`` (1-based), poisons one weight or one metric."""

    def __init__(self, inner, at: int, what: str):
        self.inner, self.at, self.what = inner, at, what

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, state, batch, ctx, cfg):
        metrics = self.inner.step(state, batch, ctx, cfg)
        if ctx.step + 1 == self.at:
            if self.what == "weight":
                module = next(iter(state.modules.values()))
                _, param = list(module.named_parameters())[-1]
                with torch.no_grad():
                    param.view(-1)[0] = float("nan")
            else:
                metrics = {**metrics, "poisoned": torch.tensor(float("inf"))}
        return metrics


@pytest.mark.parametrize(("family", "what"), [("ncsn", "weight"), ("mmd", "weight"), ("agd", "metric")])
def test_a_non_finite_value_stops_training_at_its_step_and_keeps_the_checkpoint_before(family, data, what):
    cfg = _cfg(family)
    saved = []
    with pytest.raises(TrainingDiverged) as info:
        fit(_Poisoned(FAMILIES[family], 23, what), cfg, data, (2,), device="cpu",
            hooks=Hooks(on_checkpoint=lambda s, final: saved.append(s["step"])))
    msg = str(info.value)
    assert "step 23" in msg and "last good checkpoint is step 20" in msg, msg
    if what == "weight":
        name, module = next(iter(FAMILIES[family].build(cfg, (2,)).items()))
        assert f"non-finite weight {name}.{list(module.named_parameters())[-1][0]}" in msg, msg
    else:
        assert "non-finite poisoned = inf" in msg, msg
    assert saved == [10, 20]  # no checkpoint at or after the bad step
    for step in saved:
        assert step < 23


def test_a_global_batch_that_does_not_split_evenly_is_refused(data):
    with pytest.raises(ValueError, match="batch_size=30 is not a multiple of the 4 workers"):
        fit(FAMILIES["mmd"], _cfg("mmd", batch_size=30), data, (2,), device="cpu", world=4)


@pytest.mark.slow
# agd is heavy (25 s, make test-all): ncsn exercises Ray Train's DDP path in make test, and
# tests/stages/test_ddp_contract.py checks every family's gradients under DDP (the world-size scaling)
@pytest.mark.parametrize("family", ["ncsn", *(pytest.param(f, marks=pytest.mark.heavy) for f in ("agd", "ksd", "lsd"))])
def test_two_ray_workers_give_the_weights_of_one_worker(family, project, data):
    """Ray Train with 2 DDP workers (gloo, CPU) against the bare loop with the same global batch: the final
    weights agree to float32 round-off (the two ranks' partial gradients are summed in another order). ``ncsn``
    averages per-example losses over each rank's slice; ``agd`` couples the whole batch through kernel matrices
    and gathers the generator batch across the ranks; ``ksd`` (an energy model: no DDP wrapper, the ranks' parts of
    the U-statistic's gradient summed) and ``lsd`` (critic and model updates, gradients averaged by the family). Also checks what the stage writes: every checkpoint, the
    model and the curves."""
    from tasks.data.io import load_checkpoint, write_dataset
    from tasks.infra.runtime import RuntimeSettings
    from tasks.stages.train.task import train_model

    cfg = _cfg(family, n_steps=30, checkpoint_every=15, heldout_every=10 if family == "agd" else 0, heldout_n=100)
    write_dataset(project / "train.parquet", data.numpy())
    write_dataset(project / "test.parquet", data[:100].numpy())
    single = fit(FAMILIES[family], cfg, data, (2,), device="cpu")
    info = train_model.fn(
        cfg, data_path=project / "train.parquet", heldout_path=project / "test.parquet", model_path=project / "model.pt",
        curves_dir=project / "plots", pipeline="test", checkpoints_dir=project / "checkpoints", mlflow_run_id=None,
        mlflow_tracking_uri=None, settings=RuntimeSettings(num_workers=2, use_gpu=False, threads=1),
    )
    assert info["steps"] == 30 and math.isfinite(info["seconds_per_epoch"])
    ckpt = load_checkpoint(project / "model.pt")
    assert ckpt["family"] == family and ckpt["step"] == 30 and ckpt["shape"] == [2]
    key = "raw_modules" if family == "ncsn" else "modules"  # ncsn samples with the EMA; compare the raw weights too
    for name, sd in single["modules"].items():
        for k, v in sd.items():
            torch.testing.assert_close(ckpt[key][name][k], v, rtol=1e-4, atol=1e-5, msg=f"{name}.{k}")
    if family == "ncsn":
        for k, v in single["extra"]["ema"]["shadow"].items():
            torch.testing.assert_close(ckpt["modules"]["score"][k], v, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (project / "checkpoints").iterdir()) == ["step_0000015.pt", "step_0000030.pt"]
    rows = (project / "plots" / "train_loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["10", "20", "30"]
    # the logged metrics are the global batch's (averaged over the ranks), as one worker logs them
    logged = np.array([float(r.split(",")[1]) for r in rows[1:]])
    np.testing.assert_allclose(logged, [h[FAMILIES[family].loss_key] for h in single["history"]], rtol=1e-4)
    if family == "agd":
        held = (project / "plots" / "heldout.csv").read_text().splitlines()
        assert held[0] == "step,epoch,seconds,mmd_heldout" and [r.split(",")[0] for r in held[1:]] == ["10", "20", "30"]


@pytest.mark.slow
def test_a_diverging_run_fails_the_train_stage_and_keeps_its_last_good_checkpoint(project, data):
    """Through Ray Train: a huge (finite) row in the training data overflows the loss at the first step whose
    minibatch draws it (found by replaying the (seed, step) generator); the stage raises with that step and the place of the
    checkpoints Ray kept, no model is written, and the last kept checkpoint is from before the bad step. The run
    is not retried: a retry from the checkpoint would diverge at the same step."""
    from tasks.data.io import write_dataset
    from tasks.infra.runtime import RuntimeSettings
    from tasks.stages.train.task import train_model
    from tasks.stages.train.loop import STATE_FILE, step_generator

    cfg = _cfg("ncsn", n_steps=200, batch_size=16, checkpoint_every=5, log_every=5)
    x = data.clone()
    x[7] = 1e30  # finite in float32 (so the data are valid input); its square is not
    bad = next(t for t in range(cfg.n_steps)
               if 7 in torch.randint(len(x), (cfg.batch_size,), generator=step_generator(cfg.seed, t, "cpu")).tolist()) + 1
    assert bad > 5, "the NaN row must be drawn after the first checkpoint for this test to mean something"
    write_dataset(project / "train.parquet", x.numpy())
    with pytest.raises(TrainingDiverged) as info:
        train_model.fn(
            cfg, data_path=project / "train.parquet", heldout_path=None, model_path=project / "model.pt",
            curves_dir=project / "plots", pipeline="test", checkpoints_dir=project / "checkpoints", mlflow_run_id=None,
            mlflow_tracking_uri=None, settings=RuntimeSettings(num_workers=1, use_gpu=False, threads=1),
        )
    msg = str(info.value)
    assert f"training diverged at step {bad}: non-finite dsm_loss = " in msg, msg
    assert f"the last good checkpoint is step {(bad - 1) // 5 * 5}" in msg, msg
    assert not (project / "model.pt").exists() and not (project / "checkpoints").exists()
    kept = sorted(Path(msg.rsplit("under ", 1)[1]).glob(f"checkpoint_*/{STATE_FILE}"))
    assert kept, msg
    steps = sorted(torch.load(p, weights_only=True)["step"] for p in kept)
    assert steps[-1] == (bad - 1) // 5 * 5 < bad


@pytest.mark.slow
def test_bad_data_inside_a_ray_worker_arrives_as_the_config_error_and_is_not_retried(project, data):
    """A NaN row that was not written by this project (pyarrow directly) is found where the data are read: inside
    the Ray Train worker. The driver gets the same ConfigError (file, key, row count), not Train's wrapped
    ``TrainingFailedError``; the worker reports it instead of raising, so Train does not retry it, and Ray's run
    folder (nothing in it is worth resuming) is removed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.config.sections import ConfigError
    from tasks.infra.runtime import RuntimeSettings
    from tasks.stages.train.task import train_model

    x = data.numpy().copy()
    x[[3, 11]] = np.nan
    path = project / "train.parquet"
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 2)}), path)
    with pytest.raises(ConfigError) as info:
        train_model.fn(
            _cfg("ncsn", n_steps=10), data_path=path, heldout_path=None, model_path=project / "model.pt",
            curves_dir=project / "plots", pipeline="test", checkpoints_dir=None, mlflow_run_id=None,
            mlflow_tracking_uri=None, settings=RuntimeSettings(num_workers=1, use_gpu=False, threads=1),
        )
    err = info.value
    assert type(err) is ConfigError and err.path == str(path) and err.key == "x", err
    assert f"2 of {len(x)} rows hold non-finite values (NaN or inf), the first at row 3" in str(err), err
    assert not (project / "model.pt").exists()
    assert not any((project / ".stein" / "ray_results").glob("test-train-*")), "Ray's run folder was left behind"
