"""Shared test setup: offline environment, GPU marker handling, a temporary project root."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """One torch thread in the test process. The suite runs on 2-core machines beside other processes (the
    end-to-end test's Prefect server and Ray workers, other jobs): intra-op threads then only add
    synchronisation, measured here at 4-15x slower for small convolutions and for sampler loops on
    [4000, 2] tensors. Pipeline stages started as subprocesses keep their own runtime settings."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project root (with a dvc.yaml marker) that the stage code resolves paths against."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("STEIN_PROJECT_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / '.stein' / 'mlflow.db'}")
    return tmp_path


def update_params(root, updates, pipeline: str = "gmm2d") -> None:
    """Update sections of ``conf/<pipeline>.yaml`` under ``root``: ``{"train": {"n_steps": 100}, ...}``."""
    from pathlib import Path

    import yaml

    path = Path(root) / "conf" / f"{pipeline}.yaml"
    raw = yaml.safe_load(path.read_text())
    for section, values in updates.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def copy_project(dst, *, set_params=None, params=None, commit: bool = True):
    """A copy of this repository's files (tracked and untracked, not ignored) at ``dst`` without ``dvc.lock`` and
    ``metrics/`` (so every stage is stale), with ``params`` (``{pipeline: {section: {key: value}}}``, see
    :func:`update_params`) and then ``set_params(dst)`` applied to its configs, committed to a fresh git repository
    (DVC needs one). Returns ``dst``."""
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    dst = Path(dst)
    git_env = os.environ | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
                            "GIT_COMMITTER_EMAIL": "t@localhost"}

    def git(cwd, *args):
        return subprocess.run(["git", *args], cwd=cwd, env=git_env, check=True, capture_output=True, text=True).stdout

    for rel in git(repo, "ls-files", "--cached", "--others", "--exclude-standard").splitlines():
        if (repo / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, dst / rel)
    for stale in ("dvc.lock", "metrics"):
        p = dst / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for pipeline, updates in (params or {}).items():
        update_params(dst, updates, pipeline)
    if set_params is not None:
        set_params(dst)
    if commit:
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "test copy"]):
            git(dst, *args)
    return dst


@pytest.fixture(scope="session")
def project_copier():
    """:func:`copy_project`, for module fixtures that build a copy of the repository."""
    return copy_project


class S3Server:
    """A running S3-compatible server (moto's server mode) on 127.0.0.1: ``endpoint`` is its URL, ``env`` the
    credentials and endpoint any client (boto3, DVC's s3fs, pyarrow) needs, ``bucket(name)`` creates a bucket."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }

    def bucket(self, name: str) -> str:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server, started once per test session on a free 127.0.0.1 port in its own process group and
    stopped by that group at the end."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from flows.local import stop_process_group
    from tasks.infra.runtime import free_port

    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"moto_server exited with code {proc.returncode}"
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not answer within 60 s"
                time.sleep(0.2)
        yield S3Server(endpoint)
    finally:
        stop_process_group(proc, timeout=10)


@pytest.fixture(scope="session")
def assert_resumed_where_it_stopped():
    """A check of a training's output: the loop's own ``resumed: first step run N`` line of a restarted Ray Train
    worker follows its ``resuming from the checkpoint of step S`` line with N = S + 1, so a worker that announced a
    resume but trained from step 0 again (ending with the same weights: a step is a pure function of (seed,
    step)) fails. A worker group torn down before its first step (a second restart) prints no such line; at
    least one resume must have run. Returns the steps resumed from."""
    import re

    def check(out: str) -> list[int]:
        last, ran = None, []
        for line in out.splitlines():
            if m := re.search(r"\[train\] resuming from the checkpoint of step (\d+)/", line):
                last = int(m.group(1))
            elif m := re.search(r"\[train\] resumed: first step run (\d+)/", line):
                assert last is not None, f"a first step after a resume, but no resume before it: {line}"
                assert int(m.group(1)) == last + 1, f"resumed from step {last}, but the first step run was {m.group(1)}"
                ran.append(last)
                last = None
        assert ran, "no resumed training ran a step"
        return ran

    return check


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """The URL of one Prefect server (``flows.local.prefect_server``) for every test of the session that runs
    stage or pipeline commands, stopped with its process group at the end: starting one takes 10-35 s on a
    2-core machine, and each module (or test) would otherwise start its own. Commands get the URL in their
    environment (``PREFECT_API_URL``); the test process's own environment is left as it was, so the tests of a
    `stein run` that starts its own server still see none."""
    from flows.local import prefect_server

    keys = ("PREFECT_API_URL", "PREFECT_UI_URL", "PREFECT_HOME")
    saved = {k: os.environ.get(k) for k in keys}

    def restore() -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    os.environ.pop("PREFECT_API_URL", None)  # always a server of our own, never one the caller points to
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    try:
        with prefect_server(timeout=180) as url:
            restore()
            yield url
    finally:
        restore()


#: What makes any pipeline tiny: caps on its sizes and step counts, by key, at any depth of its config (a value
#: above its cap is lowered to it). A new pipeline gets a tiny run from these without a line of its own.
TINY_CAPS = {
    "n_train": 2000, "n_test": 600, "max_train": 300, "epochs": 5, "n_steps": 40, "log_every": 10,
    "checkpoint_every": 20, "heldout_every": 20, "heldout_n": 100, "batch_size": 64, "n_samples": 200,
    "n_steps_each": 5, "n_eval": 100, "n_bootstrap": 50, "kid_subset_size": 30, "kid_subsets": 10, "grid": 6,
    "burst_steps": 5, "energy_steps": 2, "critic_steps": 2,
}


def tiny(raw: dict) -> dict:
    """A config (as read from conf/<pipeline>.yaml) shrunk to seconds of compute by :data:`TINY_CAPS`; the
    classifier's accuracy floor drops with its epochs, every digit image set is capped, and a sweep keeps its
    smallest dimension and its first seed (tests/stages/test_sweep.py runs a sweep of two in detail)."""
    import copy

    def shrink(node, key=None):
        if isinstance(node, dict):
            return {k: shrink(v, k) for k, v in node.items()}
        if key in TINY_CAPS and isinstance(node, int) and not isinstance(node, bool) and node > TINY_CAPS[key]:
            return TINY_CAPS[key]
        return node

    out = shrink(copy.deepcopy(raw))
    if isinstance(out.get("prepare"), dict) and "max_train" in out["prepare"] and out["prepare"]["max_train"] is None:
        out["prepare"]["max_train"] = TINY_CAPS["max_train"]
    if isinstance(out.get("prepare"), dict) and isinstance(out["prepare"].get("dims"), list):  # a sweep's grid
        out["prepare"]["dims"] = sorted(out["prepare"]["dims"])[:1]
        out["prepare"]["seeds"] = out["prepare"].get("seeds", [0])[:1]
    if isinstance(out.get("classifier"), dict):
        out["classifier"]["min_accuracy"] = min(out["classifier"].get("min_accuracy", 0.3), 0.3)
    return out


@pytest.fixture(scope="session")
def tiny_config():
    """:func:`tiny`, for the tests that run every pipeline in seconds."""
    return tiny
