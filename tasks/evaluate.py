"""Evaluate stage for the toy mixtures: KSD against the true score, MMD against held-out data, mode weights.

KSD comes with its goodness-of-fit p-value (wild bootstrap) and MMD with its two-sample p-value (permutations),
all from ``stein_core``: the pipeline has one implementation of each statistic.

Every metric is reported twice: for the model's samples and, as the reference a perfect model would reach, for
held-out test points of the same size. The test set is split into two disjoint halves: the reference half plays
the model's part, the other half is the MMD comparison set for both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import ConfigError, GMMEvaluate
from tasks.io import atomic_path, read_dataset, write_json

log = logging.getLogger("stein")


def make_kernel(cfg: GMMEvaluate, pooled=None):
    from stein_core import IMQ, RBF, median_heuristic

    if cfg.kernel == "imq":
        return IMQ(c=cfg.imq_c, beta=cfg.imq_beta)
    bandwidth = median_heuristic(pooled) if cfg.rbf_bandwidth == "median" else cfg.rbf_bandwidth
    return RBF(bandwidth=bandwidth)


def mixture_metrics(x, *, mixture, reference, kernel, heavy: int, n_bootstrap: int, generator) -> dict[str, float]:
    """KSD² (U) of ``x`` against the mixture's score with its wild-bootstrap p-value, MMD² (U) to ``reference``
    with its permutation p-value, and the fraction of ``x`` nearest the heavy mode."""
    from stein_core import ksd_test, mmd_permutation_test

    ksd_res = ksd_test(x, mixture.score(x), kernel, n_bootstrap=n_bootstrap, generator=generator)
    mmd_res = mmd_permutation_test(x, reference, kernel, n_permutations=n_bootstrap, generator=generator)
    return {
        "ksd": float(ksd_res.statistic),
        "ksd_p_value": float(ksd_res.p_value),
        "mmd": float(mmd_res.statistic),
        "mmd_p_value": float(mmd_res.p_value),
        "weight": (mixture.nearest_component(x) == heavy).double().mean().item(),
    }


@task(name="evaluate-gmm", cache_policy=NO_CACHE)
def evaluate_gmm(
    cfg: GMMEvaluate,
    *,
    samples_path: Path,
    test_path: Path,
    model_path: Path,
    metrics_path: Path,
    plots_dir: Path,
) -> dict[str, float]:
    import torch

    from stein_core import GaussianMixture

    samples, test = read_dataset(samples_path), read_dataset(test_path)
    spec = test.metadata.get("mixture")
    if not isinstance(spec, dict):
        raise ConfigError(test_path, "mixture", "schema metadata has no mixture specification (written by prepare)")
    if samples.x.shape[1] != test.x.shape[1]:
        raise ConfigError(samples_path, "x", f"dimension {samples.x.shape[1]} differs from the test set's {test.x.shape[1]}")
    mixture = GaussianMixture(spec["weights"], spec["means"], spec["stds"])
    heavy = int(np.argmax(spec["weights"]))
    true_weight = float(spec["weights"][heavy])

    gen = torch.Generator().manual_seed(cfg.seed)
    n_test = len(test)
    half = n_test // 2
    perm = torch.randperm(n_test, generator=gen)
    ref_model = torch.from_numpy(test.x)[perm[:half]].double()  # plays a perfect model
    ref_cmp = torch.from_numpy(test.x)[perm[half:]].double()  # the MMD comparison set
    n = min(cfg.n_eval, len(samples), half)
    x = torch.from_numpy(samples.x)[torch.randperm(len(samples), generator=gen)[:n]].double()
    ref_model = ref_model[:n]
    kernel = make_kernel(cfg, torch.cat([x, ref_cmp]))

    kw = {"mixture": mixture, "reference": ref_cmp, "kernel": kernel, "heavy": heavy, "n_bootstrap": cfg.n_bootstrap, "generator": gen}
    model_m = mixture_metrics(x, **kw)
    ref_m = mixture_metrics(ref_model, **kw)
    metrics = {
        **model_m,
        "weight_error": abs(model_m["weight"] - true_weight),
        "true_weight": true_weight,
        **{f"ref_{k}": v for k, v in ref_m.items()},
        "ref_weight_error": abs(ref_m["weight"] - true_weight),
        "n_eval": float(n),
    }
    plot_gmm(
        data=test.x, samples=samples.x, mixture=mixture, model_path=model_path,
        samples_png=Path(plots_dir) / "samples.png", score_png=Path(plots_dir) / "score_field.png",
        title=f"weight of heavy mode: samples {model_m['weight']:.3f}, true {true_weight:.2f}",
    )
    write_json(metrics_path, metrics)
    log.info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def plot_gmm(*, data, samples, mixture, model_path, samples_png: Path, score_png: Path, title: str) -> None:
    """Data vs samples (scatter over true density contours), and the learned vs true score field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from tasks.sample import load_score_model

    lo = np.minimum(data.min(0), np.percentile(samples, 0.5, axis=0)) - 1.0
    hi = np.maximum(data.max(0), np.percentile(samples, 99.5, axis=0)) + 1.0
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1)).double()
    density = mixture.log_prob(grid).exp().numpy().reshape(gx.shape)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True, constrained_layout=True)
    for ax, pts, name in ((axes[0], data, "held-out data"), (axes[1], samples, "annealed Langevin samples")):
        ax.contour(gx, gy, density, levels=8, colors="0.6", linewidths=0.7)
        k = min(len(pts), 3000)
        ax.scatter(pts[:k, 0], pts[:k, 1], s=3, alpha=0.4, color="C0" if name.startswith("held") else "C3")
        ax.set_title(f"{name} (n={len(pts)})")
        ax.set_aspect("equal")
    fig.suptitle(title)
    with atomic_path(samples_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    model, sigmas = load_score_model(model_path)
    qx, qy = np.meshgrid(np.linspace(lo[0], hi[0], 25), np.linspace(lo[1], hi[1], 25))
    q = torch.from_numpy(np.stack([qx.ravel(), qy.ravel()], 1)).float()
    levels = [0, len(sigmas) // 2, len(sigmas) - 1]
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4.6), constrained_layout=True)
    for ax, i in zip(np.atleast_1d(axes), levels):
        sigma = float(sigmas[i])
        with torch.no_grad():
            learned = model(q, sigmas[i]).numpy()
        true = mixture.perturbed(sigma).score(q.double()).numpy()
        ax.contour(gx, gy, density, levels=8, colors="0.75", linewidths=0.7)
        ax.quiver(q[:, 0], q[:, 1], true[:, 0], true[:, 1], color="0.55", angles="xy", label="true")
        ax.quiver(q[:, 0], q[:, 1], learned[:, 0], learned[:, 1], color="C3", angles="xy", alpha=0.8, label="learned")
        ax.set_title(f"score field at σ={sigma:.3g}")
        ax.set_aspect("equal")
    np.atleast_1d(axes)[0].legend(loc="upper left")
    with atomic_path(score_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
