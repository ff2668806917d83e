"""stein_core: pure-PyTorch mathematics for Stein's method and score matching.

No I/O and no orchestration imports (prefect, ray, mlflow, dvc, pyarrow,
pydantic, config layers): tensors in, tensors out; device and dtype come from
the inputs; randomness from an explicit ``torch.Generator``.
"""

from .discrepancies import get_ksd_fn, get_mmd_fn, ksd, mmd, stein_kernel_matrix
from .distributions import GaussianMixture, score_from_log_prob
from .kernels import (
    IMQ,
    RBF,
    DeepKernel,
    RadialKernel,
    SumKernel,
    grad_x_sum_autograd,
    gram_and_grad_x_sum,
    imq_mixture,
    median_heuristic,
    sq_dists,
)
from .nets import NoiseConditionalMLP
from .samplers import annealed_langevin, langevin_step
from .score_estimators import (
    SSGE,
    fit_ssge,
    fit_stein_gradient,
    ssge,
    stein_gradient_estimator,
    stein_gradient_predict,
)
from .score_matching import geometric_sigmas, get_dsm_loss_fn
from .discrepancies import (
    LinearStatistic,
    MaxSKSDResult,
    get_sksd_fn,
    ksd_linear,
    maxsksd,
    median_rbf,
    mmd_linear,
    sksd,
    sliced_stein_kernel_matrix,
)
from .tests_stat import (
    KernelTestResult,
    SlicedTestResult,
    ksd_test,
    mmd_permutation_test,
    sksd_test,
    wild_bootstrap,
)

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
    # kernels (issue 3)
    "DeepKernel",
    "SumKernel",
    "grad_x_sum_autograd",
    "gram_and_grad_x_sum",
    "imq_mixture",
    # score estimators (issue 3)
    "SSGE",
    "fit_ssge",
    "fit_stein_gradient",
    "ssge",
    "stein_gradient_estimator",
    "stein_gradient_predict",
    # discrepancies and kernel tests (issue 3)
    "LinearStatistic",
    "MaxSKSDResult",
    "get_sksd_fn",
    "ksd_linear",
    "maxsksd",
    "median_rbf",
    "mmd_linear",
    "sksd",
    "sliced_stein_kernel_matrix",
    "KernelTestResult",
    "SlicedTestResult",
    "ksd_test",
    "mmd_permutation_test",
    "sksd_test",
    "wild_bootstrap",
]
