"""`stein run` killed with SIGKILL, then run again: in training it resumes from the last checkpoint of the same
stage inputs and ends with the metrics of an uninterrupted run (and says how much time that saved); in sampling
and evaluation no half-written output survives, and the rerun completes.

Heavy (`make test-all`): five pipeline runs in a project copy. tests/stages/test_fault_tolerance.py proves the
same resumption at the stage level in `make test`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_signals import _alive
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.heavy]

PARAMS = {
    "prepare": {"n_train": 3000, "n_test": 600},
    "train": {"n_steps": 1500, "net": {"kind": "mlp", "hidden": 32, "n_layers": 2}, "n_sigmas": 5, "batch_size": 128,
              "log_every": 50, "checkpoint_every": 250},
    "sample": {"n_samples": 300, "n_steps_each": 10, "batch_size": 300},
    "evaluate": {"n_eval": 200, "checkpoints": {"metrics": ["mmd", "mode_weight"], "n_samples": 100, "sampler": "sample"}},
}
RESUMED = "[train] resuming from the checkpoint of step"
SNAPSHOT = "checkpoint_manager_snapshot.json"


@pytest.fixture(scope="module")
def repo(tmp_path_factory, project_copier) -> Path:
    return project_copier(tmp_path_factory.mktemp("kill") / "repo", params={"gmm2d": PARAMS})


def _env(repo: Path, prefect_api: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEIN_", "PREFECT_", "MLFLOW_TRACKING", "RAY_ADDRESS"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # SHELL: DVC runs a stage through $SHELL -c, and dash (CI's /bin/sh) stays the stage's parent where bash execs
    return env | {"SHELL": "/bin/sh", "STEIN_THREADS": "1", "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(repo / ".stein" / "prefect")}


def stein(repo: Path, *args: str, prefect_api: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=repo, env=_env(repo, prefect_api),
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:], proc.stderr[-4000:], sep="\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_stein_run_when(repo: Path, prefect_api: str, ready, what: str) -> None:
    """Start `stein run gmm2d`, SIGKILL it (the `stein run` process only, as `kill -9 PID` does) once ``ready()``,
    and check that every process it had started is gone within 60 s."""
    log = repo / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "gmm2d"], cwd=repo,
                                env=_env(repo, prefect_api), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 600
        while not ready():
            assert proc.poll() is None, f"`stein run` ended before {what}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within 600 s"
            try:
                seen |= {p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while (alive := _alive(list(seen.values()))) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive, f"left running after SIGKILL: {[(p.pid, p.name()) for p in alive]}"
    finally:
        for p in _alive(list(seen.values())):
            p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _stage_running(name: str):
    def ready() -> bool:
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "stage" in cmd and name in cmd and "gmm2d" in cmd:
                return True
        return False

    return ready


def _registered_checkpoint(repo: Path):
    def ready() -> bool:
        for snap in (repo / ".stein" / "ray_results").glob(f"gmm2d-train-*/{SNAPSHOT}"):
            try:
                if json.loads(snap.read_text()).get("checkpoint_results"):
                    return True
            except (OSError, json.JSONDecodeError):  # being rewritten
                pass
        return False

    return ready


def _train_run(repo: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / '.stein' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gmm2d")
    runs = client.search_runs([exp.experiment_id], "tags.`stein.stage` = 'train' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0]


def _weights(repo: Path) -> dict[str, torch.Tensor]:
    from tasks.data.io import load_checkpoint

    return load_checkpoint(repo / "models" / "gmm2d" / "model.pt")["modules"]["score"]


def test_killed_runs_resume_or_leave_nothing_half_written(repo, prefect_api, assert_resumed_where_it_stopped):
    # 1. kill -9 `stein run` once the training has a checkpoint that Ray Train registered
    kill_stein_run_when(repo, prefect_api, _registered_checkpoint(repo), "registered checkpoint")
    assert not (repo / "models" / "gmm2d" / "model.pt").exists()

    # 2. run again: the train stage resumes the same Ray Train run (named after its inputs)
    resumed = stein(repo, "run", "gmm2d", prefect_api=prefect_api)
    assert RESUMED in resumed.stdout + resumed.stderr
    assert_resumed_where_it_stopped(resumed.stdout + resumed.stderr)
    resumed_metrics = json.loads((repo / "metrics" / "gmm2d.json").read_text())
    resumed_weights = _weights(repo)
    resumed_fit = _train_run(repo).data.metrics["fit_seconds"]
    assert not list((repo / ".stein" / "ray_results").glob("gmm2d-train-*")), "the finished run was not removed"

    # 3. an uninterrupted run of the same inputs (forced): the same weights and the same metrics
    full = stein(repo, "run", "gmm2d", "--force", prefect_api=prefect_api)
    assert RESUMED not in full.stdout + full.stderr
    full_fit = _train_run(repo).data.metrics["fit_seconds"]
    for k, v in _weights(repo).items():
        torch.testing.assert_close(resumed_weights[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert json.loads((repo / "metrics" / "gmm2d.json").read_text()) == pytest.approx(resumed_metrics, rel=1e-6)
    print(f"training after the kill {resumed_fit:.1f} s, uninterrupted {full_fit:.1f} s: "
          f"{full_fit - resumed_fit:.1f} s saved by resuming")

    # 4. kill -9 during sample, then during evaluate (a changed sample section makes both stale): no output of the
    # killed stage survives in any form, and the rerun completes with DVC's status clean
    for stage, output in (("sample", "samples/gmm2d/samples.parquet"), ("evaluate", "metrics/gmm2d.json")):
        conf = repo / "conf" / "gmm2d.yaml"
        raw = yaml.safe_load(conf.read_text())
        raw["sample"]["seed"] += 1
        conf.write_text(yaml.safe_dump(raw, sort_keys=False))
        kill_stein_run_when(repo, prefect_api, _stage_running(stage), f"{stage} stage")
        out = repo / output
        assert not list(out.parent.glob(f".{out.name}.*")), f"a temporary file of {output} survived"
        if stage == "sample":  # DVC removed the stage's old output before running it: no stale file either
            assert not out.exists()
        stein(repo, "run", "gmm2d", prefect_api=prefect_api)
        assert out.is_file()
        status = subprocess.run([sys.executable, "-m", "dvc", "status", "gmm2d-evaluate"], cwd=repo,
                                capture_output=True, text=True, env=_env(repo, prefect_api))
        assert "up to date" in status.stdout, status.stdout
