"""GaussianMixture closed forms vs autograd and quadrature; score_from_log_prob."""

import math

import pytest
import torch

from stein_core import GaussianMixture, score_from_log_prob


def random_gmm(k: int, d: int, seed: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    mu = 3.0 * torch.randn(k, d, generator=g, dtype=torch.float64)
    s = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    return GaussianMixture(w, mu, s)


def autograd_score(log_prob, x):
    xr = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(log_prob(xr).sum(), xr)
    return g


@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("k", [1, 3])
def test_score_closed_form_matches_autograd(d, k):
    gmm = random_gmm(k, d, seed=10 * d + k)
    g = torch.Generator().manual_seed(1)
    x = 4.0 * torch.randn(4, 7, d, generator=g, dtype=torch.float64)  # batch dims [4, 7]
    closed = gmm.score(x)
    assert closed.shape == (4, 7, d) and closed.dtype == torch.float64
    torch.testing.assert_close(closed, autograd_score(gmm.log_prob, x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(closed, score_from_log_prob(gmm.log_prob)(x), rtol=1e-10, atol=1e-12)


def test_log_prob_single_component_is_gaussian():
    gmm = GaussianMixture([1.0], [[1.0, -2.0, 0.5]], [0.7])
    x = torch.randn(11, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.MultivariateNormal(
        gmm.means[0], covariance_matrix=0.49 * torch.eye(3, dtype=torch.float64)
    ).log_prob(x)
    torch.testing.assert_close(gmm.log_prob(x), ref, rtol=1e-12, atol=1e-12)


def test_dtype_follows_input_and_float32_close_to_float64():
    gmm = random_gmm(3, 2, seed=3)
    x64 = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x32 = x64.float()
    assert gmm.log_prob(x32).dtype == torch.float32
    assert gmm.score(x32).dtype == torch.float32
    torch.testing.assert_close(gmm.score(x32).double(), gmm.score(x64), rtol=1e-4, atol=1e-5)


def test_score_from_log_prob_no_mutation_and_no_grad_context():
    gmm = random_gmm(2, 3, seed=4)
    x = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_copy = x.clone()
    fn = score_from_log_prob(gmm.log_prob)
    with torch.no_grad():
        s = fn(x)
    assert not x.requires_grad and torch.equal(x, x_copy)
    assert not s.requires_grad
    torch.testing.assert_close(s, gmm.score(x), rtol=1e-10, atol=1e-12)


def test_score_from_log_prob_create_graph_and_extra_args():
    theta = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)

    def log_prob(x, shift):
        return -0.5 * theta * ((x - shift) ** 2).sum(-1)

    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = score_from_log_prob(log_prob, create_graph=True)(x, 0.5)  # = -theta (x - 0.5)
    torch.testing.assert_close(s, -1.7 * (x - 0.5))
    (dtheta,) = torch.autograd.grad(s.sum(), theta)
    torch.testing.assert_close(dtheta, -(x - 0.5).sum())


def test_perturbed_matches_quadrature_convolution_1d():
    # p_sigma(x) = int p(y) N(x; y, sigma^2) dy, by the trapezoid rule on a fine grid
    # (spacing 1e-3 over [-15, 15]; the integrand is smooth, error << 1e-8).
    gmm = GaussianMixture([0.3, 0.7], [[-2.0], [1.5]], [0.4, 1.1])
    sigma = 0.8
    y = torch.linspace(-15.0, 15.0, 30001, dtype=torch.float64)
    py = gmm.log_prob(y[:, None]).exp()
    xs = torch.tensor([-3.0, -1.0, 0.0, 0.7, 2.5], dtype=torch.float64)
    kern = torch.exp(-0.5 * (xs[:, None] - y) ** 2 / sigma**2) / math.sqrt(2 * math.pi * sigma**2)
    ref = torch.trapezoid(py * kern, y, dim=-1)
    got = gmm.perturbed(sigma).log_prob(xs[:, None]).exp()
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=0.0)
    torch.testing.assert_close(
        gmm.perturbed(sigma).stds, torch.sqrt(gmm.stds**2 + sigma**2), rtol=1e-15, atol=0
    )


def test_perturbed_score_per_point_sigma():
    gmm = random_gmm(3, 2, seed=5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, dtype=torch.float64, generator=g)
    sig = torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0], dtype=torch.float64)
    got = gmm.perturbed_score(x, sig)
    ref = torch.stack([gmm.perturbed(float(s)).score(x[i]) for i, s in enumerate(sig)])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gmm.perturbed_score(x, 0.0), gmm.score(x), rtol=1e-12, atol=0)


def test_sample_statistics_and_reproducibility():
    gmm = GaussianMixture([0.8, 0.2], [[-5.0, -5.0], [5.0, 5.0]], [1.0, 0.5])
    n = 20000
    x, c = gmm.sample(n, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 2) and x.dtype == torch.float32 and c.dtype == torch.long
    # Component frequency: SE = sqrt(0.8 * 0.2 / n) = 0.0028; allow 4 SE.
    assert abs(c.eq(0).double().mean().item() - 0.8) < 4 * math.sqrt(0.16 / n)
    for k, (mu, s) in enumerate([(-5.0, 1.0), (5.0, 0.5)]):
        xk = x[c == k].double()
        nk = xk.shape[0]
        # Mean: SE = s / sqrt(n_k); variance: SE = s^2 sqrt(2 / n_k); allow 4 SE.
        assert (xk.mean(0) - mu).abs().max() < 4 * s / math.sqrt(nk)
        assert (xk.var(0) - s**2).abs().max() < 4 * s**2 * math.sqrt(2 / nk)
    x2, c2 = gmm.sample(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(c, c2)
    # Draws are made in float64 and cast, so the dtype does not change the stream.
    x3, _ = gmm.sample(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x3.dtype == torch.float64
    assert torch.equal(x3.float(), x)


def test_nearest_component():
    gmm = GaussianMixture([0.5, 0.5], [[-5.0, -5.0], [5.0, 5.0]], [1.0, 1.0])
    x = torch.tensor([[[-4.0, -6.0], [0.1, 0.2]], [[3.0, 9.0], [-0.1, -0.1]]])
    assert torch.equal(gmm.nearest_component(x), torch.tensor([[0, 1], [1, 0]]))


def test_validation():
    with pytest.raises(ValueError):
        GaussianMixture([0.5, 0.5], [[0.0], [1.0]], [1.0, -1.0])
    with pytest.raises(ValueError):
        GaussianMixture([0.5, -0.5], [[0.0], [1.0]], [1.0, 1.0])
    with pytest.raises(ValueError):
        GaussianMixture([1.0], [0.0, 1.0], [1.0])
    with pytest.raises(ValueError):
        GaussianMixture([0.5, 0.5], [[0.0], [1.0]], [1.0, 1.0, 1.0])
    gmm = GaussianMixture([1.0], [[0.0, 0.0]], 2.0)  # scalar std broadcast
    assert gmm.stds.shape == (1,)
    with pytest.raises(ValueError):
        gmm.log_prob(torch.zeros(3, 3))
