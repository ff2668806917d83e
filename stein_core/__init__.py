"""stein_core: pure-PyTorch mathematics for Stein's method and score matching.

No I/O and no orchestration imports (prefect, ray, mlflow, dvc, pyarrow,
pydantic, config layers): tensors in, tensors out; device and dtype come from
the inputs; randomness from an explicit ``torch.Generator``.
"""

from .discrepancies import get_ksd_fn, get_mmd_fn, ksd, mmd, stein_kernel_matrix
from .distributions import GaussianMixture, score_from_log_prob
from .kernels import IMQ, RBF, RadialKernel, median_heuristic, sq_dists
from .nets import NoiseConditionalMLP
from .samplers import annealed_langevin, langevin_step
from .score_matching import geometric_sigmas, get_dsm_loss_fn

__all__ = [
    "GaussianMixture",
    "IMQ",
    "NoiseConditionalMLP",
    "RBF",
    "RadialKernel",
    "annealed_langevin",
    "geometric_sigmas",
    "get_dsm_loss_fn",
    "get_ksd_fn",
    "get_mmd_fn",
    "ksd",
    "langevin_step",
    "median_heuristic",
    "mmd",
    "score_from_log_prob",
    "sq_dists",
    "stein_kernel_matrix",
]
