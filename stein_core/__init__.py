"""stein_core: pure-PyTorch mathematics for Stein's method and score matching.

No I/O and no orchestration imports (prefect, ray, mlflow, dvc, pyarrow,
pydantic, config layers): tensors in, tensors out; device and dtype come from
the inputs; randomness from an explicit ``torch.Generator``.

Modules: ``kernels`` (RBF, IMQ, sums, deep kernels, closed-form derivatives),
``distributions`` (Gaussian mixtures, log-density -> score), ``discrepancies``
(KSD, sliced KSD / maxSKSD, MMD), ``tests_stat`` (wild-bootstrap and
permutation tests), ``score_estimators`` (Stein gradient estimators, SSGE),
``score_matching`` (exact, denoising, sliced score matching), ``samplers``
(ULA, MALA, RWMH, underdamped Langevin, HMC, annealed Langevin), ``nets``
(noise-conditional MLP and conv score networks, MLP and conv generators),
``generators`` (approximate-gradient-descent and MMD losses for implicit
generators), ``ema`` (weight averaging),
``metrics`` (Fréchet distance, KID, Inception score, precision/recall, streaming
moments), ``features`` (FID Inception-v3, a LeNet classifier as feature extractors).
Each module's ``__all__`` is re-exported here.
"""

from . import (
    discrepancies,
    distributions,
    ema,
    features,
    generators,
    kernels,
    metrics,
    nets,
    samplers,
    score_estimators,
    score_matching,
    tests_stat,
)
from .discrepancies import *  # noqa: F403
from .distributions import *  # noqa: F403
from .ema import *  # noqa: F403
from .features import *  # noqa: F403
from .generators import *  # noqa: F403
from .kernels import *  # noqa: F403
from .metrics import *  # noqa: F403
from .nets import *  # noqa: F403
from .samplers import *  # noqa: F403
from .score_estimators import *  # noqa: F403
from .score_matching import *  # noqa: F403
from .tests_stat import *  # noqa: F403

__all__ = sorted(
    {
        name
        for module in (
            discrepancies, distributions, ema, features, generators, kernels, metrics, nets, samplers,
            score_estimators, score_matching, tests_stat,
        )
        for name in module.__all__
    }
)
