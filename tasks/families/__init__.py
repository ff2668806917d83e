"""The model families: one module each, registered here by name (the ``family:`` key of a train section).

Adding a family: a module in this folder with its train section (a subclass of ``tasks.config.TrainBase`` with
``family: Literal["<name>"]``) and a :class:`~tasks.families.base.Family` subclass, and one line in
``_FAMILY_CLASSES`` below. The training loop, the stages, DVC, MLflow and the CLI need no change.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from tasks.config import UNION_TAGS, ConfigError
from tasks.families.agd import AGDFamily
from tasks.families.base import Family, Model, StepContext, TrainState
from tasks.families.mmd import MMDFamily
from tasks.families.ncsn import NCSNFamily

_FAMILY_CLASSES: tuple[type[Family], ...] = (NCSNFamily, AGDFamily, MMDFamily)

#: Every family by its ``family:`` name.
FAMILIES: dict[str, Family] = {cls.name: cls() for cls in _FAMILY_CLASSES}
UNION_TAGS.update(FAMILIES)

#: A train section, chosen by its ``family`` key.
TrainSection = Annotated[
    NCSNFamily.config | AGDFamily.config | MMDFamily.config, Field(discriminator="family")
]

__all__ = ["FAMILIES", "Family", "Model", "StepContext", "TrainSection", "TrainState", "get_family", "load_model",
           "model_checkpoint", "model_payload", "module_checkpoint"]


def get_family(name: str, where: str | Path = "checkpoint") -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(where, "family", f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def model_checkpoint(family: str, weights: Mapping[str, Any], classes: Mapping[str, str],
                     model_args: Mapping[str, Any], *, shape, step: int = 0, **extra: Any) -> dict[str, Any]:
    """A model checkpoint: the family, each module's weights, class name and constructor arguments (so it loads
    with ``weights_only=True`` and instantiates only the family's own classes), the example shape, the training
    step, and the family's extra plain data (a score network's noise ladder)."""
    return {"family": family, "modules": dict(weights), "classes": dict(classes), "model_args": dict(model_args),
            "shape": list(shape), "step": int(step), **extra}


def module_checkpoint(family: str, modules: Mapping[str, Any], *, shape, step: int = 0, **extra: Any) -> dict[str, Any]:
    """:func:`model_checkpoint` of live modules (tests and tools that build a model by hand)."""
    return model_checkpoint(family, {k: m.state_dict() for k, m in modules.items()},
                            {k: type(m).__name__ for k, m in modules.items()},
                            {k: dict(m.model_args) for k, m in modules.items()}, shape=shape, step=step, **extra)


def model_payload(family: Family, cfg, state: Mapping[str, Any]) -> dict[str, Any]:
    """A training state -> its model checkpoint, with the weights the family samples with and its train section."""
    exported = family.export(cfg, state)
    weights = exported.pop("weights")
    return model_checkpoint(family.name, weights, state["classes"], state["model_args"], shape=state["shape"],
                            step=state["step"], train_config=cfg.model_dump(), **exported)


def load_model(path: str | Path, *, device: str = "cpu", sampler=None) -> Model:
    """The model in a checkpoint written by the train stage, ready to sample (with the sample section
    ``sampler``, or the family's default) and, where its family has one, to score."""
    from tasks.io import load_checkpoint

    ckpt = load_checkpoint(path)
    if "family" not in ckpt or "modules" not in ckpt:
        raise ConfigError(path, "family", "not a model checkpoint of this project (no family/modules): rerun the train stage")
    family = get_family(ckpt["family"], path)
    if sampler is not None and sampler.sampler not in family.samplers:
        raise ConfigError(path, "sampler", f"a {family.name} model cannot be sampled with {sampler.sampler!r} "
                          f"(options: {', '.join(sorted(family.samplers))})")
    return family.load(ckpt, device=device, sampler=sampler)
