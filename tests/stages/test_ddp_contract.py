"""The distributed-training contract of ``tasks/families/base.py``, checked on the raw gradients: N DDP workers
take the step one worker takes with the global batch.

Final weights cannot show it: Adam is blind to a constant scale of the gradient, so a family that forgot to
scale a batch-coupled loss by ``ctx.world`` (or scaled a per-example loss by it) trains the same weights. Adam's
first moment after one step is exactly ``(1 - beta1) * grad``, so it is compared instead: 2 workers (real
``torch.distributed`` with gloo on loopback, real ``DistributedDataParallel`` as Ray Train's ``prepare_model``
wraps a module) against one. The bookkeeping that rank 0 logs (epoch, samples/s) is compared too: an epoch counted
with the per-rank batch would halve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.families import FAMILIES
from tasks.infra.runtime import free_port
from tasks.stages.train.loop import Hooks, fit

REPO = Path(__file__).resolve().parents[2]
_GEN = {"kind": "mlp", "latent_dim": 2, "hidden": 16, "n_layers": 2}
_CRITIC = {"kind": "mlp", "hidden": 16, "n_layers": 2}
_OPT = {"lr": 3e-3, "beta1": 0.5, "beta2": 0.999}
FAMILY_CFG = {
    "ncsn": {"net": {"kind": "mlp", "hidden": 16, "n_layers": 2}, "n_sigmas": 4, "ema_decay": 0.9, "lr": 3e-3},
    "agd": {"net": _GEN, "lr": 3e-3},
    "mmd": {"net": _GEN, "lr": 3e-3},
    # step 0 is a burst of 3 critic updates, each with its own batch and a gradient penalty (a double backward):
    # Adam's moments then hold every update's gradient, and a wrong cross-rank term in any of them shows
    "gebm": {"net": _GEN, "energy": _CRITIC, "energy_steps": 2, "burst_steps": 3, "penalty": 1.0,
             "generator_optimizer": _OPT, "critic_optimizer": _OPT, "log_partition_lr": 3e-3},
    "mmdgan": {"net": _GEN, "critic": _CRITIC, "features": 4, "critic_steps": 2, "burst_steps": 3, "penalty": 1.0,
               "generator_optimizer": _OPT, "critic_optimizer": _OPT},
    # a KSD U-statistic over the global batch of an energy model's scores (a gradient of a gradient: no DDP wrapper,
    # the ranks' parts summed); maxSKSD's directions see every row; LSD's critic takes 2 updates with Hutchinson
    # probes drawn for the global batch, then the model one
    "ksd": {"model": {"kind": "energy_mlp", "hidden": 16, "n_layers": 2}, "lr": 3e-3},
    "maxsksd": {"model": {"kind": "ica"}, "variant": "rg", "n_slices": 2, "directions_lr": 0.1, "lr": 3e-3},
    "lsd": {"model": {"kind": "ica"}, "critic_steps": 2, "critic_hidden": 16, "critic_layers": 2, "exact_trace_max_dim": 1,
            "critic_optimizer": _OPT, "lr": 3e-3},
    # energy-based models: each rank runs its slice of the MALA chains from its part of the replay buffer (the noise
    # of a RowShard: what one process gives those chains); NCE's noise rows split over the ranks; FCE's flow updates.
    # The L2 term gives the energy's output bias a gradient (the CD difference alone is blind to a shift of E)
    "ebm": {"energy": _CRITIC, "negatives": "pcd", "mcmc": "mala", "mcmc_steps": 3, "buffer_size": 64, "reinit": 0.5,
            "l2": 0.1, "lr": 3e-3},
    "nce": {"energy": _CRITIC, "lr": 3e-3, "noise_ratio": 2.0, "log_normaliser_init": 0.5},
    "fce": {"energy": _CRITIC, "lr": 3e-3, "flow_transforms": 2, "flow_hidden": 16, "flow_lr": 3e-3, "flow_steps": 2},
    # the latent EBM: posterior and prior chains per rank on its rows (RowShard), both modules' gradients averaged;
    # the L2 term gives the prior's output bias a gradient
    "latent_ebm": {"net": _GEN, "prior": {"hidden": 16, "n_layers": 2}, "langevin": "mala", "posterior_steps": 3,
                   "prior_steps": 3, "l2": 0.1, "prior_optimizer": _OPT, "generator_optimizer": _OPT},
}
N_TRAIN = 400

WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tasks.families import FAMILIES
from tasks.stages.train.loop import Hooks, fit

rank, world, family, cfg, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['PORT']}", rank=rank, world_size=world)
data = torch.randn(%d, 2, generator=torch.Generator().manual_seed(0))
logged = []
state = fit(FAMILIES[family], FAMILIES[family].config.model_validate(cfg), data, (2,), device="cpu", rank=rank,
            world=world, wrap=DistributedDataParallel, hooks=Hooks(on_log=lambda s, m, i: logged.append(i)))
if rank == 0:
    torch.save({"optimizers": state["optimizers"], "logged": logged}, out)
dist.destroy_process_group()
""" % N_TRAIN


def _cfg(family: str) -> dict:
    # one step, logged: Adam's state then holds that step's gradient
    base = {"family": family, "n_steps": 1, "batch_size": 32, "log_every": 1, "checkpoint_every": 1}
    return base | FAMILY_CFG[family]


def _first_moments(state: dict) -> dict[str, torch.Tensor]:
    return {f"{opt}.{i}": s["exp_avg"] for opt, sd in state["optimizers"].items() for i, s in sd["state"].items()}


def _two_workers(family: str, tmp_path: Path, *, cfg: dict | None = None, script: str = WORKER,
                 env: dict[str, str] | None = None) -> dict:
    """What rank 0 of 2 gloo workers running ``script`` with ``cfg`` (default: the family's one-step config) saved."""
    env = {**os.environ, "PORT": str(free_port()), "PYTHONPATH": str(REPO), **(env or {})}
    out = tmp_path / f"{family}.pt"
    cfg = _cfg(family) if cfg is None else cfg
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), "2", family, json.dumps(cfg), str(out)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_workers_take_the_gradient_of_one(family, tmp_path):
    data = torch.randn(N_TRAIN, 2, generator=torch.Generator().manual_seed(0))
    logged: list[dict] = []
    single = fit(FAMILIES[family], FAMILIES[family].config.model_validate(_cfg(family)), data, (2,), device="cpu",
                 hooks=Hooks(on_log=lambda s, m, i: logged.append(i)))
    double = _two_workers(family, tmp_path)
    one, two = _first_moments(single), _first_moments(double)
    assert one.keys() == two.keys() and one
    # float32 round-off is relative to a module's largest gradient: an MMD-GAN critic's output bias has the gradient
    # 0 exactly (the MMD² of its kernel is shift-invariant), and it shows round-off of ~1e-7 of the module's scale
    scale = {opt: max(float(g.abs().max()) for k, g in one.items() if k.startswith(f"{opt}.")) for opt in double["optimizers"]}
    for k, g in one.items():
        assert float(g.abs().max()) > 0, f"{k}: no gradient reached this parameter"
        atol = max(1e-7, 1e-5 * scale[k.split(".")[0]])
        torch.testing.assert_close(two[k], g, rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{family} {k}: {m}")
    # the global batch's bookkeeping on rank 0, as one worker logs it
    (a,), (b,) = logged, double["logged"]
    assert a["epoch"] == b["epoch"] == 32 / N_TRAIN
    for info in (a, b):  # samples/s x seconds/epoch = the examples of one epoch
        assert info["samples_per_s"] * info["seconds_per_epoch"] == pytest.approx(N_TRAIN, rel=1e-9)



CHAINS_WORKER = WORKER.replace(
    'wrap=DistributedDataParallel, hooks=Hooks(on_log=lambda s, m, i: logged.append(i)))',
    'wrap=DistributedDataParallel, stop_after=int(os.environ["STOP_AFTER"]))',
).replace('torch.save({"optimizers": state["optimizers"], "logged": logged}, out)', 'torch.save(state, out)')


def test_persistent_chains_saved_by_two_workers_continue_on_one_as_one_worker_runs_them(tmp_path):
    """Per-rank training state end to end: 2 workers run PCD for 3 steps, each owning half of the replay buffer's
    slots; their checkpoint holds both halves, and one worker resumes from it (the halves resharded into one) to end
    where one uninterrupted worker ends, weights and every chain. Without the per-rank save the second half of the
    chains would be lost (rank 0's half loaded everywhere), and without RowShard the ranks' chains would see other
    noise: either moves the buffer by the chains' noise scale, far above the float32 round-off allowed here."""
    family = FAMILIES["ebm"]
    cfg = _cfg("ebm") | {"n_steps": 6, "log_every": 3, "checkpoint_every": 3}
    saved = _two_workers("ebm", tmp_path, cfg=cfg, script=CHAINS_WORKER, env={"STOP_AFTER": "3"})
    halves = saved["extra"]["buffer"]["ranks"]
    assert saved["step"] == 3 and [h["x"].shape for h in halves] == [(16, 2, 2), (16, 2, 2)]

    data = torch.randn(N_TRAIN, 2, generator=torch.Generator().manual_seed(0))
    train = family.config.model_validate(cfg)
    whole = fit(family, train, data, (2,), device="cpu")
    resumed = fit(family, train, data, (2,), device="cpu", resume=saved)
    for k, v in whole["modules"]["energy"].items():
        torch.testing.assert_close(resumed["modules"]["energy"][k], v, rtol=1e-4, atol=1e-6)
    (a,), (b,) = whole["extra"]["buffer"]["ranks"], resumed["extra"]["buffer"]["ranks"]
    assert a["x"].shape == (32, 2, 2)
    torch.testing.assert_close(b["x"], a["x"], rtol=1e-4, atol=1e-5)
