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
    is one example's shape), and ``score(x)`` -> ``[n, d]`` where the family has a score (else None)."""

    shape: tuple[int, ...]
    score: Callable | None = None

    def sample(self, n: int, *, generator, callback: Callable[[int], None] | None = None):
        """``n`` samples; ``callback(k)`` reports progress in ``ticks(n)`` ticks."""
        raise NotImplementedError

    def ticks(self, n: int) -> int:
        """Progress ticks of one ``sample(n)`` call."""
        return 1


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


def build_from_checkpoint(ckpt, name: str, allowed: tuple[str, ...]):
    """Module ``name`` of a model checkpoint: its class (one of ``allowed``, from ``stein_core``) rebuilt from
    its constructor arguments, with the checkpoint's weights loaded.

    The arguments come from a file: before any storage is allocated they must bind to the constructor, build on
    the meta device, stay under :data:`MAX_PARAMETERS` and give the checkpoint's tensor shapes; any of these
    failing is a :class:`ConfigError` naming the key (a 400 KB file asked for ``hidden=10**6``: terabytes)."""
    import inspect

    from stein_core import nets
    from tasks.config.sections import ConfigError, short_repr

    cls = ckpt.get("classes", {}).get(name)
    if cls not in allowed:
        raise ConfigError("checkpoint", f"classes.{name}", f"{short_repr(cls)} is not a network of this family ({', '.join(allowed)})")
    ctor = getattr(nets, cls)
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


class Family:
    """Base of the model families; subclasses set the class attributes and implement build/step/load."""

    name: ClassVar[str]
    config: ClassVar[type[TrainBase]]
    #: the sample sections (``sampler:`` values) this family's models can be drawn with
    samplers: ClassVar[frozenset[str]]
    #: whether a loaded model has ``score(x)`` (metrics such as ``ksd_model`` need it)
    has_score: ClassVar[bool] = False
    #: whether it is a noise-conditional score network (``score_field`` plots its field at several noise levels)
    noise_conditional: ClassVar[bool] = False
    #: the step metric drawn in ``plots/<pipeline>/train_loss.csv``'s DVC plot
    loss_key: ClassVar[str]

    def build(self, cfg: TrainBase, shape: tuple[int, ...]) -> dict[str, Any]:
        """The named modules for examples of ``shape``; each has ``model_args`` (its constructor arguments)."""
        raise NotImplementedError

    def optimizers(self, cfg: TrainBase, modules: Mapping[str, Any]) -> dict[str, Any]:
        """One Adam per module at ``cfg.lr`` (families with other needs override)."""
        import torch

        return {name: torch.optim.Adam(m.parameters(), lr=cfg.lr) for name, m in modules.items()}

    def init_extra(self, cfg: TrainBase, modules: Mapping[str, Any]) -> dict[str, Any]:
        """Extra training state saved in checkpoints (objects with state_dict/load_state_dict)."""
        return {}

    def objective(self, cfg: TrainBase, device) -> Any:
        """Built once per run and passed to every step as ``state.objective``: the family's loss function from
        its ``stein_core`` factory (built once, not per step: constants such as a noise ladder live in it)."""
        return None

    def step(self, state: TrainState, batch, ctx: StepContext, cfg: TrainBase) -> dict[str, Any]:
        """One optimisation step on the global minibatch ``batch`` ``[B, d]`` -> named 0-dim tensors."""
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
