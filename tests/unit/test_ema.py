"""EMA of weights: the averaging formula, buffers, swapping weights in and out, state round trip, DDP."""

import pytest
import torch
from torch import nn

from stein_core.ema import EMA, unwrap_model


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("stat", torch.zeros(2))

    def forward(self, x):
        return self.lin(x) + self.stat


def set_weights(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_constant_weights_follow_the_closed_form():
    # shadow_k = d^k w_0 + (1 - d^k) w for constant weights w after k updates
    # (the geometric sum (1 - d) sum_{j<k} d^j = 1 - d^k).
    torch.manual_seed(0)
    model = Tiny().double()
    set_weights(model, 2.0)
    d, k = 0.9, 7
    ema = EMA(model, decay=d)
    set_weights(model, -1.0)
    for _ in range(k):
        ema.update(model)
    expected = d**k * 2.0 + (1 - d**k) * -1.0
    for name, _ in model.named_parameters():
        torch.testing.assert_close(ema.shadow[name], torch.full_like(ema.shadow[name], expected), rtol=1e-14, atol=0)
    assert ema.num_updates == k


def test_varying_weights_match_the_recursion_and_constants_stay_exact():
    # w_j = j for j = 1..k: shadow_k = d^k w_0 + (1 - d) sum_j d^(k - j) j.
    model = Tiny().double()
    set_weights(model, 0.5)
    d, k = 0.8, 5
    ema = EMA(model, decay=d)
    for j in range(1, k + 1):
        set_weights(model, float(j))
        ema.update(model)
    expected = d**k * 0.5 + (1 - d) * sum(d ** (k - j) * j for j in range(1, k + 1))
    torch.testing.assert_close(ema.shadow["lin.weight"], torch.full((2, 3), expected, dtype=torch.float64), rtol=1e-14, atol=0)
    # A weight that never changes stays bit-for-bit equal (lerp, not d*a + (1-d)*a).
    model = Tiny()
    before = model.lin.weight.detach().clone()
    ema = EMA(model, decay=0.999)
    for _ in range(10):
        ema.update(model)
    assert torch.equal(ema.shadow["lin.weight"], before)


def test_buffers_are_copied_not_averaged():
    model = Tiny()
    ema = EMA(model, decay=0.99)
    model.count += 5
    model.stat.fill_(3.0)
    ema.update(model)
    assert ema.shadow["count"].item() == 5 and ema.shadow["count"].dtype == torch.int64
    assert torch.equal(ema.shadow["stat"], torch.full((2,), 3.0))


def test_copy_to_and_average_parameters_restore_the_live_weights():
    torch.manual_seed(1)
    model = Tiny()
    ema = EMA(model, decay=0.5)
    set_weights(model, 4.0)
    ema.update(model)  # shadow = (initial + 4) / 2
    live = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = {k: v.clone() for k, v in ema.shadow.items()}
    x = torch.randn(5, 3)
    with ema.average_parameters(model) as m:
        assert m is model
        for k, v in model.state_dict().items():
            assert torch.equal(v, averaged[k])
        out_ema = model(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k])
    with pytest.raises(RuntimeError):  # weights come back on error too
        with ema.average_parameters(model):
            raise RuntimeError("boom")
    assert torch.equal(model.lin.weight, live["lin.weight"])
    # copy_to writes in place, so an optimiser holding the parameters still sees them.
    params = list(model.parameters())
    ema.copy_to(model)
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert torch.equal(model(x), out_ema)


def test_state_dict_round_trip_weights_only(tmp_path):
    torch.manual_seed(2)
    model = Tiny()
    ema = EMA(model, decay=0.9)
    set_weights(model, 1.0)
    for _ in range(3):
        ema.update(model)
    state = ema.state_dict()
    ema.update(model)  # the saved state is a snapshot
    assert not torch.equal(state["shadow"]["lin.weight"], ema.shadow["lin.weight"])
    torch.save(state, tmp_path / "ema.pt")
    loaded = torch.load(tmp_path / "ema.pt", weights_only=True)
    fresh = EMA(Tiny(), decay=0.5)
    fresh.load_state_dict(loaded)
    assert fresh.decay == 0.9 and fresh.num_updates == 3
    for k, v in state["shadow"].items():
        assert torch.equal(fresh.shadow[k], v)
    # The shadow is keyed like the model's state_dict, so it loads into a fresh model directly.
    other = Tiny()
    other.load_state_dict(loaded["shadow"])
    with pytest.raises(ValueError, match="does not match"):
        EMA(nn.Linear(3, 2)).load_state_dict(loaded)


def test_validation_and_mismatched_models():
    with pytest.raises(ValueError):
        EMA(Tiny(), decay=1.0)
    with pytest.raises(ValueError, match="missing"):
        EMA(Tiny()).update(nn.Linear(3, 2))


def test_wrapped_models_are_unwrapped(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(3)
    model = Tiny()
    class Wrapper(nn.Module):  # DataParallel-like (.module) around torch.compile-like (._orig_mod)
        def __init__(self, inner, attr):
            super().__init__()
            setattr(self, attr, inner)

    assert unwrap_model(Wrapper(Wrapper(model, "_orig_mod"), "module")) is model
    assert unwrap_model(model) is model
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        ema = EMA(ddp, decay=0.5)
        assert set(ema.shadow) == set(model.state_dict())  # no "module." prefix
        set_weights(model, 2.0)
        ema.update(ddp)
        ema.copy_to(model)  # the wrapper and the bare module are interchangeable
        with ema.average_parameters(ddp):
            pass
        assert torch.equal(ddp.module.lin.weight, model.lin.weight)
    finally:
        dist.destroy_process_group()


def _old_update(ema, model):
    """``EMA.update`` before it used ``torch._foreach_lerp_``: one ``lerp_`` per floating parameter."""
    w = 1.0 - ema.decay
    with torch.no_grad():
        for name, value in ema._state(model).items():
            shadow = ema.shadow[name]
            if name in ema._param_names and shadow.is_floating_point():
                shadow.lerp_(value.detach().to(shadow.dtype), w)
            else:
                shadow.copy_(value.detach())
    ema.num_updates += 1


class Mixed(nn.Module):
    """Parameters of two dtypes and odd sizes (a foreach kernel's chunking), a float and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(37, 129)
        self.b = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
        self.register_buffer("stat", torch.zeros(3))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999, 0.9999])
def test_the_foreach_update_is_bit_identical_to_one_lerp_per_tensor(decay):
    """``torch._foreach_lerp_`` over all floating shadows (one call, the same weight) gives exactly the bits of the
    per-tensor ``lerp_`` it replaced, with buffers copied and a weight that never moves kept exactly."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(4)
    model = Mixed().to(device)
    new, old = EMA(model, decay=decay), EMA(model, decay=decay)
    for t in range(6):
        with torch.no_grad():
            for p in (model.a.weight, model.a.bias, model.b):  # `frozen` never moves
                p.add_(torch.randn_like(p) * 10.0 ** (t - 3))
            model.stat.add_(1.5)
            model.count.add_(2)
        new.update(model)
        _old_update(old, model)
        for k in old.shadow:
            assert old.shadow[k].dtype == new.shadow[k].dtype and torch.equal(new.shadow[k], old.shadow[k]), k
    assert new.num_updates == old.num_updates == 6
    assert torch.equal(new.shadow["frozen"], model.frozen) and new.shadow["count"].item() == 12
