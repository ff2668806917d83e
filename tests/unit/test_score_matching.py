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
