"""The model families: one module each, registered here by name (the ``family:`` key of a train section).

Adding a family: a module ``<name>.py`` in this folder with its train section (a subclass of
``tasks.config.sections.TrainBase`` with ``family: Literal["<name>"]``), a :class:`~tasks.families.base.Family`
subclass named ``<name>``, and ``FAMILY = <the subclass>()`` at its end. Nothing else changes: not this file, the
training loop, the stages, DVC, MLflow or the CLI. Modules whose names start with ``_`` and those in
:data:`SHARED` are helpers the families share, not families.

A family's module is imported when a pipeline first asks for that family (:data:`FAMILIES` is a lazy mapping):
a stage imports the family its config names and no other, so DVC lists that module among the stage's code deps
(``flows.code_deps``), and adding or editing another family reruns nothing of this pipeline.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tasks.config.sections import ConfigError
from tasks.families.base import Family, Model, StepContext, TrainState

#: Modules of this folder that are not families: what the families share.
SHARED = frozenset({"base", "loading"})


def _family_names() -> tuple[str, ...]:
    """The family modules of this folder, in a fixed order (the first three as they were registered)."""
    found = {m.stem for m in Path(__file__).parent.glob("*.py") if not m.stem.startswith("_") and m.stem not in SHARED}
    first = [n for n in ("ncsn", "agd", "mmd") if n in found]
    return (*first, *sorted(found - set(first)))


class _Families(Mapping[str, Family]):
    """Family name -> :class:`Family`, importing a family's module (``tasks.families.<name>``) on first access."""

    def __init__(self):
        self._names: tuple[str, ...] | None = None
        self._loaded: dict[str, Family] = {}

    def _all(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = _family_names()
        return self._names

    def __getitem__(self, name: str) -> Family:
        if name not in self._loaded:
            if name not in self._all():
                raise KeyError(name)
            family = importlib.import_module(f"{__name__}.{name}").FAMILY
            if family.name != name:
                raise RuntimeError(f"{__name__}.{name}.FAMILY is named {family.name!r}: a family's module bears its name")
            self._loaded[name] = family
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


#: Every family by its ``family:`` name (lazy: ``FAMILIES[name]`` imports that family's module alone).
FAMILIES: Mapping[str, Family] = _Families()

__all__ = ["FAMILIES", "Family", "Model", "StepContext", "TrainState", "get_family", "model_checkpoint",
           "model_payload", "module_checkpoint"]


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
