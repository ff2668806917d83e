"""What the families that learn an unnormalised model by minimising a Stein discrepancy (``ksd``, ``maxsksd``,
``lsd``) share: the ``model:`` sub-section naming what is trained, its construction, its score, and the loaded
model (a score, no sampler of its own: ``sampler: svgd`` draws from it).

A model enters a Stein discrepancy through its score ∇ₓ log p_θ only:

- ``kind: ica``: the ICA model with a learnable unmixing matrix (``stein_core.ica.ICAModel``), closed-form score
  Vᵀψ(Vx), exact log-likelihood;
- ``kind: energy_mlp``: an energy network E_θ (``stein_core.critics.MLPCritic`` with one output) for the 2-D toys,
  score −∇ₓE_θ by autograd (kept in the graph, so the discrepancy reaches θ).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field

from tasks.config.sections import OneOptimizerTrain, _Section
from tasks.families.base import Family, Model, build_from_checkpoint


class ICAModelSection(_Section):
    """The ICA model: sources of the data's law (``source``, ``dof``), unmixing matrix learned from the identity."""

    kind: Literal["ica"]
    source: Literal["student_t", "laplace"] = "student_t"
    dof: float = Field(5.0, gt=0, le=1e6, description="the Student-t sources' degrees of freedom")


class EnergyMLPSection(_Section):
    """An energy MLP E_θ(x) (SiLU, smooth), density ∝ exp(−E_θ)."""

    kind: Literal["energy_mlp"]
    hidden: int = Field(128, ge=1, le=65536)
    n_layers: int = Field(3, ge=1, le=64)


ModelSection = Annotated[ICAModelSection | EnergyMLPSection, Field(discriminator="kind")]


class SteinTrain(OneOptimizerTrain):
    """An unnormalised model (``model``) trained with Adam at ``lr`` by descending a Stein discrepancy."""

    model: ModelSection = ICAModelSection(kind="ica")


def build_model(section: ICAModelSection | EnergyMLPSection, shape: tuple[int, ...]):
    from stein_core.critics import MLPCritic
    from stein_core.ica import ICAModel

    dim = math.prod(shape)
    if section.kind == "ica":
        return ICAModel(dim, section.source, section.dof)
    return MLPCritic(dim, out_dim=1, hidden=section.hidden, n_layers=section.n_layers)


def model_score(model, x, kind: str, *, create_graph: bool = True):
    """``x [n, d]`` -> the score ``[n, d]`` of a model of ``kind``: the ICA model's closed form (its forward, so that
    a DDP wrapper sees the call), or −∇ₓE by autograd (in the graph when ``create_graph``, so that a loss of it
    reaches the energy's parameters)."""
    import torch

    if kind == "ica":
        return model(x)
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xg).sum(), xg, create_graph=create_graph)
    return -grad


class SteinModel(Model):
    """A trained unnormalised model: ``score(x)`` (and ``log_prob(x)`` for the ICA model); no sampler of its own."""

    def __init__(self, net, shape, device="cpu"):
        from stein_core.ica import ICAModel

        self.net, self.shape, self.device = net, tuple(shape), device
        self.kind = "ica" if isinstance(net, ICAModel) else "energy_mlp"

    def score(self, x):
        return model_score(self.net, x, self.kind, create_graph=False).detach()

    def sample(self, n: int, *, generator, callback=None):
        raise NotImplementedError("this model has no sampler of its own: sample it with `sampler: svgd`")


class SteinFamily(Family):
    """Base of ``ksd``/``maxsksd``/``lsd``: the model module, its score, and loading."""

    samplers = frozenset()
    has_score = True

    def build(self, cfg: SteinTrain, shape) -> dict[str, Any]:
        return {"model": build_model(cfg.model, shape)}

    def load(self, ckpt, *, device="cpu", sampler=None) -> Model:
        from stein_core.critics import MLPCritic
        from stein_core.ica import ICAModel

        net = build_from_checkpoint(ckpt, "model", (ICAModel, MLPCritic)).to(device).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return SteinModel(net, ckpt["shape"], device)
