"""Stein kernel vs an autograd per-pair reference (radial and non-radial kernels); KSD and MMD
(quadratic and linear time) vs closed forms and quadrature."""

import math

import pytest
import torch

from stein_core import IMQ, RBF, get_ksd_fn, get_mmd_fn, ksd, mmd, stein_kernel_matrix
from stein_core.discrepancies import ksd_linear, mmd_linear
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


# ---------------------------------------------------------------------------
# Non-radial kernels: autograd fallback of stein_kernel_matrix
# ---------------------------------------------------------------------------
def exact_rbf(h):
    """RBF Gram from explicit pairwise differences (no clamp: exact derivatives everywhere).

    Deliberately not a RadialKernel, so stein_kernel_matrix takes the autograd path.
    """

    def gram(a, b):
        diff = a[..., :, None, :] - b[..., None, :, :]  # [..., n, m, d] (tests only, small n)
        return torch.exp(-(diff * diff).sum(-1) / (2 * h * h))

    return gram


class TanhFeatureKernel:
    """Deep kernel k(x, y) = exp(-||f(x) - f(y)||^2 / 2) with f(x) = tanh(W x + b) (non-radial)."""

    def __init__(self, d, d_feat, generator, dtype):
        self.w = torch.randn(d_feat, d, generator=generator, dtype=dtype)
        self.b = torch.randn(d_feat, generator=generator, dtype=dtype)

    def features(self, x):
        return torch.tanh(x @ self.w.T + self.b)

    def __call__(self, a, b):
        fa, fb = self.features(a), self.features(b)
        diff = fa[..., :, None, :] - fb[..., None, :, :]
        return torch.exp(-0.5 * (diff * diff).sum(-1))

    def pair(self, a, b):
        """k of two single points [d] -> scalar (for the per-pair reference)."""
        diff = self.features(a) - self.features(b)
        return torch.exp(-0.5 * (diff * diff).sum())


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stein_kernel_autograd_fallback_deep_kernel(d, dtype):
    g = torch.Generator().manual_seed(10 + d)
    kernel = TanhFeatureKernel(d, 4, g, dtype)
    x = torch.randn(6, d, generator=g, dtype=dtype)
    s = torch.randn(6, d, generator=g, dtype=dtype)
    x_copy, s_copy = x.clone(), s.clone()
    u = stein_kernel_matrix(x, s, kernel)
    assert u.shape == (6, 6) and u.dtype == dtype
    assert torch.equal(x, x_copy) and torch.equal(s, s_copy)
    kernel64 = TanhFeatureKernel(d, 4, torch.Generator().manual_seed(10 + d), torch.float64)
    ref = reference_stein_kernel(x, s, kernel64.pair)
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(u.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("d", [1, 4])
def test_autograd_fallback_equals_closed_form(name, d):
    # The same radial kernel through both paths: a plain callable takes the autograd route.
    kernel, _ = KERNELS[name]
    if name == "rbf":
        fallback = exact_rbf(0.9)
    else:

        def fallback(a, b):
            diff = a[..., :, None, :] - b[..., None, :, :]
            return (1.2**2 + (diff * diff).sum(-1)) ** -0.5

    g = torch.Generator().manual_seed(20 + d)
    x = torch.randn(2, 7, d, generator=g, dtype=torch.float64)  # batched
    s = torch.randn(2, 7, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        stein_kernel_matrix(x, s, fallback), stein_kernel_matrix(x, s, kernel), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(ksd(x, s, fallback, "v"), ksd(x, s, kernel, "v"), rtol=1e-12, atol=1e-12)


def test_autograd_fallback_gradients_and_no_grad():
    g = torch.Generator().manual_seed(30)
    kernel = TanhFeatureKernel(2, 3, g, torch.float64)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    # Differentiable in the samples and the score values (4th-order autograd inside).
    assert torch.autograd.gradcheck(lambda a, b: stein_kernel_matrix(a, b, kernel), (x, s))
    # ... and in the kernel parameters.
    kernel.w.requires_grad_(True)
    ksd(x.detach(), s.detach(), kernel).backward()
    assert kernel.w.grad is not None and torch.isfinite(kernel.w.grad).all()
    with torch.no_grad():
        u = stein_kernel_matrix(x, s, kernel)
    assert not u.requires_grad


# ---------------------------------------------------------------------------
# IMQ: population KSD^2 by quadrature
# ---------------------------------------------------------------------------
def chi_expectation(fn, d: int, n_grid: int = 400_001, v_max: float = 40.0) -> float:
    """E fn(V^2) for V ~ chi_d (V^2 ~ chi^2_d), by the trapezoid rule in float64.

    Density of V: v^(d-1) exp(-v^2/2) / (2^(d/2-1) Gamma(d/2)), smooth on [0, inf) for d >= 1;
    the mass beyond v = 40 is below exp(-790). Step 1e-4 on a smooth integrand: error << 1e-8.
    """
    v = torch.linspace(0.0, v_max, n_grid, dtype=torch.float64)
    log_norm = (d / 2 - 1) * math.log(2.0) + math.lgamma(d / 2)
    dens = torch.exp((d - 1) * torch.log(v.clamp_min(1e-300)) - v * v / 2 - log_norm)
    if d == 1:
        dens[0] = math.exp(-log_norm)
    return torch.trapezoid(fn(v * v) * dens, v).item()


def ksd_gauss_shift_quadrature(mu_norm2: float, phi, d: int) -> float:
    # KSD^2(q || p) = E_{x,x'~q} (s_p - s_q)(x)^T (s_p - s_q)(x') k(x, x') (Liu et al. 2016,
    # Thm. 3.6); for p = N(0, I), q = N(mu, I): s_p - s_q = -mu, so KSD^2 = ||mu||^2 E phi(||x - x'||^2)
    # with x - x' ~ N(0, 2 I): ||x - x'||^2 = 2 V^2, V^2 ~ chi^2_d.
    return mu_norm2 * chi_expectation(lambda t: phi(2.0 * t), d)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_quadrature_reproduces_rbf_closed_form(d):
    h = 1.3
    quad = ksd_gauss_shift_quadrature(1.0, lambda r2: torch.exp(-r2 / (2 * h * h)), d)
    assert abs(quad - ksd_gauss_closed_form(1.0, h, d)) < 1e-9


@pytest.mark.parametrize("d", [2, 5])
def test_ksd_imq_closed_form_gaussian_shift(d):
    c, beta, n = 1.0, -0.5, 2000
    kernel = IMQ(c, beta)
    mu = torch.zeros(d, dtype=torch.float64)
    mu[0], mu[1] = 0.6, -0.8  # ||mu||^2 = 1
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(40 + d), dtype=torch.float64) + mu
    truth = ksd_gauss_shift_quadrature(1.0, lambda r2: (c * c + r2) ** beta, d)  # d=2: 0.387; d=5: 0.283
    est = ksd(x, lambda y: -y, kernel).item()
    se = u_stat_se(stein_kernel_matrix(x, -x, kernel))
    assert se < 0.1 * truth
    assert abs(est - truth) < 4 * se


# ---------------------------------------------------------------------------
# Linear-time statistics
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ksd_linear_matches_pair_loop(name, d, dtype):
    kernel, kernel_fn = KERNELS[name]
    g = torch.Generator().manual_seed(50 + d)
    x = torch.randn(9, d, generator=g, dtype=dtype)  # odd n: the last sample is dropped
    s = torch.randn(9, d, generator=g, dtype=dtype)
    out = ksd_linear(x, s, kernel)
    full = reference_stein_kernel(x, s, kernel_fn)
    terms = torch.stack([full[2 * i, 2 * i + 1] for i in range(4)])
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    assert out.value.dtype == dtype and out.value.ndim == 0
    torch.testing.assert_close(out.value.double(), terms.mean(), rtol=tol, atol=tol)
    torch.testing.assert_close(out.std_error.double(), terms.std() / 2.0, rtol=tol, atol=tol)
    z = terms.mean() / (terms.std() / 2.0)
    torch.testing.assert_close(out.p_value.double(), 0.5 * torch.erfc(z / math.sqrt(2)), rtol=1e-4, atol=1e-6)
    # Non-radial path gives the same numbers.
    if name == "rbf" and dtype == torch.float64:
        torch.testing.assert_close(ksd_linear(x, s, exact_rbf(0.9)).value, out.value, rtol=1e-12, atol=1e-12)


def test_ksd_linear_unbiased_and_calibrated():
    reps, n, d, h = 400, 200, 2, 1.0
    g = torch.Generator().manual_seed(60)
    # Alternative q = N(mu, I), ||mu||^2 = 0.25: mean over replicates matches the closed form.
    x = torch.randn(reps, n, d, generator=g, dtype=torch.float64) + torch.tensor([0.3, 0.4], dtype=torch.float64)
    out = ksd_linear(x, -x, RBF(h))
    assert out.value.shape == (reps,)
    truth = ksd_gauss_closed_form(0.25, h, d)
    se = (out.value.std() / math.sqrt(reps)).item()
    assert abs(out.value.mean().item() - truth) < 4 * se
    # The per-replicate SE estimates the spread of the statistic across replicates (ratio ~1;
    # the sd of a sample sd over 400 replicates is ~3.5%, so [0.85, 1.15] is > 4 sd).
    ratio = out.std_error.mean().item() / out.value.std().item()
    assert 0.85 < ratio < 1.15, ratio
    # Under the null the normal p-values reject at about the nominal rate: 400 reps at
    # alpha = 0.05 give sd 0.011; [0.02, 0.09] allows for the normal approximation at m = 100.
    z = torch.randn(reps, n, d, generator=g, dtype=torch.float64)
    rate = (ksd_linear(z, -z, RBF(h)).p_value <= 0.05).double().mean().item()
    assert 0.02 <= rate <= 0.09, rate


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mmd_linear_matches_pair_loop(d, dtype):
    kernel = IMQ(1.1, -0.5)
    g = torch.Generator().manual_seed(70 + d)
    x = torch.randn(10, d, generator=g, dtype=dtype)
    y = torch.randn(10, d, generator=g, dtype=dtype) + 0.3
    out = mmd_linear(x, y, kernel)
    k = lambda a, b: ((1.1**2 + ((a.double() - b.double()) ** 2).sum()) ** -0.5)
    terms = torch.stack(
        [
            k(x[2 * i], x[2 * i + 1]) + k(y[2 * i], y[2 * i + 1]) - k(x[2 * i], y[2 * i + 1]) - k(x[2 * i + 1], y[2 * i])
            for i in range(5)
        ]
    )
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    assert out.value.dtype == dtype
    torch.testing.assert_close(out.value.double(), terms.mean(), rtol=tol, atol=tol)
    torch.testing.assert_close(out.std_error.double(), terms.std() / math.sqrt(5), rtol=tol, atol=tol)
    # A non-radial callable (with batch dims) gives the same values.
    torch.testing.assert_close(
        mmd_linear(x.double(), y.double(), lambda a, b: kernel(a, b)).value, mmd_linear(x.double(), y.double(), kernel).value
    )
    with pytest.raises(ValueError):
        mmd_linear(x, y[:8], kernel)


def test_mmd_linear_unbiased_over_replicates():
    reps, n, d, h = 400, 100, 2, 1.0
    g = torch.Generator().manual_seed(80)
    x = torch.randn(reps, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(reps, n, d, generator=g, dtype=torch.float64) + torch.tensor([0.8, 0.0], dtype=torch.float64)
    out = mmd_linear(x, y, RBF(h))
    truth = mmd_gauss_closed_form(0.64, h, d)
    se = (out.value.std() / math.sqrt(reps)).item()
    assert abs(out.value.mean().item() - truth) < 4 * se
    xs = x[0, :8].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: mmd_linear(t, y[0, :8], RBF(h)).value, (xs,))


# --------------------------------------------------------------------------- blocked fast path of ksd()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("statistic", ["u", "v"])
@pytest.mark.parametrize("kernel_name", ["rbf", "imq", "sum"])
def test_blocked_ksd_equals_matrix_form(monkeypatch, dtype, statistic, kernel_name):
    """ksd() for radial kernels sums u_ij blockwise without forming the matrix; it must equal the mean of
    stein_kernel_matrix (value and gradient), also when the rows split into several uneven blocks."""
    import stein_core.discrepancies as disc
    from stein_core.kernels import IMQ, RBF, SumKernel

    kernel = {"rbf": RBF(1.3), "imq": IMQ(c=0.7, beta=-0.6), "sum": SumKernel([IMQ(0.5), RBF(2.0)])}[kernel_name]
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 150, 4, generator=gen, dtype=torch.float64) + 3.0).to(dtype).requires_grad_(True)
    score = torch.tanh(x) - 0.3 * x  # any smooth field, not a gradient of anything in particular
    monkeypatch.setattr(disc, "_BLOCK_ELEMENTS", 150 * 40)  # blocks of 40 rows: 40, 40, 40, 30
    fast = disc.ksd(x, score, kernel, statistic=statistic)
    ref = disc._reduce(disc.stein_kernel_matrix(x, score, kernel), statistic)
    assert fast.shape == (2,) and fast.dtype == dtype
    tol = {torch.float32: 2e-5, torch.float64: 1e-11}[dtype]
    scale = ref.abs().max().item() + 1e-3
    assert (fast - ref).abs().max().item() <= tol * scale
    (g_fast,) = torch.autograd.grad(fast.sum(), x, retain_graph=True)  # the score graph is shared
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_fast, g_ref, rtol=50 * tol, atol=50 * tol * g_ref.abs().max().item())


# --------------------------------------------------------------------------- issue 10 item 9: collapsed bandwidth


def test_median_rbf_statistics_stay_finite_when_most_points_coincide():
    """80% of the rows are one point, so the plain median of r^2 is 0: median_rbf used to give RBF(0), whose
    KSD, MMD and (per-slice) maxSKSD were NaN. With the median heuristic's fallback (median of the non-zero r^2)
    all are finite, and KSD matches the closed form at the reference bandwidth."""
    from stein_core.discrepancies import maxsksd, median_rbf

    gen = torch.Generator().manual_seed(40)
    x = torch.randn(150, 2, generator=gen, dtype=torch.float64)
    idx = torch.randperm(150, generator=gen)[:120]
    x[idx] = x[idx[0]].clone()
    y = torch.randn(150, 2, generator=gen, dtype=torch.float64)
    diff2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)[tuple(torch.triu_indices(150, 150, 1))]
    assert diff2.median() == 0
    nz = diff2[diff2 > 0].sort().values
    h = math.sqrt(nz[(len(nz) - 1) // 2].item() / 2.0)
    k = median_rbf(x)
    assert abs(k.bandwidth.item() - h) < 1e-12
    value = ksd(x, -x, k)
    torch.testing.assert_close(value, ksd(x, -x, RBF(h)), rtol=1e-12, atol=0)
    assert torch.isfinite(value) and value > 0.5  # an atom is far from N(0, I) (~1.5 here)
    assert torch.isfinite(mmd(x, y, median_rbf(x, y)))
    res = maxsksd(x, -x, median_rbf, n_steps=3)
    assert torch.isfinite(res.statistic) and torch.isfinite(res.g).all()


def test_sliced_kernel_factory_error_names_the_slice_projections():
    from stein_core.discrepancies import median_rbf, sksd

    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(41), dtype=torch.float64)
    x[:, 1] = -1.0  # the second coordinate is constant: every projection on e_2 coincides
    eye = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="slice kernel factory failed on the projections.*all 20 points coincide"):
        sksd(x, -x, median_rbf, r=eye, g=eye)


@pytest.mark.parametrize("kernel", ["median", "imq", "batched_rbf"])
def test_sliced_stein_kernel_is_the_same_whatever_the_chunk_of_slices(monkeypatch, kernel):
    """Slices are summed in chunks of SLICE_BLOCK // n² (one batched median heuristic per chunk): one slice per
    pass, chunks that do not divide R, and every slice at once give the same matrix, for a kernel factory, a fixed
    kernel and a kernel with one bandwidth per batch entry."""
    import stein_core.discrepancies as disc
    from stein_core.kernels import IMQ, RBF

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, 5, generator=gen, dtype=torch.float64)  # 3 batch entries
    s = torch.randn(3, 12, 5, generator=gen, dtype=torch.float64)
    r = torch.nn.functional.normalize(torch.randn(7, 5, generator=gen, dtype=torch.float64), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(3, 7, 5, generator=gen, dtype=torch.float64), dim=-1)
    k = {"median": disc.median_rbf, "imq": IMQ(c=1.3), "batched_rbf": RBF(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))}[kernel]
    results = []
    for block in (12 * 12, 3 * 12 * 12, 100 * 12 * 12):  # 1, 3 (7 = 3 + 3 + 1) and all 7 slices per pass
        monkeypatch.setattr(disc, "SLICE_BLOCK", block)
        results.append(disc.sliced_stein_kernel_matrix(x, s, k, r, g))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-12, atol=1e-12)
    # and a slice alone is the 1-D Stein kernel the loop of the definition gives for it
    one = disc.sliced_stein_kernel_matrix(x[1], s[1], k if kernel != "batched_rbf" else RBF(1.0), r[2:3], g[1, 2:3])
    u, sr, c = x[1] @ g[1, 2], s[1] @ r[2], float(r[2] @ g[1, 2])
    kern = (k(u[:, None]) if kernel == "median" else (k if kernel == "imq" else RBF(1.0)))
    delta = u[:, None] - u[None, :]
    phi, dphi, d2phi = kern.profile(delta * delta)
    ref = phi * sr[:, None] * sr[None, :] + 2 * c * dphi * delta * (sr[None, :] - sr[:, None]) \
        - c * c * (2 * dphi + 4 * d2phi * delta * delta)
    torch.testing.assert_close(one, ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- issue 24: KSD near its GEMM floor
def _ksd_radial_blocked_before(x, s, kernel, stat):
    """``discrepancies._ksd_radial_blocked`` as it was before issue 24 (a private copy, kept here on purpose):
    the generic closed form over full row blocks of ``_BLOCK_ELEMENTS`` (2^20) elements."""
    n, d = x.shape[-2], x.shape[-1]
    if stat == "u" and n < 2:
        raise ValueError("a U-statistic needs at least 2 samples")
    shift = x.mean(dim=-2, keepdim=True).detach()
    xc = x - shift
    sq = (xc * xc).sum(-1, keepdim=True)
    ones = torch.ones_like(sq)
    left = torch.cat([xc, sq, ones], dim=-1)
    right_t = torch.cat([-2.0 * xc, ones, sq], dim=-1).transpose(-2, -1)
    a = (s * xc).sum(-1)
    block = max(16, min(n, (1 << 20) // max(n, 1)))
    total = x.new_zeros(x.shape[:-2])
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        r2 = (left[..., i0:i1, :] @ right_t).clamp_min_(0.0)
        phi, dphi, d2phi = kernel.profile(r2)
        m = phi @ s + 4.0 * (dphi @ xc)
        rho = dphi.sum(-1)
        dot = (
            torch.dot(d2phi.reshape(-1), r2.reshape(-1)) if d2phi.dim() == 2 else (d2phi * r2).sum((-2, -1))
        )
        total = total + (
            (s[..., i0:i1, :] * m).sum((-2, -1))
            - 4.0 * (a[..., i0:i1] * rho).sum(-1)
            - 2.0 * d * rho.sum(-1)
            - 4.0 * dot
        )
    if stat == "v":
        return total / (n * n)
    phi0, dphi0, _ = kernel.profile(x.new_zeros((*x.shape[:-2], 1, 1)))
    diag = phi0[..., 0, 0] * (s * s).sum((-2, -1)) - 2.0 * d * n * dphi0[..., 0, 0]
    return (total - diag) / (n * (n - 1))


def _ksd_kernels(dtype):
    from stein_core.kernels import IMQ, RBF, SumKernel

    return {
        "rbf": RBF(1.3),
        "imq": IMQ(c=0.9),  # beta = -1/2: the rsqrt closed form
        "imq-0.6": IMQ(c=0.7, beta=-0.6),
        "sum": SumKernel([IMQ(0.5), RBF(2.0)]),  # any other radial kernel: the generic profile
        "imq-batched-c": IMQ(c=torch.tensor([0.6, 1.7], dtype=dtype)),
        "rbf-batched-h": RBF(torch.tensor([0.8, 2.5], dtype=dtype)),
    }


@pytest.mark.parametrize("kernel_name", ["rbf", "imq", "imq-0.6", "sum", "imq-batched-c", "rbf-batched-h"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ksd_up_to_1024_samples_is_bit_for_bit_the_one_before(dtype, kernel_name):
    """The pipelines train with ksd at batch <= 1000: up to _KSD_EXACT_MAX_N samples the value and the gradients
    (what the optimiser sees) are exactly those of the code before issue 24, for every kernel, both statistics,
    batched or not."""
    import stein_core.discrepancies as disc

    assert disc._KSD_EXACT_MAX_N == 1024
    kernel = _ksd_kernels(dtype)[kernel_name]
    gen = torch.Generator().manual_seed(24)
    for n in (2, 17, 300, 1024):
        x = (torch.randn(2, n, 3, generator=gen, dtype=torch.float64) + 2.0).to(dtype).requires_grad_(True)
        score = torch.tanh(x) - 0.3 * x
        for statistic in ("u", "v"):
            got = disc.ksd(x, score, kernel, statistic=statistic)
            want = _ksd_radial_blocked_before(x, score, kernel, statistic)
            assert torch.equal(got, want), (n, statistic)
            (g_got,) = torch.autograd.grad(got.sum(), x, retain_graph=True)
            (g_want,) = torch.autograd.grad(want.sum(), x, retain_graph=True)
            assert torch.equal(g_got, g_want), (n, statistic)
        if kernel_name == "imq" and n == 300:  # unbatched too
            got = disc.ksd(x[0].detach(), score[0].detach(), kernel)
            assert torch.equal(got, _ksd_radial_blocked_before(x[0].detach(), score[0].detach(), kernel, "u"))


@pytest.mark.parametrize("kernel_name", ["rbf", "imq", "imq-0.6", "sum", "imq-batched-c", "rbf-batched-h"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("statistic", ["u", "v"])
def test_fast_ksd_equals_the_matrix_form_across_block_boundaries(monkeypatch, dtype, statistic, kernel_name):
    """The upper-triangle sum of _ksd_sum_fast (forced at small n: _KSD_EXACT_MAX_N = 0) equals the mean of
    stein_kernel_matrix, value and gradients (x, the score, a kernel parameter), with blocks of 20 rows and n
    one below, at and one above a block (19, 20, 21 rows: one block, one full block, a block and a row) and
    several uneven blocks (61 = 20 + 20 + 20 + 1, 70); without autograd (the in-place path) the value is the
    same bit for bit."""
    import stein_core.discrepancies as disc

    kernel = _ksd_kernels(dtype)[kernel_name]
    monkeypatch.setattr(disc, "_KSD_EXACT_MAX_N", 0)
    monkeypatch.setattr(disc, "_KSD_MIN_ROWS", 1)
    blocks = []
    fast_sum = disc._ksd_sum_fast
    monkeypatch.setattr(disc, "_ksd_sum_fast", lambda x, s, k, block: blocks.append(block) or fast_sum(x, s, k, block))
    gen = torch.Generator().manual_seed(5)
    for n in (19, 20, 21, 61, 70):
        monkeypatch.setitem(disc._KSD_BLOCK_ELEMENTS, "cpu", 20 * n)  # 20 rows per block
        x = (torch.randn(2, n, 4, generator=gen, dtype=torch.float64) + 3.0).to(dtype).requires_grad_(True)
        score = torch.tanh(x) - 0.3 * x
        fast = disc.ksd(x, score, kernel, statistic=statistic)
        ref = disc._reduce(disc.stein_kernel_matrix(x, score, kernel), statistic)
        assert fast.shape == (2,) and fast.dtype == dtype
        tol = {torch.float32: 2e-5, torch.float64: 1e-11}[dtype]
        scale = ref.abs().max().item() + 1e-3
        assert (fast - ref).abs().max().item() <= tol * scale, (n, fast, ref)
        (g_fast,) = torch.autograd.grad(fast.sum(), x, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(g_fast, g_ref, rtol=50 * tol, atol=50 * tol * g_ref.abs().max().item())
        with torch.no_grad():
            assert torch.equal(disc.ksd(x, score, kernel, statistic=statistic), fast.detach())
        assert blocks[-1] == min(n, 20)
    # a kernel parameter that requires grad (a learned IMQ c): d ksd / dc as the matrix form's
    if kernel_name == "imq":
        c = torch.tensor(0.9, dtype=dtype, requires_grad=True)
        from stein_core.kernels import IMQ

        x = x.detach()
        score = torch.tanh(x) - 0.3 * x
        (dc_fast,) = torch.autograd.grad(disc.ksd(x, score, IMQ(c), statistic=statistic).sum(), c)
        (dc_ref,) = torch.autograd.grad(disc._reduce(disc.stein_kernel_matrix(x, score, IMQ(c)), statistic).sum(), c)
        torch.testing.assert_close(dc_fast, dc_ref, rtol=50 * tol, atol=50 * tol * dc_ref.abs().item())


def test_fast_ksd_above_1024_samples_matches_float64_and_clamps_a_tiny_c(monkeypatch):
    """At the default settings n = 1100 takes the fast path (several blocks of 2^19 elements); its float32 value
    is as close to the float64 matrix form as the form before issue 24 is. With c far below the round-off of
    r^2 (c^2 < 2^10 (d + 3) eps max|x|^2) the base c^2 + r^2 is clamped, as r^2 >= 0 was: finite, and equal
    to the matrix form."""
    import stein_core.discrepancies as disc
    from stein_core.kernels import IMQ

    gen = torch.Generator().manual_seed(7)
    x64 = torch.randn(1100, 5, generator=gen, dtype=torch.float64) * 2.0 + 1.0
    s64 = -(x64 - 1.0) / 4.0  # N(1, 4 I): the model is right, KSD^2 ~ 0
    kernel = IMQ(c=1.0)
    ref = disc._reduce(disc.stein_kernel_matrix(x64, s64, kernel), "u").item()
    x, s = x64.float(), s64.float()
    fast = disc.ksd(x, s, kernel).item()
    before = _ksd_radial_blocked_before(x, s, kernel, "u").item()
    scale = (s64 * s64).sum(-1).mean().item()  # phi(0) |s|^2: the size of the terms that cancel
    assert abs(fast - ref) <= max(2.0 * abs(before - ref), 1e-6 * scale), (fast, before, ref)
    # a small c: the clamp path, in float32 against the float64 matrix form of the same points
    monkeypatch.setattr(disc, "_KSD_EXACT_MAX_N", 0)
    x32 = (10.0 * torch.randn(200, 5, generator=gen, dtype=torch.float64)).float()
    s32 = -x32 / 100.0
    small = IMQ(c=0.25)
    xc = x32 - x32.mean(0)
    assert 0.25**2 < 1024 * (5 + 3) * torch.finfo(torch.float32).eps * float((xc * xc).sum(-1).max())
    got = disc.ksd(x32, s32, small).item()
    want = disc._reduce(disc.stein_kernel_matrix(x32.double(), s32.double(), small), "u").item()
    before = _ksd_radial_blocked_before(x32, s32, small, "u").item()
    assert math.isfinite(got)
    assert abs(got - want) <= max(2.0 * abs(before - want), 1e-6 * abs(want)), (got, before, want)


def test_ksd_block_elements_per_device(monkeypatch):
    import stein_core.discrepancies as disc

    assert disc._ksd_block_elements(torch.device("cuda")) == 1 << 24
    assert disc._ksd_block_elements(torch.device("cpu")) == 1 << 19
    assert disc._ksd_block_elements(torch.device("meta")) == disc._BLOCK_ELEMENTS
    # rows per block above 1024 samples on the CPU: 2^19 // n, but at least 128 (fast products), at most n
    blocks = []
    fast_sum = disc._ksd_sum_fast
    monkeypatch.setattr(disc, "_ksd_sum_fast", lambda x, s, k, block: blocks.append(block) or fast_sum(x, s, k, block))
    from stein_core.kernels import IMQ

    for n in (1025, 2048, 8192):
        x = torch.randn(n, 2, generator=torch.Generator().manual_seed(n))
        disc.ksd(x, -x, IMQ(1.0))
    assert blocks == [(1 << 19) // 1025, 256, 128]


@pytest.mark.gpu
def test_fast_ksd_on_cuda_matches_the_cpu():
    """On CUDA (2^24-element blocks) the fast path gives the CPU's value to float32 round-off."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from stein_core.discrepancies import ksd
    from stein_core.kernels import IMQ

    x = torch.randn(3000, 16, generator=torch.Generator().manual_seed(0))
    s = -x
    cpu = ksd(x, s, IMQ(1.0))
    gpu = ksd(x.cuda(), s.cuda(), IMQ(1.0)).cpu()
    scale = (s * s).sum(-1).mean().item()
    assert abs(gpu.item() - cpu.item()) <= 1e-5 * scale
