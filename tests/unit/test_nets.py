"""NoiseConditionalMLP and NoiseConditionalConvNet: shapes, sigma broadcasting, checkpoint round trip, training."""

import pytest
import torch

from stein_core import NoiseConditionalMLP, geometric_sigmas, get_dsm_loss_fn
from stein_core.nets import NoiseConditionalConvNet


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


def test_model_args_round_trip(tmp_path, round_trip):
    net = make(seed=0, hidden=24, n_layers=2, embed_dim=8)
    assert net.model_args == {"dim": 2, "hidden": 24, "n_layers": 2, "embed_dim": 8}
    rebuilt = round_trip(net, NoiseConditionalMLP)
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


# --------------------------------------------------------------------------------------------- conv net

# (C, H, W) -> the suggested configuration for that image size (see the class docstring).
CONV_CONFIGS = {
    (1, 8, 8): {"base_channels": 32, "channel_mults": [1, 2, 2]},  # 8 -> 4 -> 2
    (1, 28, 28): {"base_channels": 32, "channel_mults": [1, 2, 2]},  # 28 -> 14 -> 7
    (3, 32, 32): {"base_channels": 64, "channel_mults": [1, 2, 2, 2]},  # 32 -> 16 -> 8 -> 4
}


def make_conv(shape, seed=0, **kw):
    torch.manual_seed(seed)
    c, h, _ = shape
    return NoiseConditionalConvNet(in_channels=c, image_size=h, **{**CONV_CONFIGS[shape], **kw})


def perturb_output_layer(net, seed=0):
    # The last convolution starts at zero (score 0); give it weights so the tests see a non-trivial map.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.conv_out.weight.copy_(0.1 * torch.randn(net.conv_out.weight.shape, generator=g))
    return net


@pytest.mark.parametrize("shape", list(CONV_CONFIGS))
def test_conv_shapes_flat_and_image_layouts_agree(shape):
    net = perturb_output_layer(make_conv(shape, base_channels=8))
    c, h, w = shape
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, c, h, w, generator=g)
    sig = torch.tensor([0.05, 1.0, 20.0])
    out_img = net(x, sig)
    out_flat = net(x.reshape(3, -1), sig)
    assert out_img.shape == (3, c, h, w) and out_flat.shape == (3, c * h * w)
    torch.testing.assert_close(out_flat, out_img.reshape(3, -1), rtol=0, atol=0)
    assert out_img.abs().sum() > 0 and torch.isfinite(out_img).all()
    # Rows are independent (GroupNorm, no batch statistics): row-by-row evaluation gives the same values.
    rows = torch.cat([net(x[i : i + 1], sig[i]) for i in range(3)])
    torch.testing.assert_close(out_img, rows, rtol=1e-5, atol=1e-5)


def test_conv_sigma_scalar_vector_and_dtype():
    net = perturb_output_layer(make_conv((1, 8, 8)))
    x = torch.rand(5, 64, generator=torch.Generator().manual_seed(2))
    ref = net(x, torch.full((5,), 0.3))
    torch.testing.assert_close(net(x, 0.3), ref, rtol=0, atol=0)
    torch.testing.assert_close(net(x, torch.tensor(0.3)), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sigma"):
        net(x, torch.ones(3))
    with pytest.raises(ValueError, match=r"\[n, 1, 8, 8\] or \[n, 64\]"):
        net(torch.rand(5, 63), 0.3)
    with pytest.raises(ValueError):
        net(torch.rand(5, 1, 7, 8), 0.3)
    assert net.double()(x.double(), 0.3).dtype == torch.float64


def test_conv_output_is_inverse_sigma_scaled_and_starts_at_zero():
    net = make_conv((1, 8, 8), seed=3)
    x = torch.rand(4, 64)
    assert torch.equal(net(x, 0.5), torch.zeros(4, 64))  # zero-initialised output convolution
    perturb_output_layer(net)
    for sg in (0.01, 1.0, 100.0):
        f = sg * net(x + sg * torch.randn(4, 64, generator=torch.Generator().manual_seed(4)), sg)
        assert 0 < f.abs().max() < 10.0  # the unit-scale f = sigma * s stays O(1) at every noise level


def test_conv_model_args_round_trip_weights_only(tmp_path, round_trip):
    net = perturb_output_layer(make_conv((1, 28, 28), base_channels=8, num_res_blocks=2, embed_dim=8))
    assert net.model_args == {
        "in_channels": 1, "image_size": 28, "base_channels": 8, "channel_mults": [1, 2, 2],
        "num_res_blocks": 2, "embed_dim": 8,
    }
    rebuilt = round_trip(net, NoiseConditionalConvNet)
    x = torch.rand(2, 784, generator=torch.Generator().manual_seed(5))
    sig = torch.tensor([0.1, 3.0])
    assert torch.equal(rebuilt(x, sig), net(x, sig))
    # A non-square size survives the round trip as a list.
    assert NoiseConditionalConvNet(1, (8, 12), base_channels=4, channel_mults=[1, 2]).model_args["image_size"] == [8, 12]


def test_conv_parameter_counts():
    # Reported sizes of the suggested configurations; a change of architecture must update them knowingly.
    counts = {shape: sum(p.numel() for p in make_conv(shape).parameters()) for shape in CONV_CONFIGS}
    assert counts == {(1, 8, 8): 776_929, (1, 28, 28): 776_929, (3, 32, 32): 4_225_091}


def test_conv_validation():
    with pytest.raises(ValueError, match="too small"):
        NoiseConditionalConvNet(1, 8, channel_mults=[1, 1, 1, 1, 1])  # 8 -> 4 -> 2 -> 1 -> 1
    with pytest.raises(ValueError):
        NoiseConditionalConvNet(1, 8, embed_dim=7)
    with pytest.raises(ValueError):
        NoiseConditionalConvNet(1, 8, channel_mults=[])
    with pytest.raises(ValueError):
        NoiseConditionalConvNet(0, 8)


def test_conv_dsm_training_reduces_loss_on_digits():
    # 100 Adam steps on 16 sklearn digits with fresh noise each step. The zero-initialised net scores 0, so the
    # sigma^2-weighted DSM loss starts at E 1/2 ||z||^2 = d/2 = 32; learning the denoiser must cut the loss,
    # measured on noise draws never used in training, by well over half (it reaches ~0.24 of the start).
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[:16] / 16.0, dtype=torch.float32)  # [16, 64] in [0, 1]
    net = make_conv((1, 8, 8), seed=0, base_channels=16)
    loss_fn = get_dsm_loss_fn(geometric_sigmas(5.0, 0.05, 8))

    def held_out_loss():
        with torch.no_grad():
            return sum(loss_fn(net, x, generator=torch.Generator().manual_seed(s)).item() for s in range(100, 110)) / 10

    start = held_out_loss()
    assert 28.0 < start < 36.0
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        opt.zero_grad()
        loss_fn(net, x, generator=gen).backward()
        opt.step()
    assert all(p.grad is not None for p in net.parameters())
    assert held_out_loss() < 0.4 * start
