"""Score estimators from samples: exact identities, closed form vs autograd, batching and
dtypes, and recovery of known scores (Gaussians, a Gaussian mixture) with error decreasing in n."""

import math

import pytest
import torch

from stein_core import (
    IMQ,
    RBF,
    DeepKernel,
    GaussianMixture,
    fit_ssge,
    fit_stein_gradient,
    median_heuristic,
    ssge,
    stein_gradient_estimator,
    stein_gradient_predict,
)

# (n, number of independent sample sets averaged). Averaging over n_total / n sets keeps the
# cost of the small-n rows negligible while making "the error decreases with n" a statement
# about mean errors rather than about one draw.
SIZES = ((100, 16), (400, 4), (1600, 1))
SSGE_SIZES = ((100, 9), (300, 3), (900, 1))  # eigh is ~10x a Cholesky: smaller n for SSGE


# ---------------------------------------------------------------------------
# Targets with closed-form scores
# ---------------------------------------------------------------------------
class Gaussian:
    """N(mu, Sigma) with Sigma = A A^T / d + 0.5 I (A, mu standard normal, seed 123): correlated,
    eigenvalues roughly in [0.5, 4]. Score: -Sigma^{-1} (x - mu)."""

    def __init__(self, d: int) -> None:
        g = torch.Generator().manual_seed(123)
        self.mu = torch.randn(d, generator=g, dtype=torch.float64)
        a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        self.chol = torch.linalg.cholesky(a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64))
        self.d = d

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.d, generator=gen, dtype=torch.float64)
        return self.mu + z @ self.chol.T

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cholesky_solve((x - self.mu).unsqueeze(-1), self.chol).squeeze(-1)


class Mixture:
    """0.3 N((-2, 0), I) + 0.7 N((2, 0), 0.49 I): bimodal, unequal weights and widths."""

    def __init__(self) -> None:
        self.gm = GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 0.0]], [1.0, 0.7])

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.gm.sample(n, gen, torch.float64)[0]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm.score(x)


def rel_err(est: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """||G_hat - grad log p||_F / ||grad log p||_F over the evaluation points: ``[..., n, d]`` -> ``[...]``."""
    return (est - true).norm(dim=(-2, -1)) / true.norm(dim=(-2, -1))


def errors_vs_n(target, estimate, seed: int, in_sample: bool, sizes) -> list[float]:
    """Mean relative error for each ``(n, S)`` in ``sizes``: S independent sample sets of size n,
    estimated in one batched call (``[S, n, d]``); out of sample: on 500 fresh points per set."""
    errs = []
    for n, reps in sizes:
        gen = torch.Generator().manual_seed(seed + n)
        x = target.sample(reps * n, gen).reshape(reps, n, -1)
        pts = x if in_sample else target.sample(reps * 500, gen).reshape(reps, 500, -1)
        errs.append(rel_err(estimate(pts, x), target.score(pts)).mean().item())
    return errs


# ---------------------------------------------------------------------------
# Statistical recovery (default kernel: RBF with the median-heuristic bandwidth; default
# eta = tr(K)/n; SSGE eigen_threshold = 0.99). The bounds at the largest n are ~ mean + 3 sd
# of the same statistic over 10 seeds, measured with exactly these SIZES:
#                n:    100          400          1600
#   SGE   g1        0.495+-0.032 0.331+-0.042 0.222+-0.026     bound 0.30
#         g2        0.426+-0.013 0.298+-0.025 0.200+-0.035     bound 0.31
#         g5        0.442+-0.007 0.330+-0.007 0.227+-0.017     bound 0.28
#         mix       0.404+-0.008 0.289+-0.015 0.206+-0.016     bound 0.26
#   pred  g2        0.411+-0.014 0.290+-0.027 0.195+-0.032     bound 0.30
#         g5        0.404+-0.009 0.313+-0.006 0.218+-0.020     bound 0.28
#         mix       0.383+-0.010 0.280+-0.015 0.199+-0.014     bound 0.25
#                n:    100          300          900
#   SSGE  g1        0.661+-0.095 0.447+-0.067 0.294+-0.082     bound 0.54
#         g2        0.671+-0.057 0.431+-0.049 0.268+-0.024     bound 0.34
#         g5        1.004+-0.051 0.645+-0.035 0.428+-0.037     bound 0.54
#         mix       0.545+-0.062 0.371+-0.038 0.268+-0.035     bound 0.38
# The means decreased with n on 10/10 seeds in every case except SSGE g1 (9/10). The zero
# estimate has error 1 and a sign error ~2, so the bounds reject broken estimators.
# ---------------------------------------------------------------------------
SGE_BOUND = {"g1": 0.30, "g2": 0.31, "g5": 0.28, "mix": 0.26}
PRED_BOUND = {"g2": 0.30, "g5": 0.28, "mix": 0.25}
SSGE_BOUND = {"g1": 0.54, "g2": 0.34, "g5": 0.54, "mix": 0.38}
TARGETS = {"g1": lambda: Gaussian(1), "g2": lambda: Gaussian(2), "g5": lambda: Gaussian(5), "mix": Mixture}


def _sge_at_samples(pts, x):
    return stein_gradient_estimator(x)


def _sge_predict(pts, x):
    return stein_gradient_predict(pts, x)


def _ssge(pts, x):
    return ssge(pts, x)


def _check_decreasing_and_bounded(errs, bound):
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < bound, errs


@pytest.mark.parametrize("name", ["g1", "g2", "g5", "mix"])
def test_sge_recovers_score_at_samples(name):
    errs = errors_vs_n(TARGETS[name](), _sge_at_samples, 11, in_sample=True, sizes=SIZES)
    _check_decreasing_and_bounded(errs, SGE_BOUND[name])


@pytest.mark.parametrize("name", ["g2", "g5", "mix"])
def test_stein_predictor_recovers_score_out_of_sample(name):
    errs = errors_vs_n(TARGETS[name](), _sge_predict, 12, in_sample=False, sizes=SIZES)
    _check_decreasing_and_bounded(errs, PRED_BOUND[name])


@pytest.mark.parametrize("name", ["g1", "g2", "g5", "mix"])
def test_ssge_recovers_score_out_of_sample(name):
    errs = errors_vs_n(TARGETS[name](), _ssge, 13, in_sample=False, sizes=SSGE_SIZES)
    _check_decreasing_and_bounded(errs, SSGE_BOUND[name])


# ---------------------------------------------------------------------------
# Exact identities
# ---------------------------------------------------------------------------
def test_sge_matches_definition_with_per_pair_autograd():
    # G_hat = -(K + eta I)^{-1} <nabla, K>, <nabla, K>_i = sum_j grad_1 k(x_j, x_i), by brute force.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, generator=g, dtype=torch.float64)
    kern = IMQ(1.3, -0.5)
    n = x.shape[0]
    gram = torch.empty(n, n, dtype=torch.float64)
    nabla = torch.zeros(n, 2, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            xj = x[j].clone().requires_grad_(True)
            kji = kern(xj[None], x[i][None])[0, 0]
            gram[i, j] = kji.detach()
            nabla[i] += torch.autograd.grad(kji, xj)[0]
    eta = 0.3
    ref = -torch.linalg.solve(gram + eta * torch.eye(n, dtype=torch.float64), nabla)
    x_copy = x.clone()
    torch.testing.assert_close(stein_gradient_estimator(x, kern, eta=eta), ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(x, x_copy)  # input untouched
    # Default eta = eta_rel * tr(K) / n; for an IMQ the diagonal is c^(2 beta).
    eta_default = 0.5 * 1.3 ** (2 * -0.5)
    torch.testing.assert_close(
        stein_gradient_estimator(x, kern, eta_rel=0.5), stein_gradient_estimator(x, kern, eta=eta_default)
    )


def test_autograd_fallback_matches_closed_form():
    # A DeepKernel with the identity map and a bare Gram callable go through forward-mode
    # autograd; both must equal the closed form of the radial base kernel.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 30, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    base = RBF(torch.tensor([1.1, 0.8], dtype=torch.float64))  # one bandwidth per batch entry
    for kern in [DeepKernel(lambda z: z, base), lambda a, b: base(a, b)]:
        torch.testing.assert_close(
            stein_gradient_estimator(x, kern), stein_gradient_estimator(x, base), rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(
            stein_gradient_predict(xt, x, kern), stein_gradient_predict(xt, x, base), rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(
            fit_ssge(x, kern, n_eigen=10)(xt), fit_ssge(x, base, n_eigen=10)(xt), rtol=1e-8, atol=1e-10
        )


@pytest.mark.parametrize("eta", [0.01, 0.3, 3.0])
def test_predictor_equals_in_sample_estimator_at_the_samples(eta):
    # Derivation in fit_stein_gradient: g_hat(y_i) = G_hat_i exactly, for every eta > 0.
    g = torch.Generator().manual_seed(2)
    y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    kern = RBF(0.9)
    score_fn = fit_stein_gradient(y, kern, eta=eta)
    torch.testing.assert_close(score_fn(y), stein_gradient_estimator(y, kern, eta=eta), rtol=1e-7, atol=1e-9)
    # The closure and the one-shot function agree; far from the samples the estimate -> 0.
    xt = torch.randn(5, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(score_fn(xt), stein_gradient_predict(xt, y, kern, eta=eta))
    assert score_fn(torch.full((1, 2), 50.0, dtype=torch.float64)).abs().max() < 1e-12


def test_ssge_all_eigenpairs_equals_sge_without_ridge():
    # g_hat(X) = -K U Lam^-2 U^T <nabla,K> = -K^{-1} <nabla,K> when every eigenpair is kept.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(15, 2, generator=g, dtype=torch.float64)
    kern = RBF(0.5)  # narrow bandwidth: well-conditioned K (cond ~ 1e2)
    fit = fit_ssge(x, kern, n_eigen=15)
    assert int(fit.n_eigen) == 15
    torch.testing.assert_close(fit(x), stein_gradient_estimator(x, kern, eta=0.0), rtol=1e-8, atol=1e-10)


def test_ssge_eigenfunctions_and_selection():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(60, 2, generator=g, dtype=torch.float64)
    kern = RBF(1.0)
    fit = fit_ssge(x, kern, eigen_threshold=0.9)
    lam = fit.eigenvalues
    assert bool((lam[:-1] >= lam[1:]).all())  # descending
    # J = the smallest J whose leading eigenvalues reach 90% of tr(K).
    frac = torch.cumsum(lam.clamp_min(0), 0) / lam.clamp_min(0).sum()
    j = int(fit.n_eigen)
    assert frac[j - 1] >= 0.9 > frac[j - 2]
    psi = fit.eigenfunctions(x)[:, :j]  # [M, J]
    # Nystrom eigenfunctions are orthonormal in L2(q_hat): (1/M) sum_m psi_i psi_j = delta_ij,
    # and psi_j(x_m) = sqrt(M) U_mj at the samples.
    torch.testing.assert_close(psi.T @ psi / 60, torch.eye(j, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(psi, math.sqrt(60) * fit.eigenvectors[:, :j], rtol=0, atol=1e-9)
    # beta_j = -(1/M) sum_m grad psi_j(x_m), by autograd through the eigenfunctions.
    xr = x.clone().requires_grad_(True)
    grads = [torch.autograd.grad(fit.eigenfunctions(xr)[:, i].sum(), xr)[0].sum(0) for i in range(j)]
    torch.testing.assert_close(fit.beta[:j], -torch.stack(grads) / 60, rtol=1e-8, atol=1e-10)
    assert bool((fit.beta[j:] == 0).all())
    # g_hat = sum_j beta_j psi_j.
    xt = torch.randn(9, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fit(xt), fit.eigenfunctions(xt) @ fit.beta)


# ---------------------------------------------------------------------------
# Batching, dtypes, default kernel, differentiability, validation
# ---------------------------------------------------------------------------
def test_batched_equals_loop():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, 2, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0])[:, None, None]
    xt = torch.randn(3, 8, 2, generator=g, dtype=torch.float64)
    sge_b = stein_gradient_estimator(x)  # default kernel: per-entry median-heuristic RBF
    pred_b = stein_gradient_predict(xt, x)
    ssge_fit = fit_ssge(x)
    ssge_b = ssge_fit(xt)
    for b in range(3):
        torch.testing.assert_close(sge_b[b], stein_gradient_estimator(x[b]), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pred_b[b], stein_gradient_predict(xt[b], x[b]), rtol=1e-10, atol=1e-12)
        single = fit_ssge(x[b])
        assert int(single.n_eigen) == int(ssge_fit.n_eigen[b])
        torch.testing.assert_close(ssge_b[b], single(xt[b]), rtol=1e-8, atol=1e-10)
    # The batches differ in scale, so the selected kernels (and numbers of eigenpairs) differ.
    assert len(set(ssge_fit.kernel.bandwidth.tolist())) == 3


def test_default_kernel_is_median_heuristic_rbf():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    kern = RBF(median_heuristic(x))
    torch.testing.assert_close(stein_gradient_estimator(x), stein_gradient_estimator(x, kern))
    assert fit_ssge(x).kernel.bandwidth == median_heuristic(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_preserved_and_float32_accurate(dtype):
    target = Gaussian(2)
    gen = torch.Generator().manual_seed(7)
    x64, xt64 = target.sample(300, gen), target.sample(50, gen)
    x, xt = x64.to(dtype), xt64.to(dtype)
    outs = [stein_gradient_estimator(x), stein_gradient_predict(xt, x), ssge(xt, x)]
    refs = [stein_gradient_estimator(x64), stein_gradient_predict(xt64, x64), ssge(xt64, x64)]
    for out, ref in zip(outs, refs):
        assert out.dtype == dtype and out.shape == ref.shape
        # float32 vs float64 rounding, measured ~4e-5 relative at n = 1600
        assert rel_err(out.double(), ref) < 1e-3


def test_sge_is_differentiable_in_x():
    # Closed forms and the solve are differentiable (e.g. for a generator's entropy gradient).
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    kern = IMQ(1.0, -0.5)
    assert torch.autograd.gradcheck(lambda z: stein_gradient_estimator(z, kern, eta=0.2), (x,))


def test_validation():
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(9))
    with pytest.raises(ValueError):
        fit_stein_gradient(x, eta=0.0)  # out-of-sample form divides by eta
    with pytest.raises(ValueError):
        stein_gradient_estimator(x, eta=-1.0)
    with pytest.raises(ValueError):
        fit_ssge(x, eigen_threshold=1.5)
    with pytest.raises(ValueError):
        fit_ssge(x, n_eigen=0)
    with pytest.raises(ValueError):
        fit_ssge(x)(torch.zeros(3, 5))  # wrong d
    with pytest.raises(ValueError):
        stein_gradient_estimator(torch.zeros(5, 2))  # median bandwidth 0
