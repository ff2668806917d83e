"""A trained model from its checkpoint, ready to sample with a sample section: what the sample and evaluate stages
(and the model registry) call. Kept out of ``tasks/families/__init__.py``, which every stage imports, so that the
samplers any family may be drawn with (``sampler: svgd``, :mod:`tasks.families._svgd`) are code deps of the stages
that sample, not of every stage."""

from __future__ import annotations

from pathlib import Path

from tasks.config.sections import ConfigError
from tasks.families import get_family
from tasks.families.base import Model


def load_model(path: str | Path, *, device: str = "cpu", sampler=None) -> Model:
    """The model in a checkpoint written by the train stage, ready to sample (with the sample section
    ``sampler``, or the family's default) and, where its family has one, to score."""
    from tasks.data.io import load_checkpoint

    ckpt = load_checkpoint(path)
    if "family" not in ckpt or "modules" not in ckpt:
        raise ConfigError(path, "family", "not a model checkpoint of this project (no family/modules): rerun the train stage")
    family = get_family(ckpt["family"], path)
    if sampler is not None and (why := family.sampler_refusal(sampler.sampler)) is not None:
        raise ConfigError(path, "sampler", why)
    by_score = sampler is not None and sampler.sampler not in family.samplers  # svgd, mcmc: on the model's score
    try:
        model = family.load(ckpt, device=device, sampler=None if by_score else sampler)
    except ConfigError as exc:  # a check of the checkpoint's contents: it names the key, here the file too
        if exc.path != "checkpoint":
            raise
        raise ConfigError(path, exc.key, exc.message) from None
    if by_score and sampler.sampler == "mcmc":  # on the model's energy
        from tasks.families._mcmc import MCMCModel

        return MCMCModel(model, sampler, device=device)
    if by_score:
        from tasks.families._svgd import SVGDModel

        return SVGDModel(model, sampler, device=device)
    return model
