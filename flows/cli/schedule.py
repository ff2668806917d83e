"""``stein schedule`` and ``stein worker``: pipelines on a cron schedule, run by a Prefect process worker.

Only click and the standard library are imported here at module level (``stein --help`` stays fast); the Prefect
side lives in :mod:`flows.schedule`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import click

from flows.cli.common import _fail, _setup


def _when(dt) -> str:
    return dt.astimezone().strftime("%Y-%m-%d %H:%M %Z") if dt is not None else "-"


def _show(info) -> str:
    state = "paused" if info.paused else "active"
    cron = f"{info.cron!r} ({info.timezone})" if info.cron else "no schedule"
    nxt = _when(info.next_run) if info.next_run or info.paused else "not yet scheduled (the server adds runs within seconds)"
    return (f"{info.name}: pipeline {info.pipeline}, cron {cron}, {state}, next run {nxt}, "
            f"pool {info.pool}, at most {info.concurrency_limit or '-'} run at a time, project {info.project}")


@click.command()
@click.argument("pipeline", required=False)
@click.option("--cron", metavar="EXPR", help='When to run, as a cron expression: "0 2 * * *" is 02:00 every day.')
@click.option("--timezone", default="UTC", show_default=True, metavar="TZ",
              help="IANA time zone the cron expression is read in (e.g. Europe/Berlin).")
@click.option("--name", metavar="NAME", help="Deployment name (default: the pipeline's name).")
@click.option("--pool", metavar="POOL", default=None,
              help="Process work pool to deploy to (default: stein; created if missing).")
@click.option("--list", "list_", is_flag=True, help="List the schedules on the server and their next run.")
@click.option("--pause", metavar="NAME", help="Pause a schedule: no runs until --resume.")
@click.option("--resume", metavar="NAME", help="Resume a paused schedule.")
@click.option("--delete", metavar="NAME", help="Delete a schedule and its scheduled runs.")
def schedule(pipeline: str | None, cron: str | None, timezone: str, name: str | None, pool: str | None,
             list_: bool, pause: str | None, resume: str | None, delete: str | None) -> None:
    """Run PIPELINE on a cron schedule: a Prefect deployment of the pipeline flow in a process work pool.

    \b
      stein schedule gmm2d --cron "0 2 * * *"     every day at 02:00 UTC
      stein schedule --list                       schedules, their state and next run
      stein schedule --pause gmm2d                (--resume gmm2d, --delete gmm2d)
      stein worker                                runs the scheduled runs (keep it running)

    A scheduled run is `dvc repro` of the pipeline in this project directory, like `stein run`: only stale stages
    rerun, and the stages' MLflow runs are grouped under one pipeline run. At most one run per schedule at a time
    (a run that comes due while the previous one runs waits in state AwaitingConcurrencySlot), and one `dvc repro`
    per project: a run waits up to 6 hours for a `stein run` or another pipeline's run to finish.

    Needs a Prefect server that keeps running, named by PREFECT_API_URL: start one with
    `.venv/bin/prefect server start --host 127.0.0.1` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`
    (in every terminal that runs `stein schedule` or `stein worker`). Its scheduler creates the runs; without a
    server nothing is scheduled.
    """
    actions = [a for a, given in (("PIPELINE --cron", pipeline is not None or cron is not None), ("--list", list_),
                                  ("--pause", pause), ("--resume", resume), ("--delete", delete)) if given]
    if len(actions) != 1:
        _fail("give exactly one of: PIPELINE --cron EXPR, --list, --pause NAME, --resume NAME, --delete NAME"
              + (f" (got {', '.join(actions)})" if actions else ""))
    if actions[0] != "PIPELINE --cron" and (name or pool or timezone != "UTC"):
        _fail("--name, --pool and --timezone go with PIPELINE --cron")
    if actions[0] == "PIPELINE --cron" and (pipeline is None or not cron):
        _fail("PIPELINE and --cron EXPR go together, e.g. stein schedule gmm2d --cron \"0 2 * * *\"")
    root = _setup()
    from flows import schedule as sched
    from tasks.config.sections import ConfigError

    try:
        if pipeline is not None:  # bad input is refused before the server is asked anything
            from flows.registry import get_pipeline

            get_pipeline(pipeline)
            sched.cron_schedule(cron, timezone)
        sched.api_url()
        if list_:
            infos = sched.list_schedules()
            if not infos:
                click.echo("no schedules on this server: create one with stein schedule PIPELINE --cron EXPR")
            for info in infos:
                click.echo(_show(info))
        elif pause or resume:
            info = sched.set_paused(pause or resume, paused=bool(pause))
            click.echo(("paused " if pause else "resumed ") + _show(info))
        elif delete:
            sched.delete(delete)
            click.echo(f"deleted schedule {delete!r} and its scheduled runs")
        else:
            info = sched.deploy(pipeline, cron, root=root, pool=pool or sched.DEFAULT_POOL, name=name,
                                timezone=timezone)
            click.echo("scheduled " + _show(info))
            click.echo(f"runs start when a worker serves pool {info.pool!r}: `stein worker"
                       + (f" --pool {info.pool}`" if info.pool != sched.DEFAULT_POOL else "`"))
    except (sched.ScheduleError, ConfigError) as exc:
        _fail(str(exc))


@click.command()
@click.option("--pool", metavar="POOL", default="stein", show_default=True, help="The process work pool to serve.")
@click.option("--limit", type=click.IntRange(1, 1000), default=None,
              help="At most this many flow runs at once (default: no limit; runs of one project still take turns).")
def worker(pool: str, limit: int | None) -> None:
    """Run the scheduled (and triggered) runs of the `stein schedule` deployments: a Prefect process worker.

    Each flow run starts as a subprocess in its project's directory, with this environment (MLFLOW_TRACKING_URI,
    STEIN_* and RAY_ADDRESS included). Keep it running; Ctrl-C or SIGTERM stops it and the runs it started.
    Needs PREFECT_API_URL, like `stein schedule` (see `stein schedule --help`).
    """
    _setup()
    from flows import schedule as sched
    from flows.local import die_with_parent, exit_on_termination

    try:
        url = sched.api_url()
        sched.ensure_pool(pool)
    except sched.ScheduleError as exc:
        _fail(str(exc))
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
           "--install-policy", "never", "--no-create-pool-if-not-found", *(["--limit", str(limit)] if limit else [])]
    click.echo(f"worker for pool {pool!r} on {url} (pid {os.getpid()}); Ctrl-C to stop")
    exit_on_termination()
    # its own process group, stopped whichever way this command ends; it dies with us even on SIGKILL
    proc = subprocess.Popen(cmd, env=sched.worker_env(), start_new_session=True, preexec_fn=die_with_parent)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = 130
    finally:
        sched.stop_worker(proc)
    sys.exit(code)
