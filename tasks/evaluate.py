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

from tasks.config import ConfigError, GMMEvaluate, ImageEvaluate
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
    with its permutation p-value, the fraction of ``x`` nearest the heavy mode, and the mean log-density of ``x``
    under the true mixture (tractable here: a cross-entropy estimate, maximal for samples from the mixture
    itself only in expectation: over-concentrated samples can score higher, hence the held-out reference)."""
    from stein_core import ksd_test, mmd_permutation_test

    ksd_res = ksd_test(x, mixture.score(x), kernel, n_bootstrap=n_bootstrap, generator=generator)
    mmd_res = mmd_permutation_test(x, reference, kernel, n_permutations=n_bootstrap, generator=generator)
    return {
        "ksd": float(ksd_res.statistic),
        "ksd_p_value": float(ksd_res.p_value),
        "mmd": float(mmd_res.statistic),
        "mmd_p_value": float(mmd_res.p_value),
        "weight": (mixture.nearest_component(x) == heavy).double().mean().item(),
        "log_likelihood": mixture.log_prob(x).mean().item(),
    }


class MixtureEvaluation:
    """The held-out test set split in two (a perfect model's samples, and the MMD comparison set), the true
    mixture from its metadata, and one generator: shared by every evaluation of samples against it."""

    def __init__(self, test_path: Path, cfg: GMMEvaluate):
        import torch

        from stein_core import GaussianMixture

        self.cfg, self.test_path = cfg, test_path
        self.test = test = read_dataset(test_path)
        spec = test.metadata.get("mixture")
        if not isinstance(spec, dict):
            raise ConfigError(test_path, "mixture", "schema metadata has no mixture specification (written by prepare)")
        self.mixture = GaussianMixture(spec["weights"], spec["means"], spec["stds"])
        self.heavy = int(np.argmax(spec["weights"]))
        self.true_weight = float(spec["weights"][self.heavy])
        self.gen = torch.Generator().manual_seed(cfg.seed)
        half = len(test) // 2
        perm = torch.randperm(len(test), generator=self.gen)
        self.ref_model = torch.from_numpy(test.x)[perm[:half]].double()  # plays a perfect model
        self.ref_cmp = torch.from_numpy(test.x)[perm[half:]].double()  # the MMD comparison set

    def n_eval(self, n_samples: int) -> int:
        return min(self.cfg.n_eval, n_samples, len(self.ref_model))

    def _metrics(self, x) -> dict[str, float]:
        import torch

        kernel = make_kernel(self.cfg, torch.cat([x, self.ref_cmp]))
        return mixture_metrics(
            x, mixture=self.mixture, reference=self.ref_cmp, kernel=kernel, heavy=self.heavy,
            n_bootstrap=self.cfg.n_bootstrap, generator=self.gen,
        )

    def metrics_of(self, samples, samples_path: Path) -> dict[str, float]:
        """Metrics of (a seeded subset of) ``samples``."""
        import torch

        if samples.x.shape[1] != self.test.x.shape[1]:
            raise ConfigError(samples_path, "x", f"dimension {samples.x.shape[1]} differs from the test set's {self.test.x.shape[1]}")
        n = self.n_eval(len(samples))
        x = torch.from_numpy(samples.x)[torch.randperm(len(samples), generator=self.gen)[:n]].double()
        return self._metrics(x)

    def reference_metrics(self, n: int) -> dict[str, float]:
        """The same metrics for ``n`` held-out points: what a perfect model reaches."""
        return self._metrics(self.ref_model[:n])


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
    setup = MixtureEvaluation(test_path, cfg)
    samples = read_dataset(samples_path)
    n = setup.n_eval(len(samples))
    model_m = setup.metrics_of(samples, samples_path)
    ref_m = setup.reference_metrics(n)
    true_weight = setup.true_weight
    metrics = {
        **model_m,
        "weight_error": abs(model_m["weight"] - true_weight),
        "true_weight": true_weight,
        **{f"ref_{k}": v for k, v in ref_m.items()},
        "ref_weight_error": abs(ref_m["weight"] - true_weight),
        "n_eval": float(n),
    }
    plot_gmm(
        data=setup.test.x, samples=samples.x, mixture=setup.mixture, model_path=model_path,
        samples_png=Path(plots_dir) / "samples.png", score_png=Path(plots_dir) / "score_field.png",
        title=f"weight of heavy mode: samples {model_m['weight']:.3f}, true {true_weight:.2f}",
    )
    write_json(metrics_path, metrics)
    log.info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


@task(name="evaluate-blindness", cache_policy=NO_CACHE)
def evaluate_blindness(
    cfg: GMMEvaluate, *, samples_paths: dict[str, Path], test_path: Path, metrics_path: Path, plot_path: Path
) -> dict[str, float]:
    """Mixture metrics of several sample sets of one model, keyed ``<metric>_<sampler>``, beside the held-out
    reference; and one figure with the data and every sample set side by side."""
    setup = MixtureEvaluation(test_path, cfg)
    metrics: dict[str, float] = {"true_weight": setup.true_weight}
    sets = {}
    for name, path in samples_paths.items():
        samples = read_dataset(path)
        sets[name] = samples.x
        m = setup.metrics_of(samples, path)
        m["weight_error"] = abs(m["weight"] - setup.true_weight)
        metrics.update({f"{k}_{name}": v for k, v in m.items()})
    ref = setup.reference_metrics(setup.n_eval(min(len(x) for x in sets.values())))
    metrics.update({f"ref_{k}": v for k, v in ref.items()} | {"ref_weight_error": abs(ref["weight"] - setup.true_weight)})
    plot_sample_sets(
        {"held-out data": setup.test.x, **{f"{k} (weight {metrics[f'weight_{k}']:.3f})": v for k, v in sets.items()}},
        mixture=setup.mixture, path=plot_path,
        title=f"mixing-proportion blindness: true weight of the heavy mode {setup.true_weight:.2f}",
    )
    write_json(metrics_path, metrics)
    log.info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def _density_grid(mixture, points: list[np.ndarray], size: int = 200):
    """A grid covering the first point set (the data) and the central 99% of the others, with the mixture's
    density on it: (lo, hi, gx, gy, density)."""
    import torch

    lo = np.min([np.minimum(points[0].min(0), np.percentile(p, 0.5, axis=0)) for p in points], axis=0) - 1.0
    hi = np.max([np.maximum(points[0].max(0), np.percentile(p, 99.5, axis=0)) for p in points], axis=0) + 1.0
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], size), np.linspace(lo[1], hi[1], size))
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1)).double()
    return lo, hi, gx, gy, mixture.log_prob(grid).exp().numpy().reshape(gx.shape)


def plot_sample_sets(sets: dict[str, np.ndarray], *, mixture, path: Path, title: str) -> None:
    """Scatter plots of 2-D point sets side by side over the true density's contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, gx, gy, density = _density_grid(mixture, list(sets.values()))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4.6), sharex=True, sharey=True, constrained_layout=True)
    for i, (ax, (name, pts)) in enumerate(zip(np.atleast_1d(axes), sets.items())):
        ax.contour(gx, gy, density, levels=8, colors="0.6", linewidths=0.7)
        k = min(len(pts), 3000)
        ax.scatter(pts[:k, 0], pts[:k, 1], s=3, alpha=0.4, color=f"C{i}")
        ax.set_title(f"{name}, n={len(pts)}")
        ax.set_aspect("equal")
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_gmm(*, data, samples, mixture, model_path, samples_png: Path, score_png: Path, title: str) -> None:
    """Data vs samples (scatter over true density contours), and the learned vs true score field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from tasks.sample import load_score_model

    plot_sample_sets({"held-out data": data, "annealed Langevin samples": samples}, mixture=mixture, path=samples_png, title=title)
    lo, hi, gx, gy, density = _density_grid(mixture, [data, samples])
    model, sigmas, _ = load_score_model(model_path)
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


@task(name="evaluate-images", cache_policy=NO_CACHE)
def evaluate_images(
    cfg: ImageEvaluate,
    *,
    samples_path: Path,
    test_path: Path,
    train_path: Path,
    model_path: Path,
    metrics_path: Path,
    plots_dir: Path,
    classifier_path: Path | None = None,
    stats_path: Path | None = None,
) -> dict[str, float]:
    """Sample quality of an image model. With the pipeline's feature classifier (``classifier_path``, and the
    cached held-out feature statistics ``stats_path``): FID of the samples and, as the baseline, of the training
    images against the held-out split; KID; the Inception score of samples and held-out images; improved
    precision/recall. In pixel space:

    - MMD² (U) between samples and held-out images, with its permutation p-value; the same for training images
      (what a model that memorised its training set reaches) as the reference;
    - KSD² (U) of held-out images and of the samples against the model's own score at σ_L (a goodness-of-fit
      of the model to the data, and of the samples to the model), with wild-bootstrap p-values;
    and a PNG grid of samples beside held-out images."""
    import torch

    from stein_core import IMQ, ksd_test, mmd_permutation_test
    from tasks.sample import load_score_model

    samples, test, train = read_dataset(samples_path), read_dataset(test_path), read_dataset(train_path)
    if samples.x.shape[1] != test.x.shape[1]:
        raise ConfigError(samples_path, "x", f"dimension {samples.x.shape[1]} differs from the test set's {test.x.shape[1]}")
    gen = torch.Generator().manual_seed(cfg.seed)
    n = min(cfg.n_eval, len(samples), len(test), len(train))

    def subset(ds):
        return torch.from_numpy(ds.x)[torch.randperm(len(ds), generator=gen)[:n]].double()

    x, y, ref = subset(samples), subset(test), subset(train)
    kernel = IMQ(c=cfg.imq_c, beta=cfg.imq_beta)
    model, sigmas, _ = load_score_model(model_path)
    sigma_min = sigmas[-1]

    def model_score(z):
        with torch.no_grad():
            return model(z.float(), sigma_min).double()

    mmd_s = mmd_permutation_test(x, y, kernel, n_permutations=cfg.n_bootstrap, generator=gen)
    mmd_r = mmd_permutation_test(ref, y, kernel, n_permutations=cfg.n_bootstrap, generator=gen)
    ksd_t = ksd_test(y, model_score(y), kernel, n_bootstrap=cfg.n_bootstrap, generator=gen)
    ksd_s = ksd_test(x, model_score(x), kernel, n_bootstrap=cfg.n_bootstrap, generator=gen)
    metrics = {
        "mmd": float(mmd_s.statistic),
        "mmd_p_value": float(mmd_s.p_value),
        "ref_mmd": float(mmd_r.statistic),
        "ref_mmd_p_value": float(mmd_r.p_value),
        "ksd_model_test": float(ksd_t.statistic),
        "ksd_model_test_p_value": float(ksd_t.p_value),
        "ksd_model_samples": float(ksd_s.statistic),
        "ksd_model_samples_p_value": float(ksd_s.p_value),
        "pixel_mean_abs_diff": float((x.mean(0) - y.mean(0)).abs().mean()),
        "n_eval": float(n),
    }
    if classifier_path is not None:
        metrics |= classifier_metrics(cfg, samples=samples, test=test, train=train, classifier_path=classifier_path,
                                      stats_path=stats_path, generator=gen)
    plot_image_grids(
        {"annealed Langevin samples": samples.x, "held-out images": test.x}, shape=samples.shape,
        grid=cfg.grid, path=Path(plots_dir) / "samples.png",
    )
    plot_nearest_neighbours(samples.x, train.x, shape=samples.shape, path=Path(plots_dir) / "nearest.png")
    write_json(metrics_path, metrics)
    log.info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def classifier_metrics(cfg: ImageEvaluate, *, samples, test, train, classifier_path: Path, stats_path: Path | None, generator) -> dict[str, float]:
    """FID (against the cached held-out statistics), the train-vs-held-out FID baseline, KID, Inception score
    and improved precision/recall (Kynkäänniemi et al. 2019), all on the classifier's features."""
    import torch

    from stein_core import (
        ClassifierFeatures, LeNetClassifier, StreamingMoments, frechet_distance, inception_score, kid, precision_recall,
    )
    from tasks.io import load_checkpoint

    ckpt = load_checkpoint(classifier_path)
    model = LeNetClassifier(**ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    extractor = ClassifierFeatures(model)
    fingerprint = extractor.fingerprint()

    def images(ds):
        # Langevin samples overshoot the pixel range slightly; like any image sampler's output they are clipped
        # to [0, 1] before feature extraction (the pixel-space metrics above use them unclipped).
        return torch.from_numpy(ds.x).clamp(0.0, 1.0).reshape(len(ds), *ds.shape)

    f_samples, f_test, f_train = extractor(images(samples)), extractor(images(test)), extractor(images(train))
    if stats_path is not None:
        cached = torch.load(stats_path, weights_only=True)
        if cached["fingerprint"] != fingerprint:
            raise ConfigError(stats_path, "fingerprint", "reference statistics were computed with another classifier; rerun the classifier stage")
        ref = StreamingMoments.from_state_dict(cached["moments"])
    else:
        ref = StreamingMoments(extractor.dim).update(f_test)

    def fid_to_ref(f) -> float:
        m = StreamingMoments(extractor.dim).update(f)
        return float(frechet_distance(m.mean, m.cov, ref.mean, ref.cov))

    size = min(cfg.kid_subset_size, len(f_samples), len(f_test))
    kid_res = kid(f_test, f_samples, n_subsets=cfg.kid_subsets, subset_size=size, generator=generator)
    is_samples = inception_score(extractor.logits(images(samples)), from_logits=True)
    is_test = inception_score(extractor.logits(images(test)), from_logits=True)
    pr = precision_recall(f_test, f_samples, k=cfg.pr_k)
    return {
        "fid": fid_to_ref(f_samples),
        "fid_train_test": fid_to_ref(f_train),
        "kid": float(kid_res.mean),
        "kid_std": float(kid_res.std),
        "inception_score": float(is_samples.mean),
        "inception_score_std": float(is_samples.std),
        "ref_inception_score": float(is_test.mean),
        "precision": float(pr.precision),
        "recall": float(pr.recall),
        "classifier_test_accuracy": float(ckpt["test_accuracy"]),
    }


def plot_nearest_neighbours(samples: np.ndarray, train: np.ndarray, *, shape: tuple[int, ...], path: Path, rows: int = 8, k: int = 5) -> None:
    """Each of the first ``rows`` samples beside its ``k`` nearest training images (pixel L2): memorisation
    shows as a sample identical to its first neighbour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from stein_core import sq_dists

    rows = min(rows, len(samples))
    d2 = sq_dists(torch.from_numpy(samples[:rows]).double(), torch.from_numpy(train).double())
    nearest = d2.topk(k, largest=False).indices.numpy()
    c, h, w = shape
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.1 * (k + 1), 1.1 * rows), squeeze=False)
    for r in range(rows):
        row = [samples[r]] + [train[j] for j in nearest[r]]
        for q, img in enumerate(row):
            ax = axes[r, q]
            img = np.clip(img, 0, 1).reshape(c, h, w).transpose(1, 2, 0)
            ax.imshow(img[..., 0] if c == 1 else img, cmap="gray_r" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("sample" if q == 0 else f"NN {q}", fontsize=8)
    fig.suptitle("samples and their nearest training images", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_image_grids(sets: dict[str, np.ndarray], *, shape: tuple[int, ...], grid: int, path: Path) -> None:
    """grid x grid images of each set side by side; pixels clipped to [0, 1] for display only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, h, w = shape
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 4.6), constrained_layout=True)
    for ax, (name, x) in zip(np.atleast_1d(axes), sets.items()):
        k = min(grid * grid, len(x))
        imgs = np.clip(x[:k], 0.0, 1.0).reshape(k, c, h, w).transpose(0, 2, 3, 1)
        # white separators: 0 is white under gray_r (single channel), 1 is white in RGB
        canvas = np.full((grid * (h + 1) + 1, grid * (w + 1) + 1, c), 0.0 if c == 1 else 1.0, dtype=np.float32)
        for i in range(k):
            r, q = divmod(i, grid)
            canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = imgs[i]
        ax.imshow(canvas[..., 0] if c == 1 else canvas, cmap="gray_r" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name} ({k} of {len(x)})")
        ax.axis("off")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
