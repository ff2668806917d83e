"""Feature-space metrics between two sample sets (Parquet): ``stein eval fid`` and ``stein eval kid``.

The features come from one of three extractors, named by a spec string: ``raw`` (the vectors themselves),
``classifier:PATH`` (the penultimate layer of a LeNet classifier checkpoint, e.g. the one a pipeline trained
on its own data) or ``inception:PATH`` (the FID Inception-v3 with weights from the local file PATH, checked
against the SHA-256 prefix 6726825d). Every result carries the extractor's name and fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.config import ConfigError
from tasks.io import load_checkpoint, read_dataset


@dataclass
class Features:
    """Features ``[n, dim]`` (float64) of one sample set, with what produced them."""

    values: object
    extractor: str
    fingerprint: str

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])


class _Raw:
    name, dim = "raw", None

    def fingerprint(self) -> str:
        return "raw"

    def __call__(self, x):
        return x.reshape(x.shape[0], -1).double()


def load_extractor(spec: str):
    """``raw`` | ``classifier:PATH`` | ``inception:PATH`` | ``inception`` (the path from
    ``$STEIN_INCEPTION_WEIGHTS``) -> an extractor (callable, ``name``, ``fingerprint()``)."""
    import os

    from stein_core import INCEPTION_WEIGHTS_ENV_VAR

    kind, _, path = spec.partition(":")
    if kind == "inception" and not path:
        path = os.environ.get(INCEPTION_WEIGHTS_ENV_VAR, "")
        if not path:
            raise ConfigError("command line", "features", f"inception features need the local weights file: name it "
                              f"(inception:PATH) or set ${INCEPTION_WEIGHTS_ENV_VAR}; nothing is downloaded")
    if kind == "raw" and not path:
        return _Raw()
    if kind == "classifier" and path:
        from stein_core import ClassifierFeatures, LeNetClassifier

        ckpt = load_checkpoint(path)
        model = LeNetClassifier(**ckpt["model_args"])
        model.load_state_dict(ckpt["state_dict"])
        return ClassifierFeatures(model)
    if kind == "inception" and path:
        from stein_core import InceptionV3FID

        try:
            return InceptionV3FID.from_file(path)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(path, "features", str(exc)) from None
    raise ConfigError("command line", "features", f"expected raw, classifier:PATH, inception:PATH or inception, got {spec!r}")


def extract(path: str | Path, extractor) -> Features:
    """Read a Parquet sample set and map it through ``extractor`` (images get their (C, H, W) shape back)."""
    import torch

    ds = read_dataset(path)
    x = torch.from_numpy(ds.x)
    if len(ds.shape) == 3:
        x = x.reshape(len(ds), *ds.shape)
    try:
        values = extractor(x)
    except ValueError as exc:  # e.g. pixels outside [0, 1], images too small for the network
        raise ConfigError(path, "x", f"not valid input for the {getattr(extractor, 'name', 'feature')} extractor: {exc}") from None
    return Features(values, getattr(extractor, "name", "raw"), extractor.fingerprint())


def _pair(real: str | Path, fake: str | Path, features: str) -> tuple[Features, Features]:
    extractor = load_extractor(features)
    a, b = extract(real, extractor), extract(fake, extractor)
    if a.dim != b.dim:
        raise ConfigError(fake, "x", f"feature dimension {b.dim} differs from {real}'s {a.dim}")
    for path, f in ((real, a), (fake, b)):
        if f.n < 2:
            raise ConfigError(path, "x", f"needs at least 2 rows, found {f.n}")
    return a, b


def fid(real: str | Path, fake: str | Path, *, features: str = "raw") -> dict:
    """Fréchet distance between the feature distributions of two sample sets (covariances divide by N-1).

    With few samples relative to the dimension (n_real * n_fake < dim²) the exact Gram form is used, so
    FID(X, X) is ~0 rather than a negative round-off; otherwise the dim x dim covariances."""
    from stein_core import frechet_distance_from_samples

    a, b = _pair(real, fake, features)
    method = "gram" if a.n * b.n < a.dim**2 else "eigen"
    value = frechet_distance_from_samples(a.values, b.values, method=method)
    return {
        "fid": float(value), "n_real": a.n, "n_fake": b.n, "dim": a.dim, "method": method,
        "features": a.extractor, "fingerprint": a.fingerprint,
    }


def kid(real: str | Path, fake: str | Path, *, features: str = "raw", n_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> dict:
    """Kernel inception distance: unbiased MMD² with the kernel (xᵀy/d + 1)³ over seeded random subsets."""
    import torch

    from stein_core import kid as kid_fn

    a, b = _pair(real, fake, features)
    res = kid_fn(a.values, b.values, n_subsets=n_subsets, subset_size=subset_size, generator=torch.Generator().manual_seed(seed))
    return {
        "kid": float(res.mean), "kid_std": float(res.std), "n_real": a.n, "n_fake": b.n, "dim": a.dim,
        "subset_size": min(subset_size, a.n, b.n), "n_subsets": n_subsets, "features": a.extractor,
        "fingerprint": a.fingerprint,
    }
