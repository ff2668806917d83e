"""Family ``agd``: an implicit generator trained by approximate gradient descent on KL[q_θ ‖ p_data] (Li,
"Approximate Gradient Descent for Training Implicit Generative Models", 2017).

The KL gradient pushed through x = G_θ(z) is E_z[(∇log q(x) − ∇log p(x))ᵀ ∂G/∂θ]; ∇log q is estimated in-sample
from the generator batch with the Stein gradient estimator (Li & Turner, "Gradient Estimators for Implicit
Models", ICLR 2018), ∇log p out-of-sample at the generator samples from a data batch (the estimator's
out-of-sample form, or SSGE: Shi, Sun & Zhu, ICML 2018), and the step descends the surrogate
mean⟨stopgrad(ĝ_q − ĝ_p), G(z)⟩ (``stein_core.get_agd_loss_fn``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.config.sections import KeyedError
from tasks.families._generator import GeneratorFamily, GeneratorTrain


class AGDTrain(GeneratorTrain):
    family: Literal["agd"]
    estimator: Literal["stein", "ssge"] = Field(
        "stein", description="∇log p at the generator samples: the Stein gradient estimator's out-of-sample form, or SSGE"
    )
    eta: float | None = Field(None, ge=0, le=1e6, description="ridge η of the Stein estimator; null: eta_rel · tr(K)/n")
    eta_rel: float = Field(1.0, ge=0, le=1e6, description="relative ridge when eta is null")
    n_eigen: int | None = Field(None, ge=1, le=100_000, description="SSGE: eigenfunctions kept (null: eigen_threshold)")
    eigen_threshold: float = Field(0.99, gt=0, le=1, description="SSGE: share of the kernel's spectrum kept")

    @model_validator(mode="after")
    def _keys_of_the_estimator(self):
        """A key of the other estimator does nothing: set to anything but its default (which the shipped configs
        list, so that every key can be varied), it is an error: the user meant something by it."""
        for estimator, keys in (("stein", ("eta", "eta_rel")), ("ssge", ("n_eigen", "eigen_threshold"))):
            for key in keys:
                if self.estimator != estimator and getattr(self, key) != type(self).model_fields[key].default:
                    raise KeyedError(f"train.{key}", f"has no effect with estimator: {self.estimator} (it is the "
                                     f"{estimator!r} estimator's): remove it, or set estimator: {estimator}")
        return self


class AGDFamily(GeneratorFamily):
    name = "agd"
    config = AGDTrain
    loss_key = "kl_grad_norm"

    def objective(self, cfg: AGDTrain, device):
        from stein_core.generators import get_agd_loss_fn

        return get_agd_loss_fn(cfg.kernel.make(), estimator=cfg.estimator, eta=cfg.eta, eta_rel=cfg.eta_rel,
                               n_eigen=cfg.n_eigen, eigen_threshold=cfg.eigen_threshold)


#: The family this module registers (``tasks.families.FAMILY_MODULES``).
FAMILY = AGDFamily()
