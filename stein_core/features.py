"""Feature extractors for FID / KID / Inception-score style evaluation.

Every extractor follows :class:`FeatureExtractor`:

* ``name: str`` and ``dim: int`` (feature dimension);
* ``input_spec: dict`` -- the expected input (shape, channels, value range, resizing), plain JSON-able values;
* ``fingerprint() -> str`` -- SHA-256 hex digest of the name, the input spec and every ``state_dict`` entry
  (key, dtype, shape, bytes); stable across runs and processes, to be stored with every result;
* ``__call__(x) -> Tensor`` -- features ``[n, dim]`` in float64 on ``x``'s device, computed under
  ``torch.no_grad()`` in eval mode, ``batch_size`` rows at a time on the network's device (move the
  extractor with ``.to(device)``).

Extractors:

* :class:`InceptionV3FID` -- the Inception-v3 variant used by FID implementations (the TensorFlow graph ported
  to PyTorch: ``pt_inception-2015-12-05-6726825d.pth``), 2048-d pool3 features. Weights come only from a
  local file (:meth:`InceptionV3FID.from_file`); :meth:`InceptionV3FID.random` builds a seeded random network
  for tests.
* :class:`ClassifierFeatures` around a :class:`LeNetClassifier` (small digits / MNIST), trained with
  :func:`train_classifier`; penultimate-layer features for FID/KID and logits for the Inception score.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "FeatureExtractor",
    "FIDInceptionV3",
    "InceptionV3FID",
    "INCEPTION_FID_WEIGHTS_FILE",
    "INCEPTION_FID_SHA256_PREFIX",
    "INCEPTION_WEIGHTS_ENV_VAR",
    "LeNetClassifier",
    "ClassifierFeatures",
    "train_classifier",
    "accuracy",
    "state_dict_fingerprint",
    "sha256_file",
]

INCEPTION_FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_FID_SHA256_PREFIX = "6726825d"
# Named in error messages only: stein_core reads no environment; the pipeline resolves the path.
INCEPTION_WEIGHTS_ENV_VAR = "STEIN_INCEPTION_WEIGHTS"
_INCEPTION_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FID_WEIGHTS_FILE
)


@runtime_checkable
class FeatureExtractor(Protocol):
    """What an evaluation metric needs from a feature extractor (see the module docstring)."""

    name: str
    dim: int
    input_spec: dict[str, Any]

    def fingerprint(self) -> str: ...

    def __call__(self, x: Tensor) -> Tensor: ...


# --------------------------------------------------------------------------------------------- helpers


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: Any) -> str:
    """Deterministic text for nested dicts / lists / scalars (dict keys sorted)."""
    if isinstance(obj, dict):
        return "{" + ",".join(f"{k!r}:{_canonical(obj[k])}" for k in sorted(obj)) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_canonical(v) for v in obj) + "]"
    return repr(obj)


def state_dict_fingerprint(name: str, module: nn.Module, extra: Any = None) -> str:
    """SHA-256 hex digest of ``name``, ``extra`` (canonicalised) and every ``state_dict`` entry of ``module``.

    Each entry contributes its key, dtype, shape and raw bytes (moved to CPU, made contiguous), in the
    ``state_dict`` order, which is fixed by the architecture. Equal weights give equal digests in any process.
    """
    h = hashlib.sha256()
    h.update(f"name={name};extra={_canonical(extra)};".encode())
    for key, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _batched(
    module: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int, out_dim: int
) -> Tensor:
    """``fn`` over ``x [n, ...]`` in batches of ``batch_size`` rows, no_grad + eval -> float64 ``[n, out_dim]``.

    Each batch is moved to the module's device and dtype; the result goes back to ``x``'s device. The module's
    training flag is restored afterwards.
    """
    device, dtype = _module_device_dtype(module)
    was_training = module.training
    module.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                xb = x[i : i + batch_size].to(device=device, dtype=dtype)
                out.append(fn(xb).to(torch.float64))
    finally:
        module.train(was_training)
    if not out:
        return torch.zeros(0, out_dim, dtype=torch.float64, device=x.device)
    return torch.cat(out).to(x.device)  # [n, out_dim]


def _check_range(x: Tensor, lo: float, hi: float, tol: float = 1e-3) -> None:
    if x.numel() and (float(x.min()) < lo - tol or float(x.max()) > hi + tol):
        raise ValueError(
            f"inputs must lie in [{lo}, {hi}], got values in [{float(x.min()):.4g}, {float(x.max()):.4g}]"
        )


# ------------------------------------------------------------------------------------- Inception-v3 FID


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

    Build with :meth:`from_file` (the only way to get the real weights) or :meth:`random` (tests). Move to an
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

    @classmethod
    def from_file(
        cls, path: str | Path, *, batch_size: int = 50, resize_to: int | None = 299, check_hash: bool = True
    ) -> InceptionV3FID:
        """Load the FID weights from the local file ``path`` (nothing is ever downloaded).

        Raises:
            FileNotFoundError: ``path`` does not exist; the message says how to provide the file.
            ValueError: the file's SHA-256 does not start with ``6726825d``.
            RuntimeError: the state_dict does not match the architecture (strict loading).
        """
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"Inception FID weights not found: looked for '{path}' (resolved to '{p.resolve()}'). "
                f"Nothing is downloaded: fetch {INCEPTION_FID_WEIGHTS_FILE} ({_INCEPTION_FID_URL}) on a machine "
                f"with network access, copy it here, and name it with the environment variable "
                f"{INCEPTION_WEIGHTS_ENV_VAR} or the evaluation config key for the Inception weights."
            )
        if check_hash:
            digest = sha256_file(p)
            if not digest.startswith(INCEPTION_FID_SHA256_PREFIX):
                raise ValueError(
                    f"'{p}' is not {INCEPTION_FID_WEIGHTS_FILE}: expected a SHA-256 starting with "
                    f"'{INCEPTION_FID_SHA256_PREFIX}', got '{digest}'"
                )
        state = torch.load(p, map_location="cpu", weights_only=True)
        net = FIDInceptionV3()
        net.load_state_dict(state, strict=True)
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


# ------------------------------------------------------------------------------------------------ LeNet


class LeNetClassifier(nn.Module):
    """LeNet-5-style classifier (LeCun et al. 1998) for small grey images (8x8 digits up to 28x28 MNIST).

    ``conv5x5(pad 2) - ReLU - maxpool2`` twice, then ``Linear - ReLU`` for each entry of ``hidden`` and a
    linear read-out; the last hidden layer (after ReLU) is the penultimate layer returned by
    :meth:`features`. Sizes: 8 -> 4 -> 2 and 28 -> 14 -> 7. Inputs ``[n, C, H, W]`` or flattened ``[n, C*H*W]``
    in [0, 1].

    ``self.model_args`` holds the constructor arguments (ints and lists), so that
    ``LeNetClassifier(**ckpt["model_args"])`` rebuilds the network.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int | tuple[int, int] = 8,
        n_classes: int = 10,
        channels: tuple[int, int] | list[int] = (6, 16),
        hidden: tuple[int, ...] | list[int] = (120, 84),
    ) -> None:
        super().__init__()
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        ch = [int(c) for c in channels]
        hid = [int(h) for h in hidden]
        if in_channels < 1 or n_classes < 2:
            raise ValueError("in_channels must be >= 1 and n_classes >= 2")
        if len(hw) != 2 or min(hw) < 4:
            raise ValueError(f"image_size must be >= 4 (two 2x poolings), got {image_size!r}")
        if len(ch) != 2 or min(ch) < 1 or not hid or min(hid) < 1:
            raise ValueError(f"channels must be two positive ints and hidden non-empty, got {channels!r}, {hidden!r}")
        self.model_args = {
            "in_channels": int(in_channels),
            "image_size": hw[0] if hw[0] == hw[1] else list(hw),
            "n_classes": int(n_classes),
            "channels": ch,
            "hidden": hid,
        }
        self.image_shape = (int(in_channels), hw[0], hw[1])  # (C, H, W)
        self.feature_dim = hid[-1]
        self.n_classes = int(n_classes)
        self.conv1 = nn.Conv2d(in_channels, ch[0], 5, padding=2)
        self.conv2 = nn.Conv2d(ch[0], ch[1], 5, padding=2)
        flat = ch[1] * (hw[0] // 4) * (hw[1] // 4)
        dims = [flat] + hid
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(hid[-1], n_classes)

    def _as_images(self, x: Tensor) -> Tensor:
        if x.ndim == 2 and x.shape[1] == math.prod(self.image_shape):
            return x.reshape((x.shape[0],) + self.image_shape)  # [n, C, H, W]
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected [n, {self.image_shape}] or flattened, got {tuple(x.shape)}")
        return x

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations: ``[n, C, H, W]`` or ``[n, C*H*W]`` -> ``[n, feature_dim]``."""
        h = F.max_pool2d(F.relu(self.conv1(self._as_images(x))), 2)  # [n, c1, H/2, W/2]
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # [n, c2, H/4, W/4]
        h = h.flatten(1)  # [n, c2 * H/4 * W/4]
        for lin in self.hidden:
            h = F.relu(lin(h))
        return h  # [n, feature_dim]

    def logits(self, x: Tensor) -> Tensor:
        """``[n, C, H, W]`` or ``[n, C*H*W]`` -> ``[n, n_classes]``."""
        return self.head(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)


def train_classifier(
    x: Tensor,
    labels: Tensor,
    *,
    shape: tuple[int, int, int],
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    n_classes: int | None = None,
    weight_decay: float = 0.0,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[LeNetClassifier, dict[str, list[float]]]:
    """Train a :class:`LeNetClassifier` with Adam and cross-entropy, deterministically.

    Args:
        x: images ``[n, C, H, W]`` or ``[n, C*H*W]`` in [0, 1]; training runs on ``x``'s device.
        labels: integer classes ``[n]`` in ``[0, n_classes)``.
        shape: ``(C, H, W)``.
        n_classes: defaults to ``labels.max() + 1``.
        model_kwargs: extra :class:`LeNetClassifier` arguments (``channels``, ``hidden``).

    The initial weights come from ``torch.manual_seed(seed)`` inside a forked RNG (the caller's global RNG is
    left untouched) on the CPU; shuffling uses a CPU ``torch.Generator`` seeded with ``seed``. Same inputs and
    seed give identical weights (on the same device and thread settings).

    Returns:
        ``(model in eval mode, history)``, ``history = {"loss": [...], "train_accuracy": [...]}`` per epoch.
    """
    if x.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise ValueError(f"x [n, ...] and labels [n] must agree, got {tuple(x.shape)} and {tuple(labels.shape)}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
    c, h, w = (int(s) for s in shape)
    labels = labels.to(device=x.device, dtype=torch.long)
    k = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LeNetClassifier(
            in_channels=c, image_size=(h, w) if h != w else h, n_classes=k, **(model_kwargs or {})
        )
    model.to(device=x.device)
    x = model._as_images(x.to(dtype=next(model.parameters()).dtype))  # [n, C, H, W]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict[str, list[float]] = {"loss": [], "train_accuracy": []}
    n = x.shape[0]
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        total, correct = 0.0, 0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            logits = model.logits(x[idx])  # [b, k]
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            correct += int((logits.detach().argmax(dim=1) == labels[idx]).sum())
        history["loss"].append(total / n)
        history["train_accuracy"].append(correct / n)
    model.eval()
    return model, history


def accuracy(model: LeNetClassifier, x: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``x`` whose arg-max logit equals ``labels`` (no_grad, eval mode)."""
    logits = _batched(model, model.logits, x, batch_size, model.n_classes)  # [n, k]
    return float((logits.argmax(dim=1) == labels.to(logits.device)).double().mean())


class ClassifierFeatures:
    """Extractor around a trained :class:`LeNetClassifier`: penultimate features ``[n, feature_dim]`` float64.

    ``logits(x)`` gives ``[n, n_classes]`` float64 for the Inception score. Inputs in [0, 1], the model's
    ``image_shape`` (or flattened), no resizing. The fingerprint hashes ``model_args`` and the state_dict.
    """

    name = "lenet_classifier"

    def __init__(self, model: LeNetClassifier, *, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.batch_size = int(batch_size)
        self.dim = int(model.feature_dim)
        c, h, w = model.image_shape
        self.input_spec: dict[str, Any] = {
            "shape": f"[n, {c}, {h}, {w}] or [n, {c * h * w}]",
            "channels": [c],
            "range": [0.0, 1.0],
            "resize": None,
        }

    def to(self, device: torch.device | str) -> ClassifierFeatures:
        self.model.to(device)
        return self

    def __call__(self, x: Tensor) -> Tensor:
        _check_range(x, 0.0, 1.0)
        return _batched(self.model, self.model.features, x, self.batch_size, self.dim)

    def logits(self, x: Tensor) -> Tensor:
        _check_range(x, 0.0, 1.0)
        return _batched(self.model, self.model.logits, x, self.batch_size, self.model.n_classes)

    def fingerprint(self) -> str:
        return state_dict_fingerprint(
            self.name, self.model, {"model_args": self.model.model_args, "input_spec": self.input_spec}
        )
