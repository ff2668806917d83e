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
