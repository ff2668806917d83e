"""Goodness-of-fit test of a dataset (Parquet) against a named target density: ``stein gof``.

KSD with a Rademacher wild bootstrap (Liu, Lee & Jordan 2016; Chwialkowski, Strathmann & Gretton 2016),
maxSKSD with the slice directions optimised on one half of the data and the test run on the other
(Gong, Li & Hernández-Lobato 2021), or the noise-smoothed KSD over a ladder of noise levels, both sides
convolved with the same Gaussian noise (Wenliang & Kanagawa, arXiv:2008.10087), which sees the mixing
proportions of far-apart modes that the plain KSD is blind to. All come from ``stein_core``; this module only
reads the data and picks the target's score (and its noise-perturbed score) and the kernel.

Targets: ``std_normal`` and ``std_laplace`` in the data's dimension, or the name of a pipeline whose prepare
section draws a Gaussian mixture (``conf/<name>.yaml``, ``source: mixture`` or ``ring``; ``gmm2d``: weights
0.8/0.2 at ±(5, 5)), the mixture its data are drawn from, with its weights optionally replaced (``weights``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tasks.config.sections import ConfigError, load_yaml
from tasks.data.io import read_dataset

Target = Literal["std_normal", "std_laplace"]
STD_TARGETS: tuple[str, ...] = ("std_normal", "std_laplace")
Test = Literal["ksd", "sksd", "ksd_smoothed"]

_CLI = "command line"


def target_score(name: Target) -> Callable:
    """Score of the named target in the data's dimension: N(0, I) gives -x, the i.i.d. standard Laplace
    gives -sign(x) (its density exp(-|x|)/2 is differentiable everywhere but at 0)."""
    import torch

    scores = {"std_normal": lambda x: -x, "std_laplace": lambda x: -torch.sign(x)}
    if name not in scores:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(scores)}")
    return scores[name]


def laplace_perturbed_score(x, sigma: float):
    """Score of the i.i.d. standard Laplace convolved with N(0, σ² I), per coordinate, in closed form.

    With Φ the standard normal CDF, the convolved density of one coordinate is
    p_σ(x) = ½ e^{σ²/2} [e^{−x} Φ(x/σ − σ) + e^{x} Φ(−x/σ − σ)]. Differentiating, the two terms in φ cancel
    (e^{−x} φ(x/σ − σ) = e^{x} φ(−x/σ − σ) = e^{−x²/(2σ²) − σ²/2} / √(2π)), leaving

        s_σ(x) = (e^{B} − e^{A}) / (e^{A} + e^{B}) = tanh(x + ½ [log Φ(−x/σ − σ) − log Φ(x/σ − σ)]),

    with A = −x + log Φ(x/σ − σ) and B = x + log Φ(−x/σ − σ), computed with ``log_ndtr`` (no overflow in the
    tails). σ = 0 gives −sign(x), the Laplace's own score."""
    import torch

    if sigma == 0.0:
        return -torch.sign(x)
    log_ndtr = torch.special.log_ndtr
    return torch.tanh(x + 0.5 * (log_ndtr(-x / sigma - sigma) - log_ndtr(x / sigma - sigma)))


def _std_perturbed_score(name: str) -> Callable:
    """Score of the named standard target convolved with N(0, σ² I): N(0, (1 + σ²) I) for the normal."""
    if name == "std_normal":
        return lambda x, sigma: -x / (1.0 + sigma * sigma)
    return laplace_perturbed_score


@dataclass(frozen=True)
class GofTarget:
    """A resolved target: its score, the score of its convolution with N(0, σ² I), and for a mixture its
    dimension and weights (None for the standard targets, which take the data's dimension)."""

    name: str
    score: Callable
    perturbed_score: Callable
    dim: int | None = None
    weights: list[float] | None = None


def mixture_targets(root: Path) -> list[str]:
    """The pipelines whose prepare section draws a Gaussian mixture (``conf/<name>.yaml`` with ``prepare.source``
    ``mixture`` or ``ring``), by name."""
    names = []
    for path in sorted((Path(root) / "conf").glob("*.yaml")):
        try:
            prepare = load_yaml(path).get("prepare")
        except ConfigError:
            continue
        if isinstance(prepare, dict) and prepare.get("source") in ("mixture", "ring"):
            names.append(path.stem)
    return names


def _check_weights(weights: Sequence[float], n_components: int, name: str) -> list[float]:
    w = [float(v) for v in weights]
    if len(w) != n_components:
        raise ConfigError(_CLI, "--weights", f"{len(w)} weights for the {n_components} components of the mixture of {name}")
    if not all(math.isfinite(v) and v > 0 for v in w) or abs(sum(w) - 1.0) > 1e-6:
        raise ConfigError(_CLI, "--weights", f"weights must be positive and sum to 1, got {w}")
    return w


def resolve_target(name: str, *, weights: Sequence[float] | None = None, root: str | Path | None = None) -> GofTarget:
    """The target named ``name``: a standard one (``std_normal``, ``std_laplace``) or a pipeline whose prepare
    section draws a Gaussian mixture, read and validated from ``<root>/conf/<name>.yaml`` (``root``: the project
    root); ``weights`` replaces the mixture's weights (positive, summing to 1, one per component). Bad names and
    weights raise :class:`ConfigError` naming ``--target`` or ``--weights``; a bad config names its file and key."""
    if name in STD_TARGETS:
        if weights is not None:
            raise ConfigError(_CLI, "--weights", f"--weights re-weights the components of a mixture target; "
                              f"{name} has none")
        return GofTarget(name, target_score(name), _std_perturbed_score(name))
    from pydantic import BaseModel, ConfigDict

    from tasks.config.pipelines import PrepareSection
    from tasks.config.sections import ImagePrepare, load_config
    from tasks.infra.runtime import project_root

    root = Path(root) if root is not None else project_root()
    path = root / "conf" / f"{name}.yaml"
    if "/" in name or name.startswith(".") or not path.is_file():
        known = ", ".join([*STD_TARGETS, *mixture_targets(root)])
        raise ConfigError(_CLI, "--target", f"unknown target {name!r}; known: {known} (a pipeline name stands for "
                          "the Gaussian mixture its prepare section draws)")

    class _Prepare(BaseModel):  # the prepare section alone, validated as the pipeline validates it
        model_config = ConfigDict(extra="ignore")
        prepare: PrepareSection | None = None

    prepare = load_config(path, _Prepare).prepare
    if prepare is None or isinstance(prepare, ImagePrepare):
        what = (f"draws images ({prepare.source})" if prepare is not None
                else "is missing (a pipeline that reuses another's data: name that one)")
        raise ConfigError(_CLI, "--target", f"the prepare section of {name} {what}, not a Gaussian mixture; mixture "
                          f"targets: {', '.join(mixture_targets(root))}")
    from stein_core.distributions import GaussianMixture
    from tasks.stages.prepare import mixture_spec

    spec = mixture_spec(prepare)
    w = _check_weights(weights, len(spec["weights"]), name) if weights is not None else list(spec["weights"])
    mixture = GaussianMixture(w, spec["means"], spec["stds"])
    return GofTarget(name, mixture.score, mixture.perturbed_score, dim=mixture.dim, weights=w)


#: The most rows a test takes: its [n, n] float64 kernel matrix is then 3.2 GB.
MAX_ROWS = 20_000


def _check_sigmas(test: str, sigmas: Sequence[float] | None) -> list[float] | None:
    if test != "ksd_smoothed":
        if sigmas is not None:
            raise ConfigError(_CLI, "--sigmas", f"--sigmas sets the noise levels of --test ksd_smoothed, not of {test}")
        return None
    if not sigmas:
        raise ConfigError(_CLI, "--sigmas", "--test ksd_smoothed needs its noise levels, e.g. --sigmas 5,10 (levels "
                          "comparable to the distance between the modes; 0 is the plain KSD)")
    s = [float(v) for v in sigmas]
    if not all(math.isfinite(v) and v >= 0 for v in s):
        raise ConfigError(_CLI, "--sigmas", f"noise levels must be finite and >= 0, got {s}")
    if len(set(s)) != len(s):
        raise ConfigError(_CLI, "--sigmas", f"a noise level is listed twice: {s}")
    return s


def goodness_of_fit(
    data: str | Path,
    *,
    target: str = "std_normal",
    test: Test = "ksd",
    kernel: Literal["imq", "rbf"] = "imq",
    n_bootstrap: int = 500,
    alpha: float = 0.05,
    seed: int = 0,
    max_samples: int | None = None,
    weights: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    root: str | Path | None = None,
) -> dict:
    """Test H0: the rows of ``data`` (column ``x``) are i.i.d. draws from ``target`` (see :func:`resolve_target`;
    ``weights`` re-weights a mixture target). ``test="ksd_smoothed"`` needs ``sigmas``, the noise levels: its
    statistic is the studentized sum over the levels of the KSD² U-statistics of the noised data against the
    noised target (``stein_core.tests_stat.ksd_smoothed_test``), with the kernel's length scale widened to
    sqrt(ℓ² + σ²) at each level (IMQ c = 1, or the median-heuristic RBF bandwidth of the data)."""
    import torch

    from stein_core.discrepancies import median_rbf, smoothed_kernels
    from stein_core.kernels import IMQ
    from stein_core.tests_stat import ksd_smoothed_test, ksd_test, sksd_test

    levels = _check_sigmas(test, sigmas)
    tgt = resolve_target(target, weights=weights, root=root)
    ds = read_dataset(data)
    if len(ds) < 4:
        raise ConfigError(data, "x", f"a goodness-of-fit test needs at least 4 rows, found {len(ds)}")
    if tgt.dim is not None and ds.x.shape[1] != tgt.dim:
        raise ConfigError(data, "x", f"rows of dimension {ds.x.shape[1]}; the target {target} is {tgt.dim}-dimensional")
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(ds.x).double()
    if max_samples is not None and len(x) > max_samples:
        x = x[torch.randperm(len(x), generator=gen)[:max_samples]]
    if len(x) > MAX_ROWS:
        raise ConfigError(data, "x", f"{len(x):,} rows: the test holds [n, n] float64 matrices "
                                     f"({8 * len(x) ** 2 / 2**30:.0f} GiB each); test at most {MAX_ROWS:,} "
                                     f"(--max-samples draws a random subset)")
    extra: dict = {}
    try:
        if test == "ksd":
            k = IMQ(c=1.0, beta=-0.5) if kernel == "imq" else median_rbf(x)
            result = ksd_test(x, tgt.score, k, n_bootstrap=n_bootstrap, generator=gen, alpha=alpha)
        elif test == "sksd":
            # maxSKSD slices the kernel input to one dimension; an RBF with a per-slice median bandwidth is the
            # paper's choice, an IMQ works on the projections as well.
            k = IMQ(c=1.0, beta=-0.5) if kernel == "imq" else median_rbf
            result = sksd_test(x, tgt.score, k, variant="g", n_bootstrap=n_bootstrap, generator=gen, alpha=alpha)
        else:
            base = IMQ(c=1.0, beta=-0.5) if kernel == "imq" else median_rbf(x)
            result = ksd_smoothed_test(x, tgt.perturbed_score, smoothed_kernels(base, levels), levels,
                                       n_bootstrap=n_bootstrap, generator=gen, alpha=alpha)
            extra = {"sigmas": levels, "weighting": "studentized",
                     "ksd_per_sigma": [float(v) for v in result.per_sigma]}
    except ValueError as exc:  # the data admit no test: every point the same, a non-finite statistic
        raise ConfigError(data, "x", str(exc)) from None
    return {
        "test": test,
        "target": target,
        **({"weights": tgt.weights} if tgt.weights is not None else {}),
        "kernel": kernel,
        "statistic": float(result.statistic),
        "p_value": float(result.p_value),
        "reject": bool(result.reject),
        "alpha": alpha,
        # the rows the statistic was computed on: all of them for KSD, the tested half for maxSKSD (the other half
        # chose the slice directions); n_used is every row read (after max_samples)
        "n": int(result.n) if test == "sksd" else int(x.shape[0]),
        "n_used": int(x.shape[0]),
        "d": int(x.shape[1]),
        "n_bootstrap": n_bootstrap,
        **extra,
        "data": str(data),
    }
