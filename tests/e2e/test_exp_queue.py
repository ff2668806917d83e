"""Queued DVC experiments: two sampler variants of gmm2d with `dvc exp run --queue -S ...`, run by `dvc queue start
-j 2` at the same time, each reusing the committed model from DVC's cache; `dvc exp show` lists both with their
metrics, the MLflow store of the project holds their stage runs, and no queue worker outlives the test.

What a queued run needs, and this test gives it as a user must (README, "Queued experiments"):

- The venv's ``bin`` first on PATH when ``dvc queue start`` runs: DVC's workers start ``dvc`` and the stages start
  ``python`` from PATH (without it the worker dies with ``FileNotFoundError: 'dvc'`` and the experiment stays
  queued for ever).
- ``PREFECT_API_URL`` of a running Prefect server (else every stage process starts its own ephemeral server) and
  an absolute ``MLFLOW_TRACKING_URI`` (else the runs go to a store inside the temporary workspace under
  .dvc/tmp/exps, deleted with it). Workers take the environment of the ``dvc queue start`` that spawned them.
- Only committed or DVC-tracked files reach a queued run: the baseline's dvc.lock and metrics are committed here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_remote import TINY, clean_env, git, sh

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.heavy]  # minutes: a gmm2d run, then two experiments

VARIANTS = {"eps-small": "5e-4", "eps-large": "4e-3"}


def processes_in(root: Path) -> dict[int, str]:
    """Live processes whose working directory is inside ``root``, with their command lines: DVC's queue workers
    and experiment executors run in the project (each in a process group of its own), the stages in its temporary
    workspaces under .dvc/tmp/exps."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(proc / "cwd"))
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cwd == root or root in cwd.parents:
            found[int(proc.name)] = cmd
    return found


def queue_pids(root: Path) -> set[int]:
    """The PIDs DVC's task queue recorded under .dvc/tmp/exps (workers, experiment executors) of processes still
    running in ``root`` (a recorded PID that now belongs to another process is left alone)."""
    recorded = set()
    for info in (root / ".dvc" / "tmp" / "exps").rglob("*.json"):
        try:
            pid = json.loads(info.read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(pid, int):
            recorded.add(pid)
    return recorded & set(processes_in(root))


def stop_pids(pids: set[int]) -> None:
    """SIGTERM to each process's group (DVC starts each worker and executor in a group of its own; never ours),
    SIGKILL to what is left after 15 s."""
    ours = os.getpgid(0)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                group = os.getpgid(pid)
                os.killpg(group, sig) if group != ours else os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.5)


def queue_states(root: Path, env: dict[str, str]) -> dict[str, str]:
    """Experiment name -> status (Queued, Running, Success, Failed) from `dvc queue status`. DVC reads the queue's
    message files while its workers write them: a read in between fails with "unexpected error - Expecting value"
    (seen once in a poll); such a poll is retried, up to three times."""
    for attempt in range(3):
        proc = sh(root, "dvc", "queue", "status", env=env, check=False)
        if proc.returncode == 0 or "Expecting value" not in proc.stderr or attempt == 2:
            break
        time.sleep(1)
    assert proc.returncode == 0, f"dvc queue status exited {proc.returncode}: {proc.stderr[-2000:]}"
    out = proc.stdout
    rows = re.findall(r"^\s*[0-9a-f]{7}\s+(\S+)\s+.*?\s(Queued|Running|Success|Failed)\s*$", out, re.M)
    return dict(rows)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, project_copier) -> Path:
    return project_copier(tmp_path_factory.mktemp("queue") / "repo", params={"gmm2d": TINY})


def test_two_queued_experiments_run_in_parallel(repo, prefect_api):
    store = repo / ".stein" / "mlflow.db"
    env = clean_env(PREFECT_API_URL=prefect_api, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    # the baseline: gmm2d reproduced and committed, its outputs in the project's DVC cache
    sh(repo, "stein", "run", "gmm2d", env=env)
    git(repo, "add", "dvc.lock", "metrics")
    git(repo, "commit", "-q", "-m", "gmm2d baseline")
    baseline = json.loads((repo / "metrics" / "gmm2d.json").read_text())

    for name, eps in VARIANTS.items():
        sh(repo, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"conf/gmm2d.yaml:sample.eps={eps}", "gmm2d-evaluate",
           env=env)
    assert queue_states(repo, env) == {name: "Queued" for name in VARIANTS}
    try:
        t0 = time.perf_counter()
        # not through pipes: the workers DVC forks inherit them, and reading to EOF would wait for the workers to end
        with open(repo.parent / "queue-start.log", "w") as log:
            subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=300, check=True)
        deadline = time.monotonic() + 900
        while (states := queue_states(repo, env)) and any(s in ("Queued", "Running") for s in states.values()):
            assert time.monotonic() < deadline, f"queued experiments not done after 900 s: {states}"
            time.sleep(3)
        seconds = time.perf_counter() - t0
        failed = [name for name, state in states.items() if state != "Success"]
        logs = {name: sh(repo, "dvc", "queue", "logs", name, env=env, check=False).stdout[-3000:] for name in failed}
        assert states == {name: "Success" for name in VARIANTS}, (states, logs)
        print(f"two queued experiments (sample + evaluate each) with -j 2: {seconds:.1f} s")
        # the workers leave by themselves once the queue has been empty for 10 s
        deadline = time.monotonic() + 120
        while queue_pids(repo):
            assert time.monotonic() < deadline, f"queue processes still running: {queue_pids(repo)}"
            time.sleep(2)
    finally:
        stop_pids(queue_pids(repo) | set(processes_in(repo)))
    assert processes_in(repo) == {}

    # dvc exp show: both experiments, their parameter and their own metrics, unlike each other and the baseline
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json", env=env).stdout)
    exps = {e["name"]: e for rev in shown for e in (rev.get("experiments") or []) for e in [e["revs"][0]]}
    assert set(VARIANTS) <= set(exps), list(exps)
    metrics = {}
    for name, eps in VARIANTS.items():
        data = exps[name]["data"]
        assert data["params"]["conf/gmm2d.yaml"]["data"]["sample"]["eps"] == float(eps)
        metrics[name] = data["metrics"]["metrics/gmm2d.json"]["data"]
        assert set(baseline) == set(metrics[name])
        assert metrics[name]["ref_mmd"] == baseline["ref_mmd"]  # held-out data vs held-out data: no sampler in it
    assert metrics["eps-small"]["mmd"] != metrics["eps-large"]["mmd"]
    assert metrics["eps-small"]["ksd"] != metrics["eps-large"]["ksd"]

    # MLflow: each experiment ran sample and evaluate only (the model came from DVC's cache), in parallel
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp_id = client.get_experiment_by_name("gmm2d").experiment_id
    runs = client.search_runs([exp_id], max_results=1000)
    stages = sorted(r.data.tags.get("stein.stage", "pipeline") for r in runs)
    assert stages == sorted(["pipeline", "prepare", "train", "sample", "evaluate"] + ["pipeline", "sample", "evaluate"] * 2)
    # each queued experiment's stages are grouped under a pipeline run named after it, which has its metrics
    groups = {r.data.tags["stein.dvc_exp"]: r for r in runs if "stein.dvc_exp" in r.data.tags}
    assert set(groups) == set(VARIANTS)
    for name, group in groups.items():
        assert group.info.run_name == f"gmm2d {name}" and group.info.status == "FINISHED"
        assert float(group.data.params["sample.eps"]) == float(VARIANTS[name])
        assert group.data.metrics["mmd"] == pytest.approx(metrics[name]["mmd"])
    queued = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {g.info.run_id for g in groups.values()}]
    assert sorted(r.data.tags["stein.stage"] for r in queued) == ["evaluate", "evaluate", "sample", "sample"]
    # one after another, the second sample stage would start after the first experiment's evaluate stage ended
    second_sample = sorted(r.info.start_time for r in queued if r.data.tags["stein.stage"] == "sample")[1]
    first_evaluate_end = min(r.info.end_time for r in queued if r.data.tags["stein.stage"] == "evaluate")
    assert second_sample < first_evaluate_end, "the two experiments ran one after another"
