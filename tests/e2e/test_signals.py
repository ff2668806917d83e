"""A `stein run` stopped in the middle of training leaves no process of its own behind: not the Prefect server,
not DVC, not the stage, not the Ray it started (SIGTERM: its cleanup runs; SIGKILL: the kernel's parent-death
signals take down each layer), and no half-written output.

Both cases let `stein run` start its own Prefect server (no ``PREFECT_API_URL`` reaches it), unlike
tests/e2e/test_pipeline_e2e.py, whose runs share one server: that server is part of what must not survive, and
here it is stopped by `stein run`'s cleanup (SIGTERM) and by the parent-death signal (SIGKILL) inside a real run.
A server shared by this module would start once for the one case that used it, so it would save no time (nearly
all of each case is the way up to training: measured 70-100 s of 70-105, 2-3 s after the signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, project_copier) -> Path:
    def long_training(dst: Path) -> None:
        conf = dst / "conf" / "gmm2d.yaml"
        raw = yaml.safe_load(conf.read_text())
        raw["prepare"].update(n_train=2000, n_test=400)
        raw["train"].update(n_steps=100_000, log_every=10, checkpoint_every=50_000)  # runs until stopped
        conf.write_text(yaml.safe_dump(raw, sort_keys=False))

    return project_copier(tmp_path_factory.mktemp("signals") / "repo", set_params=long_training)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _is_prefect_server(p: psutil.Process) -> bool:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return False
    return any(Path(a).name == "prefect" for a in cmd) and "server" in cmd


@pytest.mark.heavy  # make test stays under 10 minutes; make test-all (CI) runs it (56 s)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_stein_run_mid_training_leaves_no_process_behind(repo, sig):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEIN_", "PREFECT_", "MLFLOW_TRACKING", "RAY_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["STEIN_THREADS"] = "1"
    env["SHELL"] = "/bin/sh"  # DVC runs a stage through $SHELL -c; dash (CI's sh) stays the stage's parent, bash execs
    log = repo / f"run-{sig.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "gmm2d"], cwd=repo, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 300
        while "[train] step" not in log.read_text():  # training has started inside a Ray Train worker
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            seen |= {p.pid: p for p in _tree(proc.pid)}
            time.sleep(0.5)
        seen |= {p.pid: p for p in _tree(proc.pid)}
        names = {p.name() for p in _alive(list(seen.values()))}
        assert {"gcs_server", "raylet"} <= names, names  # the tree we watch does include the Ray the stage started
        # ... and the Prefect server `stein run` started itself (no PREFECT_API_URL reached it)
        assert any(_is_prefect_server(p) for p in _alive(list(seen.values()))), names
        proc.send_signal(sig)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while (alive := _alive(list(seen.values()))) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive, f"left running after {sig.name}: {[(p.pid, p.name()) for p in alive]}"
        assert not (repo / "models" / "gmm2d" / "model.pt").exists()
        assert not list((repo / "models" / "gmm2d").glob(".*.tmp")) if (repo / "models" / "gmm2d").exists() else True
    finally:
        for p in _alive(list(seen.values())):
            p.kill()
