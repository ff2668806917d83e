"""Sample-quality metrics: Frechet distance vs closed forms and an mpmath reference, the exact Gram
form vs the eigen form, streaming moments vs two-pass float64, KID unbiasedness, Inception Score
closed forms, improved precision/recall vs a brute-force reference."""

import math

import mpmath
import pytest
import torch

from stein_core.discrepancies import mmd
from stein_core.metrics import (
    StreamingMoments,
    frechet_distance,
    frechet_distance_from_samples,
    inception_score,
    kid,
    precision_recall,
)

F64 = torch.float64


def random_spd(d: int, gen: torch.Generator, cond: float = 1e3) -> torch.Tensor:
    """Q diag(logspace(0, log10 cond)) Q^T with a random orthogonal Q (float64)."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    evals = torch.logspace(0.0, math.log10(cond), d, dtype=F64)[torch.randperm(d, generator=gen)]
    a = (q * evals) @ q.T
    return 0.5 * (a + a.T)


def mp_matrix(a: torch.Tensor) -> mpmath.matrix:
    return mpmath.matrix(a.tolist())


def mp_frechet(mu1, cov1, mu2, cov2, dps: int = 40) -> float:
    """High-precision reference: mpmath's own matrix square roots (Denman-Beavers), a route
    independent of eigh/eigvalsh, at `dps` decimal digits."""
    with mpmath.workdps(dps):
        s1, s2 = mp_matrix(cov1), mp_matrix(cov2)
        r1 = mpmath.sqrtm(s1)
        inner = r1 * s2 * r1
        root = mpmath.sqrtm(inner)
        d = s1.rows
        tr = sum(s1[i, i] + s2[i, i] - 2 * root[i, i] for i in range(d))
        diff = sum((mpmath.mpf(a) - mpmath.mpf(b)) ** 2 for a, b in zip(mu1.tolist(), mu2.tolist()))
        return float(mpmath.re(diff + tr))


# ---------------------------------------------------------------------------
# Frechet distance from moments
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 5, 32])
def test_frechet_identical_statistics_is_zero(d):
    gen = torch.Generator().manual_seed(d)
    mu = torch.randn(d, generator=gen, dtype=F64)
    cov = random_spd(d, gen, cond=1e2)
    assert frechet_distance(mu, cov, mu, cov).item() < 1e-10


def test_frechet_one_dimensional_closed_form():
    # d = 1: W2^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + s1^2 + s2^2 - 2 s1 s2 = (m1 - m2)^2 + (s1 - s2)^2
    m1, m2, s1, s2 = 0.3, -1.7, 2.5, 0.4
    out = frechet_distance(
        torch.tensor([m1], dtype=F64), torch.tensor([[s1**2]], dtype=F64),
        torch.tensor([m2], dtype=F64), torch.tensor([[s2**2]], dtype=F64),
    )
    expected = (m1 - m2) ** 2 + (s1 - s2) ** 2
    assert out.dtype == F64 and out.shape == ()
    assert abs(out.item() - expected) < 1e-12 * expected


def test_frechet_commuting_covariances_ill_conditioned():
    # Diagonal (commuting) covariances: (S1^{1/2} S2 S1^{1/2})^{1/2} = diag(sqrt(a b)), so
    # d^2 = ||dmu||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2. Condition numbers ~1e9.
    gen = torch.Generator().manual_seed(0)
    d = 12
    a = torch.logspace(-4.5, 4.5, d, dtype=F64)
    b = torch.logspace(-4.5, 4.5, d, dtype=F64)[torch.randperm(d, generator=gen)] * 3.0
    mu1, mu2 = torch.randn(d, generator=gen, dtype=F64), torch.randn(d, generator=gen, dtype=F64)
    out = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)).item()
    expected = ((mu1 - mu2) ** 2).sum().item() + ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert abs(out - expected) < 1e-9 * expected


@pytest.mark.parametrize("d,seed", [(4, 0), (5, 1), (6, 2), (6, 3)])
def test_frechet_random_spd_matches_mpmath(d, seed):
    gen = torch.Generator().manual_seed(seed)
    cov1, cov2 = random_spd(d, gen, cond=1e4), random_spd(d, gen, cond=1e2)
    mu1, mu2 = torch.randn(d, generator=gen, dtype=F64), torch.randn(d, generator=gen, dtype=F64)
    expected = mp_frechet(mu1, cov1, mu2, cov2)
    out = frechet_distance(mu1, cov1, mu2, cov2).item()
    assert abs(out - expected) < 1e-6 * expected
    # Near-identical covariances: the distance is small against the traces (cancellation).
    cov2b = cov1 + 1e-2 * random_spd(d, gen, cond=10.0)
    expected_b = mp_frechet(mu1, cov1, mu1, cov2b)
    out_b = frechet_distance(mu1, cov1, mu1, cov2b).item()
    assert abs(out_b - expected_b) < 1e-6 * expected_b


def test_frechet_is_batched_and_symmetric():
    gen = torch.Generator().manual_seed(4)
    d = 5
    covs1 = torch.stack([random_spd(d, gen) for _ in range(3)])  # [3, d, d]
    covs2 = torch.stack([random_spd(d, gen) for _ in range(3)])
    mu1, mu2 = torch.randn(3, d, generator=gen, dtype=F64), torch.randn(3, d, generator=gen, dtype=F64)
    out = frechet_distance(mu1, covs1, mu2, covs2)  # [3]
    assert out.shape == (3,)
    for i in range(3):
        single = frechet_distance(mu1[i], covs1[i], mu2[i], covs2[i])
        swapped = frechet_distance(mu2[i], covs2[i], mu1[i], covs1[i])
        torch.testing.assert_close(out[i], single, rtol=1e-12, atol=0)
        torch.testing.assert_close(swapped, single, rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------
# Frechet distance from samples (Gram form vs eigen form)
# ---------------------------------------------------------------------------
def _moments(x):
    x = x.double()
    return x.mean(0), torch.cov(x.T, correction=1).reshape(x.shape[1], x.shape[1])


@pytest.mark.parametrize("d", [3, 8])
def test_gram_equals_eigen_when_both_full_rank(d):
    gen = torch.Generator().manual_seed(d)
    n = d + 3  # n slightly > d: covariances full rank, both routes valid
    x = torch.randn(n, d, generator=gen, dtype=F64)
    y = 0.5 + 2.0 * torch.randn(n + 2, d, generator=gen, dtype=F64)
    gram = frechet_distance_from_samples(x, y, method="gram").item()
    eig = frechet_distance_from_samples(x, y, method="eigen").item()
    expected = mp_frechet(*_moments(x), *_moments(y))
    assert abs(gram - expected) < 1e-10 * expected
    assert abs(eig - expected) < 1e-8 * expected


def test_gram_rank_deficient_matches_mpmath_and_eigen():
    # n < d: rank-deficient covariances. Gram form vs a 40-digit reference; the eigen form
    # is only sqrt(eps)-accurate on the null space, hence its looser tolerance.
    gen = torch.Generator().manual_seed(7)
    d, n1, n2 = 6, 4, 3
    x = torch.randn(n1, d, generator=gen, dtype=F64)
    y = 1.0 + torch.randn(n2, d, generator=gen, dtype=F64)
    mu1, c1 = _moments(x)
    mu2, c2 = _moments(y)
    # Reference: mpmath sqrtm needs invertible matrices; use the Gram identity at 40 digits
    # through mpmath's SVD instead (an independent high-precision route).
    with mpmath.workdps(40):
        xc = mp_matrix(x - x.mean(0))
        yc = mp_matrix(y - y.mean(0))
        sv = mpmath.svd_r(xc * yc.T, compute_uv=False)
        tr_sqrt = sum(sv) / mpmath.sqrt((n1 - 1) * (n2 - 1))
        ref = float(
            sum((mpmath.mpf(a) - mpmath.mpf(b)) ** 2 for a, b in zip(mu1.tolist(), mu2.tolist()))
            + sum(c1[i, i].item() + c2[i, i].item() for i in range(d))
            - 2 * tr_sqrt
        )
    auto = frechet_distance_from_samples(x, y).item()  # n1 n2 < d^2 -> Gram form
    assert abs(auto - ref) < 1e-12 * ref
    eig = frechet_distance(mu1, c1, mu2, c2).item()
    assert abs(eig - ref) < 1e-6 * ref


@pytest.mark.parametrize("n,d", [(10, 64), (50, 64), (3, 5)])
def test_fid_of_a_sample_with_itself_is_zero(n, d):
    gen = torch.Generator().manual_seed(n + d)
    x = 100.0 + 10.0 * torch.randn(n, d, generator=gen)  # float32 input, far from the origin
    assert frechet_distance_from_samples(x, x).item() < 1e-8


@pytest.mark.parametrize("n", [2, 5, 50])
@pytest.mark.parametrize("d", [1, 3, 64])
def test_frechet_never_nan(n, d):
    gen = torch.Generator().manual_seed(1000 * n + d)
    x = torch.randn(n, d, generator=gen)
    y = 3.0 * torch.randn(n + 1, d, generator=gen) + 1.0
    values = [frechet_distance_from_samples(x, y, method=m) for m in ("auto", "gram", "eigen")]
    values.append(frechet_distance_from_samples(x, x, method="eigen"))
    mu, cov = _moments(x)
    values.append(frechet_distance(mu, cov, mu, cov))
    values.append(frechet_distance(mu, torch.zeros(d, d, dtype=F64), mu, cov))
    for v in values:
        assert torch.isfinite(v) and v.item() >= 0.0
    # Both routes agree to the eigen form's accuracy (sqrt(eps) on null spaces).
    torch.testing.assert_close(values[1], values[2], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Streaming moments
# ---------------------------------------------------------------------------
def test_streaming_moments_match_two_pass_far_from_origin():
    gen = torch.Generator().manual_seed(0)
    d = 5
    mix = torch.randn(d, d, generator=gen)
    sizes = [1, 7, 100, 3, 50, 64, 2, 9, 200, 11]
    batches = [(torch.randn(s, d, generator=gen) @ mix + 1e4).float() for s in sizes]  # float32, offset 1e4
    acc = StreamingMoments(d)
    for b in batches:
        acc.update(b)
    data = torch.cat(batches).double()  # the same float32 values, exactly, in float64
    mean = data.mean(0)
    centred = data - mean  # two-pass
    cov = centred.T @ centred / (data.shape[0] - 1)
    assert acc.n == data.shape[0]
    assert acc.mean.dtype == F64 and acc.cov.shape == (d, d)
    assert ((acc.mean - mean).abs().max() / mean.abs().max()).item() < 1e-12
    assert ((acc.cov - cov).abs().max() / cov.abs().max()).item() < 1e-9


def test_streaming_merge_and_state_dict_roundtrip():
    gen = torch.Generator().manual_seed(1)
    d = 4
    x = torch.randn(300, d, generator=gen, dtype=F64) + 5.0
    a, b, whole = StreamingMoments(d), StreamingMoments(d), StreamingMoments(d)
    a.update(x[:120])
    b.update(x[120:200]).update(x[200:])
    whole.update(x)
    restored = StreamingMoments.from_state_dict(a.state_dict())
    restored.merge(b)
    for acc in (restored, a.merge(b)):
        assert acc.n == 300
        torch.testing.assert_close(acc.mean, whole.mean, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(acc.cov, whole.cov, rtol=1e-12, atol=1e-13)
    state = whole.state_dict()
    assert set(state) == {"n", "mean", "m2"} and all(isinstance(v, torch.Tensor) for v in state.values())
    with pytest.raises(ValueError):
        StreamingMoments(d).cov


# ---------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------
def linear_kernel(a, b):
    return a @ b.T


@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_kid_linear_kernel_is_unbiased(shift):
    # Linear kernel: E[unbiased MMD^2] = ||mu_x||^2 + ||mu_y||^2 - 2 mu_x^T mu_y = ||dmu||^2 exactly.
    # The biased (V) estimator would add tr(Sx)/m + tr(Sy)/m = 2 d / m = 0.2 here, ~20 standard errors.
    gen = torch.Generator().manual_seed(11)
    d, n, reps = 2, 20, 400
    delta = torch.full((d,), shift / math.sqrt(d), dtype=F64)
    est = []
    for _ in range(reps):
        x = torch.randn(n, d, generator=gen, dtype=F64)
        y = torch.randn(n, d, generator=gen, dtype=F64) + delta
        est.append(kid(x, y, n_subsets=1, subset_size=n, kernel=linear_kernel, generator=gen).mean)
    est = torch.stack(est)
    se = est.std() / math.sqrt(reps)
    assert abs(est.mean().item() - shift**2) < 4 * se.item()


def test_kid_poly_kernel_by_hand_and_subset_average():
    gen = torch.Generator().manual_seed(3)
    d, m = 4, 50
    x = torch.randn(60, d, generator=gen)
    y = 0.3 + torch.randn(m, d, generator=gen)
    xs, ys = x.double(), y.double()
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731  KID's cubic kernel, written out
    # subset_size >= n: each subset is a permutation of the rows, i.e. the full-sample U-statistic
    # mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j).
    x50 = xs[:m]
    kxx, kyy, kxy = k(x50, x50), k(ys, ys), k(x50, ys)
    off = lambda g: (g.sum() - g.diagonal().sum()) / (m * (m - 1))  # noqa: E731
    by_hand = off(kxx) + off(kyy) - 2 * kxy.mean()
    same = kid(x[:m], y, n_subsets=2, subset_size=1000, generator=gen)
    assert same.mean.dtype == F64
    torch.testing.assert_close(same.mean, by_hand, rtol=1e-12, atol=1e-12)
    assert same.std.item() < 1e-12
    # Seeded generator -> reproducible. Subsets drawn without replacement average (in expectation over
    # the draws) to the full-sample U-statistic with n_x = 60, n_y = 50.
    r1 = kid(x, y, n_subsets=300, subset_size=15, generator=torch.Generator().manual_seed(5))
    r2 = kid(x, y, n_subsets=300, subset_size=15, generator=torch.Generator().manual_seed(5))
    assert r1 == r2
    full_u = mmd(xs, ys, k)
    assert abs(r1.mean.item() - full_u.item()) < 4 * r1.std.item() / math.sqrt(300)


# ---------------------------------------------------------------------------
# Inception score
# ---------------------------------------------------------------------------
def test_inception_score_closed_forms():
    K, splits, per = 10, 5, 4
    uniform = torch.full((splits * per * K, K), 1.0 / K)
    res = inception_score(uniform, splits=splits)
    assert abs(res.mean.item() - 1.0) < 1e-12 and res.std.item() < 1e-12
    # Balanced one-hots (each split holds every class equally): KL = log K for every row -> IS = K.
    labels = torch.arange(splits * per * K) % K
    onehot = torch.nn.functional.one_hot(labels, K).float()
    res = inception_score(onehot, splits=splits)
    assert abs(res.mean.item() - K) < 1e-10 and res.std.item() < 1e-10
    assert res.mean.dtype == F64
    res_logits = inception_score(torch.zeros(100, K), splits=10, from_logits=True)
    assert abs(res_logits.mean.item() - 1.0) < 1e-12
    sharp = inception_score(60.0 * onehot, splits=splits, from_logits=True)
    assert abs(sharp.mean.item() - K) < 1e-8
    # Two rows, one split: p(y) = (0.75, 0.25); KL_1 = log(1/0.75), KL_2 = .5 log(.5/.75) + .5 log(.5/.25).
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=F64)
    kl = 0.5 * (math.log(1 / 0.75) + 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert abs(inception_score(p, splits=1).mean.item() - math.exp(kl)) < 1e-14


# ---------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------
def brute_precision_recall(real, fake, k):
    real, fake = real.double(), fake.double()
    rr = torch.cdist(real, real)
    ff = torch.cdist(fake, fake)
    rad_r = rr.sort(dim=1).values[:, k]
    rad_f = ff.sort(dim=1).values[:, k]
    prec = (torch.cdist(fake, real) <= rad_r).any(1).double().mean()
    rec = (torch.cdist(real, fake) <= rad_f).any(1).double().mean()
    return prec.item(), rec.item()


def test_precision_recall_identical_and_disjoint():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen)
    pr = precision_recall(x, x.clone(), batch=37)
    assert pr.precision.item() == 1.0 and pr.recall.item() == 1.0
    far = x + 1e3
    pr = precision_recall(x, far)
    assert pr.precision.item() == 0.0 and pr.recall.item() == 0.0


def test_precision_recall_subset_support_and_reference():
    # Real: uniform on [0, 1]^2. Fake: uniform on the left half. Every fake lies in the real support
    # (precision ~ 1) while fakes cover about half the real points (recall ~ 0.5 plus a boundary layer
    # of width ~ the fake 3-NN radius, sqrt(3 / (pi 2000)) ~ 0.02).
    gen = torch.Generator().manual_seed(1)
    real = torch.rand(1000, 2, generator=gen)
    fake = torch.rand(1000, 2, generator=gen) * torch.tensor([0.5, 1.0])
    pr = precision_recall(real, fake, k=3, batch=128)
    assert pr.precision.item() > 0.95
    assert 0.45 < pr.recall.item() < 0.6
    swapped = precision_recall(fake, real, k=3)
    assert swapped.recall.item() > 0.95 and 0.45 < swapped.precision.item() < 0.6
    ref = brute_precision_recall(real[:300], fake[:250], 3)
    got = precision_recall(real[:300], fake[:250], k=3, batch=64)
    assert (got.precision.item(), got.recall.item()) == pytest.approx(ref, abs=1e-12)
