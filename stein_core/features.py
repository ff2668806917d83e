"""Feature extractors for FID / KID / Inception-score style evaluation: the protocol they follow, the shared
helpers, and the small LeNet classifier whose features the image pipelines use offline.

Every extractor follows :class:`FeatureExtractor`:

* ``name: str`` and ``dim: int`` (feature dimension);
* ``input_spec: dict`` -- the expected input (shape, channels, value range, resizing), plain JSON-able values;
* ``fingerprint() -> str`` -- SHA-256 hex digest of the name, the input spec and every ``state_dict`` entry
  (key, dtype, shape, bytes); stable across runs and processes, to be stored with every result;
* ``__call__(x) -> Tensor`` -- features ``[n, dim]`` in float64 on ``x``'s device, computed under
  ``torch.no_grad()`` in eval mode, ``batch_size`` rows at a time on the network's device (move the
  extractor with ``.to(device)``).

Extractors: :class:`ClassifierFeatures` around a :class:`LeNetClassifier` (small digits / MNIST; the pipeline's
classifier stage trains it), penultimate-layer features for FID/KID and logits for the Inception score; and
:class:`stein_core.inception.InceptionV3FID`. No file is read here: weights come in as modules or tensors.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "FeatureExtractor",
    "LeNetClassifier",
    "ClassifierFeatures",
    "accuracy",
    "state_dict_fingerprint",
]


@runtime_checkable
class FeatureExtractor(Protocol):
    """What an evaluation metric needs from a feature extractor (see the module docstring)."""

    name: str
    dim: int
    input_spec: dict[str, Any]

    def fingerprint(self) -> str: ...

    def __call__(self, x: Tensor) -> Tensor: ...


# --------------------------------------------------------------------------------------------- helpers


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
