"""`stein schedule` and `stein worker` against a real `prefect server` (its scheduler on) started by this module.

What is checked, and why this way:
- the server's scheduler itself creates the future runs of a cron deployment: the test queries the flow runs in
  state Scheduled that nobody triggered (``auto_scheduled``), and compares their start times with the cron
  expression's own sequence; a run triggered by hand would not prove that a schedule works;
- pausing drops those runs and resuming brings them back, a new cron replaces them, deleting removes them;
- (heavy) two runs triggered at once in a tiny copy of the project go through `stein worker` one after the other:
  the second waits in state AwaitingConcurrencySlot, both complete, the first produces the pipeline's MLflow run
  with its four stage runs as children; SIGTERM to `stein worker` stops a run in flight with it.

The server runs in its own process group with a temporary PREFECT_HOME, and is stopped by that group whatever
happens. Two settings shorten waits that would otherwise dominate the heavy test: the worker polls every 2 s
(``PREFECT_WORKER_QUERY_SECONDS``, default 10) and a run refused a concurrency slot is retried after 5 s
(``PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS``, default 30). The scheduler's own loops keep their
defaults.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tasks.infra.runtime import free_port

REPO = Path(__file__).resolve().parents[2]
PREFECT = Path(sys.executable).parent / "prefect"


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """A `prefect server start` with its scheduler on, on a free 127.0.0.1 port; its URL."""
    from flows.local import stop_process_group, wait_until_healthy

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1", "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "5",
    }
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        t0 = time.monotonic()
        try:
            wait_until_healthy(proc, f"{url}/health", 120, "prefect server", log)
        except RuntimeError as exc:
            pytest.fail(f"{exc}:\n{log.read_text()[-3000:]}")
        print(f"prefect server (scheduler on) answered after {time.monotonic() - t0:.1f} s")
        yield url
    finally:
        stop_process_group(proc)


def _env(api: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEIN_", "PREFECT_", "MLFLOW_TRACKING", "RAY_ADDRESS"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env |= {"PREFECT_API_URL": api, "PREFECT_HOME": str(home), "STEIN_THREADS": "1", **extra}
    return env


def stein(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    print(f"$ stein {' '.join(args)}  -> {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def _client(api: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api)


def _scheduled(client, name: str) -> list:
    from flows.schedule import FLOW_NAME, scheduled_runs

    return scheduled_runs(client, client.read_deployment_by_name(f"{FLOW_NAME}/{name}").id, limit=50)


def _wait_for(what: str, check, timeout: float = 60.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)


def _cron_times(hour: int, minute: int, tz: str, n: int, weekday: int | None = None) -> list[datetime]:
    """The next ``n`` times, in UTC, of ``minute hour * * *`` (``* * weekday`` with ``weekday`` = 0 for Monday,
    as Python counts) in zone ``tz`` after now: written out by hand, not with the cron library Prefect uses."""
    from datetime import time as clock, timedelta
    from zoneinfo import ZoneInfo

    now = datetime.now(timezone.utc)
    day = now.astimezone(ZoneInfo(tz)).date()
    out: list[datetime] = []
    while len(out) < n:
        at = datetime.combine(day, clock(hour, minute), tzinfo=ZoneInfo(tz))
        if at > now and (weekday is None or day.weekday() == weekday):
            out.append(at.astimezone(timezone.utc))
        day += timedelta(days=1)
    return out


@pytest.mark.slow
@pytest.mark.heavy  # make test stays under 10 minutes; make test-all (CI) runs it (40 s with its server)
def test_the_servers_scheduler_creates_the_future_runs_of_a_cron_schedule(prefect_api, tmp_path):
    env = _env(prefect_api, tmp_path / "prefect-home")
    cron, tz = "0 2 * * *", "Europe/Berlin"
    made = stein(REPO, "schedule", "gmm2d", "--cron", cron, "--timezone", tz, "--name", "t-nightly", env=env)
    assert made.returncode == 0 and "scheduled t-nightly: pipeline gmm2d" in made.stdout

    with _client(prefect_api) as client:
        d = client.read_deployment_by_name("reproduce-pipeline/t-nightly")
        assert d.work_pool_name == "stein" and client.read_work_pool("stein").type == "process"
        assert d.global_concurrency_limit.limit == 1 and d.concurrency_options.collision_strategy == "ENQUEUE"
        assert d.parameters == {"pipeline": "gmm2d", "force": False, "project_lock_wait": 21600.0}
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert d.job_variables["working_dir"] == str(REPO)

        # nobody triggers anything: the runs below are the scheduler's (Prefect keeps at least 3 ahead)
        runs = _wait_for("scheduled runs", lambda: (r := _scheduled(client, "t-nightly")) and len(r) >= 3 and r, 60)
        now = datetime.now(timezone.utc)
        assert all(r.state.name == "Scheduled" and r.auto_scheduled for r in runs)
        assert all(r.expected_start_time > now for r in runs)
        starts = [r.expected_start_time for r in runs]
        assert starts == _cron_times(2, 0, tz, len(starts))  # 02:00 Berlin time on consecutive days, in order

        listed = stein(REPO, "schedule", "--list", env=env)
        assert listed.returncode == 0
        line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("t-nightly:"))
        assert f"cron '{cron}' ({tz}), active, next run " in line and f"project {REPO}" in line

        # a new cron replaces the runs of the old one
        cron2 = "30 3 * * 1"
        assert stein(REPO, "schedule", "gmm2d", "--cron", cron2, "--name", "t-nightly", env=env).returncode == 0
        runs = _wait_for("the new cron's runs", lambda: (
            (r := _scheduled(client, "t-nightly")) and [x.expected_start_time for x in r] == _cron_times(3, 30, "UTC", len(r), weekday=0) and r), 60)
        assert len(runs) >= 3

        paused = stein(REPO, "schedule", "--pause", "t-nightly", env=env)
        assert paused.returncode == 0 and "paused t-nightly" in paused.stdout
        _wait_for("no scheduled runs while paused", lambda: not _scheduled(client, "t-nightly"), 30)
        time.sleep(6)  # more than the scheduler's loop for recent deployments (5 s): still nothing scheduled
        assert _scheduled(client, "t-nightly") == []

        deleted = stein(REPO, "schedule", "--delete", "t-nightly", env=env)
        assert deleted.returncode == 0
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

        left = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))))
        assert [r for r in left if r.deployment_id == d.id] == []
    gone = stein(REPO, "schedule", "--pause", "t-nightly", env=env)
    assert gone.returncode == 2 and gone.stderr.strip().splitlines()[-1].startswith("error: no schedule named 't-nightly'")


def test_bad_schedule_input_exits_2_with_one_line(tmp_path):
    """Each is refused with one line on stderr and exit code 2; a bad cron, time zone or pipeline before any server
    is asked (none listens at the URL given here)."""
    closed = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    env = _env(closed, tmp_path)
    cases = [
        (("schedule",), "give exactly one of"),
        (("schedule", "gmm2d"), "PIPELINE and --cron EXPR go together"),
        (("schedule", "--list", "--delete", "x"), "give exactly one of"),
        (("schedule", "--list", "--name", "x"), "--name, --pool and --timezone go with PIPELINE --cron"),
        (("schedule", "--list"), f"no Prefect server answers at PREFECT_API_URL={closed}"),
        (("worker",), "no Prefect server answers"),
        (("schedule", "gmm2d", "--cron", "0 2 * *"), "error: --cron '0 2 * *': Invalid cron string"),
        (("schedule", "gmm2d", "--cron", "0 2 * * *", "--timezone", "Mars/Base"), "error: --timezone 'Mars/Base': Invalid timezone"),
        (("schedule", "nope", "--cron", "0 2 * * *"), "unknown pipeline 'nope'"),
    ]
    for args, message in cases:
        proc = stein(REPO, *args, env=env)
        assert proc.returncode == 2, args
        assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, (args, proc.stderr)
    env.pop("PREFECT_API_URL")
    for args in (("schedule", "--list"), ("worker",)):
        proc = stein(REPO, *args, env=env)
        assert proc.returncode == 2 and proc.stderr.startswith("error: PREFECT_API_URL is not set")
        assert "prefect server start --host 127.0.0.1" in proc.stderr


# --- the heavy end-to-end part: runs through `stein worker` in a tiny copy of the project -----------------------

TINY = {
    "prepare": {"n_train": 1000, "n_test": 400},
    "train": {"n_steps": 30, "net": {"kind": "mlp", "hidden": 16, "n_layers": 2}, "n_sigmas": 3, "batch_size": 64,
              "log_every": 10, "checkpoint_every": 30},
    "sample": {"n_samples": 100, "n_steps_each": 3, "batch_size": 100},
    "evaluate": {"n_eval": 100, "n_bootstrap": 20, "checkpoints": {"metrics": ["mmd"], "n_samples": 50, "sampler": "sample"}},
}




def _state_names(client, run_id) -> list[str]:
    return [s.name for s in client.read_flow_run_states(run_id)]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.heavy
def test_triggered_runs_go_through_stein_worker_one_at_a_time(prefect_api, tmp_path, project_copier):
    from flows.schedule import _children

    repo = project_copier(tmp_path / "repo", params={"gmm2d": TINY})
    env = _env(prefect_api, tmp_path / "prefect-home")
    assert stein(repo, "schedule", "gmm2d", "--cron", "0 2 * * *", "--name", "e2e-gmm2d", env=env).returncode == 0
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "flows.cli", "worker"], cwd=repo, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True,
                              env=env | {"PREFECT_WORKER_QUERY_SECONDS": "2"})
    try:
        with _client(prefect_api) as client:
            d = client.read_deployment_by_name("reproduce-pipeline/e2e-gmm2d")
            t0 = time.monotonic()
            first, second = (client.create_flow_run_from_deployment(d.id) for _ in range(2))
            running_at: dict = {}

            def both_final():
                for r in (first, second):
                    state = client.read_flow_run(r.id).state
                    if state.is_running():
                        running_at.setdefault(r.id, time.monotonic() - t0)
                    if not state.is_final():
                        return False
                return True

            _wait_for("both triggered runs to end", both_final, timeout=1200, every=1)
            runs = sorted((client.read_flow_run(r.id) for r in (first, second)), key=lambda r: r.start_time)
            print(f"trigger -> Running through the worker: {min(running_at.values()):.1f} s; "
                  f"run times {[round(r.total_run_time.total_seconds(), 1) for r in runs]} s")
            assert [r.state.name for r in runs] == ["Completed", "Completed"], [r.state.message for r in runs]
            # one at a time: the later run waited for the slot, and started after the first ended
            assert "AwaitingConcurrencySlot" in _state_names(client, runs[1].id)
            assert "AwaitingConcurrencySlot" not in _state_names(client, runs[0].id)
            assert runs[1].start_time >= runs[0].end_time

            # the MLflow runs: the first reproduced all four stages under its pipeline run, the second found
            # nothing stale (its pipeline run has no children)
            import mlflow

            ml = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / '.stein' / 'mlflow.db'}")
            all_runs = ml.search_runs([ml.get_experiment_by_name("gmm2d").experiment_id], max_results=100)
            parents = sorted((r for r in all_runs if r.data.tags.get("stein.kind") == "pipeline"),
                             key=lambda r: r.info.start_time)
            assert [p.info.status for p in parents] == ["FINISHED", "FINISHED"]
            children = {p.info.run_id: sorted(r.data.tags["stein.dvc_stage"] for r in all_runs
                                              if r.data.tags.get("mlflow.parentRunId") == p.info.run_id) for p in parents}
            assert children[parents[0].info.run_id] == ["gmm2d-evaluate", "gmm2d-prepare", "gmm2d-sample", "gmm2d-train"]
            assert children[parents[1].info.run_id] == []
            assert "mmd" in parents[0].data.metrics and (repo / "metrics" / "gmm2d.json").is_file()

            # SIGTERM to `stein worker` while a run is in flight stops the run (Crashed) and everything it started
            third = client.create_flow_run_from_deployment(d.id, parameters={"force": True})
            _wait_for("the third run to run", lambda: client.read_flow_run(third.id).state.is_running(), 300, 1)
            engines = [pid for w in _children(worker.pid) for pid in _children(w)]
            assert engines, "no flow-run process under the worker"
            # into `dvc repro` (the engine's child; it runs the stages in its process group)
            repro = _wait_for("`dvc repro` under the flow run", lambda: [c for e in engines for c in _children(e)], 300, 1)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=120) == 128 + signal.SIGTERM
            _wait_for("the flow run and `dvc repro` to end",
                      lambda: not any(Path(f"/proc/{p}").exists() for p in engines + repro), 30)
            state = _wait_for("the third run's final state", lambda: (s := client.read_flow_run(third.id).state).is_final() and s, 30)
            assert state.type.value == "CRASHED"
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        log.close()
        print((tmp_path / "worker.log").read_text()[-6000:])
        # flow runs, DVC, stages and their Ray: none may outlive the worker (Ray takes a few seconds to stop)
        deadline = time.monotonic() + 30
        while (leftovers := _processes_in(repo)) and time.monotonic() < deadline:
            time.sleep(1)
        for pid in leftovers:  # stopped here, by their groups, so that a failure leaves nothing behind either
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
    assert leftovers == [], f"processes in the copy still running after `stein worker` ended: {leftovers}"


def _processes_in(root: Path) -> list[int]:
    """Processes (not zombies) whose working directory is ``root`` or below it."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(proc / "cwd"))
            zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and cwd.is_relative_to(root):
            found.append(int(proc.name))
    return found


def test_a_deployed_run_waits_for_the_project_lock(project):
    """A run started by a deployment takes the lock `stein run` holds (flows.local.project_lock) and waits for it:
    it gets the lock once the holder lets go, and gives up, naming the holder, after its wait."""
    import threading

    from flows.local import ProjectBusy, project_lock
    from flows.pipeline import _project_exclusion

    held, release = threading.Event(), threading.Event()

    def stein_run():  # holds the lock the way `stein run` does (flock refuses a second open file, same process too)
        with project_lock(project):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=stein_run)
    holder.start()
    try:
        assert held.wait(10)
        t0 = time.monotonic()
        with pytest.raises(ProjectBusy, match=r"gave up after waiting 1 s: `stein run` \(pid \d+\) is reproducing"):
            with _project_exclusion(project, 1.0, "gmm2d"):
                pytest.fail("entered while the lock was held")
        assert 1.0 <= time.monotonic() - t0 < 3.0
        threading.Timer(1.5, release.set).start()
        t0 = time.monotonic()
        with _project_exclusion(project, 60.0, "gmm2d"):
            waited = time.monotonic() - t0
            with pytest.raises(ProjectBusy):  # now the deployed run holds it: a `stein run` is refused
                with project_lock(project):
                    pass
        assert 1.5 <= waited < 10.0
    finally:
        release.set()
        holder.join()


def test_only_the_io_tasks_of_the_pipeline_flow_retry():
    """MLflow calls retry (a tracking server can drop a request); `dvc repro` does not (a stage that failed on bad
    input fails again the same way, and DVC resumes a crashed pipeline on the next run)."""
    import flows.pipeline as p

    for io in (p.open_pipeline_run, p.log_pipeline_results, p.close_pipeline_run):
        assert (io.retries, io.retry_delay_seconds) == (3, [5, 10, 30]), io.name
    assert p.dvc_repro.retries == 0
