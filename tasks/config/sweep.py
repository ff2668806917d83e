"""The root config of a sweep pipeline (``ica-small``, ``ica``): one synthetic ICA dataset per (dimension, seed)
and one model per (method, dimension, seed), a *cell*; the evaluate stage tables the cells.

``conf/<pipeline>.yaml``::

    prepare:   {source: ica, dims: [10, 20], seeds: [0], n_train: 20000, n_test: 5000, ...}
    methods:                       # one train stage per method, <pipeline>-train-<method>
      ksd:     {family: ksd, batch_size: 100, n_steps: 15000, lr: 0.001, model: {kind: ica}}
      lsd:     {family: lsd, ...}
    evaluate:  {}

Each method is a train section of its family (validated by that family's model, like a generative pipeline's
``train``); its cells train it on every dataset, with the cell's seed as the training seed. Where the artifacts
live: :class:`SweepPaths`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from tasks.config.paths import Paths
from tasks.config.sections import KeyedError, Seed, TrainBase, _Section, describe_error, short_repr
from tasks.families import FAMILIES

#: A method's name: it becomes part of stage names, file names and metric keys.
METHOD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class ICAPrepare(_Section):
    """Synthetic ICA data x = W z (``stein_core.ica``): for every dimension and seed, a random mixing W with
    condition number at most ``condition`` (recorded in the data's metadata) and train/test draws."""

    source: Literal["ica"]
    dims: list[int] = Field(min_length=1, max_length=64, description="the data's dimensions D")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, max_length=64)
    sources: Literal["student_t", "laplace"] = Field("student_t", description="the law of the independent components")
    dof: float = Field(5.0, gt=0, le=1e6, description="degrees of freedom of the Student-t sources")
    condition: float = Field(4.0, ge=1, le=1e6, description="the largest condition number of the random W")
    n_train: int = Field(20000, ge=2, le=10_000_000)
    n_test: int = Field(5000, ge=2, le=10_000_000)

    @field_validator("dims")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(not 1 <= d <= 10_000 for d in v) or len(set(v)) != len(v):
            raise ValueError(f"dims must be distinct dimensions in [1, 10000], got {v}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v


class SweepEvaluate(_Section):
    """The table of held-out log-likelihoods: nothing to set yet (the section exists so that DVC tracks it)."""

    batch_size: int = Field(5000, ge=1, le=10_000_000, description="test points scored together")


class SweepConfig(_Section):
    prepare: ICAPrepare
    methods: dict[str, Any] = Field(min_length=1, max_length=16)
    evaluate: SweepEvaluate = SweepEvaluate()

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, raw: Any) -> dict[str, TrainBase]:
        if not isinstance(raw, dict):
            raise ValueError(f"expected a mapping of method name to train section, got {short_repr(raw)}")
        out = {}
        for name, section in raw.items():
            if not isinstance(name, str) or not METHOD_NAME.match(name):
                raise KeyedError("methods", f"{short_repr(name)} is not a method name (lower case letters, digits and _, "
                                 "starting with a letter)")
            family = section.get("family") if isinstance(section, dict) else None
            if family not in FAMILIES or not FAMILIES[family].has_score or FAMILIES[family].samplers:
                options = [n for n in FAMILIES if FAMILIES[n].has_score and not FAMILIES[n].samplers]
                raise KeyedError(f"methods.{name}.family", f"must be a family that learns an unnormalised model "
                                 f"({', '.join(options)}), got {short_repr(family)}")
            if "seed" in section:
                raise KeyedError(f"methods.{name}.seed", "a cell's training seed is its data seed (prepare.seeds): "
                                 "remove it")
            try:
                out[name] = FAMILIES[family].config.model_validate(section)
            except KeyedError as exc:  # a family's cross-key check names its key as train.<key>
                raise KeyedError(f"methods.{name}.{exc.key.removeprefix('train.')}", str(exc)) from None
            except ValidationError as exc:
                key, msg = describe_error(exc)
                raise KeyedError(f"methods.{name}" + (f".{key.removeprefix('train.')}" if key else ""), msg) from None
        return out

    @model_validator(mode="after")
    def _models_match_the_data(self) -> SweepConfig:
        for name, m in self.methods.items():
            model = getattr(m, "model", None)
            if model is None or model.kind != "ica":
                raise KeyedError(f"methods.{name}.model.kind", "an ICA sweep trains the ICA model: set kind: ica")
            if model.source != self.prepare.sources or (model.source == "student_t" and model.dof != self.prepare.dof):
                raise KeyedError(f"methods.{name}.model", f"the model's sources ({model.source}, dof {model.dof}) are "
                                 f"not the data's ({self.prepare.sources}, dof {self.prepare.dof})")
        return self

    def cells(self, method: str) -> list[tuple[int, int]]:
        """The (dimension, seed) cells of every method, in a fixed order."""
        return [(d, s) for d in self.prepare.dims for s in self.prepare.seeds]

    def cell_train(self, method: str, seed: int) -> TrainBase:
        """Method ``method``'s train section for a cell of seed ``seed``."""
        return self.methods[method].model_copy(update={"seed": seed})


def cell_name(dim: int, seed: int) -> str:
    return f"d{dim}-s{seed}"


@dataclass(frozen=True)
class SweepPaths:
    """Artifacts of a sweep pipeline: ``data/<p>/<cell>/{train,test}.parquet``, ``models/<p>/<method>/<cell>/model.pt``
    (and the cell's ``train_loss.csv`` beside it), ``metrics/<p>.json`` and ``plots/<p>/table.{csv,md,png}``."""

    paths: Paths

    @property
    def data(self) -> Path:
        return self.paths.root / "data" / self.paths.name

    def train(self, dim: int, seed: int) -> Path:
        return self.data / cell_name(dim, seed) / "train.parquet"

    def test(self, dim: int, seed: int) -> Path:
        return self.data / cell_name(dim, seed) / "test.parquet"

    def models(self, method: str) -> Path:
        return self.paths.root / "models" / self.paths.name / method

    def model(self, method: str, dim: int, seed: int) -> Path:
        return self.models(method) / cell_name(dim, seed) / "model.pt"

    @property
    def table(self) -> Path:
        return self.paths.plots / "table.csv"
