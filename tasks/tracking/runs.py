"""``stein runs``: the recent pipeline runs, read back from MLflow, with what differs between them.

A pipeline run (tag ``stein.kind=pipeline``) carries its pipeline's whole config as flat params and the headline
metrics (:mod:`tasks.tracking.log`), so a table of recent runs needs no other source: per pipeline, the params whose
values differ between the listed runs (the rest are the same everywhere and only add width) and the headline
metrics, the way the MLflow UI's run table shows them once those columns are ticked.

Two readers return the same rows: :func:`recent_runs` through an ``mlflow.MlflowClient`` (any store, a tracking
server included), and :func:`recent_runs_sqlite`, which reads a local SQLite store's tables directly, read-only.
Importing MLflow and opening its SQLAlchemy store costs 3-6 s before the first query; the direct read answers in
a few milliseconds, so ``stein runs`` on the project's own store takes about as long as ``dvc status``. A test
holds the two readers to identical results. Nothing is written.
"""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.tracking.compare import BOOKKEEPING, METRIC_ORDER, format_value, metric_sort_key


@dataclass(frozen=True)
class RunRow:
    """One pipeline run as ``stein runs`` shows it."""

    pipeline: str
    run_id: str
    name: str
    status: str
    start_time: dt.datetime  # local time
    cached: bool  # no stage ran: every output was unchanged or restored from DVC's run cache
    stages_run: tuple[str, ...]
    model_version: str | None
    params: dict[str, str]
    metrics: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "run_id": self.run_id, "name": self.name, "status": self.status,
                "start_time": self.start_time.isoformat(), "cached": self.cached, "stages_run": list(self.stages_run),
                "model_version": self.model_version, "params": dict(self.params), "metrics": dict(self.metrics)}


def _row_of(pipeline: str, run_id: str, name: str | None, status: str, start_ms: int, tags: dict[str, str],
            params: dict[str, str], metrics: dict[str, float]) -> RunRow:
    return RunRow(
        pipeline=pipeline, run_id=run_id, name=name or run_id, status=status,
        start_time=dt.datetime.fromtimestamp(start_ms / 1000), cached=tags.get("stein.cached") == "true",
        stages_run=tuple(s for s in tags.get("stein.stages_run", "").split(",") if s),
        model_version=tags.get("stein.model"), params=params, metrics=metrics,
    )


def recent_runs(client, pipelines: Sequence[str], *, last: int) -> list[RunRow]:
    """The ``last`` newest pipeline runs of each of ``pipelines`` (whose experiment exists), newest first."""
    rows: list[RunRow] = []
    for pipeline in pipelines:
        exp = client.get_experiment_by_name(pipeline)
        if exp is None:
            continue
        found = client.search_runs([exp.experiment_id], filter_string="tags.`stein.kind` = 'pipeline'",
                                   order_by=["attributes.start_time DESC"], max_results=last)
        rows += [_row_of(pipeline, r.info.run_id, r.info.run_name, r.info.status, r.info.start_time,
                         dict(r.data.tags), dict(r.data.params), dict(r.data.metrics)) for r in found]
    return rows


def sqlite_store(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for any other store)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def experiments_sqlite(db: Path) -> dict[str, str]:
    """The active experiments of a SQLite store, name -> id, read directly (read-only)."""
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {name: str(eid) for eid, name in con.execute(
            "SELECT experiment_id, name FROM experiments WHERE lifecycle_stage = 'active'")}
    finally:
        con.close()


def recent_runs_sqlite(db: Path, pipelines: Sequence[str], *, last: int) -> list[RunRow]:
    """:func:`recent_runs` read straight from MLflow's SQLite tables (``experiments``, ``runs``, ``tags``,
    ``params``, ``latest_metrics``), opened read-only: the active runs tagged ``stein.kind=pipeline``, newest
    first (ties by run id, as MLflow orders them), each with its latest metric values."""
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows: list[RunRow] = []
        for pipeline in pipelines:
            exp = con.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                              (pipeline,)).fetchone()
            if exp is None:
                continue
            found = con.execute(
                "SELECT r.run_uuid, r.name, r.status, r.start_time FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' AND t.key = 'stein.kind' "
                "AND t.value = 'pipeline' ORDER BY r.start_time DESC, r.run_uuid ASC LIMIT ?", (exp[0], last),
            ).fetchall()
            for run_id, name, status, start in found:
                tags = dict(con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))
                params = dict(con.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))
                metrics = {k: math.nan if is_nan else float(v) for k, v, is_nan in con.execute(
                    "SELECT key, value, is_nan FROM latest_metrics WHERE run_uuid = ?", (run_id,))}
                rows.append(_row_of(pipeline, run_id, name, status, start, tags, params, metrics))
        return rows
    finally:
        con.close()


def differing_params(rows: Sequence[RunRow]) -> list[str]:
    """The param keys whose value is not the same in every row (a key absent from a row counts as a value)."""
    keys = sorted({k for r in rows for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in rows}) > 1]


def headline_keys(rows: Sequence[RunRow]) -> list[str]:
    """The metrics a reader compares first: those named in :data:`tasks.tracking.compare.METRIC_ORDER` (with per-sample-set
    suffixes), without their reference (``ref_``), spread (``_std``) and p-value companions and bookkeeping."""
    keys = {k for r in rows for k in r.metrics if k not in BOOKKEEPING and not k.startswith("ref_")
            and "_std" not in k and "_p_value" not in k}
    known = [k for k in keys if any(k == m or k.startswith(m + "_") for m in METRIC_ORDER)]
    return sorted(known, key=metric_sort_key)


def format_runs(rows: Sequence[RunRow]) -> str:
    """One table per pipeline: name, status, start, the differing params, the headline metrics."""
    blocks = []
    for pipeline in dict.fromkeys(r.pipeline for r in rows):
        mine = [r for r in rows if r.pipeline == pipeline]
        params, metrics = differing_params(mine), headline_keys(mine)
        header = ["run", "id", "status", "started", *params, *metrics]
        body = [[r.name + (" *" if r.cached else ""), r.run_id[:8], r.status, f"{r.start_time:%Y-%m-%d %H:%M}",
                 *(r.params.get(k, "") for k in params), *(format_value(r.metrics.get(k)) for k in metrics)]
                for r in mine]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        text = ["  ".join(f"{c:<{w}}" if i < 4 + len(params) else f"{c:>{w}}" for i, (c, w) in
                          enumerate(zip(row, widths))).rstrip() for row in [header, *body]]
        same = "" if params else " (all params equal)"
        blocks.append(f"{pipeline}: {len(mine)} run(s){same}\n" + "\n".join("  " + t for t in text))
    footer = ["* cached: no stage ran (unchanged, or restored from DVC's run cache): no new result"] \
        if any(r.cached for r in rows) else []
    return "\n\n".join(blocks + footer)
