"""Small score networks and implicit generators.

Score networks -- shapes: ``x [n, d]`` (MLP) or ``[n, C, H, W]`` / flattened ``[n, C*H*W]`` (conv net),
``sigma [n]`` or scalar; the output has the shape of ``x``.

Generators (:class:`MLPGenerator`, :class:`ConvGenerator`) -- latent ``z [n, latent_dim]`` to samples
``x [n, d]`` (images flattened to ``d = C*H*W``), trained by the losses of :mod:`stein_core.generators`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._random import randn

__all__ = ["ConvGenerator", "MLPGenerator", "NoiseConditionalConvNet", "NoiseConditionalMLP"]


class NoiseConditionalMLP(nn.Module):
    """Noise-conditional score MLP ``s_theta(x, sigma) = f_theta(x, log sigma) / sigma``.

    NCSN-style parametrisation (Song & Ermon, NeurIPS 2020, Technique 3: the
    score is the network output divided by ``sigma``), so ``f_theta`` predicts
    ``-z`` under the denoising score-matching objective, a target of unit scale
    at every noise level.

    The noise level enters through sinusoidal features of ``log sigma`` at
    fixed geometric frequencies (``embed_dim // 2`` of them, from 1/4 to 16
    rad per unit of ``log sigma``), mapped by a small MLP and added to every
    hidden layer's pre-activation. The input is scaled by
    ``1 / sqrt(1 + sigma^2)`` so that noisy inputs stay of order one.

    Args:
        dim: data dimension ``d``.
        hidden: hidden width.
        n_layers: number of hidden layers (>= 1).
        embed_dim: size of the sinusoidal embedding (even, >= 2).

    Training note (2-D toy data, CPU): ``hidden=128, n_layers=3, embed_dim=32``
    trained with :func:`~stein_core.score_matching.get_dsm_loss_fn` on
    ``geometric_sigmas(20, 0.1, 10)``, Adam lr 1e-3 with cosine decay to 0 over
    3000 steps of batch 256 takes ~8 s on one core; a constant learning rate
    leaves the small-sigma scores 10x less accurate.

    ``self.model_args`` holds the constructor arguments, so that
    ``NoiseConditionalMLP(**ckpt["model_args"])`` rebuilds the network.
    """

    def __init__(self, dim: int, hidden: int = 128, n_layers: int = 3, embed_dim: int = 32) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or n_layers < 1:
            raise ValueError("dim, hidden and n_layers must be >= 1")
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"embed_dim must be even and >= 2, got {embed_dim}")
        self.model_args = {
            "dim": int(dim),
            "hidden": int(hidden),
            "n_layers": int(n_layers),
            "embed_dim": int(embed_dim),
        }
        n_freq = embed_dim // 2
        freqs = torch.exp(torch.linspace(math.log(0.25), math.log(16.0), n_freq))
        self.register_buffer("freqs", freqs)  # [embed_dim/2]
        self.embed = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.inp = nn.Linear(dim, hidden)
        self.hidden_layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers - 1))
        self.cond = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers))
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def _sigma(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        return _sigma_vector(x, sigma)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Score estimate: ``x [n, d]``, ``sigma`` scalar or ``[n]`` -> ``[n, d]``."""
        s = self._sigma(x, sigma)  # [n]
        ang = torch.log(s)[:, None] * self.freqs.to(x.dtype)  # [n, embed_dim/2]
        emb = self.embed(torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1))  # [n, hidden]
        h = self.inp(x * torch.rsqrt(1.0 + s * s)[:, None])  # [n, hidden]
        h = self.act(h + self.cond[0](emb))
        for lin, cond in zip(self.hidden_layers, self.cond[1:]):
            h = self.act(lin(h) + cond(emb))
        return self.out(h) / s[:, None]


def _sigma_vector(x: Tensor, sigma: Tensor | float) -> Tensor:
    """``sigma`` (scalar or ``[n]``) as a ``[n]`` tensor with the dtype and device of ``x [n, ...]``."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or [n={x.shape[0]}], got {tuple(s.shape)}")
    return s


def _group_count(channels: int) -> int:
    """GroupNorm groups: the most of 32, 16, ..., 1 that divide ``channels`` with >= 4 channels per group."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


class _ResBlock(nn.Module):
    """Pre-activation residual block ``GN-SiLU-conv3x3, + emb, GN-SiLU-conv3x3`` (Ho et al. 2020 without dropout).

    The noise embedding enters as a per-channel bias after the first convolution. The second convolution
    starts at zero, so every block starts as the identity (or its 1x1 projection).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_group_count(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_group_count(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        # h [n, in_ch, H, W], emb [n, emb_dim] (already passed through SiLU) -> [n, out_ch, H, W]
        out = self.conv1(self.act(self.norm1(h)))
        out = out + self.emb(emb)[:, :, None, None]
        out = self.conv2(self.act(self.norm2(out)))
        return self.skip(h) + out


class NoiseConditionalConvNet(nn.Module):
    """Noise-conditional convolutional score network for images, ``s_theta(x, sigma) = f_theta(x, sigma) / sigma``.

    A small U-Net (Ronneberger et al. 2015) in the form used by score models (Ho et al., NeurIPS 2020;
    NCSNv2, Song & Ermon, NeurIPS 2020, uses a RefineNet of the same shape): one resolution level per entry of
    ``channel_mults``, ``num_res_blocks`` residual blocks per level (GroupNorm, SiLU, 3x3 convolutions), a
    stride-2 convolution between levels, two blocks at the coarsest level, then the mirror path that
    upsamples (nearest, to the exact size of the skip, then a 3x3 convolution), concatenates the skip of the
    same level and applies ``num_res_blocks`` blocks. Stride-2 convolutions give ``ceil(H / 2)``, so odd sizes
    work (28 -> 14 -> 7 -> 4 and back to 28).

    The noise level enters as in :class:`NoiseConditionalMLP`: sinusoidal features of ``log sigma`` at
    ``embed_dim // 2`` geometric frequencies from 1/4 to 16, a two-layer MLP to ``4 * base_channels``, and a
    per-channel bias in every residual block. The input is scaled by ``1 / sqrt(1 + sigma^2)`` and the output
    divided by ``sigma`` (NCSNv2, Technique 3), so ``f_theta`` predicts ``-z`` under
    :func:`~stein_core.score_matching.get_dsm_loss_fn`. The last convolution starts at zero: the initial
    score is 0 and the initial ``sigma^2``-weighted DSM loss is ``d / 2``.

    Args:
        in_channels: image channels ``C``.
        image_size: ``H = W`` (an int) or ``(H, W)``; used to reshape flattened inputs.
        base_channels: channels of the first level.
        channel_mults: channel multiplier per level; ``len(channel_mults)`` levels, ``len - 1`` downsamplings.
        num_res_blocks: residual blocks per level on each path.
        embed_dim: size of the sinusoidal embedding (even, >= 2).

    Suggested sizes (parameter counts in the tests): 8x8 digits ``base_channels=32, channel_mults=(1, 2, 2)``
    (8 -> 4 -> 2); 28x28 MNIST ``base_channels=32, channel_mults=(1, 2, 2)`` (28 -> 14 -> 7);
    32x32 colour ``base_channels=64, channel_mults=(1, 2, 2, 2)`` (32 -> 16 -> 8 -> 4).

    ``self.model_args`` holds the constructor arguments (plain ints and lists), so that
    ``NoiseConditionalConvNet(**ckpt["model_args"])`` rebuilds the network from a ``weights_only`` checkpoint.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int | tuple[int, int] = 8,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] | list[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        embed_dim: int = 32,
    ) -> None:
        super().__init__()
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        mults = [int(m) for m in channel_mults]
        if in_channels < 1 or base_channels < 1 or num_res_blocks < 1:
            raise ValueError("in_channels, base_channels and num_res_blocks must be >= 1")
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
        if not mults or min(mults) < 1:
            raise ValueError(f"channel_mults must be a non-empty list of positive ints, got {channel_mults!r}")
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"embed_dim must be even and >= 2, got {embed_dim}")
        if min(hw) < 2 ** (len(mults) - 1):
            raise ValueError(
                f"{len(mults)} levels halve the image {len(mults) - 1} times; {hw[0]}x{hw[1]} is too small"
            )
        self.model_args = {
            "in_channels": int(in_channels),
            "image_size": hw[0] if hw[0] == hw[1] else list(hw),
            "base_channels": int(base_channels),
            "channel_mults": mults,
            "num_res_blocks": int(num_res_blocks),
            "embed_dim": int(embed_dim),
        }
        self.image_shape = (int(in_channels), hw[0], hw[1])  # (C, H, W)
        emb_dim = 4 * base_channels
        freqs = torch.exp(torch.linspace(math.log(0.25), math.log(16.0), embed_dim // 2))
        self.register_buffer("freqs", freqs)  # [embed_dim/2]
        self.embed = nn.Sequential(nn.Linear(embed_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.act = nn.SiLU()

        chans = [base_channels * m for m in mults]  # channels per level
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = base_channels
        for i, c in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(_ResBlock(ch, c, emb_dim))
                ch = c
            self.down.append(blocks)
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = nn.ModuleList([_ResBlock(ch, ch, emb_dim), _ResBlock(ch, ch, emb_dim)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(chans))):
            c = chans[i]
            blocks = nn.ModuleList()
            for j in range(num_res_blocks):
                blocks.append(_ResBlock(ch + c if j == 0 else c, c, emb_dim))  # the skip joins the first block
                ch = c
            self.up.append(blocks)
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = nn.GroupNorm(_group_count(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Score estimate: ``x [n, C, H, W]`` or ``[n, C*H*W]``, ``sigma`` scalar or ``[n]`` -> shape of ``x``."""
        shape = x.shape
        if x.ndim == 2 and x.shape[1] == math.prod(self.image_shape):
            x = x.reshape((x.shape[0],) + self.image_shape)  # [n, C, H, W]
        elif x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            c, hh, ww = self.image_shape
            raise ValueError(f"x must be [n, {c}, {hh}, {ww}] or [n, {c * hh * ww}], got {tuple(shape)}")
        s = _sigma_vector(x, sigma)  # [n]
        ang = torch.log(s)[:, None] * self.freqs.to(x.dtype)  # [n, embed_dim/2]
        emb = self.act(self.embed(torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)))  # [n, 4*base]

        h = self.conv_in(x * torch.rsqrt(1.0 + s * s)[:, None, None, None])  # [n, base, H, W]
        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)  # [n, chans[i], H_i, W_i]
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)  # [n, chans[i], ceil(H_i/2), ceil(W_i/2)]
        for block in self.mid:
            h = block(h, emb)
        for k, blocks in enumerate(self.up):
            skip = skips.pop()  # the level this path is at
            if k > 0:  # back up one level: nearest to the skip's exact size (odd sizes), then a 3x3 conv
                h = self.upsample[k - 1](F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
            h = torch.cat([h, skip], dim=1)
            for block in blocks:
                h = block(h, emb)
        out = self.conv_out(self.act(self.norm_out(h)))  # [n, C, H, W]
        return (out / s[:, None, None, None]).reshape(shape)


# ---------------------------------------------------------------------------
# Implicit generators x = G_theta(z), z ~ N(0, I)
# ---------------------------------------------------------------------------
class _Generator(nn.Module):
    """Shared parts of the generators: ``latent_dim``, ``model_args`` and :meth:`sample`."""

    latent_dim: int

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``G(z)`` for ``n`` latents ``z ~ N(0, I)`` drawn from ``generator``, on the parameters' device and dtype.

        Returns ``[n, d]``; differentiable wrt the parameters.
        """
        like = next(self.parameters())
        return self(randn((int(n), self.latent_dim), like=like, generator=generator))


class MLPGenerator(_Generator):
    """Fully connected generator ``x = G_theta(z)``: ``z [n, latent_dim]`` -> ``x [n, out_dim]``.

    ``n_layers`` hidden layers of width ``hidden`` with SiLU activations and a linear output layer (no
    output squashing: for unbounded data such as the 2-D toy distributions). Every row of the output depends
    only on its own latent (no batch statistics), so a batch split over workers gives the same samples.

    ``self.model_args`` holds the constructor arguments, so that ``MLPGenerator(**ckpt["model_args"])``
    rebuilds the network; ``self.latent_dim`` is the latent size.
    """

    def __init__(self, latent_dim: int, out_dim: int, hidden: int = 128, n_layers: int = 3) -> None:
        super().__init__()
        if min(latent_dim, out_dim, hidden, n_layers) < 1:
            raise ValueError("latent_dim, out_dim, hidden and n_layers must be >= 1")
        self.model_args = {
            "latent_dim": int(latent_dim),
            "out_dim": int(out_dim),
            "hidden": int(hidden),
            "n_layers": int(n_layers),
        }
        self.latent_dim = int(latent_dim)
        layers: list[nn.Module] = []
        width = latent_dim
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """``z [n, latent_dim]`` -> ``[n, out_dim]``."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be [n, {self.latent_dim}], got {tuple(z.shape)}")
        return self.net(z)


def _upsampling_stages(h: int, w: int) -> int:
    """Upsampling stages ``k``: the most with ``min(H, W) / 2^k >= 4`` (8 -> 1, 28 -> 2, 32 -> 3; 0 below 8)."""
    k = 0
    while min(h, w) / 2 ** (k + 1) >= 4:
        k += 1
    return k


class ConvGenerator(_Generator):
    """DCGAN-style convolutional generator for images in ``[0, 1]``: ``z [n, latent_dim]`` -> ``x [n, C*H*W]``.

    Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep Convolutional Generative
    Adversarial Networks", ICLR 2016, with two changes:

    * Upsampling is nearest-neighbour x2 followed by a 3x3 convolution instead of a transposed convolution,
      which avoids checkerboard artefacts (Odena, Dumoulin & Olah, "Deconvolution and Checkerboard
      Artifacts", Distill 2016).
    * GroupNorm instead of BatchNorm. BatchNorm normalises with statistics of the whole batch, so a sample
      depends on the other latents of its batch: a batch split over N data-parallel workers would give other
      samples (and gradients) than the same batch on one worker, and a sample would change with the batch
      size. GroupNorm normalises each example on its own, so ``G`` acts row by row and the "N workers == 1
      worker" equivalence of the training loop holds.

    Layout: a linear projection of ``z`` to ``base_channels * 2^k`` maps of size ``h0 x w0`` with
    ``h0 = ceil(H / 2^k)``, ``w0 = ceil(W / 2^k)``; ``k`` blocks (upsample x2, conv3x3, GroupNorm, ReLU), each
    halving the channels down to ``base_channels``; a 3x3 convolution to ``C`` channels and a sigmoid. ``k``
    is the most stages with ``min(H, W) / 2^k >= 4``: (1, 8, 8) -> 4x4, one stage; (1, 28, 28) -> 7x7, two
    stages; (3, 32, 32) -> 4x4, three stages. When ``h0 2^k`` exceeds ``H`` (odd sizes, e.g. 28 x 20 ->
    7 x 5 -> 28 x 20 exactly, but 30 -> 8 -> 32) the map is centre-cropped to ``H x W`` before the last
    convolution.

    Args:
        latent_dim: size of ``z``.
        shape: ``(C, H, W)`` of the images.
        base_channels: channels of the last (full-resolution) block.

    ``self.model_args`` holds the constructor arguments (plain ints and a list), so that
    ``ConvGenerator(**ckpt["model_args"])`` rebuilds the network from a ``weights_only`` checkpoint;
    ``self.latent_dim`` is the latent size and ``self.image_shape`` the ``(C, H, W)``.
    """

    def __init__(self, latent_dim: int, shape: tuple[int, int, int] | list[int] = (1, 28, 28),
                 base_channels: int = 32) -> None:
        super().__init__()
        shape_t = tuple(int(s) for s in shape)
        if len(shape_t) != 3 or min(shape_t) < 1:
            raise ValueError(f"shape must be (C, H, W) with positive entries, got {shape!r}")
        if latent_dim < 1 or base_channels < 1:
            raise ValueError("latent_dim and base_channels must be >= 1")
        c, h, w = shape_t
        self.model_args = {"latent_dim": int(latent_dim), "shape": list(shape_t), "base_channels": int(base_channels)}
        self.latent_dim = int(latent_dim)
        self.image_shape = shape_t  # (C, H, W)
        k = _upsampling_stages(h, w)
        self.n_stages = k
        self.h0, self.w0 = math.ceil(h / 2**k), math.ceil(w / 2**k)
        ch = base_channels * 2**k
        self.project = nn.Linear(latent_dim, ch * self.h0 * self.w0)
        self.norm_in = nn.GroupNorm(_group_count(ch), ch)
        blocks: list[nn.Module] = []
        for _ in range(k):
            out = ch // 2
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(ch, out, 3, padding=1),
                nn.GroupNorm(_group_count(out), out),
                nn.ReLU(),
            ]
            ch = out
        self.blocks = nn.Sequential(*blocks)
        self.conv_out = nn.Conv2d(ch, c, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """``z [n, latent_dim]`` -> images in ``(0, 1)``, flattened ``[n, C*H*W]``."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be [n, {self.latent_dim}], got {tuple(z.shape)}")
        n = z.shape[0]
        c, h, w = self.image_shape
        x = self.project(z).reshape(n, -1, self.h0, self.w0)  # [n, base*2^k, h0, w0]
        x = F.relu(self.norm_in(x))
        x = self.blocks(x)  # [n, base, h0*2^k, w0*2^k]
        top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
        x = x[..., top : top + h, left : left + w]  # [n, base, H, W]
        return torch.sigmoid(self.conv_out(x)).reshape(n, c * h * w)  # [n, C*H*W]
