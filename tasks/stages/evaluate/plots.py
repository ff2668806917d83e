"""The evaluate stage's figures: sample sets over the true density, learned vs true score fields, image grids,
nearest training neighbours, and metrics along training checkpoints. Every figure is written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.data.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)


def _density_grid(mixture, points: list[np.ndarray], size: int = 200):
    """A grid covering the first point set (the data) and the central 99% of the others, with the mixture's
    density on it (None without a mixture): (lo, hi, gx, gy, density)."""
    import torch

    lo = np.min([np.minimum(points[0].min(0), np.percentile(p, 0.5, axis=0)) for p in points], axis=0) - 1.0
    hi = np.max([np.maximum(points[0].max(0), np.percentile(p, 99.5, axis=0)) for p in points], axis=0) + 1.0
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], size), np.linspace(lo[1], hi[1], size))
    if mixture is None:
        return lo, hi, gx, gy, None
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1)).double()
    return lo, hi, gx, gy, mixture.log_prob(grid).exp().numpy().reshape(gx.shape)


def plot_sample_sets(sets: dict[str, np.ndarray], *, mixture=None, path: Path, title: str) -> None:
    """Scatter plots of point sets side by side (their first two coordinates), over the true density's contours
    when the mixture is known."""
    plt = _pyplot()

    sets = {k: np.asarray(v)[:, :2] for k, v in sets.items()}
    _, _, gx, gy, density = _density_grid(mixture, list(sets.values()))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4.6), sharex=True, sharey=True, constrained_layout=True)
    for i, (ax, (name, pts)) in enumerate(zip(np.atleast_1d(axes), sets.items())):
        if density is not None:
            ax.contour(gx, gy, density, levels=8, colors="0.6", linewidths=0.7)
        k = min(len(pts), 3000)
        ax.scatter(pts[:k, 0], pts[:k, 1], s=3, alpha=0.4, color=f"C{i}")
        ax.set_title(f"{name}, n={len(pts)}")
        ax.set_aspect("equal")
    fig.suptitle(title)
    _save(fig, path)


def plot_energy(sets: dict[str, np.ndarray], *, model_path: Path, path: Path, size: int = 150) -> None:
    """Point sets side by side (a GEBM's samples, its base's, held-out data; an EBM's MCMC samples) over the trained
    energy E(x): dark where E is low, where the model puts more mass than its base (a GEBM: exp(-E) reweights the
    base) or simply where its density exp(-E) is high (an energy-based model). The shading spans the 2nd
    to 98th percentile of E at the plotted points: off the base's support the energy is unconstrained by training,
    and its extremes there would wash out the shades that matter."""
    import torch

    from tasks.families.loading import load_model
    from tasks.config.sections import LatentLangevinSample

    plt = _pyplot()
    model = load_model(model_path)
    ebm = callable(getattr(model, "energy", None))  # an energy-based model: density ∝ exp(-E) itself
    if not ebm:  # a GEBM: its energy comes with its latent sampler and reweights the base
        model = load_model(model_path, sampler=LatentLangevinSample(sampler="latent_langevin"))
    sets = {k: np.asarray(v)[:, :2] for k, v in sets.items()}
    pts = np.concatenate(list(sets.values()))
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    pad = 0.15 * (hi - lo)
    gx, gy = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], size), np.linspace(lo[1] - pad[1], hi[1] + pad[1], size))
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1)).float()
    e = model.energy(grid).double().numpy().reshape(gx.shape)
    at_points = model.energy(torch.from_numpy(pts).float()).double().numpy()
    vmin, vmax = np.percentile(at_points, [2, 98])
    levels = np.linspace(vmin, vmax, 13)
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4.6), sharex=True, sharey=True, constrained_layout=True)
    for i, (ax, (name, p)) in enumerate(zip(np.atleast_1d(axes), sets.items())):
        shade = ax.contourf(gx, gy, np.clip(e, vmin, vmax), levels=levels, cmap="Greys_r", alpha=0.7)
        k = min(len(p), 3000)
        ax.scatter(p[:k, 0], p[:k, 1], s=3, alpha=0.4, color=f"C{i}")
        ax.set_title(f"{name}, n={len(p)}")
        ax.set_aspect("equal")
    fig.colorbar(shade, ax=list(np.atleast_1d(axes)), shrink=0.8, label="E(x) (clipped to the 2nd-98th percentile at the points)")
    fig.suptitle("trained energy E(x): dark = low energy, " + ("high density exp(-E)" if ebm else
                                                                  "where exp(-E) moves the base's mass"))
    _save(fig, path)


def plot_score_field(*, data, samples, mixture, model_path: Path, path: Path) -> None:
    """The learned score field (red) over the true one (grey) at the largest, a middle and the smallest noise
    level, on the region the data and the samples cover."""
    plt = _pyplot()
    import torch

    from tasks.families.loading import load_model

    lo, hi, gx, gy, density = _density_grid(mixture, [data, samples])
    model = load_model(model_path)
    sigmas = model.sigmas
    qx, qy = np.meshgrid(np.linspace(lo[0], hi[0], 25), np.linspace(lo[1], hi[1], 25))
    q = torch.from_numpy(np.stack([qx.ravel(), qy.ravel()], 1)).float()
    levels = [0, len(sigmas) // 2, len(sigmas) - 1]
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4.6), constrained_layout=True)
    for ax, i in zip(np.atleast_1d(axes), levels):
        sigma = float(sigmas[i])
        learned = model.score_at(q, sigmas[i]).numpy()
        true = mixture.perturbed(sigma).score(q.double()).numpy()
        ax.contour(gx, gy, density, levels=8, colors="0.75", linewidths=0.7)
        ax.quiver(q[:, 0], q[:, 1], true[:, 0], true[:, 1], color="0.55", angles="xy", label="true")
        ax.quiver(q[:, 0], q[:, 1], learned[:, 0], learned[:, 1], color="C3", angles="xy", alpha=0.8, label="learned")
        ax.set_title(f"score field at σ={sigma:.3g}")
        ax.set_aspect("equal")
    np.atleast_1d(axes)[0].legend(loc="upper left")
    _save(fig, path)


def plot_nearest_neighbours(samples: np.ndarray, train: np.ndarray, *, shape: tuple[int, ...], path: Path, rows: int = 8, k: int = 5) -> None:
    """Each of the first ``rows`` samples beside its ``k`` nearest training images (pixel L2): memorisation
    shows as a sample identical to its first neighbour."""
    plt = _pyplot()
    import torch

    from stein_core.kernels import sq_dists

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
    _save(fig, path)


def plot_image_grids(sets: dict[str, np.ndarray], *, shape: tuple[int, ...], grid: int, path: Path) -> None:
    """grid x grid images of each set side by side; pixels clipped to [0, 1] for display only."""
    plt = _pyplot()

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
    _save(fig, path)


def plot_checkpoints(rows: list[dict[str, float]], *, reference: dict[str, float], path: Path, title: str) -> None:
    """One panel per metric (p-values and standard deviations left out) against the training step; a dashed
    line marks the reference set's value of the same metric where there is one."""
    plt = _pyplot()

    # the union over rows: a diverged checkpoint's row has only step and finite_fraction
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "step" and not k.endswith(("_p_value", "_std"))]
    keys = [k for k in keys if any(np.isfinite(r.get(k, np.nan)) for r in rows)]
    cols = min(3, max(1, len(keys)))
    n_rows = -(-max(1, len(keys)) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.2 * n_rows), squeeze=False, constrained_layout=True)
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes.ravel(), keys):
        values = [r.get(key, np.nan) for r in rows]
        ax.plot(steps, values, "o-", color="C0", label="samples of the checkpoint")
        ref = reference.get(f"ref_{key}")
        if ref is not None:
            ax.axhline(ref, color="0.4", ls="--", lw=1, label="reference set")
            values.append(ref)
        ax.set_title(key)
        ax.set_xlabel("training step")
        # discrepancies shrink by orders of magnitude during training; U-statistics can be negative (then linear)
        if key in ("ksd", "mmd", "fid", "kid", "ksd_model", "ksd_model_heldout") and np.nanmin(values) > 0:
            ax.set_yscale("log")
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    if keys:
        with_ref = [i for i, k in enumerate(keys) if f"ref_{k}" in reference]
        axes.ravel()[with_ref[0] if with_ref else 0].legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)
