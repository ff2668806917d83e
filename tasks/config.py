"""Typed pipeline parameters, validated once at the edge.

Each pipeline's YAML file in ``conf/`` (tracked by DVC as ``params``) has one section per stage. A section is
validated into a pydantic model with ``extra="forbid"``, so an unknown key, a wrong type or an impossible value
fails before any compute with a :class:`ConfigError` that names the file, the key and what was expected; the
CLI turns it into exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration or input problem the user must fix; the CLI exits with code 2."""

    def __init__(self, path: str | Path, key: str | None, message: str):
        self.path, self.key = str(path), key
        where = f"{path}: key '{key}'" if key else str(path)
        super().__init__(f"{where}: {message}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- gmm2d


class GMMPrepare(_Section):
    """A 2-D Gaussian mixture with isotropic components: train and test sets drawn from one seed."""

    seed: int = 0
    n_train: int = Field(20000, ge=2)
    n_test: int = Field(4000, ge=4)
    weights: list[float] = Field(default_factory=lambda: [0.8, 0.2], min_length=1)
    means: list[list[float]] = Field(default_factory=lambda: [[-5.0, -5.0], [5.0, 5.0]], min_length=1)
    std: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> GMMPrepare:
        if len(self.weights) != len(self.means):
            raise ValueError(f"weights has {len(self.weights)} entries but means has {len(self.means)}")
        if any(w <= 0 for w in self.weights) or abs(sum(self.weights) - 1.0) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got {self.weights}")
        dims = {len(m) for m in self.means}
        if len(dims) != 1 or 0 in dims:
            raise ValueError("every mean must have the same, non-zero dimension")
        return self


class _NCSNTrainBase(_Section):
    """Denoising score matching over a geometric noise ladder (NCSN, Song & Ermon 2019): what every score
    network's train stage shares."""

    seed: int = 1
    sigma_max: float = Field(20.0, gt=0, description="σ_1, the largest noise level")
    sigma_min: float = Field(0.1, gt=0, description="σ_L, the smallest noise level")
    n_sigmas: int = Field(10, ge=1)
    embed_dim: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine decay to 0 over n_steps; a constant rate leaves small-σ scores ~10x less accurate"
    )
    batch_size: int = Field(256, ge=1)
    n_steps: int = Field(3000, ge=1)
    log_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.n_sigmas > 1 and not self.sigma_max > self.sigma_min:
            raise ValueError(
                f"sigma_max (σ_1={self.sigma_max}) must be larger than sigma_min (σ_L={self.sigma_min})"
            )
        if self.n_sigmas == 1 and self.sigma_max != self.sigma_min:
            raise ValueError("with n_sigmas=1, sigma_max and sigma_min must be equal")
        return self


class NCSNTrain(_NCSNTrainBase):
    """A noise-conditional MLP for vectors."""

    hidden: int = Field(128, ge=1)
    n_layers: int = Field(3, ge=1)


class ConvNCSNTrain(_NCSNTrainBase):
    """A noise-conditional convolutional U-Net for images, sampled with an exponential moving average of its
    weights (NCSNv2, technique 5)."""

    base_channels: int = Field(16, ge=4)
    channel_mults: list[int] = Field(default_factory=lambda: [1, 2, 2], min_length=1)
    num_res_blocks: int = Field(1, ge=1)
    ema_decay: float = Field(0.999, ge=0, lt=1, description="0 turns the moving average off")


class AnnealedLangevinSample(_Section):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1): step α_i = ε σ_i² / σ_L²."""

    seed: int = 2
    n_samples: int = Field(4000, ge=1)
    eps: float = Field(2e-3, gt=0, description="ε, the step size at the smallest noise level")
    n_steps_each: int = Field(100, ge=1, description="T, Langevin steps per noise level")
    denoise: bool = Field(True, description="final denoising step x + σ_L² s(x, σ_L) (NCSNv2)")
    batch_size: int = Field(4096, ge=1, description="chains advanced together")


class LangevinSample(_Section):
    """Plain Langevin dynamics (ULA) with the learned score at the smallest noise level σ_L only: the baseline
    that is blind to mixing proportions when modes are far apart (Wenliang & Kanagawa 2021)."""

    seed: int = 4
    n_samples: int = Field(4000, ge=1)
    step_size: float = Field(2e-3, gt=0, description="α of x ← x + α s(x, σ_L) + √(2α) z")
    n_steps: int = Field(1000, ge=1)
    init_std: float | None = Field(None, gt=0, description="x_0 ~ N(0, init_std² I); default σ_1 of the model")
    batch_size: int = Field(4096, ge=1)


class ImagePrepare(_Section):
    """Real images from local sources only: scikit-learn's bundled 8x8 digits, or MNIST IDX files / CIFAR-10
    python batches in the folder ``path``. Pixels scaled to [0, 1]."""

    seed: int = 0
    source: Literal["digits", "mnist", "cifar10"] = "digits"
    path: str | None = Field(None, description="folder with the MNIST IDX files or CIFAR-10 batches")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share (digits has no official split)")
    max_train: int | None = Field(None, ge=1, description="keep the first N training images (after shuffling)")

    @model_validator(mode="after")
    def _check(self) -> ImagePrepare:
        if self.source != "digits" and not self.path:
            raise ValueError(f"source {self.source!r} reads local files: set path to their folder")
        return self


class ClassifierTrain(_Section):
    """The offline feature extractor for FID/KID/IS: a LeNet trained inside the pipeline on the real training
    split; the stage fails unless it reaches ``min_accuracy`` on the held-out split."""

    seed: int = 0
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-3, gt=0)
    min_accuracy: float = Field(0.9, ge=0, le=1)


#: What the evaluate stage can compute, with what each needs beyond samples and held-out data (checked before
#: any compute; see ``tasks.evaluation.METRICS`` for the keys each writes).
METRIC_NAMES = (
    "ksd_target",        # KSD of the samples against the true score (toys: the mixture in the data's metadata)
    "ksd_model",         # KSD of the samples and of held-out data against the model's score at σ_L
    "mmd",               # MMD² to held-out data, with its permutation p-value
    "mode_weight",       # share of samples nearest the heavy mode (toys)
    "log_likelihood",    # mean log-density of the samples under the true distribution (toys)
    "fid",               # Fréchet distance of features (the reference set's FID is the train-vs-test baseline)
    "kid",               # kernel inception distance of features
    "inception_score",   # Inception score from the feature network's logits
    "precision_recall",  # improved precision and recall (Kynkäänniemi et al. 2019) of features
)
Metric = Literal[METRIC_NAMES]
Plot = Literal["samples", "score_field", "nearest"]


def _unique(values: list[str], what: str) -> None:
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise ValueError(f"{what} listed twice: {', '.join(dup)}")


class CheckpointEvaluate(_Section):
    """Follow metrics along training: every checkpoint the train stage kept is sampled (annealed Langevin with
    the settings of the config section ``sampler``, ``n_samples`` chains) and evaluated, one Ray task per
    checkpoint; the result is a metric-vs-step plot, a CSV for ``dvc plots``, and MLflow metric histories."""

    metrics: list[Metric] = Field(default_factory=lambda: ["mmd"], min_length=1)
    n_samples: int = Field(500, ge=4, description="samples drawn from each checkpoint")
    sampler: str = Field("sample", description="the config section with the annealed Langevin settings")

    @model_validator(mode="after")
    def _check(self) -> CheckpointEvaluate:
        _unique(self.metrics, "metric")
        return self


class Evaluate(_Section):
    """The evaluate stage of every pipeline: the metrics listed in ``metrics`` for every sample set in
    ``sample_sets`` (``samples/<pipeline>/<name>.parquet``), each beside the same metric of a reference set
    (keys ``ref_*``): held-out points (``reference: test_half``: the test split is halved, one half plays a
    perfect model, the other is the comparison set) or training points (``reference: train``: what a model
    that memorised its training set reaches; the whole test split is the comparison set). With several sample
    sets, keys get the set's name as suffix (``weight_annealed``)."""

    seed: int = 3
    sample_sets: list[str] = Field(default_factory=lambda: ["samples"], min_length=1)
    metrics: list[Metric] = Field(default_factory=lambda: ["mmd"], min_length=1)
    plots: list[Plot] = Field(default_factory=lambda: ["samples"])
    reference: Literal["test_half", "train"] = "test_half"
    n_eval: int = Field(2000, ge=4, description="points per set for the kernel statistics (KSD, MMD)")
    n_bootstrap: int = Field(200, ge=10, description="wild-bootstrap draws (KSD test) and permutations (MMD test)")
    kernel: Literal["imq", "rbf"] = Field("imq", description="kernel of KSD and MMD")
    imq_c: float = Field(1.0, gt=0)
    imq_beta: float = Field(-0.5, lt=0)
    rbf_bandwidth: float | Literal["median"] = "median"
    features: Literal["classifier", "inception", "raw"] = Field(
        "classifier",
        description="features of fid/kid/inception_score/precision_recall: the classifier the pipeline trained, "
        "the FID Inception-v3 (weights from inception_weights or $STEIN_INCEPTION_WEIGHTS), or the raw vectors",
    )
    inception_weights: str | None = Field(None, description="local path of pt_inception-2015-12-05-6726825d.pth")
    kid_subset_size: int = Field(1000, ge=2, description="KID subsets (capped by the sample sizes)")
    kid_subsets: int = Field(50, ge=1)
    pr_k: int = Field(3, ge=1, description="k of the k-NN radii of improved precision/recall")
    grid: int = Field(10, ge=1, le=32, description="image sample grids are grid x grid")
    checkpoints: CheckpointEvaluate | None = Field(None, description="also evaluate every training checkpoint")

    @model_validator(mode="after")
    def _check(self) -> Evaluate:
        _unique(self.metrics, "metric")
        _unique(self.plots, "plot")
        _unique(self.sample_sets, "sample set")
        for name in self.sample_sets:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"sample set {name!r} is not a file name under samples/<pipeline>/")
        return self


class _CheckpointSampler:
    """Root configs whose ``evaluate.checkpoints.sampler`` must name one of their annealed-Langevin sections."""

    @model_validator(mode="after")
    def _check_sampler(self):
        ck = self.evaluate.checkpoints
        if ck is not None and not isinstance(getattr(self, ck.sampler, None), AnnealedLangevinSample):
            options = [k for k, v in self if isinstance(v, AnnealedLangevinSample)]
            raise ValueError(
                f"evaluate.checkpoints.sampler={ck.sampler!r} is not an annealed Langevin section of this config "
                f"(options: {', '.join(options) or 'none'})"
            )
        return self


class DigitsConfig(_CheckpointSampler, _Section):
    prepare: ImagePrepare = ImagePrepare()
    classifier: ClassifierTrain = ClassifierTrain()
    train: ConvNCSNTrain = ConvNCSNTrain()
    sample: AnnealedLangevinSample = AnnealedLangevinSample()
    evaluate: Evaluate = Evaluate(
        metrics=["fid", "kid", "inception_score", "precision_recall", "mmd", "ksd_model"],
        plots=["samples", "nearest"], reference="train", n_eval=350,
    )


class GMM2dConfig(_CheckpointSampler, _Section):
    prepare: GMMPrepare = GMMPrepare()
    train: NCSNTrain = NCSNTrain()
    sample: AnnealedLangevinSample = AnnealedLangevinSample()
    evaluate: Evaluate = Evaluate(
        metrics=["ksd_target", "mmd", "mode_weight", "log_likelihood"], plots=["samples", "score_field"],
    )


class GMMBlindnessConfig(_CheckpointSampler, _Section):
    """gmm2d's score network, sampled two ways; evaluated side by side."""

    sample_annealed: AnnealedLangevinSample = AnnealedLangevinSample()
    sample_langevin: LangevinSample = LangevinSample()
    evaluate: Evaluate = Evaluate(
        sample_sets=["annealed", "langevin"], metrics=["ksd_target", "mmd", "mode_weight", "log_likelihood"],
    )


# --------------------------------------------------------------------------------------------- loading


def _format_loc(loc: tuple[Any, ...]) -> str | None:
    """The dotted key of a validation error; None for a whole-config check (its message names its keys)."""
    return ".".join(str(p) for p in loc) if loc else None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, None, "file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(path, None, f"not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, None, f"expected a mapping of stage sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path, model: type[BaseModel]) -> BaseModel:
    """Read ``path`` and validate it into ``model``; the first error names the file and the dotted key."""
    data = load_yaml(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _format_loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a parameter of this stage; check the spelling)"
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        more = f" [and {len(exc.errors()) - 1} more error(s)]" if len(exc.errors()) > 1 else ""
        raise ConfigError(path, key, msg + more) from None
