"""Features for the feature-space metrics: the extractors (``load_extractor``, the FID Inception weights from a
local file), the feature space of the evaluate stage (:class:`FeatureSpace`), and FID/KID between two sample
sets (Parquet) for ``stein eval fid`` and ``stein eval kid``.

The features come from one of three extractors, named by a spec string: ``raw`` (the vectors themselves),
``classifier:PATH`` (the penultimate layer of a LeNet classifier checkpoint, e.g. the one a pipeline trained
on its own data) or ``inception:PATH`` (the FID Inception-v3 with weights from the local file PATH, checked
against the SHA-256 prefix 6726825d). Every result carries the extractor's name and fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tasks.config.sections import ConfigError
from tasks.data.io import load_checkpoint, read_dataset


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


#: The FID Inception weights file (the TensorFlow graph ported to PyTorch, as pytorch-fid publishes it), the
#: prefix of its SHA-256, and the environment variable that names its local path. Nothing is downloaded.
INCEPTION_FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_FID_SHA256_PREFIX = "6726825d"
INCEPTION_WEIGHTS_ENV_VAR = "STEIN_INCEPTION_WEIGHTS"
_INCEPTION_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FID_WEIGHTS_FILE


def load_inception(path: str | Path, *, batch_size: int = 50, resize_to: int | None = 299, check_hash: bool = True):
    """The FID Inception-v3 extractor (:class:`stein_core.inception.InceptionV3FID`) with the weights of the
    local file ``path``, checked against its SHA-256 prefix and loaded with ``weights_only=True``.

    Raises:
        FileNotFoundError: ``path`` does not exist; the message says how to provide the file.
        ValueError: the file's SHA-256 does not start with ``6726825d``.
        RuntimeError: the state_dict does not match the architecture (strict loading).
    """
    import torch

    from stein_core.inception import FIDInceptionV3, InceptionV3FID
    from tasks.data.io import sha256_file

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
    return InceptionV3FID(net, batch_size=batch_size, resize_to=resize_to)


def load_extractor(spec: str):
    """``raw`` | ``classifier:PATH`` | ``inception:PATH`` | ``inception`` (the path from
    ``$STEIN_INCEPTION_WEIGHTS``) -> an extractor (callable, ``name``, ``fingerprint()``)."""
    import os

    kind, _, path = spec.partition(":")
    if kind == "inception" and not path:
        path = os.environ.get(INCEPTION_WEIGHTS_ENV_VAR, "")
        if not path:
            raise ConfigError("command line", "features", f"inception features need the local weights file: name it "
                              f"(inception:PATH) or set ${INCEPTION_WEIGHTS_ENV_VAR}; nothing is downloaded")
    if kind == "raw" and not path:
        return _Raw()
    if kind == "classifier" and path:
        from stein_core.features import ClassifierFeatures, LeNetClassifier

        ckpt = load_checkpoint(path)
        model = LeNetClassifier(**ckpt["model_args"])
        model.load_state_dict(ckpt["state_dict"])
        return ClassifierFeatures(model)
    if kind == "inception" and path:
        try:
            return load_inception(path)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(path, "features", str(exc)) from None
    raise ConfigError("command line", "features", f"expected raw, classifier:PATH, inception:PATH or inception, got {spec!r}")


class FeatureSpace:
    """The features an evaluation's feature metrics (FID, KID, Inception score, precision/recall) compare in: the
    extractor ``evaluate.features`` names (``classifier``: the pipeline's LeNet; ``inception``: the FID
    Inception-v3 from ``evaluate.inception_weights``, else ``$STEIN_INCEPTION_WEIGHTS``; ``raw``), loaded on first
    use, and the comparison set's features and moments, computed once. Errors name ``config_path``."""

    def __init__(self, cfg, inputs, *, shape, device: str, comparison, comparison_is_test: bool,
                 config_path: str | Path):
        self.cfg, self.inputs, self.shape, self.device = cfg, inputs, shape, device
        self.comparison, self.comparison_is_test, self.config_path = comparison, comparison_is_test, str(config_path)

    @cached_property
    def extractor(self):
        kind = self.cfg.features
        if kind == "classifier":
            spec = f"classifier:{self.inputs.classifier}"
        elif kind == "inception":
            spec = f"inception:{self.cfg.inception_weights}" if self.cfg.inception_weights else "inception"
        else:
            spec = "raw"
        try:
            ex = load_extractor(spec)
        except ConfigError as exc:
            key = "evaluate.inception_weights" if kind == "inception" else "evaluate.features"
            raise ConfigError(self.config_path, key, str(exc)) from None
        if hasattr(ex, "to"):
            ex.to(self.device)
        return ex

    def images(self, x):
        """Samples as the extractor's input: images clipped to [0, 1] (Langevin overshoots the pixel range a
        little; the pixel-space metrics use the samples unclipped), vectors as they are."""
        if self.cfg.features == "raw":
            return x
        return x.clamp(0.0, 1.0).reshape(len(x), *self.shape).float().to(self.device)

    def features(self, s):
        """The features of a sample set (``tasks.stages.evaluate.metrics.SampleSet``), computed once per set."""
        if s._features is None:
            s._features = self.extractor(self.images(s.x)).double().cpu()
        return s._features

    def logits(self, s):
        """The extractor's class logits of a sample set (float64, on the CPU), for the Inception score."""
        return self.extractor.logits(self.images(s.x)).double().cpu()

    @cached_property
    def comparison_features(self):
        return self.extractor(self.images(self.comparison)).double().cpu()

    @cached_property
    def comparison_moments(self):
        """Mean and covariance of the comparison set's features: the classifier stage's cached statistics of
        the test split when the comparison set is that split and the fingerprints match, else computed here."""
        import torch

        from stein_core.metrics import StreamingMoments

        stats = self.inputs.reference_stats
        if self.cfg.features == "classifier" and self.comparison_is_test and stats is not None and Path(stats).is_file():
            cached = torch.load(stats, weights_only=True)
            if cached["fingerprint"] != self.extractor.fingerprint():
                raise ConfigError(stats, "fingerprint", "reference statistics were computed with another classifier; rerun the classifier stage")
            return StreamingMoments.from_state_dict(cached["moments"])
        return StreamingMoments(self.comparison_features.shape[1]).update(self.comparison_features)


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
    from stein_core.metrics import frechet_distance_from_samples

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

    from stein_core.metrics import kid as kid_fn

    a, b = _pair(real, fake, features)
    res = kid_fn(a.values, b.values, n_subsets=n_subsets, subset_size=subset_size, generator=torch.Generator().manual_seed(seed))
    return {
        "kid": float(res.mean), "kid_std": float(res.std), "n_real": a.n, "n_fake": b.n, "dim": a.dim,
        "subset_size": min(subset_size, a.n, b.n), "n_subsets": n_subsets, "features": a.extractor,
        "fingerprint": a.fingerprint,
    }
