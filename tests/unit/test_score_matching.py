"""Noise ladder and the multi-scale denoising score-matching loss."""

import math

import pytest
import torch

from stein_core import geometric_sigmas, get_dsm_loss_fn


def test_geometric_sigmas_properties():
    sig = geometric_sigmas(20.0, 0.1, 10)
    assert sig.shape == (10,) and sig.dtype == torch.float32
    assert sig[0].item() == pytest.approx(20.0, rel=1e-7) and sig[-1].item() == pytest.approx(0.1, rel=1e-7)
    assert (sig[1:] < sig[:-1]).all()
    ratios = (sig[:-1] / sig[1:]).double()
    # Constant ratio (20 / 0.1)^(1/9) = 1.8016, up to float32 rounding.
    torch.testing.assert_close(ratios, torch.full_like(ratios, 200 ** (1 / 9)), rtol=1e-6, atol=0)
    s64 = geometric_sigmas(1.0, 0.01, 3, dtype=torch.float64)
    torch.testing.assert_close(s64, torch.tensor([1.0, 0.1, 0.01], dtype=torch.float64), rtol=1e-15, atol=0)
    assert geometric_sigmas(0.5, 0.5, 1).tolist() == [0.5]
    assert geometric_sigmas(2.0, 1.0, 2, device="cpu").device.type == "cpu"


@pytest.mark.parametrize(
    "args",
    [(1.0, 2.0, 5), (1.0, 1.0, 5), (1.0, 0.0, 5), (1.0, -0.1, 3), (1.0, 0.5, 0), (1.0, 0.5, 1), (1.0, 0.5, 2.5)],
)
def test_geometric_sigmas_validation(args):
    with pytest.raises(ValueError):
        geometric_sigmas(*args)


def gaussian_noisy_score(s: float):
    # Data N(0, s^2 I) convolved with N(0, sigma^2 I) is N(0, (s^2 + sigma^2) I).
    def score_fn(x_tilde, sigma):
        var = s * s + sigma.reshape((-1,) + (1,) * (x_tilde.ndim - 1)) ** 2
        return -x_tilde / var

    return score_fn


def test_dsm_loss_expected_value_at_true_score():
    # With s = -x_tilde / v, v = s^2 + sigma^2: sigma s + z = (s^2 z - sigma x) / v, so
    # E 1/2 ||sigma s + z||^2 = d s^2 / (2 v) per level; the loss averages over levels.
    s, d = 1.5, 3
    sigmas = geometric_sigmas(10.0, 0.1, 8, dtype=torch.float64)
    expected = (0.5 * d * s**2 / (s**2 + sigmas**2)).mean().item()
    loss_fn = get_dsm_loss_fn(sigmas)
    gen = torch.Generator().manual_seed(0)
    score = gaussian_noisy_score(s)
    batches = torch.stack(
        [loss_fn(score, s * torch.randn(2000, d, generator=gen, dtype=torch.float64), generator=gen) for _ in range(40)]
    )
    se = (batches.std() / math.sqrt(batches.numel())).item()  # 40 independent batch means
    assert se < 0.02 * expected
    assert abs(batches.mean().item() - expected) < 4 * se


@pytest.mark.parametrize(
    "wrong",
    [lambda f: (lambda x, sg: 1.3 * f(x, sg)), lambda f: (lambda x, sg: f(x, sg) + 0.3)],
    ids=["scaled1.3", "shifted0.3"],
)
def test_dsm_loss_lower_at_true_score(wrong):
    s, d, n = 1.0, 2, 4000
    sigmas = geometric_sigmas(5.0, 0.1, 6)
    loss_fn = get_dsm_loss_fn(sigmas)
    x = s * torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    true = gaussian_noisy_score(s)
    # Common random numbers: the same noise and levels for both scores.
    l_true = loss_fn(true, x, generator=torch.Generator().manual_seed(2))
    l_wrong = loss_fn(wrong(true), x, generator=torch.Generator().manual_seed(2))
    assert l_wrong.item() > l_true.item() * 1.02


def test_dsm_loss_options_reproducibility_and_shapes():
    sig = torch.tensor([0.7])
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # image-shaped
    score = gaussian_noisy_score(1.0)
    mean = get_dsm_loss_fn(sig)(score, x, generator=torch.Generator().manual_seed(4))
    total = get_dsm_loss_fn(sig, reduce="sum")(score, x, generator=torch.Generator().manual_seed(4))
    plain = get_dsm_loss_fn(sig, weighting="none")(score, x, generator=torch.Generator().manual_seed(4))
    assert mean.dtype == torch.float64 and mean.ndim == 0
    torch.testing.assert_close(total, 64 * mean)
    torch.testing.assert_close(plain, mean / 0.7**2)  # lambda = 1 vs sigma^2 at a single level
    again = get_dsm_loss_fn(sig)(score, x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(mean, again)
    for bad in ({"weighting": "x"}, {"reduce": "none"}):
        with pytest.raises(ValueError):
            get_dsm_loss_fn(sig, **bad)
    with pytest.raises(ValueError):
        get_dsm_loss_fn([1.0, -1.0])


def test_dsm_loss_levels_uniform_and_gradient_flows():
    sigmas = geometric_sigmas(4.0, 0.5, 4)
    seen = []
    param = torch.tensor(0.9, requires_grad=True)

    def score_fn(x_tilde, sigma):
        seen.append(sigma)
        return -param * x_tilde / (1 + sigma[:, None] ** 2)

    x = torch.randn(8000, 2, generator=torch.Generator().manual_seed(5))
    loss = get_dsm_loss_fn(sigmas)(score_fn, x, generator=torch.Generator().manual_seed(6))
    loss.backward()
    assert param.grad is not None and torch.isfinite(param.grad)
    (sig_used,) = seen
    assert sig_used.shape == (8000,)
    # Level counts ~ Binomial(8000, 1/4): SE = sqrt(8000 * 3/16) = 38.7; allow 4 SE.
    counts = torch.stack([(sig_used == s).sum() for s in sigmas])
    assert counts.sum() == 8000
    assert (counts - 2000).abs().max() < 4 * 38.7


# ---------------------------------------------------------------------------
# Single-model objectives: exact (Hyvarinen 2005), single-sigma DSM (Vincent 2011),
# sliced SSM / SSM-VR (Song et al. 2019), and energy-parametrised scores.
# ---------------------------------------------------------------------------

from torch import nn  # noqa: E402

from stein_core.score_matching import get_score_matching_loss_fn, score_from_energy  # noqa: E402

DT = torch.float64
MU = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
SIGMA = torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.8, -0.2], [0.0, -0.2, 0.5]], dtype=DT)
PREC = torch.linalg.inv(SIGMA)  # 3x3 test matrix; the score of N(mu, Sigma) is -PREC (x - mu)
A_LIN = torch.tensor([[-0.8, 0.4, 0.1], [0.2, -1.1, 0.3], [-0.5, 0.1, -0.6]], dtype=DT)
B_LIN = torch.tensor([0.3, -0.2, 0.7], dtype=DT)


def gaussian_sample(n, seed, cov=SIGMA):
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return MU + z @ torch.linalg.cholesky(cov).T


def linear_score(a, b):
    return lambda x: x @ a.T + b


def mean_and_se(values):
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def test_exact_sm_closed_form_linear_field():
    # s(x) = A x + b: tr grad s = tr A, so per point l = 1/2 ||A x + b||^2 + tr A, and over
    # x ~ N(mu, Sigma): E l = 1/2 (||A mu + b||^2 + tr(A Sigma A^T)) + tr A.
    x = gaussian_sample(20000, 0)
    per = get_score_matching_loss_fn("exact", reduce="none")(linear_score(A_LIN, B_LIN), x)
    direct = 0.5 * (x @ A_LIN.T + B_LIN).pow(2).sum(-1) + torch.trace(A_LIN)
    torch.testing.assert_close(per, direct, rtol=1e-12, atol=1e-12)
    m = A_LIN @ MU + B_LIN
    expected = 0.5 * (m @ m + torch.trace(A_LIN @ SIGMA @ A_LIN.T)) + torch.trace(A_LIN)
    mean, se = mean_and_se(per)
    # The two terms nearly cancel here (E = 0.21); resolve 3% of the quadratic term 1/2 E ||s||^2 = 2.71.
    assert 4 * se < 0.03 * (expected - torch.trace(A_LIN)).item()
    assert abs(mean - expected.item()) < 4 * se


def test_exact_sm_trace_matches_jacobian_reference():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = gaussian_sample(40, 1)
    per = get_score_matching_loss_fn("exact", reduce="none")(net, x)
    ref = torch.stack(
        [0.5 * net(xi).pow(2).sum() + torch.trace(torch.autograd.functional.jacobian(net, xi)) for xi in x]
    )
    torch.testing.assert_close(per, ref.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_sliced_agrees_with_exact_in_expectation(projection):
    # Paired on the same x: E_v[v^T A v] = tr A and E_v[(v^T s)^2] = ||s||^2 when E[v v^T] = I,
    # so SSM - exact and SSM-VR - exact have mean zero; SE from the per-point differences.
    x = gaussian_sample(20000, 2)
    score = linear_score(A_LIN, B_LIN)
    exact = get_score_matching_loss_fn("exact", reduce="none")(score, x)
    spread = {}
    for method in ("ssm", "ssm_vr"):
        loss_fn = get_score_matching_loss_fn(method, projection=projection, reduce="none")
        diff = loss_fn(score, x, generator=torch.Generator().manual_seed(3)) - exact
        mean, se = mean_and_se(diff)
        assert 4 * se < 0.05 * abs(torch.trace(A_LIN).item())  # resolves 5% of the trace term (2.5)
        assert abs(mean) < 4 * se
        spread[method] = diff.std().item()
    assert spread["ssm_vr"] < spread["ssm"]  # the variance reduction of SSM-VR


def test_sliced_agrees_with_exact_for_a_nonlinear_net():
    # Catches per-point mixing in the batched Hessian-vector products, which a constant
    # Jacobian (linear field) could not.
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    x = gaussian_sample(4000, 4)
    with torch.no_grad():
        exact = get_score_matching_loss_fn("exact", reduce="none")(net, x)
        for method in ("ssm", "ssm_vr"):
            loss_fn = get_score_matching_loss_fn(method, n_projections=2, reduce="none")
            diff = loss_fn(net, x, generator=torch.Generator().manual_seed(5)) - exact
            mean, se = mean_and_se(diff)
            assert abs(mean) < 4 * se and se < 0.05 * exact.abs().mean().item()


def test_rademacher_ssm_vr_is_exact_for_a_diagonal_jacobian():
    # v_i^2 = 1 for Rademacher v, so v^T D v = tr D exactly and SSM-VR equals exact SM per point.
    a = torch.diag(torch.tensor([-1.0, 0.5, -2.0], dtype=DT))
    x = gaussian_sample(100, 6)
    exact = get_score_matching_loss_fn("exact", reduce="none")(linear_score(a, B_LIN), x)
    vr = get_score_matching_loss_fn("ssm_vr", projection="rademacher", n_projections=3, reduce="none")
    torch.testing.assert_close(vr(linear_score(a, B_LIN), x, generator=torch.Generator().manual_seed(7)), exact)


DSM_SIGMA = 0.3


def true_scores(method):
    # Data N(mu, Sigma); for DSM the score of the perturbed data N(mu, Sigma + sigma^2 I).
    cov = SIGMA + DSM_SIGMA**2 * torch.eye(3, dtype=DT) if method == "dsm" else SIGMA
    prec = torch.linalg.inv(cov)
    return (lambda x: -(x - MU) @ prec), prec


@pytest.mark.parametrize("method", ["exact", "dsm", "ssm", "ssm_vr"])
def test_expected_loss_at_true_score(method):
    # Exact, SSM, SSM-VR at s = -P (x - mu): E[1/2 ||s||^2] + tr(-P) = 1/2 tr P - tr P = -1/2 tr P.
    # DSM at the perturbed score s = -P_s (x_tilde - mu), P_s = (Sigma + sigma^2 I)^-1: by Stein's lemma in z,
    # E[s(x_tilde)^T z] = sigma E tr grad s = -sigma tr P_s, so E 1/2 ||s + z/sigma||^2
    # = 1/2 (tr P_s - 2 tr P_s + d / sigma^2) = 1/2 (d / sigma^2 - tr P_s).
    true, prec = true_scores(method)
    if method == "dsm":
        expected, kw = 0.5 * (3 / DSM_SIGMA**2 - torch.trace(prec).item()), {"sigma": DSM_SIGMA}
    else:
        expected, kw = -0.5 * torch.trace(prec).item(), {}
    per = get_score_matching_loss_fn(method, reduce="none", **kw)(
        true, gaussian_sample(50000, 20), generator=torch.Generator().manual_seed(21)
    )
    mean, se = mean_and_se(per)
    assert 4 * se < 0.05 * abs(expected)
    assert abs(mean - expected) < 4 * se


@pytest.mark.parametrize("method", ["exact", "dsm", "ssm", "ssm_vr"])
@pytest.mark.parametrize("perturb", ["scaled1.3", "shifted0.3"])
def test_loss_lower_at_true_score(method, perturb):
    # Each objective is 1/2 E ||s - s_true||^2 + const, so with common random numbers the
    # per-point gap has mean 1/2 E ||delta||^2: delta = 0.3 s_true gives 0.045 E ||s_true||^2
    # = 0.045 tr(P) (P the precision), delta = 0.3 * ones gives 1/2 * 3 * 0.09.
    true, prec = true_scores(method)
    if perturb == "scaled1.3":
        wrong, gap = (lambda x: 1.3 * true(x)), 0.045 * torch.trace(prec).item()
    else:
        wrong, gap = (lambda x: true(x) + 0.3), 0.135
    kw = {"sigma": DSM_SIGMA} if method == "dsm" else {}
    loss_fn = get_score_matching_loss_fn(method, reduce="none", **kw)
    x = gaussian_sample(20000, 8)
    diff = loss_fn(wrong, x, generator=torch.Generator().manual_seed(9)) - loss_fn(
        true, x, generator=torch.Generator().manual_seed(9)
    )
    mean, se = mean_and_se(diff)
    assert gap > 6 * se  # the test has power
    assert mean > 0 and abs(mean - gap) < 4 * se


def test_dsm_small_sigma_minimiser_approaches_data_score():
    # Linear family s(x) = W phi, phi = [x; 1], W = [A | b] (3 x 4). With the noise fixed (same
    # generator) the DSM loss mean 1/2 ||W phi(x_tilde) + z / sigma||^2 is quadratic in W with gradient
    # W M + G0, M = mean phi phi^T over the x_tilde that score_fn saw; its minimiser is
    # W* = -G0 M^-1 (the least-squares fit of -z / sigma on x_tilde). Population minimiser: the
    # perturbed score, A = -(Sigma + sigma^2 I)^-1, b = -A mu, within O(sigma^2) of the data score
    # A = -P, b = P mu. Residual variance ~ 1/sigma^2 per coordinate, so with C = Cov(x_tilde):
    # se(A_jk) = sqrt(C^-1_kk / n) / sigma, se(b_j) = sqrt((1 + mu^T C^-1 mu) / n) / sigma.
    sigma, n = 0.05, 1_000_000
    x = gaussian_sample(n, 10)
    loss_fn = get_score_matching_loss_fn("dsm", sigma=sigma)
    seen = []

    def loss(w):
        def score(x_tilde):
            seen.append(x_tilde.detach())
            return x_tilde @ w[:, :3].T + w[:, 3]

        return loss_fn(score, x, generator=torch.Generator().manual_seed(11))

    w0 = torch.zeros(3, 4, dtype=DT, requires_grad=True)
    (g0,) = torch.autograd.grad(loss(w0), w0)
    phi = torch.cat([seen[0], torch.ones(n, 1, dtype=DT)], dim=1)  # [n, 4]
    w_hat = -torch.linalg.solve(phi.T @ phi / n, g0.T).T  # M symmetric
    # The loss really is that quadratic: its gradient vanishes at W*.
    w_star = w_hat.clone().requires_grad_(True)
    (g_star,) = torch.autograd.grad(loss(w_star), w_star)
    assert g_star.abs().max() < 1e-8 * g0.abs().max()
    a_hat, b_hat = w_hat[:, :3], w_hat[:, 3]
    c_inv = torch.linalg.inv(SIGMA + sigma**2 * torch.eye(3, dtype=DT))
    a_pop, b_pop = -c_inv, c_inv @ MU
    se_a = (torch.diag(c_inv) / n).sqrt().expand(3, 3) / sigma
    se_b = torch.full((3,), math.sqrt((1 + MU @ c_inv @ MU) / n) / sigma, dtype=DT)
    assert ((a_hat - a_pop).abs() < 4 * se_a).all() and ((b_hat - b_pop).abs() < 4 * se_b).all()
    # Hence within sampling error plus the O(sigma^2) bias of the data score (entries up to 2.3).
    tol_a = 4 * se_a + (a_pop + PREC).abs()
    tol_b = 4 * se_b + (b_pop - PREC @ MU).abs()
    assert ((a_hat + PREC).abs() < tol_a).all() and ((b_hat - PREC @ MU).abs() < tol_b).all()
    assert tol_a.max() < 0.15 and tol_b.max() < 0.3


def mlp(d, out, dtype, seed):
    torch.manual_seed(seed)  # nn.Module init uses the global RNG
    return nn.Sequential(nn.Linear(d, 16), nn.SiLU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, out)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model", ["score_net", "energy_net"])
@pytest.mark.parametrize("method", ["exact", "dsm", "ssm", "ssm_vr"])
def test_gradients_reach_parameters_and_dtype_is_kept(method, model, dtype):
    d = 3
    net = mlp(d, d if model == "score_net" else 1, dtype, 0)
    score = net if model == "score_net" else score_from_energy(net)
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(12), dtype=dtype)
    x_before = x.clone()
    kw = {"sigma": 0.5} if method == "dsm" else {}
    loss = get_score_matching_loss_fn(method, **kw)(score, x, generator=torch.Generator().manual_seed(13))
    assert loss.dtype == dtype and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    params = list(net.parameters())
    if model == "energy_net":
        # The energy's additive constant (last bias) does not change the score: no gradient.
        assert params[-1].grad is None
        params = params[:-1]
    for p in params:
        assert p.grad is not None and p.grad.dtype == dtype
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None


@pytest.mark.parametrize("method", ["dsm", "ssm", "ssm_vr"])
def test_reproducible_with_a_generator(method):
    net = mlp(3, 3, torch.float32, 1)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(14))
    loss_fn = get_score_matching_loss_fn(method, sigma=0.5 if method == "dsm" else None)
    a = loss_fn(net, x, generator=torch.Generator().manual_seed(15))
    b = loss_fn(net, x, generator=torch.Generator().manual_seed(15))
    c = loss_fn(net, x, generator=torch.Generator().manual_seed(16))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_options_shapes_and_no_grad():
    score = linear_score(A_LIN, B_LIN)
    x = gaussian_sample(100, 17)
    for method, kw in (("exact", {}), ("dsm", {"sigma": 0.2}), ("ssm", {"n_projections": 3}), ("ssm_vr", {})):
        gen = lambda: torch.Generator().manual_seed(18)  # noqa: E731
        mean = get_score_matching_loss_fn(method, **kw)(score, x, generator=gen())
        total = get_score_matching_loss_fn(method, reduce="sum", **kw)(score, x, generator=gen())
        per = get_score_matching_loss_fn(method, reduce="none", **kw)(score, x, generator=gen())
        assert mean.ndim == 0 and mean.dtype == DT and per.shape == (100,)
        torch.testing.assert_close(total, 100 * mean)
        torch.testing.assert_close(per.mean(), mean)
        # Leading batch dims [..., n, d] give the same per-point values.
        batched = get_score_matching_loss_fn(method, reduce="none", **kw)(score, x.reshape(4, 25, 3), generator=gen())
        torch.testing.assert_close(batched.reshape(100), per)
        with torch.no_grad():
            frozen = get_score_matching_loss_fn(method, **kw)(score, x, generator=gen())
        assert not frozen.requires_grad
        torch.testing.assert_close(frozen, mean)
    with pytest.raises(ValueError):
        get_score_matching_loss_fn("exact")(lambda x: x[:, :2], x)  # wrong score shape
    with pytest.raises(ValueError):
        get_score_matching_loss_fn("exact")(score, x[0])  # not [..., n, d]


@pytest.mark.parametrize(
    "args, kw",
    [
        (("sliced",), {}),
        (("dsm",), {}),
        (("dsm",), {"sigma": 0.0}),
        (("dsm",), {"sigma": float("inf")}),
        (("exact",), {"sigma": 0.1}),
        (("ssm",), {"n_projections": 0}),
        (("ssm",), {"n_projections": 1.5}),
        (("ssm",), {"projection": "sphere"}),
        (("ssm_vr",), {"reduce": "max"}),
    ],
)
def test_score_matching_validation(args, kw):
    with pytest.raises(ValueError):
        get_score_matching_loss_fn(*args, **kw)


def test_score_from_energy_closed_form_and_graph():
    # E(x) = 1/2 (x - mu)^T P (x - mu) has score -P (x - mu): the linear field A = -P, b = P mu.
    def energy(x):
        return 0.5 * ((x - MU) @ PREC * (x - MU)).sum(-1)

    x = gaussian_sample(50, 19)
    torch.testing.assert_close(score_from_energy(energy)(x), -(x - MU) @ PREC)
    exact = get_score_matching_loss_fn("exact", reduce="none")
    torch.testing.assert_close(exact(score_from_energy(energy), x), exact(linear_score(-PREC, PREC @ MU), x))
    net = mlp(3, 1, DT, 2)
    assert score_from_energy(net)(x).requires_grad
    assert not score_from_energy(net, create_graph=False)(x).requires_grad
    assert not x.requires_grad


@pytest.mark.parametrize("method", ["exact", "ssm_vr"])
def test_loss_differentiable_wrt_x_that_requires_grad(method):
    # For s = A x + b both losses are mean_i 1/2 ||A x_i + b||^2 + (x-free trace term), so
    # d loss / d x_i = A^T (A x_i + b) / n; x is used as is, and only .backward() touches x.grad.
    x = gaussian_sample(20, 22).requires_grad_(True)
    loss_fn = get_score_matching_loss_fn(method)
    loss = loss_fn(linear_score(A_LIN, B_LIN), x, generator=torch.Generator().manual_seed(23))
    assert x.grad is None
    loss.backward()
    torch.testing.assert_close(x.grad, (x.detach() @ A_LIN.T + B_LIN) @ A_LIN / 20)


# ---------------------------------------------------------------------------
# Caller-supplied levels and noise (data-parallel training draws the global batch's randomness once).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 3), (48, 1, 4, 4)], ids=["vector", "image"])
def test_dsm_loss_given_levels_and_noise(shape):
    sigmas = geometric_sigmas(5.0, 0.1, 6, dtype=torch.float64)
    loss_fn = get_dsm_loss_fn(sigmas)
    net_param = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def score(x_tilde, sigma):  # depends on sigma and on a parameter, so levels and gradients both matter
        return -net_param * x_tilde / (1.0 + sigma.reshape((-1,) + (1,) * (x_tilde.ndim - 1)) ** 2)

    x = torch.randn(shape, generator=torch.Generator().manual_seed(30), dtype=torch.float64)
    n = shape[0]
    default = loss_fn(score, x, generator=torch.Generator().manual_seed(31))
    # The default call draws levels first, then noise, from the one generator: the same draws handed in
    # reproduce it bit for bit.
    gen = torch.Generator().manual_seed(31)
    levels = torch.randint(0, 6, (n,), generator=gen)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    given = loss_fn(score, x, levels=levels, noise=noise)
    assert torch.equal(given, default)
    # Only one of them given: the other is drawn (levels given -> only the noise is drawn).
    only_levels = loss_fn(score, x, generator=torch.Generator().manual_seed(32), levels=levels)
    ref = loss_fn(score, x, levels=levels, noise=torch.randn(shape, generator=torch.Generator().manual_seed(32),
                                                             dtype=torch.float64))
    assert torch.equal(only_levels, ref)
    # Two equal shards of the global batch: the mean of the shard means is the global mean, and so is the
    # mean of the shard gradients (what N data-parallel workers average).
    (g_full,) = torch.autograd.grad(given, net_param)
    h = n // 2
    halves = [loss_fn(score, x[sl], levels=levels[sl], noise=noise[sl]) for sl in (slice(0, h), slice(h, n))]
    torch.testing.assert_close(0.5 * (halves[0] + halves[1]), given, rtol=1e-14, atol=0)
    g_halves = [torch.autograd.grad(hv, net_param)[0] for hv in halves]
    torch.testing.assert_close(0.5 * (g_halves[0] + g_halves[1]), g_full, rtol=1e-13, atol=0)


def test_dsm_loss_given_levels_and_noise_validation():
    loss_fn = get_dsm_loss_fn(geometric_sigmas(5.0, 0.1, 4))
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(33))
    score = gaussian_noisy_score(1.0)
    ok = torch.zeros(10, dtype=torch.long)
    for bad in (torch.zeros(9, dtype=torch.long), torch.zeros(10, 1, dtype=torch.long), torch.zeros(10),
                torch.full((10,), 4), torch.full((10,), -1)):
        with pytest.raises(ValueError, match="levels"):
            loss_fn(score, x, levels=bad)
    with pytest.raises(ValueError, match="noise"):
        loss_fn(score, x, levels=ok, noise=torch.zeros(10, 3))
    # int32 indices are accepted; float32 noise is used as given.
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(34))
    torch.testing.assert_close(loss_fn(score, x, levels=ok.int(), noise=z), loss_fn(score, x, levels=ok, noise=z))
