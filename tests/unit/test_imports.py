"""stein_core stays free of orchestration and I/O dependencies."""

import pathlib
import subprocess
import sys

import stein_core

FORBIDDEN = {"prefect", "ray", "mlflow", "dvc", "pyarrow", "pydantic", "hydra", "omegaconf"}


def test_no_forbidden_imports():
    root = pathlib.Path(stein_core.__file__).resolve().parents[1]
    code = (
        "import stein_core, stein_core.kernels, stein_core.distributions, stein_core.discrepancies, "
        "stein_core.score_matching, stein_core.samplers, stein_core.nets, sys; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_public_api():
    for name in [
        "RadialKernel", "RBF", "IMQ", "median_heuristic", "sq_dists",
        "GaussianMixture", "score_from_log_prob",
        "stein_kernel_matrix", "ksd", "get_ksd_fn", "mmd",
        "geometric_sigmas", "get_dsm_loss_fn",
        "langevin_step", "annealed_langevin", "NoiseConditionalMLP",
    ]:
        assert hasattr(stein_core, name), name
        assert name in stein_core.__all__
