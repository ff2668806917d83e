"""The Inception-v3 variant FID implementations use (the TensorFlow graph ported to PyTorch:
``pt_inception-2015-12-05-6726825d.pth``), as a :class:`~stein_core.features.FeatureExtractor` with 2048-d pool3
features (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
NeurIPS 2017). The architecture only: the weights are a ``state_dict`` the caller loads (the pipeline reads the
local file and checks its hash, ``tasks.stages.evaluate.features.load_inception``); :meth:`InceptionV3FID.random`
builds a seeded random network for tests.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from stein_core.features import _batched, _check_range, state_dict_fingerprint

__all__ = ["FIDInceptionV3", "InceptionV3FID"]




class _BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=0.001) -> ReLU; state_dict keys ``conv.*`` and ``bn.*``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int | tuple[int, int], **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3_no_pad_count(x: Tensor) -> Tensor:
    # TF's average pooling divides by the number of valid (non-padding) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool(no pad count)->1x1; 224 + pool_features channels."""

    def __init__(self, in_ch: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = _BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = _BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = _BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_no_pad_count(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class _InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1->3x3->3x3/2 | maxpool 3x3/2; 384 + 96 + in_ch channels."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3 = _BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)


class _FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (c7 inner channels); 4 x 192 = 768 channels."""

    def __init__(self, in_ch: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = _BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(in_ch, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3_no_pad_count(x))
        return torch.cat([b1, b7, bd, bp], dim=1)


class _InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool 3x3/2; 320 + 192 + in_ch channels."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = _BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class _FIDInceptionE(nn.Module):
    """8x8 block with expanded 1x3 / 3x1 filter banks; 320 + 768 + 768 + 192 = 2048 channels.

    ``pool="avg"`` (Mixed_7b, FIDInceptionE_1): average pooling that excludes padding from the count;
    ``pool="max"`` (Mixed_7c, FIDInceptionE_2): max pooling, a quirk of the TF graph FID was defined with.
    """

    def __init__(self, in_ch: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = _BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = _BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = _BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(in_ch, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        h = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(h), self.branch3x3_2b(h)], dim=1)
        h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)], dim=1)
        if self.pool == "avg":
            p = _avg_pool_3x3_no_pad_count(x)
        else:
            p = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(p)
        return torch.cat([b1, b3, bd, bp], dim=1)


class FIDInceptionV3(nn.Module):
    """The Inception-v3 network of FID (Heusel et al. 2017), as ported from TF to PyTorch by pytorch-fid.

    Differs from the ImageNet Inception-v3 of Szegedy et al. (2016) in the blocks the TF graph implements
    differently: average pools that exclude padding from the count (Mixed_5b-5d, 6b-6e, 7b) and a max pool
    in the pooling branch of Mixed_7c; 1008 output classes; no auxiliary classifier.

    ``forward(x)``: ``x [n, 3, H, W]`` already scaled to [-1, 1] (``H, W >= 75``; FID uses 299) ->
    pool3 features ``[n, 2048]`` (global average of Mixed_7c). ``logits(x)`` -> ``[n, 1008]`` via ``fc``
    (kept so that the pt_inception state_dict loads strictly).

    State-dict keys follow the torchvision naming (``Conv2d_1a_3x3.conv.weight``, ``Mixed_7c.branch_pool.bn.
    running_var``, ``fc.weight``, ...), the layout of ``pt_inception-2015-12-05-6726825d.pth``.
    """

    feature_dim = 2048
    n_classes = 1008
    min_size = 75

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, 3)
        self.Mixed_5b = _FIDInceptionA(192, pool_features=32)  # -> 256
        self.Mixed_5c = _FIDInceptionA(256, pool_features=64)  # -> 288
        self.Mixed_5d = _FIDInceptionA(288, pool_features=64)  # -> 288
        self.Mixed_6a = _InceptionB(288)  # -> 768
        self.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = _InceptionD(768)  # -> 1280
        self.Mixed_7b = _FIDInceptionE(1280, pool="avg")  # -> 2048
        self.Mixed_7c = _FIDInceptionE(2048, pool="max")  # -> 2048
        self.fc = nn.Linear(2048, self.n_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"expected [n, 3, H, W] with H, W >= {self.min_size}, got {tuple(x.shape)}")
        h = self.Conv2d_1a_3x3(x)  # [n, 32, 149, 149] at 299
        h = self.Conv2d_2a_3x3(h)  # [n, 32, 147, 147]
        h = self.Conv2d_2b_3x3(h)  # [n, 64, 147, 147]
        h = F.max_pool2d(h, kernel_size=3, stride=2)  # [n, 64, 73, 73]
        h = self.Conv2d_3b_1x1(h)  # [n, 80, 73, 73]
        h = self.Conv2d_4a_3x3(h)  # [n, 192, 71, 71]
        h = F.max_pool2d(h, kernel_size=3, stride=2)  # [n, 192, 35, 35]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d):
            h = block(h)  # [n, 256 / 288 / 288, 35, 35]
        h = self.Mixed_6a(h)  # [n, 768, 17, 17]
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            h = block(h)  # [n, 768, 17, 17]
        h = self.Mixed_7a(h)  # [n, 1280, 8, 8]
        h = self.Mixed_7b(h)  # [n, 2048, 8, 8]
        h = self.Mixed_7c(h)  # [n, 2048, 8, 8]
        return h.mean(dim=(-2, -1))  # [n, 2048] (pool3)

    def logits(self, x: Tensor) -> Tensor:
        """``[n, 3, H, W]`` in [-1, 1] -> ``[n, 1008]``."""
        return self.fc(self.forward(x))


def _init_random_(net: nn.Module) -> None:
    """He-normal convolutions (fan-in, ReLU gain) so that activations keep their scale through the depth."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)


class InceptionV3FID:
    """FID feature extractor: images in [0, 1] -> Inception-v3 pool3 features ``[n, 2048]`` (float64).

    Preprocessing (pytorch-fid's ``resize_input=True, normalize_input=True``): a 1-channel input is repeated to
    3 channels; the image is resized to ``resize_to x resize_to`` with ``F.interpolate(mode="bilinear",
    align_corners=False)`` (no antialiasing), then scaled to [-1, 1] by ``2 x - 1``. ``resize_to=None`` skips
    the resize (for tests on small inputs; needs ``H, W >= 75``); features are then not comparable to FID.

    Build from a loaded :class:`FIDInceptionV3` (``tasks.stages.evaluate.features.load_inception`` reads the
    real weights) or with :meth:`random` (tests). Move to an
    accelerator with :meth:`to`; inputs may live anywhere, features come back on the input's device.
    """

    name = "inception_v3_fid"
    dim = FIDInceptionV3.feature_dim

    def __init__(self, net: FIDInceptionV3, *, batch_size: int = 50, resize_to: int | None = 299) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if resize_to is not None and resize_to < FIDInceptionV3.min_size:
            raise ValueError(f"resize_to must be >= {FIDInceptionV3.min_size} or None, got {resize_to}")
        self.net = net.eval()
        self.batch_size = int(batch_size)
        self.resize_to = None if resize_to is None else int(resize_to)
        self.input_spec: dict[str, Any] = {
            "shape": "[n, C, H, W]",
            "channels": [1, 3],  # 1 channel is repeated to 3
            "range": [0.0, 1.0],
            "min_size": None if self.resize_to is not None else FIDInceptionV3.min_size,
            "resize": None
            if self.resize_to is None
            else {
                "size": [self.resize_to, self.resize_to],
                "method": "bilinear",
                "align_corners": False,
                "antialias": False,
            },
            "network_input": "2 * x - 1, range [-1, 1]",
        }

    @classmethod
    def random(cls, seed: int = 0, *, batch_size: int = 50, resize_to: int | None = 299) -> InceptionV3FID:
        """A seeded, randomly initialised network (for tests; its features mean nothing).

        The seed drives a forked global RNG, so the caller's RNG state is left untouched.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = FIDInceptionV3()
            _init_random_(net)
        return cls(net, batch_size=batch_size, resize_to=resize_to)

    def to(self, device: torch.device | str) -> InceptionV3FID:
        self.net.to(device)
        return self

    def preprocess(self, x: Tensor) -> Tensor:
        """``[n, 1 or 3, H, W]`` in [0, 1] -> network input ``[n, 3, S, S]`` in [-1, 1] (same dtype/device)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images [n, 1 or 3, H, W], got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # [n, 3, H, W]
        if self.resize_to is not None:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images [n, 1 or 3, H, W], got {tuple(x.shape)}")
        if self.resize_to is None and min(x.shape[-2:]) < FIDInceptionV3.min_size:
            raise ValueError(f"without resizing, H and W must be >= {FIDInceptionV3.min_size}: {tuple(x.shape)}")
        _check_range(x, 0.0, 1.0)

    def __call__(self, x: Tensor) -> Tensor:
        """Images ``[n, 1 or 3, H, W]`` in [0, 1] -> pool3 features ``[n, 2048]`` float64 on ``x``'s device."""
        self._check_input(x)
        return _batched(self.net, lambda xb: self.net(self.preprocess(xb)), x, self.batch_size, self.dim)

    def logits(self, x: Tensor) -> Tensor:
        """Images as for ``__call__`` -> the 1008 class logits ``[n, 1008]`` (float64) for the Inception score."""
        self._check_input(x)
        return _batched(self.net, lambda xb: self.net.logits(self.preprocess(xb)), x, self.batch_size, self.net.n_classes)

    def fingerprint(self) -> str:
        return state_dict_fingerprint(self.name, self.net, self.input_spec)


