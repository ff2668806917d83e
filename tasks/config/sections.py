"""Typed pipeline parameters, validated once at the edge.

Each pipeline's YAML file in ``conf/`` (tracked by DVC as ``params``) has one section per stage. A section is
validated into a pydantic model with ``extra="forbid"``, so an unknown key, a wrong type or an impossible value
fails before any compute with a :class:`ConfigError` that names the file, the key and what was expected; the
CLI turns it into exit code 2.
"""

from __future__ import annotations

import re
import reprlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator


class ConfigError(ValueError):
    """A configuration or input problem the user must fix; the CLI exits with code 2.

    It pickles by its three parts, so it crosses process boundaries (Ray tasks and Train workers) intact: the
    driver re-raises the same error, message and exit code, and nothing retries it."""

    def __init__(self, path: str | Path, key: str | None, message: str):
        self.path, self.key, self.message = str(path), key, message
        shown = _relative(path)
        where = f"{shown}: key '{key}'" if key else shown
        super().__init__(f"{where}: {message}")

    def __reduce__(self):
        return type(self), (self.path, self.key, self.message)


def _relative(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies below it (``conf/gmm2d.yaml``), else as given."""
    try:
        return str(Path(path).relative_to(Path.cwd())) if Path(path).is_absolute() else str(path)
    except ValueError:
        return str(path)


class KeyedError(ValueError):
    """A check across keys, raised inside a validator: ``load_config`` reports ``key`` as the failing key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


class _Section(BaseModel):
    """A config section: unknown keys are errors, types are strict (``true`` is not an integer and ``"1e-3"`` is
    not a number), numbers are finite, and every number is bounded above and below (tests walk the sections and
    set every number of every shipped config below its bound)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_subnormal(cls, value: Any) -> Any:
        """A subnormal float (0 < |x| < 2.2e-308, ``std: 1e-320``) passes every ``gt=0`` bound but keeps a few
        bits of precision and underflows to 0 in any product: no key here means one."""
        for x in _floats(value):
            if x != 0.0 and abs(x) < sys.float_info.min:
                raise ValueError(f"{x!r} is a subnormal float (nonzero below {sys.float_info.min:.3g}): it "
                                 "underflows to 0 in float32 and keeps few bits in float64; use 0 or a normal number")
        return value


def _floats(value: Any) -> Iterator[float]:
    """The floats of a field's value, in lists at any depth (``means``)."""
    if isinstance(value, float):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _floats(v)


#: A coordinate of a mixture mean: finite and bounded, so that data drawn around it stay finite in float32.
Coordinate = Annotated[float, Field(ge=-1e6, le=1e6)]

#: Seeds of numpy's and torch's generators: non-negative 32-bit integers.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


# --------------------------------------------------------------------------------------------- prepare


class _PrepareBase(_Section):
    seed: Seed = 0


class MixturePrepare(_PrepareBase):
    """A Gaussian mixture with isotropic components given by its weights and means: train and test sets drawn
    from one seed; the mixture is recorded in the data's metadata so that later stages know the true score."""

    source: Literal["mixture"]
    n_train: int = Field(20000, ge=2, le=100_000_000)
    n_test: int = Field(4000, ge=4, le=100_000_000)
    weights: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=lambda: [0.8, 0.2], min_length=1, max_length=1024)
    means: list[list[Coordinate]] = Field(default_factory=lambda: [[-5.0, -5.0], [5.0, 5.0]], min_length=1,
                                          max_length=1024)
    std: float = Field(1.0, gt=0, le=1e6)

    @model_validator(mode="after")
    def _check(self) -> MixturePrepare:
        if len(self.weights) != len(self.means):
            raise ValueError(f"weights has {len(self.weights)} entries but means has {len(self.means)}")
        if any(w <= 0 for w in self.weights) or abs(sum(self.weights) - 1.0) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got {self.weights}")
        dims = {len(m) for m in self.means}
        if len(dims) != 1 or 0 in dims:
            raise ValueError("every mean must have the same, non-zero dimension")
        return self


class RingPrepare(_PrepareBase):
    """``n_modes`` equally weighted isotropic Gaussians evenly spaced on a circle of ``radius`` in the plane (the
    ring of 8 Gaussians of the GAN mode-collapse literature); recorded as a mixture like ``source: mixture``."""

    source: Literal["ring"]
    n_train: int = Field(20000, ge=2, le=100_000_000)
    n_test: int = Field(4000, ge=4, le=100_000_000)
    n_modes: int = Field(8, ge=2, le=64)
    radius: float = Field(2.0, gt=0, le=1e6)
    std: float = Field(0.1, gt=0, le=1e6)


class ImagePrepare(_PrepareBase):
    """Real images from local sources only: scikit-learn's bundled 8x8 digits, or MNIST IDX files / CIFAR-10
    python batches in the folder ``path``. Pixels scaled to [0, 1]."""

    source: Literal["digits", "mnist", "cifar10"]
    path: str | None = Field(None, description="folder with the MNIST IDX files or CIFAR-10 batches")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share (digits has no official split)")
    max_train: int | None = Field(None, ge=1, le=100_000_000, description="keep the first N training images (after shuffling)")

    @model_validator(mode="after")
    def _check(self) -> ImagePrepare:
        if self.source != "digits" and not self.path:
            raise ValueError(f"source {self.source!r} reads local files: set path to their folder")
        return self


# --------------------------------------------------------------------------------------------- train


#: ``model_dump(context=EVERY_KEY)``: a dump with every key of a train section (see ``TrainBase._eager_as_before``).
EVERY_KEY = {"every_key": True}


class TrainBase(_Section):
    """What the one training loop (``tasks.stages.train.loop``) reads from every family's train section; a family adds its
    own keys in a subclass with ``family: Literal["<name>"]`` (``tasks/families/<name>.py``).

    Minibatches are a pure function of ``(seed, step)``: every step draws ``batch_size`` examples (the *global*
    batch) from a generator seeded by the pair, and with N Ray Train workers rank r takes its slice, so that N
    workers compute what one worker computes (``batch_size`` must then be a multiple of N). ``compile: true`` runs
    the step under ``torch.compile`` (off by default: the step runs eagerly, as it always did)."""

    family: str
    seed: Seed = 1
    batch_size: int = Field(256, ge=2, le=1_000_000, description="the global batch (all workers together)")
    n_steps: int = Field(3000, ge=1, le=100_000_000)
    log_every: int = Field(100, ge=1, le=100_000_000)
    checkpoint_every: int = Field(1000, ge=1, le=100_000_000)
    heldout_every: int = Field(
        0, ge=0, le=100_000_000, description="every this many steps (a multiple of log_every), rank 0 draws heldout_n samples and "
        "logs their MMD² to the held-out split as train/mmd_heldout; 0 turns it off"
    )
    heldout_n: int = Field(500, ge=4, le=100_000, description="samples (and held-out points) of train/mmd_heldout")
    compile: bool = Field(
        False, description="run the family's training step under torch.compile (the modules, their checkpoint keys "
        "and the EMA are untouched); the first steps pay the compilation. Weights agree with an eager run's to "
        "round-off, not bit for bit; a step torch.compile cannot run (a double backward) fails naming train.compile"
    )

    @model_serializer(mode="wrap")
    def _eager_as_before(self, handler, info):
        """A dump leaves out ``compile: false``: an eager training is the one it always was, so the model file
        (which carries its train section), the Ray Train run name (a digest of it) and the worker's config stay
        byte for byte what they were before the option existed; ``compile: true`` is kept and recorded. A dump
        for people (the pipeline run's MLflow params) asks for every key: ``model_dump(context=EVERY_KEY)``."""
        data = handler(self)
        if isinstance(data, dict) and not self.compile and not (info.context or {}).get("every_key"):
            data.pop("compile", None)
        return data

    @model_validator(mode="after")
    def _check_loop(self):
        if self.heldout_every and self.heldout_every % self.log_every:
            raise ValueError(f"heldout_every ({self.heldout_every}) must be a multiple of log_every ({self.log_every})")
        return self


class OneOptimizerTrain(TrainBase):
    """The train section of a family with one optimiser for all its modules (``Family.optimizers``' default): Adam
    at ``lr`` with the schedule ``lr_schedule``. Families with an optimiser per module have a section each."""

    lr: float = Field(1e-3, gt=0, le=10)
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine decay to 0 over n_steps, or a constant rate"
    )


# --------------------------------------------------------------------------------------------- sample


class _SampleBase(_Section):
    seed: Seed = 2
    n_samples: int = Field(4000, ge=1, le=10_000_000)
    batch_size: int = Field(4096, ge=1, le=1_000_000, description="samples (chains) drawn together")


class AnnealedLangevinSample(_SampleBase):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) from a noise-conditional score network.

    The step is x ← x + α_i s(x, σ_i) + √(2 α_i) z with α_i = ε σ_i² / σ_L². Song & Ermon write
    x ← x + (α_i/2) s + √α_i z with α_i = ε σ_i² / σ_L²: the same chain with their ε equal to twice ours
    (ε here is the step of the Langevin diffusion dx = s dt + √2 dW)."""

    sampler: Literal["annealed_langevin"]
    eps: float = Field(2e-3, gt=0, le=10, description="ε, the step α_L at the smallest noise level (Song & Ermon's ε/2)")
    n_steps_each: int = Field(100, ge=1, le=1_000_000, description="T, Langevin steps per noise level")
    denoise: bool = Field(True, description="final denoising step x + σ_L² s(x, σ_L) (NCSNv2)")


class LangevinSample(_SampleBase):
    """Plain Langevin dynamics (ULA) with the model's score (a score network: at the smallest noise level σ_L
    only): the baseline that is blind to mixing proportions when modes are far apart (Wenliang & Kanagawa 2021)."""

    sampler: Literal["langevin"]
    seed: Seed = 4
    step_size: float = Field(2e-3, gt=0, le=10, description="α of x ← x + α s(x) + √(2α) z")
    n_steps: int = Field(1000, ge=1, le=10_000_000)
    init_std: float | None = Field(None, gt=0, le=1e6, description="x_0 ~ N(0, init_std² I); default σ_1 of the model")


class GeneratorSample(_SampleBase):
    """Samples of an implicit generator: x = G(z) with z ~ N(0, I) drawn from the seeded generator."""

    sampler: Literal["generator"]


class LatentLangevinSample(_SampleBase):
    """A latent-variable model's samples: a Langevin chain in the latent space from z_0 ~ N(0, I), then x = B(z). For a
    generalised energy-based model (Arbel, Zhou & Gretton, ICLR 2021) the chain runs on U(z) = |z|²/2 + β·E(B(z)); for
    a latent-space energy-based prior (``latent_ebm``, Pang et al., NeurIPS 2020) on U(z) = |z|²/2 + β·E(z), the
    prior itself. ``method``: ``ula`` (unadjusted, step
    z ← z − α∇U(z) + √(2α) ξ), ``mala`` (ULA proposals with a Metropolis-Hastings correction: exact for any step) or
    ``kinetic`` (underdamped Langevin, BAOAB, step α, friction γ). β = 0 samples the base alone."""

    sampler: Literal["latent_langevin"]
    method: Literal["ula", "mala", "kinetic"] = "ula"
    beta: float = Field(1.0, ge=0, le=1e6, description="β, the energy's weight (1: the trained model; 0: the base)")
    step_size: float = Field(1e-2, gt=0, le=10, description="α, the chain's step in the latent space")
    n_steps: int = Field(100, ge=1, le=10_000_000)
    friction: float = Field(1.0, gt=0, le=1e6, description="γ of the kinetic chain (kinetic only)")

    @model_validator(mode="after")
    def _friction_is_kinetic(self):
        if self.method != "kinetic" and self.friction != type(self).model_fields["friction"].default:
            raise ValueError(f"friction has no effect with method: {self.method} (it is the kinetic chain's): "
                             "remove it, or set method: kinetic")
        return self


class SVGDSample(_SampleBase):
    """Stein variational gradient descent (Liu & Wang, NeurIPS 2016) on the model's score, for every family whose
    model has one (``Family.has_score``): ``batch_size`` particles from x_0 ~ N(0, init_scale² I) move together by
    x ← x + ε φ(x), φ(x_i) = (1/n) Σ_j [k(x_j, x_i) s(x_j) + ∇_{x_j} k(x_j, x_i)], an RBF kernel with Liu & Wang's
    bandwidth h = med²/log n recomputed every step (``stein_core.samplers.svgd``). Each batch is an independent run
    (the last one holds what is left of ``n_samples``); it costs O(batch_size²) time and memory per step."""

    sampler: Literal["svgd"]
    batch_size: int = Field(500, ge=2, le=10_000, description="particles of one SVGD run (runs are independent)")
    n_steps: int = Field(1000, ge=1, le=10_000_000)
    step_size: float = Field(0.5, gt=0, le=100, description="ε of x ← x + ε φ(x) (adaptive: about each "
                             "coordinate's move per step)")
    adaptive: bool = Field(False, description="AdaGrad with momentum on φ (the authors' code: running mean of φ² "
                           "with factor 0.9, fudge 1e-6) instead of plain steps")
    init: Literal["normal"] = Field("normal", description="the initial particles: normal, x_0 ~ N(0, init_scale² I)")
    init_scale: float = Field(1.0, gt=0, le=1e6, description="standard deviation of the initial particles")


class MCMCSample(_SampleBase):
    """MCMC on a model with an energy, density ∝ exp(−E(x)/T) (``Family.unnormalised``: the ``ebm``, ``nce`` and
    ``fce`` families), through ``stein_core.samplers``: ``ula`` (x ← x − α∇E(x)/T + √(2α) ξ), ``mala`` (ULA
    proposals with a Metropolis-Hastings correction: exact at any step), ``hmc`` (``leapfrog_steps`` leapfrog
    steps of size α, then MH) or ``kinetic`` (underdamped Langevin, BAOAB, friction γ). Each of ``batch_size``
    chains gives one sample, its state after ``n_steps`` steps (the chains' final states are the samples).
    ``start``: ``noise`` (x_0 ~ N(0, init_scale² I)) or ``buffer`` (x_0 drawn from the replay buffer of a
    persistent-chain training, saved with the model; the chains continue where training left them)."""

    sampler: Literal["mcmc"]
    method: Literal["ula", "mala", "hmc", "kinetic"] = "mala"
    step_size: float = Field(1e-2, gt=0, le=10, description="α, the step of the chain (HMC: of each leapfrog step)")
    n_steps: int = Field(500, ge=1, le=10_000_000)
    temperature: float = Field(1.0, gt=0, le=1e6, description="T of the target exp(−E(x)/T) (1: the model)")
    start: Literal["noise", "buffer"] = Field("noise", description="where the chains start")
    init_scale: float = Field(1.0, gt=0, le=1e6, description="start noise: x_0 ~ N(0, init_scale² I)")
    friction: float = Field(1.0, gt=0, le=1e6, description="γ of the kinetic chain (kinetic only)")
    leapfrog_steps: int = Field(10, ge=1, le=10_000, description="L, leapfrog steps per HMC proposal (hmc only)")

    @model_validator(mode="after")
    def _options_of_the_method(self):
        for key, method in (("friction", "kinetic"), ("leapfrog_steps", "hmc")):
            if self.method != method and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"{key} has no effect with method: {self.method} (it is the {method} chain's): "
                                 f"remove it, or set method: {method}")
        return self


#: A sample section, chosen by its ``sampler`` key.
SampleSection = Annotated[
    AnnealedLangevinSample | LangevinSample | GeneratorSample | LatentLangevinSample | SVGDSample | MCMCSample,
    Field(discriminator="sampler"),
]


class ClassifierTrain(_Section):
    """The offline feature extractor for FID/KID/IS: a LeNet trained inside the pipeline on the real training
    split; the stage fails unless it reaches ``min_accuracy`` on the held-out split."""

    seed: Seed = 0
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=1_000_000)
    lr: float = Field(5e-3, gt=0, le=10)
    min_accuracy: float = Field(0.9, ge=0, le=1)


#: What the evaluate stage can compute, with what each needs beyond samples and held-out data (checked before
#: any compute; see ``tasks.stages.evaluate.metrics.METRICS`` for the keys each writes).
METRIC_NAMES = (
    "ksd_target",        # KSD of the samples against the true score (toys: the mixture in the data's metadata)
    "ksd_model",         # KSD of the samples and of held-out data against the model's score (families with one)
    "mmd",               # MMD² to held-out data, with its permutation p-value
    "mode_weight",       # share of samples nearest the heavy mode (toys)
    "log_likelihood",    # mean log-density of the samples under the true distribution (toys)
    "fid",               # Fréchet distance of features (the reference set's FID is the train-vs-test baseline)
    "kid",               # kernel inception distance of features
    "inception_score",   # Inception score from the feature network's logits
    "precision_recall",  # improved precision and recall (Kynkäänniemi et al. 2019) of features
    "mode_coverage",     # modes holding at least a quarter of their expected share of the samples (toys)
    "kale",              # KALE(held-out ‖ samples): an energy fitted on one half, the KL lower bound on the other
    "ksd_smoothed",      # KSD of noised samples against the noised true mixture over a σ ladder (toys; Wenliang & Kanagawa)
    "model_log_likelihood",  # held-out log-density under the learned energy, normalised on a grid; the truth's beside (2-D toys)
)
Metric = Literal[METRIC_NAMES]
Plot = Literal["samples", "score_field", "nearest", "energy"]


def _unique(values: list[str], what: str) -> None:
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise ValueError(f"{what} listed twice: {', '.join(dup)}")


class CheckpointEvaluate(_Section):
    """Follow metrics along training: every checkpoint the train stage kept is sampled (with the settings of the
    sample section named by ``sampler``, ``n_samples`` samples) and evaluated, one Ray task per checkpoint; the
    result is a metric-vs-step plot, a CSV for ``dvc plots``, and MLflow metric histories."""

    metrics: list[Metric] = Field(default_factory=lambda: ["mmd"], min_length=1)
    n_samples: int = Field(500, ge=4, le=1_000_000, description="samples drawn from each checkpoint")
    sampler: str = Field("sample", description="the config section with the sampler settings")

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

    seed: Seed = 3
    sample_sets: list[str] = Field(default_factory=lambda: ["samples"], min_length=1)
    metrics: list[Metric] = Field(default_factory=lambda: ["mmd"], min_length=1)
    plots: list[Plot] = Field(default_factory=lambda: ["samples"])
    reference: Literal["test_half", "train"] = "test_half"
    n_eval: int = Field(2000, ge=4, le=1_000_000, description="points per set for the kernel statistics (KSD, MMD)")
    n_bootstrap: int = Field(200, ge=10, le=1_000_000, description="wild-bootstrap draws (KSD test) and permutations (MMD test)")
    kernel: Literal["imq", "rbf"] = Field("imq", description="kernel of KSD and MMD")
    imq_c: float = Field(1.0, gt=0, le=1e6)
    imq_beta: float = Field(-0.5, lt=0, ge=-100)
    rbf_bandwidth: Annotated[float, Field(gt=0, le=1e6)] | Literal["median"] = "median"
    features: Literal["classifier", "inception", "raw"] = Field(
        "classifier",
        description="features of fid/kid/inception_score/precision_recall: the classifier the pipeline trained, "
        "the FID Inception-v3 (weights from inception_weights or $STEIN_INCEPTION_WEIGHTS), or the raw vectors",
    )
    inception_weights: str | None = Field(None, description="local path of pt_inception-2015-12-05-6726825d.pth")
    kid_subset_size: int = Field(1000, ge=2, le=1_000_000, description="KID subsets (capped by the sample sizes)")
    kid_subsets: int = Field(50, ge=1, le=100_000)
    pr_k: int = Field(3, ge=1, le=10_000, description="k of the k-NN radii of improved precision/recall")
    grid: int = Field(10, ge=1, le=32, description="image sample grids are grid x grid")
    ksd_smoothed_sigmas: list[Annotated[float, Field(ge=0, le=1e6)]] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0], min_length=1, max_length=32,
        description="noise levels σ of ksd_smoothed, in units of ksd_smoothed_scale (0: plain KSD)",
    )
    ksd_smoothed_scale: Annotated[float, Field(gt=0, le=1e6)] | Literal["target"] = Field(
        "target", description="unit of ksd_smoothed_sigmas: a number, or target, the true distribution's standard "
        "deviation per coordinate, sqrt(tr Cov / d) (4.12 for gmm2d's mixture)",
    )
    checkpoints: CheckpointEvaluate | None = Field(None, description="also evaluate every training checkpoint")

    @model_validator(mode="after")
    def _check(self) -> Evaluate:
        _unique(self.metrics, "metric")
        _unique(self.plots, "plot")
        _unique(self.sample_sets, "sample set")
        if len(set(self.ksd_smoothed_sigmas)) != len(self.ksd_smoothed_sigmas):
            raise KeyedError("evaluate.ksd_smoothed_sigmas", f"a noise level is listed twice: {self.ksd_smoothed_sigmas}")
        for name in self.sample_sets:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"sample set {name!r} is not a file name under samples/<pipeline>/")
        return self


# --------------------------------------------------------------------------------------------- loading


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 60, 60, 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 6
_REPR.maxdict = 4


def short_repr(value: Any) -> str:
    """``repr`` cut to about 60 characters (a long string or list keeps its start and ``...``): what an error
    message quotes of a value a user gave, however large."""
    return _REPR.repr(value)


#: The tags of the discriminated sections (``prepare.source``, ``sample*.sampler``, ``net.kind``): pydantic puts
#: the chosen tag into an error's location (``train.agd.lr``), which is not a key of the file.
UNION_TAGS: set[str] = {"mixture", "ring", "digits", "mnist", "cifar10", "annealed_langevin", "langevin", "generator",
                        "latent_langevin", "svgd", "mcmc",
                        "mlp", "conv", "ica", "energy_mlp"}


def _format_loc(loc: tuple[Any, ...]) -> str | None:
    """The dotted key of a validation error; None for a whole-config check (its message names its keys)."""
    parts = [str(p) for i, p in enumerate(loc) if not (i > 0 and str(p) in UNION_TAGS)]
    return ".".join(parts) if parts else None


#: What a config file may be: configs here are 1-3 KB. Past these limits a file is refused before it is read whole
#: (bytes), or as soon as the parser gets there (nodes, depth): a 2.5 KB file of nested aliases expands to 10^9
#: items, and 50 MB of comments took 74 s to parse.
MAX_CONFIG_BYTES = 256 * 1024
MAX_CONFIG_NODES = 10_000
MAX_CONFIG_DEPTH = 32


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` with these changes: no anchors or aliases (a config never needs them, and nested aliases
    expand exponentially), at most ``MAX_CONFIG_NODES`` values nested at most ``MAX_CONFIG_DEPTH`` deep, keys that
    are plain scalars, a key given twice in one mapping is an error (PyYAML keeps the last one silently), and
    ``1e-3`` is a float as in YAML 1.2 and DVC's parser (PyYAML's YAML 1.1 rule wants a dot and reads ``1e-3`` as
    the string "1e-3", which strict types would then refuse)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, f"an alias (*{event.anchor}): a config has no anchors or aliases, write the value out",
                event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, f"an anchor (&{event.anchor}): a config has no anchors or aliases, write the value out",
                event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_CONFIG_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_CONFIG_NODES} values", event.start_mark)
        if self._depth >= MAX_CONFIG_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_CONFIG_DEPTH}", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {kind} as a key: keys are names", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {short_repr(key)} given twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_StrictLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping: UTF-8 text, valid YAML without duplicate keys, a mapping at the top with at
    least one key (an empty or comments-only file is an error, not a config of defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, None, "file not found")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(path, None, f"{size:,} bytes: a config file is at most {MAX_CONFIG_BYTES // 1024} KiB")
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:  # grew since stat
        raise ConfigError(path, None, f"over {MAX_CONFIG_BYTES // 1024} KiB: a config file is at most that")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(path, None, f"not valid YAML{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, None, f"not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        raise ConfigError(path, None, "empty (no stage sections; see conf/ for examples)")
    if not isinstance(data, dict):
        raise ConfigError(path, None, f"expected a mapping of stage sections, got {type(data).__name__}")
    return data


def describe_error(exc: ValidationError) -> tuple[str | None, str]:
    """The dotted key and the message of a validation error's first problem (and how many more there are)."""
    err = exc.errors()[0]
    key = _format_loc(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, KeyedError):
        key, msg = cause.key, str(cause)
    if err["type"] == "extra_forbidden":
        msg = "unknown key (not a parameter of this stage; check the spelling)"
    elif err["type"] in ("union_tag_not_found", "union_tag_invalid"):
        ctx = err.get("ctx", {})
        tag, expected = ctx.get("discriminator", "").strip("'"), ctx.get("expected_tags", "")
        key = f"{key}.{tag}" if key else tag
        got = f", got {short_repr(ctx['tag'])}" if "tag" in ctx else " (missing)"
        msg = f"must be one of {expected}{got}"
    elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
        msg = f"{msg} (got {short_repr(err['input'])})"
    more = f" [and {len(exc.errors()) - 1} more error(s)]" if len(exc.errors()) > 1 else ""
    return key, msg + more


def load_config(path: str | Path, model: type[BaseModel]) -> BaseModel:
    """Read ``path`` and validate it into ``model``; the first error names the file and the dotted key."""
    data = load_yaml(path)
    try:
        return model.model_validate(data)
    except KeyedError as exc:  # a check before pydantic's (a generative config's family)
        raise ConfigError(path, exc.key, str(exc)) from None
    except ValidationError as exc:
        key, msg = describe_error(exc)
        raise ConfigError(path, key, msg) from None
