"""The ``nce`` and ``fce`` families through the real training loop (``tasks.stages.train.loop.fit``): NCE learns the
normaliser of its own energy, FCE with a frozen flow is NCE, an unfrozen flow learns, resume is exact, a non-finite
value stops training, and checkpoints load as energy-based models with their learned normaliser."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError

from stein_core.critics import MLPCritic
from stein_core.ebm import grid_log_normaliser, nce_loss
from tasks.families import FAMILIES, model_payload
from tasks.families.base import meta_shapes, too_large
from tasks.families.fce import nsf_weight_count
from tasks.stages.train.loop import Hooks, TrainingDiverged, fit

_ENERGY = {"kind": "mlp", "hidden": 16, "n_layers": 2}
_FLOW = {"flow_transforms": 2, "flow_hidden": 16}


def _cfg(family: str, **kw):
    base = {"family": family, "n_steps": 12, "batch_size": 32, "log_every": 4, "checkpoint_every": 100, "lr": 3e-3,
            "energy": _ENERGY, **(_FLOW if family == "fce" else {})}
    return FAMILIES[family].config.model_validate(base | kw)


@pytest.fixture(scope="module")
def data():
    # an anisotropic, off-centre Gaussian: the noise fit and the flow's standardisation have something to do (the
    # scales' product is 1.5: a standardisation without its log-Jacobian, log 1.5 = 0.41, would show)
    g = torch.Generator().manual_seed(0)
    return torch.randn(500, 2, generator=g) * torch.tensor([2.0, 0.75]) + torch.tensor([1.0, -1.0])


def _energy_net(state: dict) -> MLPCritic:
    net = MLPCritic(**state["model_args"]["energy"])
    net.load_state_dict(state["modules"]["energy"])
    return net.eval()


def _tensors(tree, prefix=""):
    """Every tensor of a nested dict/list, by its path."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}.{i}")


# ---------------------------------------------------------------------------------------------- configs


def test_the_sections_defaults_and_the_whole_noise_count():
    nce = _cfg("nce")
    assert (nce.noise_ratio, nce.log_normaliser_init, nce.noise_count) == (1.0, 0.0, 32)
    assert _cfg("nce", noise_ratio=0.25).noise_count == 8
    with pytest.raises(ValidationError, match=r"0\.3 × 32 = 9\.6 noise samples a step: it must be a whole number"):
        _cfg("nce", noise_ratio=0.3)
    for bad in (0.0, 101.0):
        with pytest.raises(ValidationError, match="noise_ratio"):
            _cfg("nce", noise_ratio=bad)
    fce = FAMILIES["fce"].config.model_validate({"family": "fce"})
    assert (fce.flow_transforms, fce.flow_hidden, fce.flow_lr, fce.flow_steps, fce.freeze_flow) == (3, 64, 1e-3, 1, False)


# ---------------------------------------------------------------------------------------------- NCE


def test_nce_learns_the_normaliser_of_its_own_energy():
    """On N(0, I) data, c (log p = −E − c) ends equal to log ∫ exp(−E) on a grid, from a start 3.5 nats off.

    The grid: [−8, 8]² at 400² points, h = 0.04; the midpoint rule's error is O(h²) ≈ 1e-4 on this smooth integrand
    and the mass outside the box is below 1e-12 for a density near N(0, I). NCE's c is a consistent estimate
    (Gutmann & Hyvärinen 2012, Thm. 2); its error here is the optimisation's: over 1500 cosine-annealed steps of 256
    data and 256 noise points the final |c − log Z| came out at 1e-4..4e-3 for three seeds and learning rates, and
    0.03 is 8x the largest of those, yet 100x smaller than the gap at the start (checked). The model's density,
    normalised on the grid, has the true N(0, I) mean log-likelihood on the data within 0.02 (measured 2e-3)."""
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    cfg = _cfg("nce", n_steps=1500, batch_size=256, log_every=500, checkpoint_every=10_000, lr=1e-2,
               energy={"kind": "mlp", "hidden": 32, "n_layers": 2}, log_normaliser_init=2.0)
    box = ((-8.0, -8.0), (8.0, 8.0))

    def gap(state):
        log_z = grid_log_normaliser(_energy_net(state), *box, n=400, dtype=torch.float32)
        return float(state["modules"]["log_normaliser"]["value"]) - log_z, log_z

    start = fit(FAMILIES["nce"], cfg, x, (2,), device="cpu", stop_after=0)
    assert abs(gap(start)[0]) > 3.0
    state = fit(FAMILIES["nce"], cfg, x, (2,), device="cpu")
    err, log_z = gap(state)
    assert abs(err) < 0.03, err
    with torch.no_grad():
        log_p = (-_energy_net(state)(x).squeeze(-1) - log_z).mean()
    true = (-0.5 * x.pow(2).sum(1) - math.log(2 * math.pi)).mean()
    assert abs(float(log_p - true)) < 0.02
    # the loaded model claims c as its normaliser; the checkpoint carries the fitted noise (the data's moments)
    ckpt = model_payload(FAMILIES["nce"], cfg, state)
    assert FAMILIES["nce"].load(ckpt).log_normaliser == float(state["modules"]["log_normaliser"]["value"])
    assert ckpt["noise"]["mean"].abs().max() < 0.1 and ckpt["noise"]["scale_tril"].shape == (2, 2)


# ---------------------------------------------------------------------------------------------- FCE


class _Recording:
    """``inner`` (the fce family) recording step 0: the EBM's modules before it, the data rows and the flow samples
    the EBM update saw, and the flow after it."""

    def __init__(self, inner):
        self.inner, self.seen = inner, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, state, batch, ctx, cfg):
        if ctx.step:
            return self.inner.step(state, batch, ctx, cfg)
        self.seen["before"] = {k: copy.deepcopy(state.modules[k]) for k in ("energy", "log_normaliser")}
        flow = state.modules["flow"]
        draw = flow.sample_and_log_prob
        flow.sample_and_log_prob = lambda z: self.seen.setdefault("y", draw(z))  # the EBM update's draw
        try:
            out = self.inner.step(state, batch, ctx, cfg)
        finally:
            del flow.sample_and_log_prob
        self.seen |= {"x": batch.clone(), "flow": copy.deepcopy(flow)}
        return out


def test_fce_with_a_frozen_flow_takes_the_gradient_of_nce_with_the_flow_as_noise(data):
    """The EBM's first gradient (Adam's first moment after one step is exactly (1 − β₁) g) equals the gradient of
    ``nce_loss`` with ν = 1 on the same data rows and flow samples, with the flow's log-density computed here in the
    forward direction (the family computes it from the inverse pass): FCE adds nothing to NCE but the flow."""
    family = _Recording(FAMILIES["fce"])
    cfg = _cfg("fce", n_steps=1, freeze_flow=True)
    initial = fit(FAMILIES["fce"], cfg, data, (2,), device="cpu", stop_after=0)
    state = fit(family, cfg, data, (2,), device="cpu")
    seen = family.seen
    energy, c = seen["before"]["energy"], seen["before"]["log_normaliser"]
    flow, x, (y, log_q_y) = seen["flow"], seen["x"], seen["y"]
    with torch.no_grad():
        log_q_x, log_q_y_forward = flow.log_prob(x), flow.log_prob(y)
    torch.testing.assert_close(log_q_y_forward, log_q_y, rtol=0, atol=1e-4)
    loss = nce_loss(-energy(x).squeeze(-1) - c(), log_q_x, -energy(y).squeeze(-1) - c(), log_q_y_forward, nu=1.0)
    params = [*energy.parameters(), *c.parameters()]
    want = torch.autograd.grad(loss, params)
    moments = state["optimizers"]["energy"]["state"]
    assert len(moments) == len(params)
    for i, g in enumerate(want):
        torch.testing.assert_close(moments[i]["exp_avg"] / 0.1, g, rtol=1e-4, atol=1e-6, msg=f"parameter {i}")
    assert max(float(g.abs().max()) for g in want) > 1e-3  # a gradient, not zeros compared with zeros
    for k, v in initial["modules"]["flow"].items():  # frozen: the flow's weights never moved
        if k not in ("shift", "scale"):
            assert torch.equal(state["modules"]["flow"][k], v), k
    assert "flow_value" not in state["history"][-1]


def test_an_unfrozen_flow_learns_and_stays_a_normalised_density(data):
    cfg = _cfg("fce", n_steps=30, log_every=10, flow_steps=2, flow_lr=1e-2)
    initial = fit(FAMILIES["fce"], cfg, data, (2,), device="cpu", stop_after=0)
    state = fit(FAMILIES["fce"], cfg, data, (2,), device="cpu")
    weights = {k: v for k, v in state["modules"]["flow"].items() if v.is_floating_point() and k not in ("shift", "scale")}
    moved = [k for k, v in weights.items() if not torch.equal(v, initial["modules"]["flow"][k])]
    assert len(moved) > len(weights) // 2, moved
    for row in state["history"]:
        assert set(row) == {"step", "fce_value", "flow_value", "log_normaliser"}
        # V = E[log D] + E[log(1 − D)] < 0; −2 log 2 at D = 1/2
        assert all(math.isfinite(v) for v in row.values()) and row["fce_value"] < 0 and row["flow_value"] < 0
    # the standardisation fitted at step 0 is the data's moments, estimated from 9 x 32 = 288 rows drawn with
    # replacement: within 4 standard errors (std / √288 for the mean, ≈ 1 / √(2 · 288) relative for the std)
    flow = FAMILIES["fce"].load_flow(model_payload(FAMILIES["fce"], cfg, state))
    n, std = 9 * 32, data.std(0)
    assert ((flow.shift - data.mean(0)).abs() < 4 * std / math.sqrt(n)).all(), flow.shift
    assert ((flow.scale / std - 1).abs() < 4 / math.sqrt(2 * n)).all(), flow.scale
    # box: the data's mean ± 10 standard deviations (the splines act on ±5, the Gaussian tails beyond); the rule's
    # error at h = 0.05 std is far below 0.01 (measured: 1e-5)
    log_mass = grid_log_normaliser(lambda u: -flow.log_prob(u), (-19.0, -8.5), (21.0, 6.5), n=800, dtype=torch.float32)
    assert abs(log_mass) < 0.01, log_mass


def test_the_flow_is_measured_on_the_meta_device_and_rebuilt_from_a_checkpoint(tmp_path):
    family, cfg = FAMILIES["fce"], _cfg("fce")
    real = {k: {n: tuple(t.shape) for n, t in m.state_dict().items()} for k, m in family.build(cfg, (2,)).items()}
    assert meta_shapes(lambda: family.build(cfg, (2,))) == real  # what resume_mismatch and the train task compare
    flow = family.build(cfg, (5,))["flow"]  # the size formula the meta build relies on, against zuko's own layers
    assert sum(p.numel() for p in flow.parameters()) == nsf_weight_count(5, cfg.flow_transforms, cfg.flow_hidden)
    # a flow no machine holds is refused by its size, before anything is allocated
    huge = family.config.model_validate({"family": "fce", "flow_hidden": 4096, "flow_transforms": 32})
    assert "module 'flow' would hold" in too_large(meta_shapes(lambda: family.build(huge, (3072,))))


# ---------------------------------------------------------------------------------------------- both


@pytest.mark.parametrize(("family", "stop"), [("nce", 8), ("nce", 0), ("fce", 8)])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(family, stop, data):
    """Stopped after ``stop`` steps and resumed from that state, a run ends with exactly the weights, optimiser
    moments and extra state (NCE's noise, fitted at step 0 and checkpointed) of one never interrupted; resuming
    from step 0 (``stop = 0``, the noise not fitted yet) fits the same noise."""
    kw = {"flow_steps": 2} if family == "fce" else {"noise_ratio": 0.5}
    cfg = _cfg(family, **kw)
    uninterrupted = fit(FAMILIES[family], cfg, data, (2,), device="cpu")
    snapshot = fit(FAMILIES[family], cfg, data, (2,), device="cpu", stop_after=stop)
    assert snapshot["step"] == stop
    resumed = fit(FAMILIES[family], cfg, data, (2,), device="cpu", resume=snapshot)
    want = dict(_tensors({g: uninterrupted[g] for g in ("modules", "optimizers", "extra")}))
    got = dict(_tensors({g: resumed[g] for g in ("modules", "optimizers", "extra")}))
    assert got.keys() == want.keys()
    if family == "nce":
        assert {".extra.noise.mean", ".extra.noise.scale_tril"} <= want.keys()
    else:
        assert {".modules.flow.shift", ".modules.flow.scale"} <= want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert resumed["history"] == uninterrupted["history"]


class _InfiniteEnergy:
    """``inner`` whose energy network outputs +inf."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def build(self, cfg, shape):
        modules = self.inner.build(cfg, shape)
        modules["energy"].register_forward_hook(lambda _m, _i, out: out + float("inf"))
        return modules


@pytest.mark.parametrize("family", ["nce", "fce"])
@pytest.mark.parametrize("how", ["nan_data", "inf_energy"])
def test_a_non_finite_value_stops_training_naming_the_metric(family, how, data):
    cfg = _cfg(family)
    x = data.clone()
    if how == "inf_energy":
        runner, hooks, at = _InfiniteEnergy(FAMILIES[family]), None, 1
    else:  # the data turn NaN after step 1 (step 0 fitted the noise or the standardisation on finite rows)
        runner, hooks, at = FAMILIES[family], Hooks(on_first_step=lambda _step: x.fill_(float("nan"))), 2
    with pytest.raises(TrainingDiverged) as info:
        fit(runner, cfg, x, (2,), device="cpu", hooks=hooks)
    metric = {"nce": "nce_loss", "fce": "fce_value"}[family]
    assert f"training diverged at step {at}: non-finite {metric} = " in str(info.value), str(info.value)


@pytest.mark.parametrize("family", ["nce", "fce"])
def test_non_finite_rows_at_step_0_are_refused_before_fitting_anything(family, data):
    x = data.clone()
    x[:, 0] = float("nan")
    with pytest.raises(ValueError, match="rows drawn at step 0 to .* hold non-finite values"):
        fit(FAMILIES[family], _cfg(family), x, (2,), device="cpu")


@pytest.mark.parametrize("family", ["nce", "fce"])
def test_a_checkpoint_loads_as_an_energy_model_with_its_learned_normaliser(family, data, tmp_path):
    cfg = _cfg(family, n_steps=4)
    state = fit(FAMILIES[family], cfg, data, (2,), device="cpu")
    torch.save(model_payload(FAMILIES[family], cfg, state), tmp_path / "model.pt")
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    model = FAMILIES[family].load(ckpt)
    assert model.log_normaliser == float(state["modules"]["log_normaliser"]["value"]) != 0.0
    probe = data[:7]
    torch.testing.assert_close(model.energy(probe), _energy_net(state)(probe).squeeze(-1).detach(), rtol=0, atol=0)
    assert model.score(probe).shape == (7, 2)
    if family == "nce":
        assert set(ckpt["noise"]) == {"mean", "scale_tril"}
    else:  # the flow rebuilds from its class and constructor arguments
        flow = FAMILIES["fce"].load_flow(ckpt)
        live = FAMILIES["fce"].build(cfg, (2,))["flow"]
        live.load_state_dict(state["modules"]["flow"])
        torch.testing.assert_close(flow.log_prob(probe), live.log_prob(probe).detach(), rtol=0, atol=0)
