"""Family ``mmd``: an implicit generator trained by direct minimisation of the unbiased MMD² between generator and
data batches (Li, Swersky & Zemel, "Generative Moment Matching Networks", ICML 2015; Dziugaite, Roy & Ghahramani,
UAI 2015), with the kernel of the ``agd`` family: the baseline Li (2017) compares approximate KL descent against.
"""

from __future__ import annotations

from typing import Literal

from tasks.families._generator import GeneratorFamily, GeneratorTrain


class MMDTrain(GeneratorTrain):
    family: Literal["mmd"]


class MMDFamily(GeneratorFamily):
    name = "mmd"
    config = MMDTrain
    loss_key = "mmd2"

    def objective(self, cfg: MMDTrain, device):
        from stein_core.generators import get_mmd_loss_fn

        return get_mmd_loss_fn(cfg.kernel.make())


#: The family this module registers (``tasks.families.FAMILY_MODULES``).
FAMILY = MMDFamily()
