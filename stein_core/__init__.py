"""stein_core: pure-PyTorch mathematics for Stein's method and score matching.

No I/O and no orchestration imports (prefect, ray, mlflow, dvc, pyarrow,
pydantic, config layers): tensors in, tensors out; device and dtype come from
the inputs; randomness from an explicit ``torch.Generator``.

Modules: ``kernels`` (RBF, IMQ, sums, deep kernels, closed-form derivatives),
``distributions`` (Gaussian mixtures, log-density -> score), ``discrepancies``
(KSD, sliced KSD / maxSKSD, MMD), ``tests_stat`` (wild-bootstrap and
permutation tests), ``score_estimators`` (Stein gradient estimators, SSGE),
``score_matching`` (exact, denoising, sliced score matching), ``samplers``
(ULA, MALA, RWMH, underdamped Langevin, HMC, annealed Langevin, SVGD), ``nets``
(noise-conditional MLP and conv score networks, MLP and conv generators),
``generators`` (approximate-gradient-descent and MMD losses for implicit
generators), ``ica`` (the ICA benchmark's data and model), ``lsd`` (the learned Stein discrepancy), ``critics`` (KALE and generalised energy-based models, MMD-GAN critics), ``ebm`` (energy-based model
estimators: contrastive divergence, NCE, FCE, grid normalisers), ``ema`` (weight averaging),
``metrics`` (Fréchet distance, KID, Inception score, precision/recall, streaming
moments), ``features`` (the extractor protocol, a LeNet classifier), ``inception``
(the FID Inception-v3).

Each module's ``__all__`` is available here too (``stein_core.ksd``), imported on first use: importing
``stein_core`` loads no submodule, so code that imports one submodule depends on that submodule alone (a DVC
stage lists exactly the files it imports, and a new module reruns nothing). Code in this project imports the
submodule itself (``from stein_core.discrepancies import ksd``); ``tests/unit/test_imports.py`` holds this table
equal to the modules' ``__all__``.
"""

from __future__ import annotations

import importlib

#: Every public name -> its submodule.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "critics": ("ConvCritic", "MLPCritic", "Scalar", "gradient_penalty", "interpolates", "kale_base_loss",
                "kale_divergence", "kale_energy_loss", "latent_log_prob", "mmd2_u", "mmd_witness",
                "optimal_log_partition", "rq_mixture_kernel"),
    "discrepancies": ("Kernel", "LinearStatistic", "MaxSKSDResult", "get_ksd_fn", "get_ksd_smoothed_fn", "get_mmd_fn",
                      "get_sksd_fn", "ksd", "ksd_linear", "ksd_smoothed", "maxsksd", "median_rbf", "mmd", "mmd_linear",
                      "sksd", "sliced_stein_kernel_matrix", "smoothed_kernels", "stein_kernel_matrix"),
    "distributions": ("GaussianMixture", "score_from_log_prob"),
    "ebm": ("GaussianNoise", "cd_loss", "fce_value", "grid_box", "grid_log_normaliser", "log_density", "nce_logits",
            "nce_loss"),
    "ema": ("EMA", "unwrap_model"),
    "ica": ("ICAModel", "SOURCES", "random_mixing", "sample_ica", "source_log_prob", "source_score",
            "true_log_likelihood"),
    "features": ("ClassifierFeatures", "FeatureExtractor", "LeNetClassifier", "accuracy", "state_dict_fingerprint"),
    "generators": ("get_agd_gradient_fn", "get_agd_loss_fn", "get_kernel_fn", "get_mmd_loss_fn"),
    "inception": ("FIDInceptionV3", "InceptionV3FID"),
    "kernels": ("DeepKernel", "IMQ", "RBF", "RadialKernel", "SumKernel", "grad_x_sum_autograd", "gram_and_grad_x_sum",
                "imq_mixture", "median_heuristic", "sq_dists"),
    "lsd": ("divergence", "lsd_objective"),
    "metrics": ("MeanStd", "PrecisionRecall", "StreamingMoments", "frechet_distance", "frechet_distance_from_samples",
                "inception_score", "kid", "precision_recall"),
    "nets": ("ConvGenerator", "MLPGenerator", "NoiseConditionalConvNet", "NoiseConditionalMLP"),
    "samplers": ("ChainResult", "MHState", "SVGDState", "Sampler", "ULAState", "UnderdampedState", "annealed_langevin",
                 "by_name", "hmc", "langevin_step", "mala", "run_chain", "rwmh", "svgd", "svgd_direction", "svgd_median_kernel",
                 "tempered", "ula", "underdamped_langevin"),
    "score_estimators": ("DEFAULT_ETA_REL", "SSGE", "fit_ssge", "fit_stein_gradient", "ssge", "stein_gradient_estimator",
                         "stein_gradient_predict"),
    "score_matching": ("geometric_sigmas", "get_dsm_loss_fn", "get_score_matching_loss_fn", "score_from_energy"),
    "tests_stat": ("KernelTestResult", "SlicedTestResult", "SmoothedTestResult", "ksd_smoothed_test", "ksd_test",
                   "mmd_permutation_test", "sksd_test", "wild_bootstrap"),
}
MODULES = tuple(_EXPORTS)
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = name if name in _EXPORTS else _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'stein_core' has no attribute {name!r}")
    mod = importlib.import_module(f"stein_core.{module}")
    return mod if name == module else getattr(mod, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_MODULE_OF})
