"""What a model family is: the plug-in that the one training loop, the sample stage and the evaluate stage call.

A family (one module in this folder) says how to build its modules from its train section, how to take one
training step (any number of modules and optimisers; it returns named scalar metrics), what a checkpoint holds
beyond the weights, and how a checkpoint becomes a :class:`Model` that samples and, where the family has one,
scores. Everything else (the Ray Train loop, DDP, minibatches, checkpoints and resume, the non-finite guard,
MLflow logging, the stages) is written once in :mod:`tasks.stages.train.loop` and the stage modules.

Distributed training contract. Every rank sees the whole *global* minibatch (drawn from the step's generator,
the same on every rank) and the same step generator; ``ctx.local(t)`` is the rank's slice of a global tensor.
A loss that is a mean of per-example terms is computed on the local slice (DDP averages the gradients over the
ranks: the global mean). A loss that couples the examples of a batch (a kernel matrix over all of them) is
computed on ``ctx.gather(local_rows)``, the global batch whose local rows carry the gradient, and scaled by
``ctx.world`` (DDP's average of the ranks' partial gradients is then the full gradient). Either way N workers
take the step one worker takes with the global batch.

Models of several modules trained against each other (a generator and a critic, a base and an energy) grow the
contract in four ways, each available to every family:

- **Alternating updates.** One loop step is one update of the family's main module, preceded by as many updates
  of the others as the family's schedule says at that step (a function of the step number alone, so resume and
  DDP see the same schedule). Each update draws its own global batch with ``ctx.draw()``, from the step's
  generator: every batch stays a pure function of (seed, step). A metric may be a vector of one value per
  update (``[k]``): the loop averages every metric over the updates that reported it, not over loop steps.
- **Per-module optimisers and schedules.** :meth:`Family.optimizers` builds one optimiser per module (learning
  rate, Adam betas) and :meth:`Family.lr_schedule` names each one's schedule.
- **Learnable scalars** (a log-partition) are modules of their own (``stein_core.critics.Scalar``): saved,
  restored, optimised and checked for non-finite values like any network.
- **Gradient penalties under DDP.** Double backward through a DDP-wrapped module has known pitfalls (DDP's
  reducer fires on the first backward pass; ``torch.autograd.grad`` with ``create_graph`` is outside what it
  supports), so a family may set ``ddp = False``: the loop then leaves its modules unwrapped and the family
  reduces the gradients itself, ``ctx.average_gradients(module)`` after a backward of a mean of per-example
  terms, or ``ctx.backward_coupled(...)`` and ``ctx.sum_gradients(module)`` for a loss that couples the examples
  of the global batch and needs exact cross-rank terms (a gradient penalty on a witness built from every row).

Training state of a rank's own (persistent MCMC chains, each rank owning its slice of them) is **per-rank**: an
extra-state object with ``per_rank = True`` has its ``state_dict()`` taken on every rank and saved as the list of
the ranks' states, and each rank gets its own back on resume. With another number of workers the object's
``reshard(states, rank, world)`` (a static method; absent: the resume is refused with the worker counts named)
builds this rank's state from every saved one, so the chains continue as one process would continue them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tasks.config.sections import TrainBase


@dataclass
class StepContext:
    """Where a training step runs: its number, the rank and world size, the step's generator (a pure function
    of the seed and the step, identical on every rank) and the device."""

    step: int
    rank: int
    world: int
    generator: Any  # torch.Generator
    device: Any
    #: another global minibatch ``[B, d]`` drawn from ``generator`` (an alternating update's own batch)
    draw: Callable[[], Any] | None = None

    def local(self, t):
        """Rows ``[rank * b, (rank + 1) * b)`` of a global-batch tensor ``[B, ...]`` (b = B / world)."""
        if self.world == 1:
            return t
        b = t.shape[0] // self.world
        return t[self.rank * b:(self.rank + 1) * b]

    def gather(self, x_local):
        """The global batch ``[B, ...]`` from every rank's rows ``[b, ...]``: the other ranks' rows as values
        (all_gather), this rank's rows as the live tensor, so gradients flow to this rank's rows only."""
        if self.world == 1:
            return x_local
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(x_local) for _ in range(self.world)]
        dist.all_gather(parts, x_local.detach().contiguous())
        parts[self.rank] = x_local
        return torch.cat(parts)

    def _grads(self, module) -> list:
        return [p.grad for p in module.parameters() if p.grad is not None]

    def _all_reduce(self, tensors: list, scale: float) -> None:
        """Sum ``tensors`` over the ranks in place (one flat all-reduce), then multiply by ``scale``."""
        if self.world == 1 or not tensors:
            return
        import torch
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat.mul_(scale)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def average_gradients(self, *modules) -> None:
        """Average the gradients of ``modules`` over the ranks (what DDP does), for an unwrapped module whose loss
        is a mean of per-example terms over this rank's slice."""
        self._all_reduce([g for m in modules for g in self._grads(m)], 1.0 / self.world)

    def sum_gradients(self, *modules) -> None:
        """Sum the gradients of ``modules`` over the ranks: after :meth:`backward_coupled`, whose per-rank parts add
        up to the global loss's gradient."""
        self._all_reduce([g for m in modules for g in self._grads(m)], 1.0)

    def backward_coupled(self, rows: list, loss_fn: Callable[[list], Any]):
        """Backward of a loss that couples the rows of the global batch, exactly under data parallelism.

        ``rows``: this rank's rows ``[b, ...]`` of tensors computed from its slice (features of its examples);
        ``loss_fn(global_rows) -> []``: this rank's share of the global loss, given the global tensors ``[B, ...]``
        (the shares of the ranks add up to the global loss; a term over every row, such as an MMD², is divided by
        ``ctx.world``, and a mean of per-example terms over this rank's own rows is divided by the global count).
        Every rank computes the gradient of its share with respect to *all* rows, the ranks sum these, and each
        rank sends the sum's slice of its own rows back through its own graph: cross-rank terms (row j of one
        rank in the share of another) are kept. Then :meth:`sum_gradients` gives every rank the global gradient.
        Returns this rank's share (detached)."""
        import torch

        if self.world == 1:
            loss = loss_fn(list(rows))
            loss.backward()
            return loss.detach()
        import torch.distributed as dist

        leaves = []
        for r in rows:
            parts = [torch.empty_like(r) for _ in range(self.world)]
            dist.all_gather(parts, r.detach().contiguous())
            leaves.append(torch.cat(parts).requires_grad_(True))
        loss = loss_fn(leaves)
        loss.backward()  # the direct terms into the parameters, and d(share)/d(every row) into the leaves
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        self._all_reduce(grads, 1.0)
        live = [(r, g[self.rank * r.shape[0]:(self.rank + 1) * r.shape[0]]) for r, g in zip(rows, grads) if r.requires_grad]
        if live:
            torch.autograd.backward([r for r, _ in live], [g for _, g in live])
        return loss.detach()


@dataclass
class TrainState:
    """The modules of a run as trained (``trained``: DDP-wrapped where distributed), the same modules unwrapped
    (``modules``: what is saved and sampled), their optimisers, and the family's extra state (objects with
    ``state_dict``/``load_state_dict``, such as an EMA of the weights)."""

    modules: dict[str, Any]
    trained: dict[str, Any]
    optimizers: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    objective: Any = None  # what Family.objective built once for the run


class Model:
    """A trained model loaded for use: ``sample(n, generator=...)`` -> ``[n, d]`` (examples flattened; ``shape``
    is one example's shape), and ``score(x)`` -> ``[n, d]`` where the family has a score (else None). A model of an
    unnormalised family (:attr:`Family.unnormalised`) also has ``energy(x)`` -> ``[n]`` (density ∝ exp(−E)), its
    learned ``log_normaliser`` where it learns one (NCE's c: log p = −E − c), and ``chain_start`` (the replay
    buffer ``[m, d]`` of persistent-chain training, where there is one)."""

    shape: tuple[int, ...]
    score: Callable | None = None
    log_normaliser: float | None = None
    chain_start: Any = None

    def sample(self, n: int, *, generator, callback: Callable[[int], None] | None = None):
        """``n`` samples; ``callback(k)`` reports progress in ``ticks(n)`` ticks."""
        raise NotImplementedError

    def ticks(self, n: int) -> int:
        """Progress ticks of one ``sample(n)`` call."""
        return 1

    def diagnostics(self) -> dict[str, float]:
        """What the sampler measured over the ``sample`` calls so far (a Metropolis chain's acceptance rate), for
        the sample stage's metrics; empty when it measures nothing."""
        return {}


#: The most numbers (weights and buffers) one module may hold: 2^28, 1 GiB of float32. The shipped configs' largest
#: network holds 196,481 (digits' score net); ``hidden: 65536`` with 2 layers asked for 1.7 * 10^10, 64 GiB.
MAX_PARAMETERS = 2**28


def meta_shapes(build: Callable[[], Mapping[str, Any]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """The shape of every tensor of the state of each module ``build()`` returns, built on PyTorch's meta device:
    shapes without storage, so a size no machine holds is measured, not allocated."""
    import torch

    with torch.device("meta"):
        modules = build()
    return {k: {n: tuple(t.shape) for n, t in m.state_dict().items()} for k, m in modules.items()}


def shape_mismatch(want: Mapping[str, tuple[int, ...]], saved: Any) -> tuple[str, Any, Any] | None:
    """The first tensor where a saved state (a module's ``state_dict`` from a file, or not even a mapping) differs
    from the shapes ``want`` (:func:`meta_shapes`): ``(key, saved shape or 'absent', wanted shape or 'absent')``;
    None when every key and shape agrees."""
    got = {k: tuple(getattr(v, "shape", ())) for k, v in saved.items()} if isinstance(saved, dict) else {}
    if want == got:
        return None
    key = (sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]])[0]
    return key, got.get(key, "absent"), want.get(key, "absent")


def too_large(shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> str | None:
    """What is wrong with modules of these state shapes (:func:`meta_shapes`; :data:`MAX_PARAMETERS`), or None."""
    for name, tensors in shapes.items():
        n = sum(math.prod(s) for s in tensors.values())
        if n > MAX_PARAMETERS:
            return (f"module {name!r} would hold {n:,} numbers ({4 * n / 2**30:,.0f} GiB of float32); a model here "
                    f"holds at most {MAX_PARAMETERS:,} (1 GiB): choose a smaller network")
    return None


def build_from_checkpoint(ckpt, name: str, allowed: tuple[str | type, ...]):
    """Module ``name`` of a model checkpoint: its class (one of ``allowed``: classes, or names of classes of
    ``stein_core.nets``) rebuilt from its constructor arguments, with the checkpoint's weights loaded.

    The arguments come from a file: before any storage is allocated they must bind to the constructor, build on
    the meta device, stay under :data:`MAX_PARAMETERS` and give the checkpoint's tensor shapes; any of these
    failing is a :class:`ConfigError` naming the key (a 400 KB file asked for ``hidden=10**6``: terabytes)."""
    import inspect

    from stein_core import nets
    from tasks.config.sections import ConfigError, short_repr

    classes = {c if isinstance(c, str) else c.__name__: (getattr(nets, c) if isinstance(c, str) else c) for c in allowed}
    cls = ckpt.get("classes", {}).get(name)
    if not isinstance(cls, str) or cls not in classes:
        raise ConfigError("checkpoint", f"classes.{name}", f"{short_repr(cls)} is not a network of this family ({', '.join(classes)})")
    ctor = classes[cls]
    args = ckpt.get("model_args", {}).get(name)
    key = f"model_args.{name}"
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ConfigError("checkpoint", key, f"expected the constructor arguments of {cls}, got {short_repr(args)}")
    try:
        inspect.signature(ctor).bind(**args)
    except TypeError as exc:
        raise ConfigError("checkpoint", key, f"not arguments of {cls}: {exc}") from None
    try:
        shapes = meta_shapes(lambda: {name: ctor(**args)})
    except Exception as exc:  # noqa: BLE001 - a wrong type or value in the file, whatever the constructor raises
        raise ConfigError("checkpoint", key, f"{cls}({short_repr(args)}) cannot be built: {exc}") from None
    if (why := too_large(shapes)) is not None:
        raise ConfigError("checkpoint", key, why)
    saved = ckpt.get("modules", {}).get(name)
    if (diff := shape_mismatch(shapes[name], saved)) is not None:
        key, got, want = diff
        raise ConfigError("checkpoint", f"modules.{name}", f"the weights do not fit {cls}({short_repr(args)}) at "
                          f"{key!r}: saved {got}, built {want}")
    net = ctor(**args)
    net.load_state_dict(saved)
    return net


#: The samplers that need only a model's score: every family with ``has_score`` can be drawn with them, besides its
#: own :attr:`Family.samplers` (:func:`tasks.families.loading.load_model` wraps its model, :mod:`tasks.families._svgd`).
SCORE_SAMPLERS = frozenset({"svgd"})
#: The samplers that need only a model's energy: every :attr:`Family.unnormalised` family can be drawn with them
#: (:mod:`tasks.families._mcmc`).
ENERGY_SAMPLERS = frozenset({"mcmc"})


class Family:
    """Base of the model families; subclasses set the class attributes and implement build/step/load."""

    name: ClassVar[str]
    config: ClassVar[type[TrainBase]]
    #: the sample sections (``sampler:`` values) this family's models can be drawn with
    samplers: ClassVar[frozenset[str]]
    #: whether a loaded model has ``score(x)`` (metrics such as ``ksd_model`` need it)
    has_score: ClassVar[bool] = False
    #: whether a loaded model (with its family's own sampler) has ``energy(x)`` (the ``energy`` plot draws it)
    has_energy: ClassVar[bool] = False
    #: whether a loaded model (with no sampler) is an energy-based model: ``energy(x)`` with density ∝ exp(−E(x)) and
    #: ``score = −∇E`` (``sampler: mcmc`` draws from it; ``model_log_likelihood`` normalises it on a grid)
    unnormalised: ClassVar[bool] = False
    #: whether it is a noise-conditional score network (``score_field`` plots its field at several noise levels)
    noise_conditional: ClassVar[bool] = False
    #: the step metric drawn in ``plots/<pipeline>/train_loss.csv``'s DVC plot
    loss_key: ClassVar[str]
    #: whether the loop wraps the modules in DDP; False: the family's step reduces its gradients itself
    #: (``StepContext.average_gradients``/``backward_coupled``), as double backward needs
    ddp: ClassVar[bool] = True

    def sampler_options(self) -> frozenset[str]:
        """Every ``sampler:`` this family's models can be drawn with: its own :attr:`samplers`, and
        :data:`SCORE_SAMPLERS` where its models have a score."""
        return (self.samplers | (SCORE_SAMPLERS if self.has_score else frozenset())
                | (ENERGY_SAMPLERS if self.unnormalised else frozenset()))

    def sampler_refusal(self, sampler: str) -> str | None:
        """Why a sample section with ``sampler: <sampler>`` cannot draw from this family's models (None: it can)."""
        options = self.sampler_options()
        if sampler in options:
            return None
        why = f" ({sampler} runs on the model's score, and a {self.name} model has none)" \
            if sampler in SCORE_SAMPLERS else \
            f" ({sampler} runs on the model's energy, and a {self.name} model is not an energy-based model)" \
            if sampler in ENERGY_SAMPLERS else ""
        return (f"a {self.name} model cannot be sampled with {sampler!r}{why} "
                f"(options: {', '.join(sorted(options)) or 'none'})")

    def build(self, cfg: TrainBase, shape: tuple[int, ...]) -> dict[str, Any]:
        """The named modules for examples of ``shape``; each has ``model_args`` (its constructor arguments)."""
        raise NotImplementedError

    def optimizers(self, cfg: TrainBase, modules: Mapping[str, Any]) -> dict[str, Any]:
        """One Adam per module at ``cfg.lr`` (a ``OneOptimizerTrain`` section; families with other needs override)."""
        import torch

        return {name: torch.optim.Adam(m.parameters(), lr=cfg.lr) for name, m in modules.items()}

    def lr_schedule(self, cfg: TrainBase, name: str) -> str:
        """The learning-rate schedule of module ``name``'s optimiser (``cosine`` or ``constant``; one scheduler
        step per loop step); by default the ``OneOptimizerTrain`` section's one schedule."""
        return cfg.lr_schedule

    def init_extra(self, cfg: TrainBase, modules: Mapping[str, Any]) -> dict[str, Any]:
        """Extra training state saved in checkpoints (objects with state_dict/load_state_dict)."""
        return {}

    def objective(self, cfg: TrainBase, device) -> Any:
        """Built once per run and passed to every step as ``state.objective``: the family's loss function from
        its ``stein_core`` factory (built once, not per step: constants such as a noise ladder live in it)."""
        return None

    def step(self, state: TrainState, batch, ctx: StepContext, cfg: TrainBase) -> dict[str, Any]:
        """One loop step on the global minibatch ``batch`` ``[B, d]`` (more with ``ctx.draw()``) -> named metrics:
        0-dim tensors, or ``[k]`` tensors of one value per update of a kind the step took k times (averaged by the
        loop over the updates that reported them)."""
        raise NotImplementedError

    def export(self, cfg: TrainBase, state: dict) -> dict[str, Any]:
        """A training state -> the weights to sample with (``{module: state_dict}``) and extra plain data
        stored beside them in the checkpoint."""
        return {"weights": state["modules"]}

    def load(self, ckpt: Mapping[str, Any], *, device: str = "cpu", sampler=None) -> Model:
        """A checkpoint (see :func:`tasks.families.model_checkpoint`) -> a :class:`Model`; ``sampler`` is the sample
        section to draw with (None: the family's default)."""
        raise NotImplementedError

    def live_model(self, state: TrainState, cfg: TrainBase, shape: tuple[int, ...]) -> Model | None:
        """The model as it is during training, for the held-out MMD along training (None: not supported)."""
        return None


def draw_in_batches(n: int, batch_size: int, run_chains: Callable):
    """``run_chains(m) -> [m, d]`` on consecutive batches of at most ``batch_size`` -> ``[n, d]`` on the CPU (the
    batches draw from whatever generator ``run_chains`` holds, in order): how the sample stage and the Ray tasks
    that evaluate training checkpoints draw from a :class:`Model`."""
    import torch

    return torch.cat([run_chains(min(batch_size, n - start)).detach().cpu() for start in range(0, n, batch_size)])
