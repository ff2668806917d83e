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


def copy_project(dst, *, set_params=None, commit: bool = True):
    """A copy of this repository's files (tracked and untracked, not ignored) at ``dst`` without ``dvc.lock`` and
    ``metrics/`` (so every stage is stale), with ``set_params(dst)`` applied to its configs, committed to a fresh
    git repository (DVC needs one). Returns ``dst``."""
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
