"""``stein runs`` and ``stein compare``: the pipeline runs in the MLflow store, listed and side by side.

Only click at module level: ``stein --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from flows.cli.common import _fail, _setup
from tasks.config.sections import ConfigError


def _client(root: Path, what: str):
    """The MLflow client of the project's store; exits 2 when the store does not exist yet (nothing has run)."""
    from tasks.tracking import compare as cmp
    from tasks.tracking.log import tracking_uri

    uri = tracking_uri(root)
    client = cmp.open_client(uri)
    if client is None:
        _fail(ConfigError(uri, None, f"no MLflow store yet: run `stein run {what}` first"))
    return client


@click.command()
@click.argument("pipeline", required=False)
@click.option("--last", type=click.IntRange(1, 10_000), default=10, show_default=True,
              help="How many of the newest pipeline runs to show, per pipeline.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: every run with all its params and metrics.")
def runs(pipeline: str | None, last: int, as_json: bool) -> None:
    """List the recent pipeline runs of PIPELINE (default: every pipeline), newest first.

    One table per pipeline: the run's name, id, status and start, the params that differ between the runs listed
    (all params are the pipeline's config, `sample.eps` and so on) and the headline metrics. A run marked * is
    cached: no stage ran (DVC found nothing changed, or restored the outputs from its run cache). Compare runs
    with `stein compare RUN RUN` (names or ids), or in the MLflow UI (`stein ui`).
    """
    root = _setup()
    from flows.registry import PIPELINES, get_pipeline
    from tasks.tracking.runs import differing_params, format_runs, recent_runs, recent_runs_sqlite, sqlite_store
    from tasks.tracking.log import tracking_uri

    try:
        pipelines = [get_pipeline(pipeline).name] if pipeline else list(PIPELINES)
    except ConfigError as exc:
        _fail(exc)
    db = sqlite_store(tracking_uri(root))
    rows = None
    if db is not None and db.is_file():  # the project's own store: read directly, without importing MLflow
        import sqlite3

        with contextlib.suppress(sqlite3.Error):  # a schema this reader does not know: ask MLflow instead
            rows = recent_runs_sqlite(db, pipelines, last=last)
    if rows is None:
        rows = recent_runs(_client(root, pipeline or ""), pipelines, last=last)
    if as_json:
        by_pipeline = {p: [r for r in rows if r.pipeline == p] for p in dict.fromkeys(r.pipeline for r in rows)}
        click.echo(json.dumps({"runs": [r.as_dict() for r in rows],
                               "differing_params": {p: differing_params(rs) for p, rs in by_pipeline.items()}}))
        return
    if not rows:
        click.echo(f"no pipeline runs yet{f' of {pipeline!r}' if pipeline else ''}: `stein run {pipeline or ''}`".rstrip())
        return
    click.echo(format_runs(rows))


@click.command()
@click.argument("refs", nargs=-1, required=True, metavar="RUN|PIPELINE...")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (runs, metrics, curves, figure) instead of the table.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the figure here (default plots/compare/<a>_vs_<b>.png).")
def compare(refs: tuple[str, ...], as_json: bool, out: Path | None) -> None:
    """Compare pipeline runs side by side: each argument a pipeline (its latest finished run), or a run's name or
    id (`stein runs` lists them); e.g. `stein compare ring8-agd ring8-mmd` or `stein compare eps-small eps-large`.

    Prints the headline metrics of each run, one column each, with the training rows (family, steps, seconds per
    epoch, final held-out MMD²) of the run that trained its model; draws their held-out MMD² learning curves
    against epochs and training seconds. The numbers are read from the MLflow store, so `stein ui` shows the same.
    """
    root = _setup()
    from flows.registry import PIPELINES, get_pipeline
    from tasks.tracking import compare as cmp

    refs = tuple(dict.fromkeys(refs))
    client = _client(root, refs[0] if refs[0] in PIPELINES else "")
    try:
        runs_ = []
        for ref in refs:
            if ref in PIPELINES:
                spec = get_pipeline(ref)
                runs_.append(cmp.latest_runs(client, spec.name, train_experiment=spec.upstream))
                continue
            experiments = [e.experiment_id for e in (client.get_experiment_by_name(p) for p in PIPELINES) if e]
            run = cmp.find_pipeline_run(client, ref, experiments, pipelines=list(PIPELINES))
            spec = get_pipeline(run.data.tags.get("stein.pipeline", ""))
            runs_.append(cmp.runs_of(client, run, pipeline=spec.name, train_experiment=spec.upstream,
                                     label=run.info.run_name))
    except ConfigError as exc:
        _fail(exc)
    labels = [r.name for r in runs_]
    if len(set(labels)) < len(labels):  # the same name twice (two pipelines' runs, or a run and its pipeline)
        runs_ = [cmp.PipelineRuns(r.pipeline, r.run, r.train, f"{r.name} {r.run.info.run_id[:6]}") for r in runs_]
        labels = [r.name for r in runs_]
    table = cmp.collect_table(runs_)
    curves = cmp.collect_curves(client, runs_)
    path = (out or cmp.figure_path(root, labels)).resolve()
    drawn = cmp.plot_curves(curves, path, labels={p: cmp.curve_label(table, p) for p in labels})
    if as_json:
        click.echo(json.dumps(cmp.as_dict(table, curves, path if drawn else None)))
        return
    click.echo(cmp.format_table(table))
    click.echo()
    for col in table.columns:
        if col.train_run_id is None:
            click.echo(f"{col.label}: no finished train run: training rows blank, no learning curve")
        elif not col.train_is_child:
            click.echo(f"{col.label}: its pipeline run reused a model; training rows and curve from train run {col.train_run_id[:8]}")
    no_curve = [p for p, c in curves.items() if c is None]
    if no_curve:
        click.echo(f"no held-out MMD² logged for {', '.join(no_curve)} (train.heldout_every is 0 or the family has no live model)")
    if drawn:
        click.echo(f"wrote {path.relative_to(root) if path.is_relative_to(root) else path}")
    else:
        click.echo("no learning curves to draw: no figure written")
    click.echo("MLflow UI: `stein ui`, tick the runs in the run table and click Compare (the curves are on the train "
               "child runs)")
