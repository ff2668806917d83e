"""A `stein run` stopped in the middle of training leaves no process of its own behind: not the Prefect server,
not DVC, not the stage, not the Ray it started (SIGTERM: its cleanup runs; SIGKILL: the kernel's parent-death
signals take down each layer), and no half-written output."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("signals") / "repo"
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in listed:
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    for stale in ("dvc.lock", "metrics"):
        p = dst / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    conf = dst / "conf" / "gmm2d.yaml"
    raw = yaml.safe_load(conf.read_text())
    raw["prepare"].update(n_train=2000, n_test=400)
    raw["train"].update(n_steps=100_000, log_every=10, checkpoint_every=50_000)  # runs until stopped
    conf.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = os.environ | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@localhost"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(["git", *args], cwd=dst, env=env, check=True, capture_output=True)
    return dst


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_stein_run_mid_training_leaves_no_process_behind(repo, sig):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEIN_", "PREFECT_", "MLFLOW_TRACKING", "RAY_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["STEIN_THREADS"] = "1"
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
