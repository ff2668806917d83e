"""Evaluate stage of a sweep: the held-out log-likelihood of every cell's model and of the true model, the metrics
``ll_<method>_d<D>`` / ``ll_true_d<D>`` and the table method × D (CSV, Markdown, PNG)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tasks.config.sweep import SweepConfig, SweepPaths, cell_name
from tasks.data.io import atomic_path, read_dataset


def cell_log_likelihoods(cfg: SweepConfig, sp: SweepPaths) -> list[dict]:
    """Mean held-out log-likelihood (nats per point) of every cell's model and of the true W on the cell's test
    set: rows ``{method, dim, seed, ll}`` with method ``true`` for the truth."""
    import torch

    from stein_core.ica import ICAModel, true_log_likelihood
    from tasks.data.io import load_checkpoint
    from tasks.families.base import build_from_checkpoint

    rows = []
    for d in cfg.prepare.dims:
        for s in cfg.prepare.seeds:
            ds = read_dataset(sp.test(d, s))
            ica = ds.metadata["ica"]
            x = torch.from_numpy(ds.x).double()
            w = torch.tensor(ica["mixing"], dtype=torch.float64)
            chunks = lambda: torch.split(x, cfg.evaluate.batch_size)  # noqa: E731
            truth = torch.cat([true_log_likelihood(c, w, source=ica["sources"], dof=ica["dof"]) for c in chunks()])
            rows.append({"method": "true", "dim": d, "seed": s, "ll": float(truth.mean())})
            for method in cfg.methods:
                path = sp.model(method, d, s)
                model = build_from_checkpoint(load_checkpoint(path), "model", (ICAModel,)).double()
                with torch.no_grad():
                    ll = torch.cat([model.log_prob(c) for c in chunks()])
                if not torch.isfinite(ll).all():
                    raise FloatingPointError(f"{path}: the model's held-out log-likelihood is not finite (a singular "
                                             "unmixing matrix?)")
                rows.append({"method": method, "dim": d, "seed": s, "ll": float(ll.mean())})
    return rows


def summarise(cfg: SweepConfig, rows: list[dict]) -> tuple[dict[str, float], list[dict]]:
    """The metrics ``ll_<method>_d<D>`` and ``ll_true_d<D>`` (means over seeds) and the table rows
    ``{method, dim, mean, std, n}`` (std over seeds, 0 for one seed)."""
    import statistics

    metrics, table = {}, []
    for method in [*cfg.methods, "true"]:
        for d in cfg.prepare.dims:
            lls = [r["ll"] for r in rows if r["method"] == method and r["dim"] == d]
            mean = statistics.fmean(lls)
            std = statistics.stdev(lls) if len(lls) > 1 else 0.0
            metrics[f"ll_{method}_d{d}"] = mean
            table.append({"method": method, "dim": d, "mean": mean, "std": std, "n": len(lls)})
    return metrics, table


def write_table(table: list[dict], out: Path, *, title: str) -> list[Path]:
    """The table method × D as ``table.csv`` (long form), ``table.md`` (mean ± std, the truth as the last row) and
    ``table.png`` (log-likelihood per dimension against D per method, the gap to the truth beside)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.data.io import write_rows

    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "table.csv", table)
    dims = sorted({r["dim"] for r in table})
    methods = list(dict.fromkeys(r["method"] for r in table))
    cell = {(r["method"], r["dim"]): r for r in table}
    fmt = lambda r: f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if r["n"] > 1 else "")  # noqa: E731
    lines = ["Held-out log-likelihood per data point (nats; mean ± std over seeds); `true`: the data's own W.", "",
             "| method | " + " | ".join(f"D = {d}" for d in dims) + " |", "|---|" + "---|" * len(dims)]
    lines += [f"| {m} | " + " | ".join(fmt(cell[m, d]) for d in dims) + " |" for m in methods]
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in methods:  # per dimension: the totals fall linearly with D and would hide the methods' differences
        means = [cell[m, d]["mean"] / d for d in dims]
        stds = [cell[m, d]["std"] / d for d in dims]
        style = {"color": "black", "linestyle": "--"} if m == "true" else {"marker": "o"}
        axes[0].errorbar(dims, means, yerr=stds, label=m, capsize=3, **style)
        if m != "true":
            gaps = [cell["true", d]["mean"] - cell[m, d]["mean"] for d in dims]
            axes[1].plot(dims, gaps, marker="o", label=m)
    axes[0].set(xlabel="dimension D", ylabel="held-out log-likelihood per point and dimension (nats)", title=title)
    axes[1].set(xlabel="dimension D", ylabel="true W's log-likelihood minus the model's (nats)",
                title="gap to the true model (lower is better)")
    axes[1].set_yscale("symlog", linthresh=0.1)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(out / "table.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return [out / "table.csv", out / "table.md", out / "table.png"]


def write_metrics(path: Path, metrics: dict[str, float]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def log_cells(client, experiment_ids: list[str], pipeline: str, rows: list[dict]) -> None:
    """Each cell's held-out log-likelihood into its MLflow run (the latest run tagged with the cell), so that the
    cells compare side by side in the UI."""
    for r in rows:
        if r["method"] == "true":
            continue
        cell = f"{r['method']}/{cell_name(r['dim'], r['seed'])}"
        found = client.search_runs(experiment_ids, f"tags.`stein.cell` = '{cell}' and tags.`stein.pipeline` = "
                                   f"'{pipeline}'", order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            client.log_metric(found[0].info.run_id, "heldout_log_likelihood", r["ll"], timestamp=int(time.time() * 1000))
            truth = next(t["ll"] for t in rows if t["method"] == "true" and t["dim"] == r["dim"] and t["seed"] == r["seed"])
            client.log_metric(found[0].info.run_id, "true_log_likelihood", truth, timestamp=int(time.time() * 1000))
