"""What the evaluate stage computes, for any pipeline: the metrics its config lists, for each sample set and for
a reference set, against held-out data. Prefect-free, because the same code runs inside the Ray tasks that
evaluate training checkpoints (:func:`evaluate_checkpoint`).

Every statistic comes from ``stein_core`` (one implementation each): KSD with its wild-bootstrap test, MMD with
its permutation test, FID/KID/Inception score/precision-recall on features of a named extractor. Each (metric,
sample set) pair draws from its own generator, seeded from the config's seed and the pair's names, so listing
another metric or sample set never changes the values of the others.

Reference sets (``evaluate.reference``): ``test_half`` halves the seeded-shuffled test split, one half plays a
perfect model and the other is the comparison set; ``train`` lets the training split play a model that memorised
it, against the whole test split (so the reference FID is the train-vs-test baseline).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tasks.config.sections import ConfigError, Evaluate
from tasks.data.io import read_dataset
from tasks.stages.evaluate.inputs import EvalInputs, check_evaluation, required_inputs

log = logging.getLogger("stein")

def _seed(base: int, *names: str) -> int:
    return (base * 1_000_003 + zlib.crc32("/".join(names).encode())) % (2**63)


def make_kernel(cfg: Evaluate, pooled=None):
    """The kernel of KSD and MMD: IMQ (c² + ‖x − y‖²)^β, or an RBF with a fixed or median-heuristic bandwidth."""
    from stein_core.kernels import IMQ, RBF, median_heuristic

    if cfg.kernel == "imq":
        return IMQ(c=cfg.imq_c, beta=cfg.imq_beta)
    bandwidth = median_heuristic(pooled) if cfg.rbf_bandwidth == "median" else cfg.rbf_bandwidth
    return RBF(bandwidth=bandwidth)


@dataclass
class SampleSet:
    """One set of samples under evaluation: all of them (float64 ``[n, d]``), the seeded subset of at most
    ``n_eval`` that the kernel statistics use, and lazily its features."""

    name: str
    x: Any
    x_eval: Any
    _features: Any = field(default=None, repr=False)


class EvalData:
    """What samples are compared with, loaded once per evaluation: held-out data, the reference and comparison
    sets, the true mixture when the data carry one, the score model, and the feature extractor with the
    comparison set's features and moments.

    ``config_path`` is named in errors about the config (a metric the data cannot support)."""

    def __init__(
        self, cfg: Evaluate, inputs: EvalInputs, *, config_path: str | Path = "evaluate config",
        model_path: Path | None = None, device: str = "cpu",
    ):
        import torch

        self.cfg, self.inputs, self.device, self.config_path = cfg, inputs, device, str(config_path)
        self.model_path = model_path or inputs.model
        self.test = read_dataset(inputs.test)
        self.shape = self.test.shape
        self.dim = self.test.x.shape[1]
        self.train = None
        spec = self.test.metadata.get("mixture")
        self.mixture = None
        if isinstance(spec, dict):
            from stein_core.distributions import GaussianMixture

            self.mixture = GaussianMixture(spec["weights"], spec["means"], spec["stds"])
            self.heavy = max(range(len(spec["weights"])), key=lambda i: spec["weights"][i])
            self.true_weight = float(spec["weights"][self.heavy])
            self.mixture_weights = [float(w) for w in spec["weights"]]
        self.check()
        if "train" in required_inputs(cfg):
            self.train = read_dataset(inputs.train)
        gen = torch.Generator().manual_seed(_seed(cfg.seed, "reference"))
        test_x = torch.from_numpy(self.test.x).double()
        if cfg.reference == "test_half":
            perm = torch.randperm(len(test_x), generator=gen)
            half = len(test_x) // 2
            self.reference, self.comparison = test_x[perm[:half]], test_x[perm[half:]]
            self.comparison_is_test = False
        else:
            train_x = torch.from_numpy(self.train.x).double()
            self.reference = train_x[torch.randperm(len(train_x), generator=gen)]
            self.comparison = test_x[torch.randperm(len(test_x), generator=gen)]
            self.comparison_is_test = True
        self.comparison_eval = self.comparison[: cfg.n_eval]

    # ------------------------------------------------------------------------------------------ validation

    def _bad(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.config_path, key, message)

    def check(self, metrics: list[str] | None = None) -> None:
        """Fail before any compute if a listed metric or plot cannot be computed from these inputs."""
        check_evaluation(self.cfg, self.inputs, metrics=list(self.cfg.metrics if metrics is None else metrics),
                         shape=self.shape, dim=self.dim, has_target=self.mixture is not None,
                         model_path=self.model_path, config_path=self.config_path)

    # ------------------------------------------------------------------------------------------ samples

    def sample_set(self, name: str, x, *, source: str | Path = "samples") -> SampleSet:
        """Wrap samples ``[n, d]`` (numpy or tensor) into a :class:`SampleSet` with its seeded evaluation subset."""
        import torch

        x = torch.as_tensor(x).double().cpu()
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ConfigError(source, "x", f"samples of shape {tuple(x.shape)}; the test set has dimension {self.dim}")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(1).sum())
            raise ConfigError(source, "x", f"{bad} of {len(x)} samples are not finite (a diverged sampler?)")
        gen = torch.Generator().manual_seed(_seed(self.cfg.seed, "subset", name))
        x = x[torch.randperm(len(x), generator=gen)]
        return SampleSet(name, x, x[: min(self.cfg.n_eval, len(x), len(self.reference))])

    def reference_set(self, n_eval: int, n: int) -> SampleSet:
        """The reference set (what a perfect or a memorising model reaches) as a sample set of the same size as
        the samples it is compared with: ``n`` points, ``n_eval`` of them for the kernel statistics (sample-size
        biased metrics such as FID are then biased alike)."""
        return SampleSet("reference", self.reference[:n], self.reference[:n_eval])

    def generator(self, metric: str, set_name: str):
        import torch

        return torch.Generator().manual_seed(_seed(self.cfg.seed, metric, set_name))

    # ------------------------------------------------------------------------------------------ model

    @cached_property
    def model(self):
        """The trained model (any family); ``ksd_model`` uses its ``score`` (a score network's at σ_L)."""
        from tasks.families.loading import load_model

        model = load_model(self.model_path, device=self.device)
        if model.score is None:
            raise self._bad("evaluate.metrics", f"ksd_model needs the model's score; {self.model_path} holds a model without one")
        return model

    def model_score(self, z):
        import torch

        out = []
        with torch.no_grad():
            for chunk in torch.split(z, 4096):
                out.append(self.model.score(chunk.float().to(self.device)).double().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------------------------------ features

    @cached_property
    def space(self):
        """The feature space of the feature metrics: the extractor ``evaluate.features`` names, with the
        comparison set's features and moments (:class:`tasks.stages.evaluate.features.FeatureSpace`)."""
        from tasks.stages.evaluate.features import FeatureSpace

        return FeatureSpace(self.cfg, self.inputs, shape=self.shape, device=self.device, comparison=self.comparison,
                            comparison_is_test=self.comparison_is_test, config_path=self.config_path)

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, s: SampleSet, metrics: list[str] | None = None) -> dict[str, float]:
        """The listed metrics (default: the config's) of one sample set."""
        out: dict[str, float] = {}
        for name in self.cfg.metrics if metrics is None else metrics:
            out |= METRICS[name].per_set(self, s)
        return out

    def once(self, metrics: list[str] | None = None, *, info: bool = True) -> dict[str, float]:
        """What the listed metrics report once rather than per sample set: keys of the model itself and, with
        ``info``, constants of the evaluation (the true weight, the feature classifier's accuracy)."""
        out: dict[str, float] = {}
        for name in self.cfg.metrics if metrics is None else metrics:
            metric = METRICS[name]
            for part in (metric.per_model, metric.info if info else None):
                if part is not None:
                    out |= part(self)
        return out


# ---------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """A metric: ``per_set(data, s)`` -> its keys for one sample set; ``per_model(data)`` -> keys of the model
    itself (they change along training); ``info(data)`` -> constants of the evaluation reported beside it."""

    per_set: Callable[[EvalData, SampleSet], dict[str, float]]
    per_model: Callable[[EvalData], dict[str, float]] | None = None
    info: Callable[[EvalData], dict[str, float]] | None = None


def _ksd_target(d: EvalData, s: SampleSet) -> dict[str, float]:
    """KSD² (U) of the samples against the true score, with the wild-bootstrap p-value (Liu et al. 2016;
    Chwialkowski et al. 2016)."""
    import torch

    from stein_core.tests_stat import ksd_test

    x = s.x_eval
    res = ksd_test(x, d.mixture.score(x), make_kernel(d.cfg, torch.cat([x, d.comparison_eval])),
                   n_bootstrap=d.cfg.n_bootstrap, generator=d.generator("ksd_target", s.name))
    return {"ksd": float(res.statistic), "ksd_p_value": float(res.p_value)}


def smoothing_scale(cfg: Evaluate, mixture) -> float:
    """The unit of ``evaluate.ksd_smoothed_sigmas``: the number ``ksd_smoothed_scale``, or (``target``) the true
    mixture's standard deviation per coordinate, ``sqrt(tr Cov / d)`` with ``tr Cov = sum_k w_k (d s_k² + |μ_k|²) −
    |μ̄|²`` (gmm2d: sqrt(17) = 4.12; a ring of 8 of radius 2: 1.43)."""
    if cfg.ksd_smoothed_scale != "target":
        return float(cfg.ksd_smoothed_scale)
    w, mu, s = mixture.weights, mixture.means, mixture.stds  # [K], [K, d], [K] float64
    dim = mu.shape[1]
    mean = w @ mu  # [d]
    var = (w * s * s).sum() + ((w * (mu * mu).sum(-1)).sum() - (mean * mean).sum()) / dim
    return float(var.sqrt())


def _ksd_smoothed(d: EvalData, s: SampleSet) -> dict[str, float]:
    """Noise-smoothed KSD (Wenliang & Kanagawa, arXiv:2008.10087): the samples plus N(0, σ² I) noise against the true
    mixture convolved with the same noise, over the ladder ``ksd_smoothed_sigmas`` × :func:`smoothing_scale`. The
    kernel of each σ is the evaluate kernel (:func:`make_kernel`, pooled with the comparison set as for ``ksd``)
    with its length scale widened to sqrt(ℓ² + σ²) (``stein_core.discrepancies.smoothed_kernels``). Reported, as
    ``ksd`` reports its test's statistic: ``ksd_smoothed``, the statistic of the studentized test
    (``stein_core.tests_stat.ksd_smoothed_test``), Σ_σ KSD²_σ / sd_σ, each level's KSD² U-statistic in units of its
    own wild-bootstrap standard deviation (under H0 a centred sum of L unit-variance terms; it grows with the
    number of samples under the alternative), and its p-value (one wild bootstrap, multipliers shared by the
    levels). The per-level KSD² themselves are dominated, in size and in noise, by the smallest σ, the level blind
    to the weights, so their plain sum would be a poor headline."""
    import torch

    from stein_core.discrepancies import smoothed_kernels
    from stein_core.tests_stat import ksd_smoothed_test

    x = s.x_eval
    unit = smoothing_scale(d.cfg, d.mixture)
    sigmas = [unit * v for v in d.cfg.ksd_smoothed_sigmas]
    kernels = smoothed_kernels(make_kernel(d.cfg, torch.cat([x, d.comparison_eval])), sigmas)
    res = ksd_smoothed_test(x, d.mixture.perturbed_score, kernels, sigmas, n_bootstrap=d.cfg.n_bootstrap,
                            generator=d.generator("ksd_smoothed", s.name))
    return {"ksd_smoothed": float(res.statistic), "ksd_smoothed_p_value": float(res.p_value)}


def _mmd(d: EvalData, s: SampleSet) -> dict[str, float]:
    """MMD² (U) to the comparison set, with the permutation p-value (Gretton et al. 2012)."""
    import torch

    from stein_core.tests_stat import mmd_permutation_test

    x, y = s.x_eval, d.comparison_eval
    res = mmd_permutation_test(x, y, make_kernel(d.cfg, torch.cat([x, y])), n_permutations=d.cfg.n_bootstrap,
                               generator=d.generator("mmd", s.name))
    return {"mmd": float(res.statistic), "mmd_p_value": float(res.p_value)}


def _mode_weight(d: EvalData, s: SampleSet) -> dict[str, float]:
    w = (d.mixture.nearest_component(s.x_eval) == d.heavy).double().mean().item()
    return {"weight": w, "weight_error": abs(w - d.true_weight)}


def _log_likelihood(d: EvalData, s: SampleSet) -> dict[str, float]:
    """Mean log-density of the samples under the true mixture: a cross-entropy estimate, maximal for samples
    from the mixture itself only in expectation (over-concentrated samples can score higher; hence the
    reference)."""
    return {"log_likelihood": d.mixture.log_prob(s.x_eval).mean().item()}


def _mode_coverage(d: EvalData, s: SampleSet) -> dict[str, float]:
    """Modes covered: the components of the true mixture that hold at least a quarter of their expected share of
    the samples (each sample counted at its nearest component): 8 of 8 on a ring of 8 when no mode collapsed."""
    import torch

    nearest = d.mixture.nearest_component(s.x_eval)
    share = torch.bincount(nearest, minlength=d.mixture.n_components).double() / len(nearest)
    expected = torch.as_tensor(d.mixture_weights, dtype=torch.float64)
    return {"modes_covered": float((share >= 0.25 * expected).sum())}


def _ksd_model(d: EvalData, s: SampleSet) -> dict[str, float]:
    """KSD² (U) of the samples against the model's own score (a score network's at σ_L): do the samples follow
    the model?"""
    from stein_core.tests_stat import ksd_test

    x = s.x_eval
    res = ksd_test(x, d.model_score(x), make_kernel(d.cfg, x), n_bootstrap=d.cfg.n_bootstrap,
                   generator=d.generator("ksd_model", s.name))
    return {"ksd_model": float(res.statistic), "ksd_model_p_value": float(res.p_value)}


def _ksd_model_heldout(d: EvalData) -> dict[str, float]:
    """KSD² (U) of held-out data against the model's score at σ_L: the model's goodness of fit."""
    from stein_core.tests_stat import ksd_test

    y = d.comparison_eval
    res = ksd_test(y, d.model_score(y), make_kernel(d.cfg, y), n_bootstrap=d.cfg.n_bootstrap,
                   generator=d.generator("ksd_model", "heldout"))
    return {"ksd_model_heldout": float(res.statistic), "ksd_model_heldout_p_value": float(res.p_value)}


def _fid(d: EvalData, s: SampleSet) -> dict[str, float]:
    """Fréchet distance between Gaussians fitted to the features (Heusel et al. 2017), float64 moments."""
    from stein_core.metrics import StreamingMoments, frechet_distance

    f = d.space.features(s)
    m, ref = StreamingMoments(f.shape[1]).update(f), d.space.comparison_moments
    return {"fid": float(frechet_distance(m.mean, m.cov, ref.mean, ref.cov))}


def _kid(d: EvalData, s: SampleSet) -> dict[str, float]:
    """Kernel inception distance (Bińkowski et al. 2018): unbiased MMD² with (xᵀy/d + 1)³ over seeded subsets."""
    from stein_core.metrics import kid

    f, g = d.space.features(s), d.space.comparison_features
    res = kid(g, f, n_subsets=d.cfg.kid_subsets, subset_size=min(d.cfg.kid_subset_size, len(f), len(g)),
              generator=d.generator("kid", s.name))
    return {"kid": float(res.mean), "kid_std": float(res.std)}


def _inception_score(d: EvalData, s: SampleSet) -> dict[str, float]:
    """Inception score (Salimans et al. 2016) from the feature network's logits, float64, 10 splits."""
    from stein_core.metrics import inception_score

    res = inception_score(d.space.logits(s), from_logits=True)
    return {"inception_score": float(res.mean), "inception_score_std": float(res.std)}


def _precision_recall(d: EvalData, s: SampleSet) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii."""
    from stein_core.metrics import precision_recall

    res = precision_recall(d.space.comparison_features, d.space.features(s), k=d.cfg.pr_k)
    return {"precision": float(res.precision), "recall": float(res.recall)}


def _kale(d: EvalData, s: SampleSet) -> dict[str, float]:
    """KALE(held-out ‖ samples) (Arbel, Zhou & Gretton 2021): an energy fitted on half of the comparison set and of
    the samples, the KL lower bound reported on the other halves (``stein_core.critics.kale_divergence``)."""
    from stein_core.critics import kale_divergence

    return {"kale": float(kale_divergence(d.comparison_eval, s.x_eval, generator=d.generator("kale", s.name)))}


#: Grid points per axis of ``model_log_likelihood``'s normaliser (400² energies: under a second for the toys' MLPs).
GRID_POINTS = 400


def _model_log_likelihood(d: EvalData) -> dict[str, float]:
    """The learned density itself on held-out data (2-D toys): ``model_log_likelihood``, the mean of
    −E(x) − log Z over the comparison set, with log Z = log ∫ exp(−E) by the midpoint rule on a
    :data:`GRID_POINTS`² grid over the held-out points' box padded by a quarter of its width
    (``stein_core.ebm.grid_log_normaliser``); ``true_log_likelihood``, the true mixture's mean log-density at the same
    points (the ceiling); and for a family that learns its normaliser (NCE's c), ``log_normaliser_error`` = c − log Z."""
    import torch

    from stein_core.ebm import grid_box, grid_log_normaliser
    from tasks.families.loading import load_model

    model = load_model(d.model_path, device=d.device)
    x = d.comparison
    lo, hi = grid_box(torch.cat([x, d.reference]))
    energy = lambda z: model.energy(z.float().to(d.device)).double().cpu()  # noqa: E731
    log_z = grid_log_normaliser(energy, lo, hi, n=GRID_POINTS)
    e = torch.cat([energy(chunk) for chunk in torch.split(x, 65536)])
    if not torch.isfinite(e).all():
        raise FloatingPointError(f"the energy of {d.model_path} is not finite at {int((~torch.isfinite(e)).sum())} "
                                 "held-out points")
    out = {"model_log_likelihood": float((-e).mean()) - log_z,
           "true_log_likelihood": float(d.mixture.log_prob(x).mean())}
    if model.log_normaliser is not None:
        out["log_normaliser_error"] = model.log_normaliser - log_z
    return out


def _feature_info(d: EvalData) -> dict[str, float]:
    """The classifier's held-out accuracy, logged beside every feature metric it produced."""
    if d.cfg.features != "classifier":
        return {}
    from tasks.data.io import load_checkpoint

    return {"classifier_test_accuracy": float(load_checkpoint(d.inputs.classifier)["test_accuracy"])}


METRICS: dict[str, Metric] = {
    "ksd_target": Metric(_ksd_target),
    "ksd_model": Metric(_ksd_model, per_model=_ksd_model_heldout),
    "mmd": Metric(_mmd),
    "mode_weight": Metric(_mode_weight, info=lambda d: {"true_weight": d.true_weight}),
    "log_likelihood": Metric(_log_likelihood),
    "mode_coverage": Metric(_mode_coverage, info=lambda d: {"n_modes": float(d.mixture.n_components)}),
    "fid": Metric(_fid, info=_feature_info),
    "kid": Metric(_kid, info=_feature_info),
    "inception_score": Metric(_inception_score, info=_feature_info),
    "precision_recall": Metric(_precision_recall, info=_feature_info),
    "kale": Metric(_kale),
    "ksd_smoothed": Metric(_ksd_smoothed, info=lambda d: {"ksd_smoothed_scale": smoothing_scale(d.cfg, d.mixture)}),
    "model_log_likelihood": Metric(lambda d, s: {}, per_model=_model_log_likelihood),
}


def evaluate_sets(data: EvalData, sets: dict[str, Any], *, sources: dict[str, Path] | None = None) -> dict[str, float]:
    """The configured metrics of every sample set (keys suffixed ``_<set>`` when there are several, except for the
    set named ``samples``, the pipeline's model: ``mmd`` beside ``mmd_base``), of the
    reference set at the smallest set's evaluation size (``ref_*``), the once-per-model keys, and ``n_eval``."""
    sources = sources or {}
    wrapped = {name: data.sample_set(name, x, source=sources.get(name, name)) for name, x in sets.items()}
    n_eval = min(len(s.x_eval) for s in wrapped.values())
    n = min(len(s.x) for s in wrapped.values())
    out: dict[str, float] = dict(data.once())
    for name, s in wrapped.items():
        m = data.evaluate(s)
        out |= m if len(wrapped) == 1 or name == "samples" else {f"{k}_{name}": v for k, v in m.items()}
        log.info("evaluated %s: %s", name, ", ".join(f"{k}={v:.4g}" for k, v in m.items()))
    out |= reference_metrics(data, n_eval, n)
    out["n_eval"] = float(n_eval)
    return out


def reference_metrics(data: EvalData, n_eval: int, n: int, metrics: list[str] | None = None) -> dict[str, float]:
    """The listed metrics (default: the config's) of the reference set at the samples' sizes, keys ``ref_*``."""
    return {f"ref_{k}": v for k, v in data.evaluate(data.reference_set(n_eval, n), metrics).items()}


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_config(cfg: Evaluate) -> Evaluate:
    """The evaluation each checkpoint gets: the checkpoint metrics, no plots, no nested checkpoints."""
    return cfg.model_copy(update={"metrics": list(cfg.checkpoints.metrics), "plots": [], "checkpoints": None})


def evaluate_checkpoint(
    path: Path, *, cfg: dict, sampler: dict, inputs: EvalInputs, threads: int = 1, device: str = "cpu",
) -> dict[str, float]:
    """One training checkpoint: draw ``checkpoints.n_samples`` samples from it (seeded, with the sample section
    ``sampler``) and compute the checkpoint metrics. Runs as a Ray task; returns the metrics with ``step``."""
    import torch
    from pydantic import TypeAdapter

    from tasks.config.sections import SampleSection
    from tasks.families.loading import load_model
    from tasks.data.io import load_checkpoint
    from tasks.families.base import draw_in_batches

    torch.set_num_threads(threads)
    full = Evaluate.model_validate(cfg)
    sampler_cfg = TypeAdapter(SampleSection).validate_python(sampler)
    ck = checkpoint_config(full)
    data = EvalData(ck, inputs, model_path=path, device=device)
    model = load_model(path, device=device, sampler=sampler_cfg)
    gen = torch.Generator(device=device).manual_seed(sampler_cfg.seed)
    x = draw_in_batches(full.checkpoints.n_samples, sampler_cfg.batch_size, lambda m: model.sample(m, generator=gen))
    step = int(load_checkpoint(path).get("step", -1))
    if not torch.isfinite(x).all():  # a diverged early checkpoint is a result, not an error
        return {"step": float(step), "finite_fraction": float(torch.isfinite(x).all(1).double().mean())}
    return {"step": float(step), **data.once(info=False), **data.evaluate(data.sample_set("samples", x, source=path))}
