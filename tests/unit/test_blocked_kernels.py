"""Row-blocked kernel statistics vs the dense forms they replace (issue 24).

``mmd`` (radial kernel, pooled sample above ``_MMD_DENSE_ELEMENTS``), ``ksd_test`` and ``mmd_permutation_test``
(radial kernels) never form an ``[n, n]`` matrix: they walk blocks of rows of at most ``_BLOCK_ELEMENTS``
elements. Each is checked against a private copy of the dense function it replaced (``_dense_*`` below, the code
as it was before the blocking), with the block constant patched down so that sizes cross block boundaries: a
block of 1 row, sizes ``block - 1``, ``block``, ``block + 1`` and a remainder block. Also: the small-input path
of ``mmd`` is the old computation bit for bit (trained models depend on it), the same seed gives the same
p-values, and no intermediate of the blocked paths has ``n^2`` elements (every op's outputs recorded by a
``TorchDispatchMode``; the same recorder sees the dense forms' ``[n, n]`` matrices, so the check can fail).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import stein_core.discrepancies as disc
from stein_core._random import randint
from stein_core.discrepancies import _reduce, mmd, stein_kernel_matrix
from stein_core.kernels import IMQ, RBF, DeepKernel, SumKernel
from stein_core.tests_stat import _p_value, ksd_test, mmd_permutation_test


# ---------------------------------------------------------------------------
# Dense references: the functions as they were before the blocking (private copies, kept here on purpose).
# ---------------------------------------------------------------------------
def _dense_mmd(x, y, kernel, statistic="u"):
    """``discrepancies.mmd`` before issue 24: three Gram matrices."""
    kxx = kernel(x, x)
    kyy = kernel(y, y)
    kxy = kernel(x, y)
    return _reduce(kxx, statistic) + _reduce(kyy, statistic) - 2.0 * kxy.mean(dim=(-2, -1))


def _dense_bootstrap(h, n_bootstrap, generator):
    """``tests_stat._bootstrap`` before issue 24."""
    n = h.shape[-1]
    h0 = h - torch.diag_embed(torch.diagonal(h, dim1=-2, dim2=-1))
    norm = n * (n - 1)
    stat = h0.sum(dim=(-2, -1)) / norm
    w = randint(2, (*h.shape[:-2], n_bootstrap, n), device=h.device, generator=generator)
    w = (2 * w - 1).to(h.dtype)  # [..., B, n]
    null = ((w @ h0) * w).sum(-1) / norm  # [..., B]
    return stat, null


def _dense_ksd_test(x, score_x, kernel, n_bootstrap, generator):
    """``(statistic, null_samples, p_value)`` of ``tests_stat.ksd_test`` before issue 24 (checks left out)."""
    with torch.no_grad():
        stat, null = _dense_bootstrap(stein_kernel_matrix(x, score_x, kernel), n_bootstrap, generator)
    return stat, null, _p_value(stat, null)


def _dense_mmd_permutation_test(x, y, kernel, n_permutations, generator, statistic="u"):
    """``(statistic, null_samples, p_value)`` of ``tests_stat.mmd_permutation_test`` before issue 24."""
    n, m = x.shape[-2], y.shape[-2]
    with torch.no_grad():
        z = torch.cat([x, y], dim=-2)
        total = n + m
        k = kernel(z, z)  # [..., N, N]
        batch = k.shape[:-2]
        keys = randint(2**62, (*batch, n_permutations, total), device=z.device, generator=generator)
        first = torch.argsort(keys, dim=-1)[..., :n]
        e = torch.zeros((*batch, n_permutations, total), dtype=k.dtype, device=k.device)
        e.scatter_(-1, first, 1.0)
        e0 = torch.zeros(total, dtype=k.dtype, device=k.device)
        e0[:n] = 1.0
        e = torch.cat([e0.expand(*batch, 1, total), e], dim=-2)
        ke = e @ k
        kf = k.sum(-1).unsqueeze(-2) - ke
        f = 1.0 - e
        s_xx = (ke * e).sum(-1)
        s_xy = (ke * f).sum(-1)
        s_yy = (kf * f).sum(-1)
        if statistic == "u":
            diag = torch.diagonal(k, dim1=-2, dim2=-1).unsqueeze(-1)
            tr_x = (e @ diag).squeeze(-1)
            tr_y = diag.sum(dim=(-2, -1)).unsqueeze(-1) - tr_x
            stats = (s_xx - tr_x) / (n * (n - 1)) + (s_yy - tr_y) / (m * (m - 1)) - 2.0 * s_xy / (n * m)
        else:
            stats = s_xx / (n * n) + s_yy / (m * m) - 2.0 * s_xy / (n * m)
    stat, null = stats[..., 0], stats[..., 1:]
    return stat, null, _p_value(stat, null)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def _imq_mixture(h=1.7):
    """What ``kernels.imq_mixture`` returns (the ring8-mmd training kernel), at a fixed ``h``."""
    return SumKernel([IMQ(s * h, -0.5) for s in (0.5, 1.0, 2.0, 4.0)])


def _kernel(name, batch=()):
    if name == "rbf":
        return RBF(1.3) if not batch else RBF(torch.tensor([0.9, 1.3, 2.0], dtype=torch.float64))
    if name == "imq":
        return IMQ(0.8, -0.5)
    return SumKernel([IMQ(0.5, -0.5), RBF(2.0), IMQ(2.0, -0.3)])


@pytest.fixture
def rows_per_block(monkeypatch):
    """``set(rows, width)``: blocks of ``rows`` rows of a ``width``-column matrix, and ``mmd`` always blocked."""

    def set_block(rows: int, width: int) -> None:
        monkeypatch.setattr(disc, "_BLOCK_ELEMENTS", rows * width)
        monkeypatch.setattr(disc, "_MMD_DENSE_ELEMENTS", 0)

    return set_block


def _rel_close(a, b, rtol):
    """``|a - b| <= rtol * max|b|`` elementwise: null statistics are differences of O(1) sums, so their round-off
    scales with the largest of them, not with each (some are near 0)."""
    scale = b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * float(scale))


# Sizes against a block of B = 8 rows: n = 7 (block - 1), 8 (block), 9 (block + 1: a 1-row remainder), 21 (two
# blocks and a remainder of 5); m likewise. mmd blocks the x rows and the y rows separately, each with B rows.
SIZES = [(7, 9), (8, 8), (9, 21), (21, 5), (2, 3)]


# ---------------------------------------------------------------------------
# mmd
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n, m", SIZES)
@pytest.mark.parametrize("kernel_name", ["rbf", "imq", "sum"])
@pytest.mark.parametrize("statistic", ["u", "v"])
@pytest.mark.parametrize("rows", [1, 8])
def test_blocked_mmd_equals_dense(rows_per_block, n, m, kernel_name, statistic, rows):
    g = torch.Generator().manual_seed(100 * n + m)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = 1.2 * torch.randn(m, 3, generator=g, dtype=torch.float64) + 0.4
    kernel = _kernel(kernel_name)
    rows_per_block(rows, n + m)
    got = mmd(x, y, kernel, statistic)
    ref = _dense_mmd(x, y, kernel, statistic)
    # float64 sums of at most 30^2 kernel values in another order: a few ulps of the O(1) terms.
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
    assert got.dtype == torch.float64 and got.shape == ()


@pytest.mark.parametrize("kernel_name", ["rbf", "imq", "sum"])
@pytest.mark.parametrize("statistic", ["u", "v"])
def test_blocked_mmd_batched_and_broadcast(rows_per_block, kernel_name, statistic):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 19, 2, generator=g, dtype=torch.float64)
    y = torch.randn(3, 12, 2, generator=g, dtype=torch.float64) * 1.5
    kernel = _kernel(kernel_name, batch=(3,))  # RBF: one bandwidth per batch entry
    rows_per_block(8, 31)
    got = mmd(x, y, kernel, statistic)
    assert got.shape == (3,)
    torch.testing.assert_close(got, _dense_mmd(x, y, kernel, statistic), rtol=1e-12, atol=1e-13)
    # Batch dims broadcast: one y against three x.
    got_b = mmd(x, y[0], kernel, statistic)
    torch.testing.assert_close(got_b, _dense_mmd(x, y[0], kernel, statistic), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kernel_name", ["rbf", "imq", "sum"])
@pytest.mark.parametrize("statistic", ["u", "v"])
def test_blocked_mmd_gradient_equals_dense(rows_per_block, kernel_name, statistic):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(21, 3, generator=g, dtype=torch.float64)
    y = torch.randn(9, 3, generator=g, dtype=torch.float64) + 0.3
    kernel = _kernel(kernel_name)
    xa = x.clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(_dense_mmd(xa, y, kernel, statistic), xa)
    rows_per_block(8, 30)
    ya = y.clone().requires_grad_(True)
    grad_x, grad_y = torch.autograd.grad(mmd(xa, ya, kernel, statistic), (xa, ya))
    torch.testing.assert_close(grad_x, grad_ref, rtol=1e-10, atol=1e-10)
    (grad_y_ref,) = torch.autograd.grad(_dense_mmd(x, ya, kernel, statistic), ya)
    torch.testing.assert_close(grad_y, grad_y_ref, rtol=1e-10, atol=1e-10)


def test_blocked_mmd_gradient_wrt_bandwidth(rows_per_block):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(13, 2, generator=g, dtype=torch.float64)
    y = torch.randn(11, 2, generator=g, dtype=torch.float64) + 0.5
    h = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(_dense_mmd(x, y, RBF(h)), h)
    rows_per_block(5, 24)
    (got,) = torch.autograd.grad(mmd(x, y, RBF(h)), h)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, m", [(64, 64), (500, 500), (1024, 1024), (300, 1700)])
def test_small_mmd_is_the_old_computation_bit_for_bit(n, m, dtype):
    # The training losses and the held-out MMD (pooled n + m <= 2048) must not move by one ulp: value and
    # gradient wrt x are torch.equal to the old function, with the kernels the pipelines use.
    g = torch.Generator().manual_seed(n + m)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    y = torch.randn(m, 5, generator=g, dtype=dtype) + 0.2
    for kernel in (IMQ(1.0, -0.5), RBF(1.5), _imq_mixture()):
        xa = x.clone().requires_grad_(True)
        got = mmd(xa, y, kernel)
        (grad,) = torch.autograd.grad(got, xa)
        xr = x.clone().requires_grad_(True)
        ref = _dense_mmd(xr, y, kernel)
        (grad_ref,) = torch.autograd.grad(ref, xr)
        assert torch.equal(got, ref) and torch.equal(grad, grad_ref)


def test_mmd_takes_the_blocked_path_exactly_above_the_threshold(monkeypatch):
    calls = []
    blocked = disc._mmd_radial_blocked

    def spy(*args):
        calls.append(args[0].shape[-2] + args[1].shape[-2])
        return blocked(*args)

    monkeypatch.setattr(disc, "_mmd_radial_blocked", spy)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1024, 2, generator=g, dtype=torch.float64)
    y = torch.randn(1025, 2, generator=g, dtype=torch.float64)
    mmd(x, y[:1024], IMQ())  # (n + m)^2 = 2^22: dense
    assert calls == []
    value = mmd(x, y, IMQ())  # 2049 pooled points: blocked
    assert calls == [2049]
    torch.testing.assert_close(value, _dense_mmd(x, y, IMQ()), rtol=1e-10, atol=1e-13)
    # Non-radial kernels keep the dense path at any size.
    deep = DeepKernel(lambda t: torch.tanh(t), IMQ())
    monkeypatch.setattr(disc, "_MMD_DENSE_ELEMENTS", 0)
    xs, ys = x[:40], y[:30]
    assert torch.equal(mmd(xs, ys, deep), _dense_mmd(xs, ys, deep))
    assert torch.equal(mmd(xs, ys, lambda a, b: IMQ()(a, b)), _dense_mmd(xs, ys, IMQ()))
    assert calls == [2049]


def test_blocked_mmd_float32_keeps_dtype_and_agrees():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1200, 16, generator=g)
    y = torch.randn(1000, 16, generator=g) + 0.05
    kernel = IMQ(4.0, -0.5)
    got = mmd(x, y, kernel)  # 2200 pooled: blocked at the default constants
    assert got.dtype == torch.float32
    # float32 sums of ~2.4e6 kernel values: the O(1) terms carry ~1e-7 relative round-off each.
    torch.testing.assert_close(got.double(), _dense_mmd(x.double(), y.double(), kernel), rtol=0, atol=2e-6)


def test_blocked_mmd_needs_two_points_a_side_for_u(rows_per_block):
    rows_per_block(2, 5)
    x, y = torch.randn(1, 2), torch.randn(4, 2)
    with pytest.raises(ValueError, match="at least 2 samples"):
        mmd(x, y, IMQ())
    assert torch.isfinite(mmd(x, y, IMQ(), statistic="v"))


# ---------------------------------------------------------------------------
# ksd_test
# ---------------------------------------------------------------------------
# Against blocks of 16 rows: n = 15, 16, 17 and 37 (two blocks and a remainder of 5). Not smaller: a bootstrap
# draw W = +-1 (all signs equal) gives U* = U exactly, and whether round-off puts U* at, above or below U decides
# the p-value; at n = 7 that is 2 of 128 draws, at n = 15 2 of 32768 (the p-value test would test round-off).
@pytest.mark.parametrize("n", [15, 16, 17, 37])
@pytest.mark.parametrize("kernel_name", ["rbf", "imq", "sum"])
@pytest.mark.parametrize("rows", [1, 16])
def test_blocked_ksd_test_equals_dense(rows_per_block, n, kernel_name, rows):
    g = torch.Generator().manual_seed(200 + n)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * 1.3 + 0.5
    score = -x  # N(0, I): x is not from it, so the statistic is well away from 0
    kernel = _kernel(kernel_name)
    stat_ref, null_ref, p_ref = _dense_ksd_test(x, score, kernel, 60, torch.Generator().manual_seed(5))
    rows_per_block(rows, n)
    res = ksd_test(x, score, kernel, n_bootstrap=60, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(res.statistic, stat_ref, rtol=1e-12, atol=1e-14)
    _rel_close(res.null_samples, null_ref, 1e-12)
    assert torch.equal(res.p_value, p_ref)


def test_blocked_ksd_test_batched_with_per_entry_bandwidth(rows_per_block):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 21, 2, generator=g, dtype=torch.float64)
    x[1] += 0.7  # one entry off the model
    score = -x
    kernel = RBF(torch.tensor([0.9, 1.3, 2.0], dtype=torch.float64))
    stat_ref, null_ref, p_ref = _dense_ksd_test(x, score, kernel, 80, torch.Generator().manual_seed(6))
    rows_per_block(8, 21)
    res = ksd_test(x, score, kernel, n_bootstrap=80, generator=torch.Generator().manual_seed(6))
    assert res.null_samples.shape == (3, 80)
    torch.testing.assert_close(res.statistic, stat_ref, rtol=1e-12, atol=1e-14)
    _rel_close(res.null_samples, null_ref, 1e-12)
    assert torch.equal(res.p_value, p_ref)
    # An unbatched sample with a batched bandwidth: the draws take the kernel's batch shape, as before.
    stat_ref, null_ref, p_ref = _dense_ksd_test(x[0], score[0], kernel, 30, torch.Generator().manual_seed(7))
    res = ksd_test(x[0], score[0], kernel, n_bootstrap=30, generator=torch.Generator().manual_seed(7))
    assert res.null_samples.shape == (3, 30)
    _rel_close(res.null_samples, null_ref, 1e-12)
    assert torch.equal(res.p_value, p_ref)


def test_single_block_ksd_test_is_the_old_computation_bit_for_bit():
    # n^2 <= _BLOCK_ELEMENTS: one block, the very operations of the dense form.
    g = torch.Generator().manual_seed(14)
    x = torch.randn(200, 4, generator=g, dtype=torch.float32)
    res = ksd_test(x, -x, IMQ(), n_bootstrap=100, generator=torch.Generator().manual_seed(3))
    stat, null, p = _dense_ksd_test(x, -x, IMQ(), 100, torch.Generator().manual_seed(3))
    assert torch.equal(res.statistic, stat) and torch.equal(res.null_samples, null) and torch.equal(res.p_value, p)


def test_blocked_ksd_test_keeps_its_finite_checks(rows_per_block):
    x = torch.randn(3, 30, 2, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    rows_per_block(8, 30)
    kernel = RBF(torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))  # entry 1 collapsed: NaN Stein kernel
    with pytest.raises(ValueError, match="KSD\\^2 statistic is not finite \\(nan\\) in 1 of 3 batch entries"):
        ksd_test(x, lambda t: -t, kernel, n_bootstrap=20)
    with pytest.raises(ValueError, match="MMD\\^2 statistic is not finite \\(nan\\) in 1 of 3 batch entries"):
        mmd_permutation_test(x, -x, kernel, n_permutations=20)
    with pytest.raises(ValueError, match="at least 2 samples"):
        ksd_test(x[:, :1], lambda t: -t, IMQ(), n_bootstrap=20)
    with pytest.raises(ValueError, match="n_bootstrap must be >= 1"):
        ksd_test(x, lambda t: -t, IMQ(), n_bootstrap=0)


# ---------------------------------------------------------------------------
# mmd_permutation_test
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n, m", SIZES)
@pytest.mark.parametrize("kernel_name", ["rbf", "imq", "sum"])
@pytest.mark.parametrize("statistic", ["u", "v"])
@pytest.mark.parametrize("rows", [1, 8])
def test_blocked_mmd_permutation_test_equals_dense(rows_per_block, n, m, kernel_name, statistic, rows):
    g = torch.Generator().manual_seed(300 + 10 * n + m)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.randn(m, 2, generator=g, dtype=torch.float64) * 1.4 + 0.3
    kernel = _kernel(kernel_name)
    stat_ref, null_ref, p_ref = _dense_mmd_permutation_test(
        x, y, kernel, 70, torch.Generator().manual_seed(9), statistic
    )
    rows_per_block(rows, n + m)
    res = mmd_permutation_test(
        x, y, kernel, n_permutations=70, generator=torch.Generator().manual_seed(9), statistic=statistic
    )
    torch.testing.assert_close(res.statistic, stat_ref, rtol=1e-12, atol=1e-13)
    _rel_close(res.null_samples, null_ref, 1e-12)
    assert torch.equal(res.p_value, p_ref)
    # the observed statistic is mmd() itself
    torch.testing.assert_close(res.statistic, _dense_mmd(x, y, kernel, statistic), rtol=1e-12, atol=1e-13)


def test_blocked_mmd_permutation_test_batched(rows_per_block):
    g = torch.Generator().manual_seed(16)
    x = torch.randn(3, 17, 2, generator=g, dtype=torch.float64)
    y = torch.randn(3, 12, 2, generator=g, dtype=torch.float64) + torch.tensor([0.0, 0.5, 1.0])[:, None, None]
    kernel = RBF(torch.tensor([0.9, 1.3, 2.0], dtype=torch.float64))
    stat_ref, null_ref, p_ref = _dense_mmd_permutation_test(x, y, kernel, 90, torch.Generator().manual_seed(4))
    rows_per_block(8, 29)
    res = mmd_permutation_test(x, y, kernel, n_permutations=90, generator=torch.Generator().manual_seed(4))
    assert res.null_samples.shape == (3, 90)
    torch.testing.assert_close(res.statistic, stat_ref, rtol=1e-12, atol=1e-13)
    _rel_close(res.null_samples, null_ref, 1e-12)
    assert torch.equal(res.p_value, p_ref)


def test_single_block_mmd_permutation_test_is_the_old_computation_bit_for_bit():
    g = torch.Generator().manual_seed(17)
    x = torch.randn(150, 3, generator=g)
    y = torch.randn(120, 3, generator=g) + 0.2
    kernel = _imq_mixture()
    res = mmd_permutation_test(x, y, kernel, n_permutations=100, generator=torch.Generator().manual_seed(2))
    stat, null, p = _dense_mmd_permutation_test(x, y, kernel, 100, torch.Generator().manual_seed(2))
    assert torch.equal(res.statistic, stat) and torch.equal(res.null_samples, null) and torch.equal(res.p_value, p)


# ---------------------------------------------------------------------------
# Peak memory: no [n, n] intermediate
# ---------------------------------------------------------------------------
class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an ATen op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


def _largest(fn):
    with _LargestOutput() as rec:
        fn()
    return rec.largest, rec.op


def test_no_n_by_n_intermediate(rows_per_block):
    # n = 512 with blocks of 64 rows: the blocked paths' largest tensors are [64, 512] slabs and the [B, n]
    # draws (B = 100, plus the observed labelling for the permutation test); the dense forms make [512, 512]
    # matrices, which the same recorder sees.
    n, b, d = 512, 64, 3
    g = torch.Generator().manual_seed(18)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n // 2, d, generator=g, dtype=torch.float64)
    kernel = IMQ()
    rows_per_block(b, n)

    def run_ksd():
        ksd_test(x, -x, kernel, n_bootstrap=100, generator=torch.Generator().manual_seed(0))

    def run_perm():
        mmd_permutation_test(x[: n // 2], y, kernel, n_permutations=100, generator=torch.Generator().manual_seed(0))

    def run_mmd():  # forward and backward
        xa = x[: n // 2].clone().requires_grad_(True)
        mmd(xa, y, kernel).backward()

    bound = max(b * n, (1 + 100) * n)  # [64, n] slabs, [1 + B, n] labellings: 51712 < n^2 = 262144
    for fn in (run_ksd, run_perm, run_mmd):
        largest, op = _largest(fn)
        assert largest <= bound, (fn.__name__, largest, op)
    # The recorder can fail: the dense forms it replaced make [n, n] (and, for mmd, [n/2, n/2]) tensors.
    assert _largest(lambda: _dense_ksd_test(x, -x, kernel, 100, torch.Generator().manual_seed(0)))[0] >= n * n
    assert _largest(
        lambda: _dense_mmd_permutation_test(x[: n // 2], y, kernel, 100, torch.Generator().manual_seed(0))
    )[0] >= n * n
    assert _largest(lambda: _dense_mmd(x[: n // 2], y, kernel))[0] > bound
