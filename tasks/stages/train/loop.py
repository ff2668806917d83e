"""The one training loop, for every model family, and the Ray Train worker around it.

Prefect-free: a Ray worker imports this module to unpickle its loop, and every import here is paid once per
worker process at the start of each fit.

Determinism (DESIGN.md): the minibatch of step t is a pure function of ``(seed, t)`` (a generator seeded from the
pair draws the global batch's indices, and the family draws the step's other randomness from it), every rank
draws the same global batch and takes its slice, and a checkpoint holds the weights, every optimiser and
scheduler, the family's extra state (an EMA) and the histories. Hence N workers compute what one worker computes
with the global batch, and a run resumed from a checkpoint ends with the weights of an uninterrupted one: the
only random state is the step number.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config.sections import ConfigError
from tasks.families import FAMILIES, Family, StepContext, TrainState

STATE_FILE = "state.pt"
#: The file of a marker checkpoint, and the metric key, by which a worker reports an error no retry can mend.
FATAL = "FATAL"


class TrainingDiverged(RuntimeError):
    """A loss or a weight became NaN or infinite; the message names the step, the metric and the last good
    checkpoint."""


def step_generator(seed: int, step: int, device):
    """The generator of step ``step``: a pure function of (seed, step), the same on every rank."""
    import torch

    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step * 7919 + 17) % (2**63))


#: What a checkpoint's state holds (``fit``'s ``snapshot``); a state without one of them resumes nothing.
STATE_KEYS = ("family", "step", "shape", "modules", "optimizers", "schedulers", "extra", "history", "heldout",
              "train_seconds")


def resume_mismatch(family: Family, cfg, shape: tuple[int, ...], state: Any) -> str | None:
    """Why ``state`` (a Ray Train checkpoint's) cannot resume the training of ``family`` with ``cfg`` on examples
    of ``shape``, or None when it can: another family, other examples, a step past the end, other modules, or a
    tensor of another shape than the modules this config builds (measured on the meta device, not built)."""
    if not isinstance(state, dict):
        return f"not a training state (a {type(state).__name__})"
    if missing := [k for k in STATE_KEYS if k not in state]:
        return f"not a training state (no {', '.join(missing)})"
    if state["family"] != family.name:
        return f"a checkpoint of the {state['family']!r} family; this training is {family.name!r}"
    if list(state["shape"]) != list(shape):
        return f"a checkpoint for examples of shape {list(state['shape'])}; the data's are {list(shape)}"
    if not (isinstance(state["step"], int) and 0 <= state["step"] <= cfg.n_steps):
        return f"a checkpoint of step {state['step']!r}; this training has steps 0..{cfg.n_steps}"
    from tasks.families.base import meta_shapes, shape_mismatch

    modules = meta_shapes(lambda: family.build(cfg, tuple(shape)))
    saved = state["modules"]
    if not isinstance(saved, dict) or set(saved) != set(modules):
        got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        return f"a checkpoint of modules {got}; this training has {sorted(modules)}"
    for name, want in modules.items():
        if (diff := shape_mismatch(want, saved[name])) is not None:
            key, got, wanted = diff
            return f"module {name!r} does not match this config at {key!r}: checkpoint {got}, config {wanted}"
    return None


def _scheduler(cfg, optimizer, schedule: str):
    import torch

    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.n_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)


class _Window:
    """What the loop keeps of the steps since the host last looked, on the device: no step syncs the host.

    - **Metrics.** Per metric a float64 0-dim tensor, the sum of the step sums ``v.sum()`` (each in the metric's
      dtype, as before), and a count (a Python int: a shape needs no sync). Each step sum is converted to float64
      exactly and added in IEEE double arithmetic from 0.0, in step order: the operations by which Python added
      ``float(v.sum())`` before, so the logged means are the same floats.
    - **The non-finite guard.** Each step stacks its metric sums and one value per parameter of every module (its
      L1 norm, one ``torch._foreach_norm`` for all of them on an accelerator; its sum on the CPU: either is
      non-finite where the parameter holds a NaN or inf, and overflows about where the sum of sums checked before
      did) and asks ``isfinite().all()``. ``first`` (float64) stays −1 until that fails, then holds
      ``step + 2^32 * layout`` of the first such step (1-based step; ``layout``: the metric names and counts the
      step reported), and ``torch.where`` keeps that step's stacked values, one tensor per layout: from them the
      host names the first non-finite metric of the step, or else its first non-finite parameter.

    :meth:`read` is the one host sync of a log or checkpoint boundary."""

    def __init__(self, modules: dict[str, Any], device) -> None:
        import torch

        self.modules = modules
        self.params = [p for m in modules.values() for p in m.parameters()]  # the run's, in the order of their names
        self.fused = torch.device(device).type != "cpu"
        self.first = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.saved: dict[int, Any] = {}  # layout -> the stacked values of the first bad step with that layout
        self.layouts: dict[tuple, int] = {}  # ((name, count), ...) -> layout
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}  # per metric: the updates that reported it since the last log

    def add(self, step: int, metrics: dict[str, Any]) -> None:
        """Step ``step``'s (1-based) metrics (0-dim or ``[k]`` tensors) into the sums and the guard: no sync."""
        import torch

        sums = []
        for k, v in metrics.items():
            v = v.detach().reshape(-1)
            s = v.sum()
            acc = self.sums.get(k)
            if acc is None:  # 0.0 + s, as Python's sum started (0.0 + -0.0 is 0.0)
                acc = self.sums[k] = torch.zeros((), dtype=torch.float64, device=s.device)
            acc.add_(s)  # float64 += float64(s): computed in the result's dtype
            self.counts[k] = self.counts.get(k, 0) + v.numel()
            sums.append(s)
        with torch.no_grad():
            # per parameter a value that is non-finite iff it holds a NaN or inf (or overflows, as the sum of sums
            # checked before did): on an accelerator one fused L1 norm over all of them (a kernel or two, not one
            # per tensor); on the CPU their sums, which _foreach_norm's CPU path would loop over 3x slower
            norms = (torch._foreach_norm(self.params, 1) if self.fused else [p.sum() for p in self.params]) \
                if self.params else []
            values = [*sums, *norms]
        if not values:
            return
        values = torch.stack(values)  # [metrics + parameters], in the promoted dtype
        layout = self.layouts.setdefault(tuple((k, v.numel()) for k, v in metrics.items()), len(self.layouts))
        keep = torch.isfinite(values).all().logical_or_(self.first >= 0)  # all finite, or fired before
        self.first = torch.where(keep, self.first, float(step + 2**32 * layout))
        self.saved[layout] = torch.where(keep, self.saved.get(layout, values), values)

    def read(self, keys: list[str]) -> tuple[list[float], int | None]:
        """One host sync: the float sums of metrics ``keys`` and the step of the first non-finite one (None)."""
        import torch

        out = torch.cat([torch.stack([self.sums[k] for k in keys]), self.first.reshape(1)]) if keys else \
            self.first.reshape(1)
        values = out.tolist()
        first = int(values[-1])
        return values[:-1], (None if first < 0 else first)

    def reset(self) -> None:
        """A new log window: the metric sums start again; the guard's state stays until the next read."""
        self.sums, self.counts = {}, {}

    def diverged(self, first: int) -> tuple[int, str]:
        """The step and what was non-finite, from the guard's state ``first`` (:meth:`read`): the first non-finite
        metric of that step (a NaN or inf anywhere in a ``[k]`` metric makes its sum non-finite), else the first
        parameter whose values were not all finite."""
        step, layout = first % 2**32, first // 2**32
        names = next(n for n, i in self.layouts.items() if i == layout)
        values = self.saved[layout].tolist()
        for (name, count), value in zip(names, values):
            if not math.isfinite(value):
                return step, (f"{name} = {value}" if count == 1 else f"{name} (one of {count} updates of the step)")
        params = [f"{k}.{n}" for k, m in self.modules.items() for n, _ in m.named_parameters()]  # self.params' names
        bad = next(n for n, v in zip(params, values[len(names):]) if not math.isfinite(v))
        return step, f"weight {bad}"


def _compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from ``torch.compile`` (Dynamo, Inductor, or AOTAutograd refusing a double backward)."""
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")) or "torch.compile" in str(exc)


def _gather_states(state: Any, world: int) -> list:
    """Every rank's ``state`` (a per-rank extra's ``state_dict()``), in rank order, its tensors on the CPU: a
    collective, which every rank calls at the same step (a snapshot)."""
    import torch

    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    if world == 1:
        return [state]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, state)
    return out


def _rank_state(obj: Any, name: str, saved: Any, rank: int, world: int) -> Any:
    """This rank's state of the per-rank extra ``name`` from a checkpoint's list of every rank's: its own with
    as many workers as saved it, else what the object's ``reshard`` makes of them; a ConfigError when it has none."""
    if not (isinstance(saved, dict) and isinstance(saved.get("ranks"), list) and saved["ranks"]):
        raise ConfigError("checkpoint", f"extra.{name}", "not the per-rank state of this training (a checkpoint "
                          "of another version?): start the training afresh")
    states = saved["ranks"]
    if len(states) == world:
        return states[rank]
    reshard = getattr(type(obj), "reshard", None)
    if reshard is None:
        raise ConfigError("checkpoint", f"extra.{name}", f"saved by {len(states)} workers, each with its own part; "
                          f"it cannot be split over {world}: resume with {len(states)} workers")
    return reshard(states, rank, world)


def _extra_state(obj: Any, world: int) -> Any:
    return {"ranks": _gather_states(obj.state_dict(), world)} if getattr(obj, "per_rank", False) else obj.state_dict()


@dataclass
class Hooks:
    """What the loop reports: ``on_log(step, metrics, info)`` every ``log_every`` steps (rank 0; metrics
    averaged over the steps since the last log and over the ranks; info: epoch, seconds, seconds_per_epoch,
    samples_per_s and, when due, mmd_heldout), ``on_checkpoint(state, final)`` every ``checkpoint_every`` steps
    and at the end (every rank: with DDP each rank reports), ``on_first_step(step)`` once, after the first step
    this call of the loop ran (1-based: ``resume["step"] + 1`` when resumed; every rank)."""

    on_log: Callable[[int, dict[str, float], dict[str, float]], None] | None = None
    on_checkpoint: Callable[[dict, bool], None] | None = None
    on_first_step: Callable[[int], None] | None = None


def _all_reduce_mean(values: list[float], world: int, device) -> list[float]:
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def _heldout_mmd(model, heldout, n: int, seed: int) -> float:
    """MMD² (U, IMQ c=1, β=-1/2: the evaluate stage's kernel) between ``n`` model samples and the held-out rows."""
    import torch

    from stein_core.discrepancies import mmd
    from stein_core.kernels import IMQ

    gen = torch.Generator(device=heldout.device).manual_seed(seed * 31 + 5)  # the same z at every evaluation
    x = model.sample(n, generator=gen)
    return float(mmd(x.double(), heldout.double(), IMQ(c=1.0, beta=-0.5)))


def fit(
    family: Family,
    cfg,
    data,
    shape: tuple[int, ...],
    *,
    device,
    rank: int = 0,
    world: int = 1,
    wrap: Callable = lambda module: module,
    resume: dict | None = None,
    heldout=None,
    hooks: Hooks | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train ``family`` on ``data`` ``[n, d]`` (a tensor on ``device``; examples of ``shape`` flattened) -> the
    final training state.

    ``wrap`` turns each module with trainable parameters into what is trained (``ray.train.torch.prepare_model``
    for DDP; identity for one process); ``resume`` is a state from an earlier checkpoint; ``heldout`` a
    ``[m, d]`` tensor of held-out rows for ``train/mmd_heldout``; ``stop_after`` ends the loop after that step
    (a test's stand-in for a crash). Raises :class:`TrainingDiverged` naming the first step with a non-finite
    metric or weight, found at the next log or checkpoint boundary (the host reads the device only there) and
    before any checkpoint of a later step; ``cfg.compile`` runs the family's step under ``torch.compile``.
    """
    import torch

    if cfg.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.batch_size} is not a multiple of the {world} workers: every rank "
                         "takes an equal slice of the global batch")
    hooks = hooks or Hooks()
    n = data.shape[0]
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    modules = {k: m.to(device) for k, m in family.build(cfg, shape).items()}
    trainable = lambda m: family.ddp and any(p.requires_grad for p in m.parameters())  # noqa: E731
    trained = {k: (wrap(m) if trainable(m) else m) for k, m in modules.items()}
    optimizers = family.optimizers(cfg, modules)
    schedulers = {k: _scheduler(cfg, opt, family.lr_schedule(cfg, k)) for k, opt in optimizers.items()}
    extra = family.init_extra(cfg, modules)
    state = TrainState(modules=modules, trained=trained, optimizers=optimizers, extra=extra,
                       objective=family.objective(cfg, device))

    start, history, heldout_rows, train_seconds = 0, [], [], 0.0
    if resume is not None:
        for k, m in modules.items():
            m.load_state_dict(resume["modules"][k])
        for group, objs in (("optimizers", optimizers), ("schedulers", schedulers)):
            for k, obj in objs.items():
                obj.load_state_dict(resume[group][k])
        for k, obj in extra.items():  # a per-rank extra (MCMC chains): this rank's part, or a resharding of all
            saved = resume["extra"][k]
            obj.load_state_dict(_rank_state(obj, k, saved, rank, world) if getattr(obj, "per_rank", False) else saved)
        start, history = resume["step"], [dict(h) for h in resume["history"]]
        heldout_rows, train_seconds = [dict(h) for h in resume["heldout"]], float(resume["train_seconds"])
    steps_per_epoch = n / cfg.batch_size
    last_good = resume["step"] if resume is not None else None

    def snapshot(done: int) -> dict:
        # a deep copy: state_dict() shares storage with the live weights, which the next steps change in place
        return copy.deepcopy({
            "family": family.name, "step": done, "shape": list(shape), "n_train": n,
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "classes": {k: type(m).__name__ for k, m in modules.items()},
            "model_args": {k: dict(m.model_args) for k, m in modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "extra": {k: _extra_state(e, world) for k, e in extra.items()},
            "history": [dict(h) for h in history], "heldout": [dict(h) for h in heldout_rows],
            "train_seconds": train_seconds,
        })

    window = _Window(modules, device)
    # train.compile: the family's whole step under torch.compile, not each module's forward (nn.Module.compile, in
    # place). Dynamo breaks the step's graph at the generator draws, backward and ``item()``, and compiles what lies
    # between (the loss around the network, with the network's forward and backward) and the frames the step calls
    # (the optimiser's and the EMA's updates). Side by side on a shared 2-core CPU (bench/bench_training_loop.py
    # --compile --modules; steps/s, eager / step compiled / modules compiled): ncsn's MLP on gmm2d 166 / 251 / 178,
    # its conv U-Net on digits 13.0 / 15.9 / 15.2. The step is faster in both, and pays a longer compilation (with
    # Inductor's disk cache warm: 2-5 s against 0.2 s for the MLP, 15 s against 1 s for the U-Net; the optimiser's
    # step is compiled too). The modules are not touched: their state_dict keys, the checkpoints and the EMA stay.
    run_step = torch.compile(family.step) if cfg.compile else family.step

    def look(keys: list[str], cause: BaseException | None = None) -> list[float]:
        """The host's look at the device (the one sync of a boundary): the sums of metrics ``keys``. Raises
        :class:`TrainingDiverged` when a step since the last look held a non-finite metric or weight."""
        values, first = window.read(keys)
        if first is not None:
            bad, what = window.diverged(first)
            where = f"the last good checkpoint is step {last_good}" if last_good is not None else "no checkpoint was written before it"
            raise TrainingDiverged(f"training diverged at step {bad}: non-finite {what}; {where}") from cause
        return values

    count = 0  # loop steps since the last log
    window_seconds = 0.0
    final = snapshot(start)
    end = cfg.n_steps if stop_after is None else min(cfg.n_steps, stop_after)
    for step in range(start, end):
        t0 = time.perf_counter()
        gen = step_generator(cfg.seed, step, device)
        draw = lambda gen=gen: data[torch.randint(n, (cfg.batch_size,), generator=gen, device=device)]  # noqa: E731
        batch = draw()
        ctx = StepContext(step=step, rank=rank, world=world, generator=gen, device=device, draw=draw)
        try:
            metrics = run_step(state, batch, ctx, cfg)
        except Exception as exc:
            # A step after a non-finite one the host has not seen yet may fail on its NaNs (a sampler that refuses
            # NaN probabilities): the divergence is the error to report.
            look([], cause=exc)
            if cfg.compile and _compile_error(exc):
                first = next(iter(str(exc).strip().splitlines()), "")
                raise ConfigError("train", "compile", f"torch.compile failed on the {family.name} family's step "
                                  f"({type(exc).__name__}: {first}); set train.compile: false to train "
                                  "uncompiled") from exc
            raise
        for s in schedulers.values():
            s.step()
        done = step + 1
        window.add(done, metrics)
        count += 1
        log_due = done % cfg.log_every == 0 or done == cfg.n_steps
        checkpoint_due = done % cfg.checkpoint_every == 0 or done == cfg.n_steps
        if log_due or checkpoint_due or done == end:  # no checkpoint is taken of a state the guard has not passed
            keys = sorted(window.sums) if log_due else []
            sums = dict(zip(keys, look(keys)))
        dt = time.perf_counter() - t0  # with the boundary's sync: on a GPU the steps' work is done by then
        train_seconds += dt
        window_seconds += dt
        if step == start and hooks.on_first_step is not None:
            hooks.on_first_step(done)
        if log_due:
            means = dict(zip(keys, _all_reduce_mean([sums[k] / window.counts[k] for k in keys], world, device)))
            info = {
                "epoch": done / steps_per_epoch, "seconds": train_seconds,
                "seconds_per_epoch": window_seconds / count * steps_per_epoch,
                "samples_per_s": count * cfg.batch_size / max(window_seconds, 1e-12),
            }
            history.append({"step": done, **means})
            if rank == 0 and heldout is not None and cfg.heldout_every and done % cfg.heldout_every == 0:
                live = family.live_model(state, cfg, shape)
                if live is not None:
                    info["mmd_heldout"] = _heldout_mmd(live, heldout, cfg.heldout_n, cfg.seed)
                    heldout_rows.append({"step": done, "epoch": info["epoch"], "seconds": train_seconds,
                                         "mmd_heldout": info["mmd_heldout"]})
            if rank == 0 and hooks.on_log is not None:
                hooks.on_log(done, means, info)
            window.reset()
            count, window_seconds = 0, 0.0
        if checkpoint_due:
            final = snapshot(done)
            last_good = done
            if hooks.on_checkpoint is not None:
                hooks.on_checkpoint(final, done == cfg.n_steps)
    return final if stop_after is None or end == cfg.n_steps else snapshot(end)


# ---------------------------------------------------------------------------------------------- Ray Train


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train (DDP) worker around :func:`fit`. ``config``: family, train (the section as a dict),
    data_path, heldout_path, threads, mlflow run_id/uri. Rank 0 prints progress and logs every metric into the
    driver's MLflow run against the step; every rank reports checkpoints (a restarted worker group resumes from
    the last one). An error that no retry can mend (divergence: a retry from the last checkpoint diverges again;
    a ConfigError: bad input data) is reported, not raised, and :func:`fatal_error` turns it back into the error
    on the driver."""
    import ray.train
    import ray.train.torch
    import torch

    from tasks.data.io import read_dataset

    family = FAMILIES[config["family"]]
    cfg = family.config.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # resuming after a worker-group failure
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
        if rank == 0:
            print(f"[train] resuming from the checkpoint of step {resume['step']}/{cfg.n_steps}", flush=True)

    client = None
    if rank == 0 and config.get("mlflow_run_id"):
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=config["mlflow_tracking_uri"])

    # Where the ranks run: the Ray node id of each, gathered over the process group (a collective: every rank takes
    # part), printed by rank 0 and kept as the tag ``ray.worker_nodes`` (ids by rank, comma-separated; the latest
    # attempt's after a restart). No tensor of the training is touched, and fit() seeds torch itself.
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, nodes[0])
        nodes = [str(n) for n in gathered]
    if rank == 0:
        print(f"[train] {world} worker(s) on {len(set(nodes))} Ray node(s); node by rank: "
              f"{', '.join(n[:12] for n in nodes)}", flush=True)
        if client is not None:
            client.set_tag(config["mlflow_run_id"], "ray.worker_nodes", ",".join(nodes))

    def on_log(step: int, metrics: dict[str, float], info: dict[str, float]) -> None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in {**metrics, **({"mmd_heldout": info["mmd_heldout"]} if "mmd_heldout" in info else {})}.items())
        print(f"[train] step {step}/{cfg.n_steps}  {shown}  epoch {info['epoch']:.2f}  "
              f"{info['samples_per_s']:,.0f} samples/s", flush=True)
        if client is not None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            values = {f"train/{k}": v for k, v in metrics.items()} | {
                f"train/{k}": v for k, v in info.items() if k != "seconds"} | {"train/elapsed_seconds": info["seconds"]}
            client.log_batch(config["mlflow_run_id"], metrics=[Metric(k, float(v), ts, step) for k, v in values.items()])

    def on_first_step(step: int) -> None:
        if rank == 0 and resume is not None:  # what a resumed worker really ran first (tests hold it to the checkpoint)
            print(f"[train] resumed: first step run {step}/{cfg.n_steps}", flush=True)

    def on_checkpoint(state: dict, final: bool) -> None:
        metrics = {"step": state["step"]}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    try:
        dataset = read_dataset(config["data_path"])
        heldout = None
        if rank == 0 and cfg.heldout_every and config.get("heldout_path"):
            heldout = torch.from_numpy(read_dataset(config["heldout_path"]).x[: cfg.heldout_n]).to(device)
        fit(family, cfg, torch.from_numpy(dataset.x).to(device), dataset.shape, device=device, rank=rank,
            world=world, wrap=ray.train.torch.prepare_model, resume=resume, heldout=heldout,
            hooks=Hooks(on_log, on_checkpoint, on_first_step))
    except (TrainingDiverged, ConfigError) as exc:
        # Train V2 hands the driver only the metrics of the latest *checkpoint*, and retries a raised error: the
        # verdict travels as a marker checkpoint (no state), and the checkpoints before it stay the last good ones.
        verdict = {FATAL: type(exc).__name__, "message": str(exc)}
        if isinstance(exc, ConfigError):
            verdict |= {"path": exc.path, "key": exc.key or "", "message": exc.message}
        if rank != 0:
            ray.train.report(verdict)
            return
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / FATAL).write_text(json.dumps(verdict) + "\n")
            ray.train.report(verdict, checkpoint=ray.train.Checkpoint.from_directory(d))


def fatal_error(metrics: dict[str, Any] | None) -> Exception | None:
    """The error a worker reported through :func:`train_loop_per_worker`'s marker checkpoint, rebuilt, or None."""
    metrics = metrics or {}
    kind = metrics.get(FATAL)
    if kind == "ConfigError":
        return ConfigError(metrics["path"], metrics["key"] or None, metrics["message"])
    if kind == "TrainingDiverged":
        return TrainingDiverged(metrics["message"])
    return None
