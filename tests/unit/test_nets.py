"""NoiseConditionalMLP: shapes, sigma broadcasting, checkpoint round trip."""

import pytest
import torch

from stein_core import NoiseConditionalMLP, geometric_sigmas, get_dsm_loss_fn


def make(seed=0, **kw):
    torch.manual_seed(seed)  # nn.Module init uses the global RNG
    return NoiseConditionalMLP(**{"dim": 2, "hidden": 32, "n_layers": 3, "embed_dim": 16, **kw})


def test_shapes_and_sigma_broadcast():
    net = make()
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(1))
    out_scalar = net(x, 0.5)
    out_tensor0 = net(x, torch.tensor(0.5))
    out_vec = net(x, torch.full((10,), 0.5))
    assert out_scalar.shape == (10, 2) and out_scalar.dtype == torch.float32
    torch.testing.assert_close(out_scalar, out_vec, rtol=0, atol=0)
    torch.testing.assert_close(out_tensor0, out_vec, rtol=0, atol=0)
    # Per-row sigma equals row-by-row evaluation.
    sig = torch.linspace(0.1, 20.0, 10)
    rows = torch.cat([net(x[i : i + 1], sig[i]) for i in range(10)])
    torch.testing.assert_close(net(x, sig), rows, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        net(x, torch.ones(3))
    assert net.double()(x.double(), 0.5).dtype == torch.float64


def test_output_is_scaled_by_inverse_sigma():
    # s(x, sigma) = f(x, sigma) / sigma: multiplying by sigma gives the unit-scale f,
    # whose size does not blow up as sigma -> 0.
    net = make(3)
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(2))
    for sg in (0.01, 1.0, 100.0):
        f = sg * net(x, sg)
        assert f.abs().max() < 10.0


def test_model_args_round_trip(tmp_path):
    net = make(seed=0, hidden=24, n_layers=2, embed_dim=8)
    assert net.model_args == {"dim": 2, "hidden": 24, "n_layers": 2, "embed_dim": 8}
    path = tmp_path / "ckpt.pt"
    torch.save({"model_args": net.model_args, "state_dict": net.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    rebuilt = NoiseConditionalMLP(**ckpt["model_args"])
    rebuilt.load_state_dict(ckpt["state_dict"])
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(4))
    sig = torch.rand(16, generator=torch.Generator().manual_seed(5)) + 0.1
    assert torch.equal(rebuilt(x, sig), net(x, sig))


def test_validation():
    with pytest.raises(ValueError):
        NoiseConditionalMLP(2, embed_dim=7)
    with pytest.raises(ValueError):
        NoiseConditionalMLP(2, n_layers=0)


def test_dsm_training_steps_reduce_loss():
    # A handful of Adam steps on a fixed batch and fixed noise must reduce the DSM loss.
    net = make(7)
    loss_fn = get_dsm_loss_fn(geometric_sigmas(5.0, 0.1, 5))
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(8))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def loss():
        return loss_fn(net, x, generator=torch.Generator().manual_seed(9))

    start = loss().item()
    for _ in range(30):
        opt.zero_grad()
        l = loss()
        l.backward()
        opt.step()
    assert all(p.grad is not None for p in net.parameters())
    assert loss().item() < 0.8 * start
