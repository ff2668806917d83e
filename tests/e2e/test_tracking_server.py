"""The pipeline logging to a real MLflow tracking server (`stein server` on 127.0.0.1) over HTTP, and who may write.

`stein run gmm2d` runs in a temporary copy of the repository with ``MLFLOW_TRACKING_URI=http://127.0.0.1:PORT``;
the server keeps its store and artifacts in another folder (its own project's .stein/), so the checks read
everything back through HTTP: the run tree (one pipeline run, its four stage children), the step metrics Ray worker
rank 0 logged, artifacts downloaded through the server (and stored under its artifacts destination), and no local
store in the copy. With ``--auth``: an anonymous client gets 401, a user without a permission 403 (and their
pipeline run stops with that error), the admin's pipeline run logs everything, and neither password is in any file
the run, the server or Ray wrote.

Both servers are started once for the module through the real command, stopped by SIGTERM to its process group
(the command then stops the server's group; SIGKILL as a fallback)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.infra.runtime import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.heavy]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

#: gmm2d in a few minutes: two step-metric rows, two checkpoints, each evaluated (dvc.yaml declares those outputs).
TINY = {
    "prepare": {"n_train": 2000, "n_test": 400},
    "train": {"n_steps": 100, "net": {"kind": "mlp", "hidden": 32, "n_layers": 2}, "n_sigmas": 5, "batch_size": 128,
              "log_every": 50, "checkpoint_every": 50},
    "sample": {"n_samples": 200, "n_steps_each": 5, "batch_size": 200},
    "evaluate": {"n_eval": 100, "n_bootstrap": 20,
                 "checkpoints": {"metrics": ["mmd"], "n_samples": 100, "sampler": "sample"}},
}
STAGES = ["gmm2d-evaluate", "gmm2d-prepare", "gmm2d-sample", "gmm2d-train"]




def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("STEIN_", "PREFECT_", "MLFLOW_TRACKING", "MLFLOW_AUTH", "MLFLOW_FLASK", "RAY_ADDRESS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    return env | extra


# --------------------------------------------------------------------------------------------- the servers


@dataclass
class Server:
    url: str
    state: Path  # the server project's .stein/
    startup_seconds: float
    admin_password: str | None = None


@contextlib.contextmanager
def stein_server(home: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """`stein server ARGS` for the project at ``home``, yielded once it prints its URL; stopped by SIGTERM to its
    process group (its own session), SIGKILL after 30 s."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "--port", str(port), *args], cwd=home,
                            env=_clean_env(STEIN_PROJECT_ROOT=str(home), PYTHONPATH=str(REPO), **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        if not first.startswith("MLflow tracking server on"):
            proc.wait(timeout=30)
            pytest.fail(f"stein server did not start (exit {proc.returncode}): {first}{proc.stderr.read()}")
        startup = float(re.search(r"started in ([0-9.]+) s", first).group(1))
        print(f"stein server {' '.join(args)}: up in {startup:.1f} s (inside the command)")
        yield Server(f"http://127.0.0.1:{port}", home / ".stein", startup)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=30)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    with stein_server(tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[Server]:
    password = secrets.token_urlsafe(24)  # a fresh one: no default, never written by the test
    with stein_server(tmp_path_factory.mktemp("auth-server"), "--auth", env={"MLFLOW_AUTH_ADMIN_PASSWORD": password}) as s:
        s.admin_password = password
        yield s


# -------------------------------------------------------------------------------------- the pipeline copy


@pytest.fixture(scope="module")
def repo(tmp_path_factory, project_copier) -> Path:
    return project_copier(tmp_path_factory.mktemp("tracking") / "repo", params={"gmm2d": TINY})


def stein_run(repo: Path, prefect_api: str, tracking: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = _clean_env(STEIN_THREADS="1", PREFECT_API_URL=prefect_api, PREFECT_HOME=str(repo / ".stein" / "prefect"),
                     MLFLOW_TRACKING_URI=tracking, **env)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "gmm2d", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=1200)
    print(f"stein run {' '.join(args)}: exit {proc.returncode} in {time.perf_counter() - t0:.0f} s")
    print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
    return proc


def request(url: str, *, auth: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET, or of a POST of ``body`` as JSON, with basic auth when given."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def check_run_tree(repo: Path, server: Server, client) -> dict:
    """The latest pipeline run on ``server`` with its four stage children, the train run's step metrics from Ray
    rank 0 and artifacts downloadable through the server; returns {stage: run} of that pipeline run."""
    exp = client.get_experiment_by_name("gmm2d")
    assert exp.artifact_location == f"mlflow-artifacts:/{exp.experiment_id}"  # proxied, not a client's local path
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("stein.kind") == "pipeline")
    children = {r.data.tags["stein.dvc_stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == STAGES
    assert all(r.info.status == "FINISHED" for r in [parent, *children.values()])
    metrics = json.loads((repo / "metrics" / "gmm2d.json").read_text())
    assert parent.data.metrics["mmd"] == pytest.approx(metrics["mmd"])
    train = children["gmm2d-train"]
    curve = client.get_metric_history(train.info.run_id, "train/dsm_loss")
    assert [m.step for m in curve] == [50, 100]  # logged by Ray worker rank 0, over HTTP
    assert train.data.tags["stein.input.train.md5"] == md5(repo / "data/gmm2d/train.parquet")

    # artifacts: through the server's artifact proxy, byte for byte, and kept under its artifacts destination
    for run, rel, local in ((parent, "gmm2d.json", repo / "metrics/gmm2d.json"),
                            (train, "model/model.pt", repo / "models/gmm2d/model.pt")):
        assert run.info.artifact_uri == f"mlflow-artifacts:/{exp.experiment_id}/{run.info.run_id}/artifacts"
        path = f"{exp.experiment_id}/{run.info.run_id}/artifacts/{rel}"
        status, body = request(f"{server.url}/api/2.0/mlflow-artifacts/artifacts/{path}",
                               auth=("admin", server.admin_password) if server.admin_password else None)
        assert status == 200 and hashlib.md5(body).hexdigest() == md5(local), rel
        assert md5(server.state / "mlartifacts" / path) == md5(local)
    plots = {a.path for a in client.list_artifacts(children["gmm2d-evaluate"].info.run_id, "plots")}
    assert "plots/samples.png" in plots
    # nothing local: every stage logged to the server
    assert not (repo / ".stein" / "mlflow.db").exists() and not (repo / ".stein" / "mlartifacts").exists()
    return children


# ------------------------------------------------------------------------------------------------- tests


def test_the_pipeline_logs_to_the_tracking_server_over_http(repo, prefect_api, server):
    import mlflow

    proc = stein_run(repo, prefect_api, server.url, "--force")
    assert proc.returncode == 0
    check_run_tree(repo, server, mlflow.MlflowClient(tracking_uri=server.url))
    # the server's own store holds them, in the server project's .stein/
    assert (server.state / "mlflow.db").is_file()


def test_with_auth_only_permitted_users_log(repo, prefect_api, auth_server, monkeypatch):
    import mlflow

    url, admin = auth_server.url, ("admin", auth_server.admin_password)
    t_start = time.time()
    # anonymous: 401 on the API (the health check stays open for probes)
    assert request(f"{url}/api/2.0/mlflow/experiments/search?max_results=5")[0] == 401
    assert request(f"{url}/health")[0] == 200
    assert request(f"{url}/api/2.0/mlflow/experiments/search?max_results=5", auth=("admin", "not-the-password"))[0] == 401

    # the admin's pipeline run logs everything, Ray rank 0 included (it inherits the credentials)
    proc = stein_run(repo, prefect_api, url, "--force",
                     MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=auth_server.admin_password)
    assert proc.returncode == 0
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server.admin_password)
    client = mlflow.MlflowClient(tracking_uri=url)
    check_run_tree(repo, auth_server, client)
    exp_id = client.get_experiment_by_name("gmm2d").experiment_id
    n_runs = len(client.search_runs([exp_id], max_results=1000))

    # a user the admin creates and grants nothing: reads (default READ), may not write: 403
    bob = ("bob", secrets.token_urlsafe(18))
    status, _ = request(f"{url}/api/2.0/mlflow/users/create", auth=admin, body={"username": bob[0], "password": bob[1]})
    assert status == 200
    assert request(f"{url}/api/2.0/mlflow/experiments/get?experiment_id={exp_id}", auth=bob)[0] == 200
    status, body = request(f"{url}/api/2.0/mlflow/runs/create", auth=bob, body={"experiment_id": exp_id})
    assert status == 403, body
    # ... and their pipeline run stops with that error before any stage runs
    proc = stein_run(repo, prefect_api, url, "--force", MLFLOW_TRACKING_USERNAME=bob[0], MLFLOW_TRACKING_PASSWORD=bob[1])
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pipeline 'gmm2d' failed") and "403" in last, last
    assert "Metrics:" not in proc.stdout
    assert len(client.search_runs([exp_id], max_results=1000)) == n_runs  # nothing logged

    # once the admin grants EDIT on the experiment, bob may log into it
    status, body = request(f"{url}/api/3.0/mlflow/users/permissions/grant", auth=admin, body={
        "username": bob[0], "resource_type": "experiment", "resource_id": exp_id, "permission": "EDIT"})
    assert status == 200, body
    assert request(f"{url}/api/2.0/mlflow/runs/create", auth=bob, body={"experiment_id": exp_id})[0] == 200

    # no password in any file the pipeline, the server or Ray wrote
    scanned = 0
    for root in (repo, auth_server.state, Path("/tmp/ray")):  # Ray's session logs: every runtime env it was given
        for path in root.rglob("*"):
            try:
                if not path.is_file() or path.is_symlink() or path.stat().st_mtime < t_start - 1:
                    continue
                data = path.read_bytes()
            except OSError:  # another process's session cleaned up meanwhile
                continue
            scanned += 1
            for secret in (auth_server.admin_password, bob[1]):
                assert secret.encode() not in data, f"a password in {path}"
    assert scanned > 10


def test_a_restart_with_another_admin_password_exits_2(auth_server, tmp_path):
    """MLflow uses the admin password only when it creates the admin; `stein server --auth` checks that the one
    it was given works, so the credentials handed to the pipeline are never silently wrong."""
    home = auth_server.state.parent
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "server", "--auth", "--port", str(port)], cwd=home,
                          env=_clean_env(STEIN_PROJECT_ROOT=str(home), PYTHONPATH=str(REPO),
                                         MLFLOW_AUTH_ADMIN_PASSWORD=secrets.token_urlsafe(24)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: $MLFLOW_AUTH_ADMIN_PASSWORD is not the password of the admin user 'admin'"), last
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the server it started is stopped
