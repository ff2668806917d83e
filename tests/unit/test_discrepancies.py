"""Stein kernel vs an autograd per-pair reference; KSD and MMD vs closed forms."""

import math

import pytest
import torch

from stein_core import IMQ, RBF, get_ksd_fn, get_mmd_fn, ksd, mmd, stein_kernel_matrix
from stein_core.kernels import sq_dists


def u_stat_se(h: torch.Tensor) -> float:
    """Standard error of the U-statistic mean_{i != j} h_ij (h symmetric, [n, n]).

    Hoeffding: Var U = (4 (n - 2) zeta_1 + 2 zeta_2) / (n (n - 1)) with
    zeta_1 = Var_x E_y h(x, y) and zeta_2 = Var h(x, y), both estimated plug-in
    (zeta_1 from the row means over j != i). Covers the degenerate case
    (zeta_1 = 0, p = q) as well.
    """
    n = h.shape[0]
    off = h.double() - torch.diag(torch.diagonal(h.double()))
    g = off.sum(1) / (n - 1)
    u = g.mean()
    zeta1 = g.var().item()
    zeta2 = ((off - u) ** 2).sum().item() / (n * (n - 1))
    return math.sqrt((4 * (n - 2) * zeta1 + 2 * zeta2) / (n * (n - 1)))


def reference_stein_kernel(x, s, kernel_fn):
    """u_p(x_i, x_j) from its definition, every derivative by autograd (float64)."""
    x, s = x.double(), s.double()
    n, d = x.shape
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            xi = x[i].clone().requires_grad_(True)
            xj = x[j].clone().requires_grad_(True)
            k = kernel_fn(xi, xj)
            gx, gy = torch.autograd.grad(k, (xi, xj), create_graph=True)
            trace = sum(torch.autograd.grad(gx[a], xj, retain_graph=True)[0][a] for a in range(d))
            out[i, j] = (s[i] @ s[j]) * k + s[i] @ gy + s[j] @ gx + trace
    return out.detach()


KERNELS = {
    "rbf": (RBF(0.9), lambda a, b: torch.exp(-((a - b) ** 2).sum() / (2 * 0.9**2))),
    "imq": (IMQ(1.2, -0.5), lambda a, b: (1.2**2 + ((a - b) ** 2).sum()) ** -0.5),
}


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stein_kernel_matches_autograd_reference(name, d, dtype):
    kernel, kernel_fn = KERNELS[name]
    g = torch.Generator().manual_seed(d)
    x = torch.randn(6, d, generator=g, dtype=dtype)
    s = torch.randn(6, d, generator=g, dtype=dtype)  # any vectors: the identity is algebraic
    x_copy, s_copy = x.clone(), s.clone()
    u = stein_kernel_matrix(x, s, kernel)
    assert u.shape == (6, 6) and u.dtype == dtype
    assert torch.equal(x, x_copy) and torch.equal(s, s_copy)
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(u.double(), reference_stein_kernel(x, s, kernel_fn), rtol=tol, atol=tol)


def test_stein_kernel_batched_equals_per_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 2, generator=g, dtype=torch.float64)
    s = torch.randn(3, 8, 2, generator=g, dtype=torch.float64)
    kernel = IMQ()
    u = stein_kernel_matrix(x, s, kernel)
    for b in range(3):
        torch.testing.assert_close(u[b], stein_kernel_matrix(x[b], s[b], kernel), rtol=1e-13, atol=1e-13)
    assert ksd(x, s, kernel).shape == (3,)


def ksd_gauss_closed_form(mu_norm2: float, h: float, d: int) -> float:
    # q = N(mu, I), p = N(0, I): KSD^2 = E_{x,x'~q} (s_p - s_q)(x)^T (s_p - s_q)(x') k(x, x')
    # with s_p - s_q = -mu constant, so KSD^2 = ||mu||^2 E k(x, x'); x - x' ~ N(0, 2I) and
    # E exp(-||z||^2 / (2h^2)) = (1 + 2/h^2)^(-d/2) = (h^2 / (h^2 + 2))^(d/2).
    return mu_norm2 * (h * h / (h * h + 2)) ** (d / 2)


def test_ksd_closed_form_gaussian_shift():
    d, h, n = 2, 1.0, 2000
    mu = torch.tensor([0.6, -0.8], dtype=torch.float64)  # ||mu||^2 = 1
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + mu
    kernel = RBF(h)
    est = ksd(x, lambda y: -y, kernel)  # score of N(0, I)
    truth = ksd_gauss_closed_form(1.0, h, d)  # 1/3
    se = u_stat_se(stein_kernel_matrix(x, -x, kernel))
    # The SE (~0.02 here) is small relative to the truth, so the check has teeth.
    assert se < 0.1 * truth
    assert abs(est.item() - truth) < 4 * se


def test_ksd_near_zero_under_null_and_monotone_in_shift():
    d, n = 2, 1000
    kernel = IMQ()
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    score = lambda y: -y  # N(0, I)
    null = ksd(z, score, kernel)
    # Degenerate U-statistic under p = q: SE = sqrt(2 zeta_2 / (n (n - 1))) ~ O(1/n).
    se0 = u_stat_se(stein_kernel_matrix(z, -z, kernel))
    assert abs(null.item()) < 4 * se0
    # Common random numbers: the same z shifted along (1, 1) / sqrt(2).
    direction = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    values = [ksd(z + t * direction, score, kernel).item() for t in (0.0, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[1] > 10 * se0  # a shift of 0.5 is clearly detected


def test_ksd_unbiased_over_replicates():
    # 400 independent replicates of n = 30 (batched [400, 30, 1]); the U-statistic
    # averages to the closed form, the V-statistic is biased upward by ~E u_p(x, x)/n.
    reps, n, d, h = 400, 30, 1, 1.5
    x = 0.5 + torch.randn(reps, n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kernel = RBF(h)
    u = ksd(x, -x, kernel, statistic="u")
    v = ksd(x, -x, kernel, statistic="v")
    truth = ksd_gauss_closed_form(0.25, h, d)
    se = (u.std() / math.sqrt(reps)).item()
    assert abs(u.mean().item() - truth) < 4 * se
    assert v.mean().item() - truth > 4 * se  # the bias is detectable at this n
    assert (v >= -1e-12).all()


def test_ksd_api_variants_and_gradient():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 2, generator=g, dtype=torch.float64)
    kernel = RBF(1.0)
    a = ksd(x, lambda y: -y, kernel)
    b = ksd(x, -x, kernel)
    c = get_ksd_fn(kernel)(x, -x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    v = get_ksd_fn(kernel, statistic="v")(x, -x)
    torch.testing.assert_close(v, stein_kernel_matrix(x, -x, kernel).mean())
    with pytest.raises(ValueError):
        ksd(x, -x, kernel, statistic="w")
    with pytest.raises(ValueError):
        get_ksd_fn(kernel, statistic="w")
    # Differentiable in the samples (finite differences vs autograd).
    xs = x[:6].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: ksd(y, lambda t: -t, kernel), (xs,))


def mmd_gauss_closed_form(delta_norm2: float, h: float, d: int) -> float:
    # E k(x, x') for x, x' ~ N(mu, I): c = (h^2 / (h^2 + 2))^(d/2);
    # E k(x, y) for x ~ N(mu1, I), y ~ N(mu2, I): c exp(-||mu1 - mu2||^2 / (2 (h^2 + 2))).
    c = (h * h / (h * h + 2)) ** (d / 2)
    return 2 * c * (1 - math.exp(-delta_norm2 / (2 * (h * h + 2))))


def test_mmd_closed_form_unequal_sizes():
    d, h, n, m = 2, 1.5, 1500, 1000
    g = torch.Generator().manual_seed(4)
    delta = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) + delta
    kernel = RBF(h)
    est = mmd(x, y, kernel).item()
    truth = mmd_gauss_closed_form(1.0, h, d)  # 0.1193
    # Two-sample U-statistic: Var ~ 4 zeta_x / n + 4 zeta_y / m with zeta_x = Var_x of
    # E_x' k(x, x') - E_y k(x, y) (and symmetrically), estimated from row means.
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    gx = (kxx.sum(1) - 1) / (n - 1) - kxy.mean(1)
    gy = (kyy.sum(1) - 1) / (m - 1) - kxy.mean(0)
    se = math.sqrt(4 * gx.var().item() / n + 4 * gy.var().item() / m)
    assert se < 0.1 * truth
    assert abs(est - truth) < 4 * se


def test_mmd_unbiased_over_replicates_and_variants():
    reps, n, m, d, h = 300, 25, 15, 2, 1.0
    g = torch.Generator().manual_seed(5)
    x = torch.randn(reps, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(reps, m, d, generator=g, dtype=torch.float64) + torch.tensor([0.8, 0.0], dtype=torch.float64)
    kernel = RBF(h)
    u, v = mmd(x, y, kernel), mmd(x, y, kernel, statistic="v")
    assert u.shape == (reps,)
    truth = mmd_gauss_closed_form(0.64, h, d)
    se = (u.std() / math.sqrt(reps)).item()
    assert abs(u.mean().item() - truth) < 4 * se
    assert v.mean().item() - truth > 4 * se
    torch.testing.assert_close(get_mmd_fn(kernel)(x[0], y[0]), u[0], rtol=0, atol=0)
    # Same sample twice: V-statistic is exactly 0, U-statistic is negative (diagonal dropped).
    assert abs(mmd(x[0], x[0], kernel, statistic="v").item()) < 1e-12
    # Differentiable wrt the samples.
    xs = x[0, :5].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: mmd(t, y[0, :4], kernel), (xs,))


def test_mmd_float32_dtype():
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(6))
    y = x + 0.1
    out = mmd(x, y, IMQ())
    assert out.dtype == torch.float32 and out.ndim == 0
    torch.testing.assert_close(out.double(), mmd(x.double(), y.double(), IMQ()), rtol=1e-4, atol=1e-6)
    assert sq_dists(x, y).dtype == torch.float32
