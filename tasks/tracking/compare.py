"""``stein compare``: pipeline runs side by side (the latest of each pipeline named, or runs named by id or name),
read back from MLflow.

Everything here reads what the pipeline already logged, so the MLflow UI's compare view shows the same numbers:

- the headline metrics are the metrics of the latest FINISHED pipeline run (tag ``stein.kind=pipeline``) of the
  pipeline's experiment;
- the training rows (family, steps, seconds per epoch, final held-out MMD²) and the learning curves come from that
  run's train child; when the pipeline run reran only sample and evaluate (no train child), from the latest
  FINISHED train run that started before it, which trained the model that run evaluated;
- a learning curve pairs ``train/mmd_heldout`` with ``train/epoch`` and ``train/elapsed_seconds`` at the same
  training step (the held-out MMD² is logged only every ``heldout_every`` steps; the others every ``log_every``).

Pure functions of an ``mlflow.MlflowClient``; no Prefect, nothing written but the figure.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config.sections import ConfigError

#: The training rows, first in the table: the train run's ``stein.family`` tag and three of its metrics.
TRAIN_KEYS = ("family", "steps", "seconds_per_epoch", "final_mmd_heldout")

#: Headline metrics in the order the table shows them (a key sorts with the longest name it starts with, after
#: stripping ``ref_``); unknown keys follow alphabetically, then the bookkeeping keys.
METRIC_ORDER = (
    "mmd", "ksd", "ksd_model", "log_likelihood", "modes_covered", "weight_error", "weight",
    "fid", "kid", "inception_score", "precision", "recall", "classifier_test_accuracy",
)
BOOKKEEPING = ("n_modes", "true_weight", "n_eval", "n_checkpoints", "pipeline_seconds")

_CURVE_KEYS = {"mmd_heldout": "train/mmd_heldout", "epoch": "train/epoch", "seconds": "train/elapsed_seconds"}


@dataclass(frozen=True)
class PipelineRuns:
    """The runs a pipeline's column is read from: its latest finished pipeline run and the train run of the model
    it evaluated (None when there is none: training rows blank, no curve)."""

    pipeline: str
    run: Any  # mlflow.entities.Run
    train: Any | None
    label: str | None = None  # the column's name (default: the pipeline's)

    @property
    def name(self) -> str:
        return self.label or self.pipeline

    @property
    def train_is_child(self) -> bool:
        return self.train is not None and self.train.data.tags.get("mlflow.parentRunId") == self.run.info.run_id


@dataclass(frozen=True)
class Curve:
    """Held-out MMD² along training, one entry per step at which it was logged."""

    step: tuple[int, ...]
    epoch: tuple[float, ...]
    seconds: tuple[float, ...]
    mmd_heldout: tuple[float, ...]

    def as_dict(self) -> dict[str, list]:
        return {"step": list(self.step), "epoch": list(self.epoch), "seconds": list(self.seconds),
                "mmd_heldout": list(self.mmd_heldout)}


@dataclass(frozen=True)
class Column:
    label: str  # the column's name: the pipeline, or the run's name when runs are compared
    pipeline: str
    run_id: str
    train_run_id: str | None
    train_is_child: bool
    git_commit: str
    git_dirty: bool
    start_time: dt.datetime  # local time of the pipeline run's start
    values: dict[str, float | str]

    @property
    def header(self) -> str:
        """``<short commit>[-dirty] <start time>``: the line under the column's name."""
        commit = self.git_commit[:7] + ("-dirty" if self.git_dirty else "")
        return f"{commit} {self.start_time:%Y-%m-%d %H:%M}"


@dataclass(frozen=True)
class Table:
    """Rows ``keys`` (training rows first, then the union of the headline metrics), one column per pipeline."""

    keys: tuple[str, ...]
    columns: tuple[Column, ...]

    def cell(self, key: str, label: str) -> float | str | None:
        col = next(c for c in self.columns if c.label == label)
        return col.values.get(key)


# ------------------------------------------------------------------------------------------------ finding runs


def open_client(uri: str):
    """An ``MlflowClient`` on ``uri``; None when it names a local SQLite file that does not exist yet (opening it
    would create an empty store)."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    return MlflowClient(tracking_uri=uri)


def no_runs(pipeline: str, store: str) -> ConfigError:
    return ConfigError(store, None, f"pipeline {pipeline!r} has no finished run; run `stein run {pipeline}` first")


def _latest(client, experiment_ids: list[str], where: str):
    if not experiment_ids:
        return None
    found = client.search_runs(
        experiment_ids, filter_string=f"attributes.status = 'FINISHED' and {where}",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return found[0] if found else None


def latest_runs(client, pipeline: str, *, train_experiment: str | None = None) -> PipelineRuns:
    """The latest finished pipeline run of ``pipeline`` and the train run of its model.

    ``train_experiment`` is where the model was trained when that is another pipeline's experiment (a pipeline
    with an upstream, such as gmm2d-blindness). Raises ConfigError naming the pipeline when it has no finished run.
    """
    exp = client.get_experiment_by_name(pipeline)
    run = _latest(client, [exp.experiment_id] if exp else [], "tags.`stein.kind` = 'pipeline'")
    if run is None:
        raise no_runs(pipeline, client.tracking_uri)
    return runs_of(client, run, pipeline=pipeline, train_experiment=train_experiment)


def runs_of(client, run, *, pipeline: str, train_experiment: str | None = None, label: str | None = None) -> PipelineRuns:
    """A pipeline run and the train run of the model it evaluated: its train child, or else (it reran only sample
    and evaluate) the latest finished train run that started before it."""
    exp = client.get_experiment(run.info.experiment_id)
    train_exp = client.get_experiment_by_name(train_experiment) if train_experiment else exp
    search = list(dict.fromkeys(e.experiment_id for e in (exp, train_exp) if e is not None))
    train = _latest(client, search, f"tags.`stein.stage` = 'train' and tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    if train is None:  # this pipeline run reused a model trained before it started
        where = f"tags.`stein.stage` = 'train' and attributes.start_time <= {run.info.start_time}"
        train = _latest(client, [train_exp.experiment_id] if train_exp else [], where)
    return PipelineRuns(pipeline, run, train, label)


def find_pipeline_run(client, ref: str, experiment_ids: Sequence[str], *, pipelines: Sequence[str] = ()):
    """The pipeline run that ``ref`` names, in ``experiment_ids``: its full id, a unique prefix of at least 6
    characters of its id, or its exact name (the newest run of that name). A stage run's id names its pipeline
    run. Raises ConfigError when nothing, or more than one run, matches (``pipelines``: the known pipelines, named
    in the message)."""
    from mlflow.exceptions import MlflowException

    if len(ref) == 32 and all(ch in "0123456789abcdef" for ch in ref):
        try:
            run = client.get_run(ref)
        except MlflowException:
            run = None
        if run is not None:
            parent = run.data.tags.get("stein.pipeline_run_id")
            return client.get_run(parent) if parent and run.data.tags.get("stein.kind") != "pipeline" else run
    runs = client.search_runs(list(experiment_ids), filter_string="tags.`stein.kind` = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=50_000)
    by_name = [r for r in runs if r.info.run_name == ref]
    if by_name:
        return by_name[0]
    by_id = [r for r in runs if len(ref) >= 6 and r.info.run_id.startswith(ref)]
    if len(by_id) == 1:
        return by_id[0]
    if by_id:
        raise ConfigError("command line", "RUN", f"{len(by_id)} pipeline runs have ids starting with {ref!r}: give "
                          "more characters (`stein runs` lists them)")
    raise ConfigError("command line", "RUN", f"unknown pipeline {ref!r} (known: {', '.join(pipelines)}), and no "
                      "pipeline run has that name or id (at least 6 characters of it; `stein runs` lists them)")


# ----------------------------------------------------------------------------------------------------- table


def metric_sort_key(key: str) -> tuple:
    """Training rows, then metrics in ``METRIC_ORDER`` (each metric's value, its ``ref_`` value, then its
    ``_std`` and ``_p_value`` companions; per-sample-set suffixes such as ``_annealed`` stay with their metric),
    then unknown keys alphabetically, then the bookkeeping keys."""
    if key in TRAIN_KEYS:
        return (0, TRAIN_KEYS.index(key))
    if key in BOOKKEEPING:
        return (3, BOOKKEEPING.index(key))
    base = key.removeprefix("ref_")
    companion = 2 if "_p_value" in base else 1 if "_std" in base else 0
    matches = [name for name in METRIC_ORDER if base == name or base.startswith(name + "_")]
    if not matches:
        return (2, base, companion, key != base)
    group = max(matches, key=len)
    return (1, METRIC_ORDER.index(group), companion, key != base, base)


def collect_table(runs: Sequence[PipelineRuns]) -> Table:
    """One column per pipeline: the training rows from its train run, the metrics of its pipeline run."""
    columns = []
    for r in runs:
        values: dict[str, float | str] = {}
        if r.train is not None:
            if "stein.family" in r.train.data.tags:
                values["family"] = r.train.data.tags["stein.family"]
            values |= {k: r.train.data.metrics[k] for k in TRAIN_KEYS[1:] if k in r.train.data.metrics}
        values |= r.run.data.metrics
        tags = r.run.data.tags
        columns.append(Column(
            label=r.name, pipeline=r.pipeline, run_id=r.run.info.run_id,
            train_run_id=r.train.info.run_id if r.train is not None else None, train_is_child=r.train_is_child,
            git_commit=tags.get("stein.git_commit", "unknown"), git_dirty=tags.get("stein.git_dirty") == "true",
            start_time=dt.datetime.fromtimestamp(r.run.info.start_time / 1000),
            values=values,
        ))
    keys = sorted({k for c in columns for k in c.values}, key=metric_sort_key)
    return Table(tuple(keys), tuple(columns))


def format_value(value: float | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def format_table(table: Table) -> str:
    """The table as aligned text: the metric names on the left, each pipeline's column right-aligned under its
    name and a ``<commit> <start time>`` line."""
    cells = [[format_value(c.values.get(k)) for c in table.columns] for k in table.keys]
    label = max([len(k) for k in table.keys] + [0])
    widths = [max([len(c.label), len(c.header)] + [len(row[i]) for row in cells]) for i, c in enumerate(table.columns)]

    def line(first: str, items: Sequence[str]) -> str:
        return (f"{first:<{label}}" + "".join(f"   {s:>{w}}" for s, w in zip(items, widths))).rstrip()

    out = [line("", [c.label for c in table.columns]), line("", [c.header for c in table.columns])]
    out += [line(k, row) for k, row in zip(table.keys, cells)]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- curves


def _by_step(history) -> dict[int, float]:
    """A metric's history as step -> value; a step logged twice (a worker group resumed from a checkpoint
    repeats the steps after it) keeps its latest value."""
    return {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}


def learning_curve(client, run_id: str) -> Curve | None:
    """Held-out MMD² of a train run against step, epoch and training seconds; None when it logged none."""
    series = {name: _by_step(client.get_metric_history(run_id, key)) for name, key in _CURVE_KEYS.items()}
    steps = sorted(set(series["mmd_heldout"]) & set(series["epoch"]) & set(series["seconds"]))
    if not steps:
        return None
    return Curve(tuple(steps), *(tuple(series[name][s] for s in steps) for name in ("epoch", "seconds", "mmd_heldout")))


def collect_curves(client, runs: Sequence[PipelineRuns]) -> dict[str, Curve | None]:
    return {r.name: learning_curve(client, r.train.info.run_id) if r.train is not None else None for r in runs}


def figure_path(root: Path, labels: Sequence[str]) -> Path:
    """``plots/compare/<label1>_vs_<label2>.png``, with characters other than letters, digits, ``.-_`` as ``-``."""
    safe = ["".join(ch if ch.isalnum() or ch in ".-_" else "-" for ch in label) for label in labels]
    return root / "plots" / "compare" / ("_vs_".join(safe) + ".png")


def plot_curves(curves: Mapping[str, Curve | None], path: Path, *, labels: Mapping[str, str] | None = None) -> bool:
    """Held-out MMD² against epoch and against training seconds, one line per pipeline (log scale when every
    value is positive: an unbiased MMD² near 0 can be negative). Writes ``path`` atomically; returns False and
    writes nothing when no pipeline has a curve."""
    from tasks.stages.evaluate.plots import _pyplot, _save

    drawn = {p: c for p, c in curves.items() if c is not None}
    if not drawn:
        return False
    plt = _pyplot()
    labels = labels or {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, constrained_layout=True)
    for i, (pipeline, curve) in enumerate(curves.items()):
        if curve is None:
            continue
        style = {"color": f"C{i}", "marker": "o", "ms": 3, "lw": 1.5, "label": labels.get(pipeline, pipeline)}
        axes[0].plot(curve.epoch, curve.mmd_heldout, **style)
        axes[1].plot(curve.seconds, curve.mmd_heldout, **style)
    positive = all(v > 0 for c in drawn.values() for v in c.mmd_heldout)
    for ax, xlabel in zip(axes, ("epoch", "training wall-clock seconds")):
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
        if positive:
            ax.set_yscale("log")
        else:
            ax.axhline(0.0, color="0.5", lw=0.8)
    axes[0].set_ylabel("held-out MMD² (IMQ kernel)")
    axes[0].set_title("against epochs")
    axes[1].set_title("against training time")
    axes[0].legend(fontsize=8)
    missing = [p for p, c in curves.items() if c is None]
    note = f"  (no held-out MMD logged: {', '.join(missing)})" if missing else ""
    fig.suptitle(f"held-out MMD² during training: {' vs '.join(curves)}{note}")
    _save(fig, path)
    return True


def curve_label(table: Table, label: str) -> str:
    """``ring8-agd (agd, 3000 steps)``: a legend entry that says what was trained."""
    family, steps = table.cell("family", label), table.cell("steps", label)
    details = ", ".join(s for s in (family, f"{format_value(steps)} steps" if steps is not None else None) if s)
    return f"{label} ({details})" if details else label


# ------------------------------------------------------------------------------------------------------ output


def as_dict(table: Table, curves: Mapping[str, Curve | None], figure: Path | None) -> dict[str, Any]:
    """Everything ``stein compare --json`` prints, keyed by column (the pipeline's name, or the run's name when
    runs are compared): the run ids, the table as {column: {key: value}} (keys absent where a column lacks them),
    the row order, the curves and the figure's path (None when not drawn)."""
    return {
        "pipelines": [c.label for c in table.columns],
        "rows": list(table.keys),
        "runs": {
            c.label: {
                "pipeline": c.pipeline, "run_id": c.run_id, "train_run_id": c.train_run_id, "train_is_child": c.train_is_child,
                "git_commit": c.git_commit, "git_dirty": c.git_dirty, "start_time": c.start_time.isoformat(),
            }
            for c in table.columns
        },
        "metrics": {c.label: dict(c.values) for c in table.columns},
        "curves": {p: c.as_dict() if c is not None else None for p, c in curves.items()},
        "figure": str(figure) if figure is not None else None,
    }
