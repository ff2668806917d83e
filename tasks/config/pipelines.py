"""The root config models of the pipelines: which sections a ``conf/<pipeline>.yaml`` has, and the checks that
span sections (a sampler the family cannot draw with, a metric that needs a score the family does not have).

Kept apart from :mod:`tasks.config.sections` because the train section is the union of the families' sections
(:mod:`tasks.families`), which themselves build on :mod:`tasks.config.sections`.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

from pydantic import Field, SerializeAsAny, create_model, model_validator

from tasks.config.sections import (
    ClassifierTrain,
    Evaluate,
    ImagePrepare,
    KeyedError,
    MixturePrepare,
    RingPrepare,
    SampleSection,
    TrainBase,
    _Section,
    short_repr,
)
from tasks.families import FAMILIES

#: A prepare section, chosen by its ``source`` key.
PrepareSection = Annotated[MixturePrepare | RingPrepare | ImagePrepare, Field(discriminator="source")]


def _sample_sections(cfg: _Section) -> dict[str, object]:
    return {k: v for k, v in cfg if k.startswith("sample") and v is not None}


def _check_checkpoint_sampler(cfg: _Section, samplers: frozenset[str] | None) -> None:
    ck = cfg.evaluate.checkpoints
    if ck is None:
        return
    sections = _sample_sections(cfg)
    if ck.sampler not in sections:
        raise KeyedError("evaluate.checkpoints.sampler", f"{ck.sampler!r} is not a sample section of this config "
                         f"(options: {', '.join(sections) or 'none'})")
    if samplers is not None and sections[ck.sampler].sampler not in samplers:
        raise KeyedError("evaluate.checkpoints.sampler", f"section {ck.sampler!r} samples with "
                         f"{sections[ck.sampler].sampler!r}, which this family cannot use")


class GenerativeConfig(_Section):
    """A dataset, a model family and their settings: prepare -> [classifier] -> train -> sample -> evaluate.

    ``GenerativeConfig.model_validate(data)`` validates with :func:`generative_config` of ``data``'s family, whose
    ``train`` is that family's section."""

    prepare: PrepareSection
    classifier: ClassifierTrain | None = Field(None, description="a feature classifier for FID/KID/IS (images)")
    train: SerializeAsAny[TrainBase]
    sample: SampleSection
    sample_base: SampleSection | None = Field(
        None, description="a second sample set, samples/<pipeline>/base.parquet (a GEBM's base generator alone)")
    evaluate: Evaluate

    @model_validator(mode="after")
    def _check_family(self) -> GenerativeConfig:
        family = FAMILIES[self.train.family]
        for key, section in _sample_sections(self).items():
            if (why := family.sampler_refusal(section.sampler)) is not None:
                raise KeyedError(f"{key}.sampler", why)
        ev = self.evaluate
        if "energy" in ev.plots and not family.has_energy:
            raise KeyedError("evaluate.plots", f"energy draws the model's energy; a {family.name} model has none")
        listed = list(ev.metrics) + list(ev.checkpoints.metrics if ev.checkpoints else [])
        if "ksd_model" in listed and not family.has_score:
            key = "evaluate.metrics" if "ksd_model" in ev.metrics else "evaluate.checkpoints.metrics"
            raise KeyedError(key, f"ksd_model needs the model's score, and a {family.name} model has none "
                             f"(families with a score: {', '.join(n for n, f in FAMILIES.items() if f.has_score)})")
        if "model_log_likelihood" in listed and not family.unnormalised:
            raise KeyedError("evaluate.metrics", f"model_log_likelihood normalises an energy-based model's density; a "
                             f"{family.name} model is not one (families: "
                             f"{', '.join(n for n, f in FAMILIES.items() if f.unnormalised)})")
        if "score_field" in ev.plots and not family.noise_conditional:
            raise KeyedError("evaluate.plots", f"score_field draws a noise-conditional score network's field; a "
                             f"{family.name} model has none")
        if ev.features == "classifier" and set(listed) & {"fid", "kid", "inception_score", "precision_recall"} \
                and self.classifier is None:
            raise KeyedError("evaluate.features", "classifier features need a classifier section (the pipeline "
                             "trains the feature classifier): add one, or use raw or inception features")
        _check_checkpoint_sampler(self, family.sampler_options())
        return self

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> GenerativeConfig:
        if cls is GenerativeConfig and isinstance(obj, dict) and isinstance(obj.get("train"), dict):
            return generative_config(_family_of(obj)).model_validate(obj, **kwargs)
        return super().model_validate(obj, **kwargs)  # no train mapping: pydantic names what is wrong


def _family_of(data: dict) -> str:
    """The ``train.family`` of a raw config, checked against the families (a KeyedError names the key)."""
    train = data["train"]
    family = train.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        got = f", got {short_repr(family)}" if "family" in train else " (missing)"
        raise KeyedError("train.family", f"must be one of {', '.join(repr(f) for f in FAMILIES)}{got}")
    return family


@functools.cache
def generative_config(family: str) -> type[GenerativeConfig]:
    """:class:`GenerativeConfig` with ``train`` typed as ``family``'s section (one class per family, importable as
    ``tasks.config.pipelines.GenerativeConfig_<family>``, so its instances pickle into Ray workers)."""
    name = f"GenerativeConfig_{family}"
    model = create_model(name, __base__=GenerativeConfig, __module__=__name__, train=(FAMILIES[family].config, ...))
    model.__qualname__ = name
    return model


def __getattr__(name: str) -> Any:
    family = name.removeprefix("GenerativeConfig_")
    if family != name and family in FAMILIES:
        return generative_config(family)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ResampleConfig(_Section):
    """Another pipeline's model (``upstream``), sampled by one or more sample sections and evaluated side by side
    (gmm2d-blindness: annealed vs plain Langevin)."""

    sample_annealed: SampleSection | None = None
    sample_langevin: SampleSection | None = None
    evaluate: Evaluate

    @model_validator(mode="after")
    def _check(self) -> ResampleConfig:
        _check_checkpoint_sampler(self, None)
        return self
