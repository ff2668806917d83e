"""Goodness-of-fit test of a dataset (Parquet) against a named target density: ``stein gof``.

KSD with a Rademacher wild bootstrap (Liu, Lee & Jordan 2016; Chwialkowski, Strathmann & Gretton 2016), or
maxSKSD with the slice directions optimised on one half of the data and the test run on the other
(Gong, Li & Hernández-Lobato 2021). Both come from ``stein_core``; this module only reads the data and picks
the target's score and the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from tasks.config.sections import ConfigError
from tasks.data.io import read_dataset

Target = Literal["std_normal", "std_laplace"]


def target_score(name: Target) -> Callable:
    """Score of the named target in the data's dimension: N(0, I) gives -x, the i.i.d. standard Laplace
    gives -sign(x) (its density exp(-|x|)/2 is differentiable everywhere but at 0)."""
    import torch

    scores = {"std_normal": lambda x: -x, "std_laplace": lambda x: -torch.sign(x)}
    if name not in scores:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(scores)}")
    return scores[name]


#: The most rows a test takes: its [n, n] float64 kernel matrix is then 3.2 GB.
MAX_ROWS = 20_000


def goodness_of_fit(
    data: str | Path,
    *,
    target: Target = "std_normal",
    test: Literal["ksd", "sksd"] = "ksd",
    kernel: Literal["imq", "rbf"] = "imq",
    n_bootstrap: int = 500,
    alpha: float = 0.05,
    seed: int = 0,
    max_samples: int | None = None,
) -> dict:
    """Test H0: the rows of ``data`` (column ``x``) are i.i.d. draws from ``target``."""
    import torch

    from stein_core.discrepancies import median_rbf
    from stein_core.kernels import IMQ
    from stein_core.tests_stat import ksd_test, sksd_test

    ds = read_dataset(data)
    if len(ds) < 4:
        raise ConfigError(data, "x", f"a goodness-of-fit test needs at least 4 rows, found {len(ds)}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(ds.x).double()
    if max_samples is not None and len(x) > max_samples:
        x = x[torch.randperm(len(x), generator=gen)[:max_samples]]
    if len(x) > MAX_ROWS:
        raise ConfigError(data, "x", f"{len(x):,} rows: the test holds [n, n] float64 matrices "
                                     f"({8 * len(x) ** 2 / 2**30:.0f} GiB each); test at most {MAX_ROWS:,} "
                                     f"(--max-samples draws a random subset)")
    score = target_score(target)
    try:
        if test == "ksd":
            k = IMQ(c=1.0, beta=-0.5) if kernel == "imq" else median_rbf(x)
            result = ksd_test(x, score, k, n_bootstrap=n_bootstrap, generator=gen, alpha=alpha)
        else:
            # maxSKSD slices the kernel input to one dimension; an RBF with a per-slice median bandwidth is the
            # paper's choice, an IMQ works on the projections as well.
            k = IMQ(c=1.0, beta=-0.5) if kernel == "imq" else median_rbf
            result = sksd_test(x, score, k, variant="g", n_bootstrap=n_bootstrap, generator=gen, alpha=alpha)
    except ValueError as exc:  # the data admit no test: every point the same, a non-finite statistic
        raise ConfigError(data, "x", str(exc)) from None
    return {
        "test": test,
        "target": target,
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
        "data": str(data),
    }
