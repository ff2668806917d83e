"""Scheduled pipeline runs: a Prefect deployment of the pipeline flow in a process work pool.

``stein schedule PIPELINE --cron "0 2 * * *"`` creates (or updates) the deployment ``reproduce-pipeline/<name>``
of :func:`flows.pipeline.reproduce_flow` in the work pool ``stein`` (type ``process``, created on first use). The
Prefect server's scheduler then creates its future runs, and ``stein worker`` (a ``prefect worker``) runs each one
as a subprocess in the project directory, where it calls ``dvc repro``: a scheduled run, too, recomputes only what
changed. Scheduling needs a Prefect server that keeps running (``PREFECT_API_URL``); the one ``stein run`` starts
for itself lives only as long as that command.

How runs are kept apart (DVC allows one ``dvc repro`` per repository, and the pipelines of a project share
``dvc.lock``):

- **Per pipeline, in Prefect: a deployment concurrency limit of 1 with the ENQUEUE collision strategy.** A run
  that comes due (or is triggered) while the previous one still runs is not started: the server puts it in the
  state *AwaitingConcurrencySlot* and the worker retries it until the slot is free. No process or worker slot is
  spent waiting, and the Prefect UI shows the queue.
- **Per project, in the flow: the project lock** (:func:`flows.local.project_lock`, an ``flock`` on
  ``.stein/run.lock``), which ``stein run`` holds too. A deployed run waits for it up to :data:`LOCK_WAIT_S`
  (``project_lock_wait`` parameter), logging who holds it. A Prefect global concurrency limit shared by every
  deployment of the project would not see a ``stein run`` by hand (which usually talks to its own short-lived
  server), and the slot of a run whose process died stays taken until its lease expires; the kernel releases an
  ``flock`` when its process ends, however it ends.

Everything here talks to the server at ``PREFECT_API_URL``; a missing or silent server is a :class:`ScheduleError`
(bad input: ``stein`` exits 2 with one line that says how to start one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tasks.infra.runtime import OFFLINE_ENV

#: The flow every deployment runs, as a path in the project (the worker loads it from the project directory).
FLOW_NAME = "reproduce-pipeline"
ENTRYPOINT = "flows/pipeline.py:reproduce_flow"
#: The work pool deployments go to and ``stein worker`` serves, unless ``--pool`` names another.
DEFAULT_POOL = "stein"
#: How long a deployed run waits for the project lock (a ``stein run`` or another pipeline's run) before failing.
LOCK_WAIT_S = 6 * 3600
#: Tags every deployment made here carries (``stein schedule --list`` shows only these).
TAG = "stein"

SERVER_HINT = ("start one that keeps running, e.g. `.venv/bin/prefect server start --host 127.0.0.1` in another "
               "terminal, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`")


class ScheduleError(ValueError):
    """Bad input or a missing server: the command exits 2 with this one-line message."""


@dataclass(frozen=True)
class ScheduleInfo:
    """One deployment, as ``stein schedule --list`` shows it."""

    name: str
    pipeline: str
    cron: str | None
    timezone: str | None
    paused: bool
    pool: str | None
    project: str | None
    next_run: datetime | None
    concurrency_limit: int | None


def api_url() -> str:
    """``PREFECT_API_URL``, checked to answer; a ScheduleError saying how to start a server otherwise."""
    url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not url:
        raise ScheduleError(f"PREFECT_API_URL is not set: schedules live in a Prefect server; {SERVER_HINT}")
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            if r.status == 200:
                return url
    except OSError as exc:
        raise ScheduleError(f"no Prefect server answers at PREFECT_API_URL={url} ({exc}); {SERVER_HINT}") from None
    raise ScheduleError(f"the Prefect server at PREFECT_API_URL={url} is not healthy; {SERVER_HINT}")


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of ``prefect worker`` and of the flow runs it starts: offline, and never installing
    dependencies before a run (Prefect can ``uv run`` a project that lists ``prefect`` in its pyproject.toml)."""
    env = dict(os.environ)
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    env["PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES"] = "false"
    env.update(extra or {})
    return env


def cron_schedule(cron: str, timezone: str = "UTC"):
    """The validated Prefect cron schedule; a bad expression or time zone is a ScheduleError naming the option."""
    from pydantic import ValidationError
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        err = exc.errors()[0]
        option = "--timezone" if "timezone" in map(str, err.get("loc", ())) else "--cron"
        value = timezone if option == "--timezone" else cron
        msg = str(err.get("msg", exc)).removeprefix("Value error, ")
        raise ScheduleError(f"{option} {value!r}: {msg}") from None


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def ensure_pool(pool: str) -> None:
    """Create the process work pool ``pool`` if it does not exist; an existing pool of another type is an error."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with _client() as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
            except ObjectAlreadyExists:  # another `stein schedule` or `stein worker` created it meanwhile
                pass
            return
    if existing.type != "process":
        raise ScheduleError(f"--pool {pool!r}: that work pool has type {existing.type!r}; `stein` deploys to a "
                            f"process pool: name another pool")


def _project_of(deployment) -> str | None:
    """The project directory a deployment runs in (its ``set_working_directory`` pull step)."""
    for step in deployment.pull_steps or []:
        spec = step.get("prefect.deployments.steps.set_working_directory")
        if spec:
            return spec.get("directory")
    return (deployment.job_variables or {}).get("working_dir")


def deploy(pipeline: str, cron: str, *, root: Path, pool: str = DEFAULT_POOL, name: str | None = None,
           timezone: str = "UTC", lock_wait: float = LOCK_WAIT_S) -> ScheduleInfo:
    """Create or update the cron deployment of ``pipeline`` for the project at ``root``; return it as listed.

    The deployment runs ``reproduce_flow(pipeline, project_lock_wait=lock_wait)`` from the project directory
    (a ``set_working_directory`` pull step, and the process worker's ``working_dir``), at most one run at a time
    (concurrency limit 1, ENQUEUE). Re-running with another cron replaces the schedule (Prefect drops the runs the
    old one had scheduled). A deployment of the same name that belongs to another project is not overwritten."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import RunnerDeployment
    from prefect.exceptions import ObjectNotFound
    from prefect.runner.storage import LocalStorage

    from flows.registry import get_pipeline

    get_pipeline(pipeline)  # an unknown name is a ConfigError (exit 2) before anything is created
    schedule = cron_schedule(cron, timezone)
    name = name or pipeline
    root = Path(root).resolve()
    with _client() as client:
        try:
            existing = client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
        except ObjectNotFound:
            existing = None
    if existing is not None and _project_of(existing) not in (None, str(root)):
        raise ScheduleError(f"deployment {FLOW_NAME}/{name} belongs to the project {_project_of(existing)}: "
                            f"choose another --name, or `stein schedule --delete {name}` there first")
    ensure_pool(pool)
    deployment = RunnerDeployment.from_storage(
        storage=LocalStorage(str(root)),
        entrypoint=ENTRYPOINT,
        name=name,
        schedule=schedule,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        parameters={"pipeline": pipeline, "force": False, "project_lock_wait": float(lock_wait)},
        tags=[TAG, f"pipeline:{pipeline}"],
        description=f"`dvc repro` of pipeline {pipeline!r} in {root} on the cron schedule {cron!r} ({timezone})",
        work_pool_name=pool,
        # the worker starts the run's process in the project (its cwd, hence its sys.path), with the project's
        # root named explicitly for the stages; a user's STEIN_PROJECT_ROOT in the worker's environment loses
        job_variables={"working_dir": str(root), "env": {"STEIN_PROJECT_ROOT": str(root)}},
        paused=False,
    )
    deployment.apply(work_pool_name=pool)
    return get(name)


def _info(deployment, next_run: datetime | None) -> ScheduleInfo:
    cron = tz = None
    for s in deployment.schedules:
        cron, tz = getattr(s.schedule, "cron", None), getattr(s.schedule, "timezone", None)
        if cron:
            break
    gcl = deployment.global_concurrency_limit
    return ScheduleInfo(
        name=deployment.name, pipeline=(deployment.parameters or {}).get("pipeline", "?"), cron=cron, timezone=tz,
        paused=bool(deployment.paused), pool=deployment.work_pool_name, project=_project_of(deployment),
        next_run=next_run, concurrency_limit=gcl.limit if gcl is not None else None,
    )


def scheduled_runs(client, deployment_id, limit: int = 10):
    """The deployment's flow runs in state Scheduled (due or future), soonest first."""
    from prefect.client.schemas.filters import (
        DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=limit,
    )


def _next_run(client, deployment) -> datetime | None:
    runs = scheduled_runs(client, deployment.id, limit=1)
    return runs[0].expected_start_time if runs else None


def list_schedules() -> list[ScheduleInfo]:
    """Every deployment ``stein schedule`` made on this server (tag ``stein``), by name."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags, FlowFilter, FlowFilterName

    with _client() as client:
        deployments = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[TAG])),
        )
        return sorted((_info(d, _next_run(client, d)) for d in deployments), key=lambda i: i.name)


def _read(client, name: str):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
    except ObjectNotFound:
        raise ScheduleError(f"no schedule named {name!r} (deployment {FLOW_NAME}/{name}); see `stein schedule "
                            f"--list`") from None


def get(name: str) -> ScheduleInfo:
    with _client() as client:
        d = _read(client, name)
        return _info(d, _next_run(client, d))


def set_paused(name: str, paused: bool) -> ScheduleInfo:
    """Pause (no new runs are scheduled, future ones are dropped) or resume the schedule ``name``."""
    with _client() as client:
        d = _read(client, name)
        (client.pause_deployment if paused else client.resume_deployment)(d.id)
    return get(name)


def delete(name: str) -> None:
    """Delete the deployment ``name`` (Prefect deletes its scheduled runs with it)."""
    with _client() as client:
        client.delete_deployment(_read(client, name).id)


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux ``/proc``; elsewhere none)."""
    kids = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1 and fields[1] == str(pid):
            kids.append(int(entry.parent.name))
    return kids


def stop_worker(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop ``prefect worker`` and the flow runs it started.

    A process worker starts each flow run in a session of its own, and on SIGTERM it waits for its runs to end: so
    first each run's process group gets SIGTERM (the engine marks the run Crashed, and ``dvc repro`` with the stage
    it runs stops with it: :func:`flows.local.dvc`), SIGKILL after ``timeout`` seconds; then the worker's own group.
    """
    from flows.local import stop_process_group

    runs = _children(proc.pid) if proc.poll() is None else []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in runs:
            try:
                os.killpg(pid, sig)  # session leader: its pid is its group's id
                alive.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _is_alive(pid)]
            time.sleep(0.2)
        runs = alive
        if not runs:
            break
    stop_process_group(proc, timeout=timeout)


def _is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, awaiting its parent's wait, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
