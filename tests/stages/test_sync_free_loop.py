"""The training loop without a host sync per step (issue 24): metrics summed on the device and the non-finite guard
kept there, read at log and checkpoint boundaries only; the same weights, optimiser states, histories and checkpoints
as the loop that synced every step; a deferred guard that still names the step and the culprit; ``train.compile``."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tasks.config.sections import ConfigError, OneOptimizerTrain
from tasks.families import FAMILIES, Family, StepContext, TrainState
from tasks.stages.train.loop import Hooks, TrainingDiverged, _extra_state, _scheduler, fit, step_generator
from test_training import _cfg, _Poisoned  # every family's tiny train section, and a family that poisons a step


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(500, 2, generator=g) * torch.tensor([1.0, 0.5]) + torch.tensor([1.0, -1.0])


# ------------------------------------------------------------------------------ the reference: the loop before


def _metric_sums(metrics):
    """The loop before issue 24, verbatim: one ``float`` (a host sync) per metric per step."""
    out = {}
    for k, v in metrics.items():
        v = v.detach().reshape(-1)
        out[k] = (float(v.sum()), int(v.numel()))
    return out


def _first_nonfinite(metrics, modules):
    for name, (value, count) in metrics.items():
        if not math.isfinite(value):
            return f"{name} = {value}" if count == 1 else f"{name} (one of {count} updates of the step)"
    for name, module in modules.items():
        params = [p.detach() for p in module.parameters()]
        if params and not torch.isfinite(torch.stack([p.sum() for p in params]).sum()):
            bad = next(n for n, p in module.named_parameters() if not torch.isfinite(p).all())
            return f"weight {name}.{bad}"
    return None


def _reference_fit(family, cfg, data, shape, *, hooks):
    """A private copy of ``fit`` as it was before issue 24 (commit 6d3b17d), one process, no resume or held-out MMD:
    the step loop that synced the host on every metric and every module at every step."""
    hooks = hooks or Hooks()
    n = data.shape[0]
    torch.manual_seed(cfg.seed)
    modules = {k: m.to("cpu") for k, m in family.build(cfg, shape).items()}
    optimizers = family.optimizers(cfg, modules)
    schedulers = {k: _scheduler(cfg, opt, family.lr_schedule(cfg, k)) for k, opt in optimizers.items()}
    extra = family.init_extra(cfg, modules)
    state = TrainState(modules=modules, trained=dict(modules), optimizers=optimizers, extra=extra,
                       objective=family.objective(cfg, "cpu"))
    history, train_seconds, last_good = [], 0.0, None

    def snapshot(done):
        return copy.deepcopy({
            "family": family.name, "step": done, "shape": list(shape), "n_train": n,
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "classes": {k: type(m).__name__ for k, m in modules.items()},
            "model_args": {k: dict(m.model_args) for k, m in modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "extra": {k: _extra_state(e, 1) for k, e in extra.items()},
            "history": [dict(h) for h in history], "heldout": [], "train_seconds": train_seconds,
        })

    sums, counts, final = {}, {}, snapshot(0)
    for step in range(cfg.n_steps):
        gen = step_generator(cfg.seed, step, "cpu")
        draw = lambda gen=gen: data[torch.randint(n, (cfg.batch_size,), generator=gen)]  # noqa: E731
        ctx = StepContext(step=step, rank=0, world=1, generator=gen, device="cpu", draw=draw)
        metrics = _metric_sums(family.step(state, draw(), ctx, cfg))
        for s in schedulers.values():
            s.step()
        bad = _first_nonfinite(metrics, modules)
        if bad is not None:
            where = f"the last good checkpoint is step {last_good}" if last_good is not None else "no checkpoint was written before it"
            raise TrainingDiverged(f"training diverged at step {step + 1}: non-finite {bad}; {where}")
        for k, (v, c) in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + c
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.n_steps:
            means = {k: sums[k] / counts[k] for k in sorted(sums)}
            history.append({"step": done, **means})
            if hooks.on_log is not None:
                hooks.on_log(done, means, {})
            sums, counts = {}, {}
        if done % cfg.checkpoint_every == 0 or done == cfg.n_steps:
            final = snapshot(done)
            last_good = done
            if hooks.on_checkpoint is not None:
                hooks.on_checkpoint(final, done == cfg.n_steps)
    return final


def _bytes(state: dict) -> bytes:
    """``torch.save`` of a training state without its wall-clock seconds (the one field that differs run to run)."""
    buf = io.BytesIO()
    torch.save({**state, "train_seconds": 0.0}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_to_the_bytes_of_the_loop_that_synced_every_step(family, data):
    """12 steps logged every 5 and checkpointed every 4 (boundaries that fall apart, and the last step, which is
    both): the final state, every checkpoint (weights, optimiser and scheduler states, extra state, history) and
    every logged mean are byte-identical to the reference loop's. The float64 device sums give the floats Python's
    sum of ``float(v.sum())`` gave: each term is the same float32 sum, converted exactly, added in IEEE double."""
    cfg = _cfg(family, n_steps=12, log_every=5, checkpoint_every=4)
    runs = {}
    for name, run in (("new", fit), ("reference", _reference_fit)):
        logs, ckpts = [], []
        hooks = Hooks(on_log=lambda step, m, info, logs=logs: logs.append((step, m)),
                      on_checkpoint=lambda s, final, ckpts=ckpts: ckpts.append(_bytes(s)))
        final = run(FAMILIES[family], cfg, data, (2,), **({"device": "cpu"} if run is fit else {}), hooks=hooks)
        runs[name] = (final, logs, ckpts)
    (new, new_logs, new_ckpts), (ref, ref_logs, ref_ckpts) = runs["new"], runs["reference"]
    assert [s for s, _ in new_logs] == [5, 10, 12] and new_logs == ref_logs
    assert new["history"] == ref["history"] and len(new_ckpts) == 3  # steps 4, 8, 12
    assert new_ckpts == ref_ckpts
    assert _bytes(new) == _bytes(ref)
    assert all(math.isfinite(v) for h in new["history"] for k, v in h.items())


# ------------------------------------------------------------------------------ the deferred guard


@pytest.mark.parametrize(("family", "what", "named"), [
    ("ncsn", "weight", "weight score.{last}"),   # a parameter (the score net's last)
    ("agd", "metric", "poisoned = inf"),         # a metric of its own
    ("mmd", "loss", "mmd2 = nan"),               # the family's loss
])
def test_a_non_finite_value_is_found_at_the_next_boundary_and_named_with_its_step(family, what, named, data):
    """NaN or inf at step 3, logs every 10 steps and checkpoints every 2: the host sees it only at the checkpoint
    boundary of step 4, yet the error names step 3 and what was non-finite then, and the last checkpoint is step 2's
    (none is written of a state the guard has not passed)."""
    fam = FAMILIES[family]
    cfg = _cfg(family, n_steps=40, log_every=10, checkpoint_every=2)
    runner = _Poisoned(fam, 3, what) if what != "loss" else _NaNLoss(fam, 3)
    saved, logged, ran = [], [], []
    with pytest.raises(TrainingDiverged) as info:
        fit(_Steps(runner, ran), cfg, data, (2,), device="cpu",
            hooks=Hooks(on_log=lambda *a: logged.append(a), on_checkpoint=lambda s, final: saved.append(s["step"])))
    msg = str(info.value)
    last = list(fam.build(cfg, (2,))["score"].named_parameters())[-1][0] if family == "ncsn" else ""
    assert msg == f"training diverged at step 3: non-finite {named.format(last=last)}; the last good checkpoint is step 2"
    assert saved == [2] and logged == [] and ran == [0, 1, 2, 3]  # detected after step 4, not before
    # with the first checkpoint after the bad step, the message says no checkpoint was written
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 3: .*; no checkpoint was written before it$"):
        fit(runner, _cfg(family, n_steps=40, log_every=10, checkpoint_every=5), data, (2,), device="cpu")


class _Steps:
    """``inner``, appending the 0-based number of every step it has run to ``done``."""

    def __init__(self, inner, done: list):
        self.inner, self.done = inner, done

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, state, batch, ctx, cfg):
        out = self.inner.step(state, batch, ctx, cfg)
        self.done.append(ctx.step)
        return out


class _NaNLoss:
    """``inner`` whose loss metric turns NaN at step ``at`` (1-based)."""

    def __init__(self, inner, at: int):
        self.inner, self.at = inner, at

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, state, batch, ctx, cfg):
        metrics = self.inner.step(state, batch, ctx, cfg)
        if ctx.step + 1 == self.at:
            metrics = {**metrics, self.loss_key: metrics[self.loss_key] * float("nan")}
        return metrics


def test_a_vector_metric_and_the_first_of_several_bad_steps_are_named(data):
    """A ``[k]`` metric with one NaN among its updates is named as one of k; of two bad steps in a window the first
    is reported, with its own layout of metrics (the later step reports another set)."""
    inner = FAMILIES["agd"]

    class Bursts:
        def __getattr__(self, name):
            return getattr(inner, name)

        def step(self, state, batch, ctx, cfg):
            out = dict(inner.step(state, batch, ctx, cfg))
            if ctx.step == 5:
                out["burst"] = torch.tensor([1.0, float("nan"), 2.0])
            elif ctx.step == 7:
                out["late"] = torch.tensor(float("inf"))
            return out

    with pytest.raises(TrainingDiverged) as info:
        fit(Bursts(), _cfg("agd", n_steps=20, log_every=10, checkpoint_every=10), data, (2,), device="cpu")
    assert str(info.value) == ("training diverged at step 6: non-finite burst (one of 3 updates of the step); "
                               "no checkpoint was written before it")


def test_a_step_that_fails_on_an_unseen_nan_reports_the_divergence(data):
    """After a NaN the host has not seen, a later step may raise on it (a sampler refusing NaN probabilities):
    the loop looks at the guard and reports the divergence, with the step's error as its cause."""
    inner = _Poisoned(FAMILIES["ncsn"], 2, "weight")

    class Refusing:
        def __getattr__(self, name):
            return getattr(inner, name)

        def step(self, state, batch, ctx, cfg):
            if ctx.step == 4:
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
            return inner.step(state, batch, ctx, cfg)

    with pytest.raises(TrainingDiverged, match="^training diverged at step 2: non-finite weight score") as info:
        fit(Refusing(), _cfg("ncsn", n_steps=20, log_every=10, checkpoint_every=10), data, (2,), device="cpu")
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="probability tensor"):  # and without a divergence, the error itself
        fit(_RaiseAt(FAMILIES["ncsn"], 4), _cfg("ncsn", n_steps=20), data, (2,), device="cpu")


class _RaiseAt:
    def __init__(self, inner, at: int):
        self.inner, self.at = inner, at

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, state, batch, ctx, cfg):
        if ctx.step == self.at:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return self.inner.step(state, batch, ctx, cfg)


@pytest.mark.parametrize("fused", [False, True])
def test_the_guard_names_the_first_bad_step_on_either_path(fused):
    """The guard's two ways of reducing the parameters (sums on the CPU; one fused L1 ``_foreach_norm`` on a GPU,
    taken here on the CPU) find the same step and name the same parameter; a metric of that step comes first."""
    from tasks.stages.train.loop import _Window

    torch.manual_seed(0)
    modules = {"a": _Linear(3), "b": _Linear(3)}
    window = _Window(modules, "cpu")
    window.fused = fused
    ok = {"loss": torch.tensor(0.5)}
    window.add(1, ok)
    window.add(2, ok)
    with torch.no_grad():
        modules["b"].lin.bias[1] = float("-inf")
    window.add(3, ok)
    with torch.no_grad():
        modules["a"].scale[0] = float("nan")  # later, and earlier in the order: not the one named
    window.add(4, {"loss": torch.tensor(float("nan"))})
    sums, first = window.read(["loss"])
    assert math.isnan(sums[0]) and window.diverged(first) == (3, "weight b.lin.bias")
    window = _Window(modules, "cpu")
    window.fused = fused
    window.add(7, {"loss": torch.tensor(float("inf")), "k": torch.tensor([1.0, float("nan")])})
    assert window.diverged(window.read([])[1]) == (7, "loss = inf")
    window = _Window({"a": _Linear(3)}, "cpu")
    window.add(2, {"k": torch.tensor([1.0, float("nan")])})
    assert window.diverged(window.read([])[1]) == (2, "k (one of 2 updates of the step)")


# ------------------------------------------------------------------------------ host syncs


class _Linear(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.model_args = {"dim": dim}
        self.lin = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.lin(x) * self.scale


class _Quiet(Family):
    """A family whose step never reads a tensor on the host: plain SGD (Adam reads its step count with ``item()``;
    on a GPU that count lives on the CPU, here it would be counted), two modules, a 0-dim and a ``[2]`` metric."""

    name = "quiet"
    config = OneOptimizerTrain
    samplers = frozenset()
    loss_key = "loss"

    def build(self, cfg, shape):
        return {"a": _Linear(shape[0]), "b": _Linear(shape[0])}

    def optimizers(self, cfg, modules):
        return {k: torch.optim.SGD(m.parameters(), lr=cfg.lr) for k, m in modules.items()}

    def step(self, state, batch, ctx, cfg):
        a, b = state.trained["a"], state.trained["b"]
        loss = (b(a(batch)) - batch).pow(2).mean()
        for opt in state.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in state.optimizers.values():
            opt.step()
        return {"loss": loss.detach(), "pair": torch.stack([loss.detach(), 2 * loss.detach()])}


class _CountSyncs(TorchDispatchMode):
    """Counts what would be a device-to-host sync on a GPU: ``aten._local_scalar_dense`` (behind ``item``, ``bool``,
    ``float``, ``int``) and, patched, ``Tensor.tolist`` and ``Tensor.numpy``, each with the steps done so far."""

    def __init__(self, done: list):
        super().__init__()
        self.done, self.syncs = done, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.append(len(self.done))
        return func(*args, **(kwargs or {}))


def _count_syncs(run, monkeypatch) -> list[int]:
    done = []  # one entry per step run: on_first_step would fire once only
    with _CountSyncs(done) as mode:
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name,
                                lambda self, *a, _o=original, **k: (mode.syncs.append(len(done)), _o(self, *a, **k))[1])
        run(done)
    monkeypatch.undo()
    return mode.syncs


def test_one_host_sync_per_log_interval(data, monkeypatch):
    """30 steps logged every 10 and checkpointed every 15 with a family that never syncs: the loop reads the
    device once at each boundary (steps 10, 15, 20, 30: four reads; the loop before read it 4 times a step), and
    never in between."""
    cfg = OneOptimizerTrain(family="quiet", n_steps=30, batch_size=32, log_every=10, checkpoint_every=15)
    syncs = _count_syncs(lambda done: fit(_Steps(_Quiet(), done), cfg, data, (2,), device="cpu"), monkeypatch)
    assert syncs == [10, 15, 20, 30], syncs
    before = _count_syncs(lambda done: _reference_fit(_Steps(_Quiet(), done), cfg, data, (2,), hooks=None),
                          monkeypatch)
    assert len(before) == 30 * 4  # per step: 2 metrics and 2 modules, one sync each


@pytest.mark.gpu
def test_on_a_gpu_the_loop_syncs_only_at_its_boundaries(data):
    """On CUDA, with PyTorch's sync debug mode warning at every synchronising call: a family that never syncs
    trains 30 steps with syncs only at the 4 boundaries (logs at 10, 20, 30; a checkpoint at 15), and a NaN
    weight injected at step 3 is still reported at step 3."""
    import warnings

    cfg = OneOptimizerTrain(family="quiet", n_steps=30, batch_size=32, log_every=10, checkpoint_every=15)
    x = data.cuda()
    fit(_Quiet(), cfg, x, (2,), device="cuda")  # warm up: CUDA's context and kernels load once
    done = []
    at_sync = []

    def on_warning(message, *args, **kwargs):
        if "synchroniz" in str(message):
            at_sync.append(len(done))

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = on_warning
            fit(_Steps(_Quiet(), done), cfg, x, (2,), device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # 0: before the first step ends (the modules' copy to the GPU, and the first step's own work)
    assert set(at_sync) - {0} == {10, 15, 20, 30}, at_sync
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 3: non-finite weight a\.scale; no "):
        fit(_Poisoned(_Quiet(), 3, "weight"), cfg.model_copy(update={"checkpoint_every": 10}), x, (2,), device="cuda")


# ------------------------------------------------------------------------------ train.compile


def test_compile_is_off_by_default_and_a_field_of_every_train_section():
    for family in FAMILIES.values():
        assert family.config.model_fields["compile"].default is False
    assert _cfg("ncsn").compile is False and _cfg("ncsn", compile=True).compile is True
    with pytest.raises(ValueError):
        _cfg("ncsn", compile="yes")  # strict: a bool


@pytest.mark.slow
@pytest.mark.heavy  # 42 s of Inductor compilation; compile is off by default (make test-all, CI, runs it)
def test_a_compiled_step_trains_like_the_eager_one(data):
    """``train.compile: true`` compiles ncsn's step (its loss, network, Adam and EMA updates): the modules keep their
    state_dict keys, and the weights agree with the eager run's to float32 round-off (Inductor fuses and reorders
    float32 arithmetic)."""
    from torch._dynamo.utils import counters

    eager = fit(FAMILIES["ncsn"], _cfg("ncsn", n_steps=6, log_every=3), data, (2,), device="cpu")
    counters.clear()
    compiled = fit(FAMILIES["ncsn"], _cfg("ncsn", n_steps=6, log_every=3, compile=True), data, (2,), device="cpu")
    assert counters["stats"]["unique_graphs"] >= 1  # Dynamo traced the step
    for group in ("modules", "extra"):
        for name, sd in eager[group].items():
            assert sd.keys() == compiled[group][name].keys()
    for k, v in eager["modules"]["score"].items():
        torch.testing.assert_close(compiled["modules"]["score"][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_a_step_torch_compile_cannot_run_fails_naming_train_compile(data):
    """KSD trains an energy model through its score, a double backward, which AOTAutograd refuses: a ConfigError
    naming train.compile, not an error from inside torch."""
    with pytest.raises(ConfigError, match=r"key 'compile'.*torch.compile failed on the ksd family's step.*"
                                          r"set train.compile: false"):
        fit(FAMILIES["ksd"], _cfg("ksd", n_steps=2, compile=True), data, (2,), device="cpu")
