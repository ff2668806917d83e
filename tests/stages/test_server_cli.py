"""`stein server`: the server it builds (loopback only, state under .stein/, no secret in any file), its bad inputs
(exit 2, one line, nothing started or written) and a real start: the project's store over HTTP with proxied
artifacts, and nothing left running after SIGTERM or SIGKILL of the command.

The pipeline logging to such a server, with and without auth, is tests/e2e/test_tracking_server.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tasks.infra.runtime import free_port
from tasks.infra.server import ADMIN_PASSWORD_ENV, SECRET_KEY_ENV, ServerSetupError, TrackingServer, check_admin_password

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "correct-horse-battery-staple"


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEIN_", "MLFLOW_TRACKING", "MLFLOW_AUTH", "MLFLOW_FLASK"))}
    return env | {"PYTHONPATH": str(REPO)} | extra


def stein_server(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "server", *args], cwd=project, env=_cli_env(**env),
                          capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------------------- the spec


def test_the_server_listens_on_loopback_and_keeps_its_state_in_the_project(tmp_path):
    spec = TrackingServer(tmp_path / ".stein", 5123)
    cmd = spec.command()
    assert cmd[1] == "server" and Path(cmd[0]).name == "mlflow"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5123"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / '.stein' / 'mlflow.db'}"
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / ".stein" / "mlartifacts")
    assert "--serve-artifacts" in cmd and "--app-name" not in cmd
    env = spec.environment({"PATH": "/bin", "MLFLOW_TRACKING_URI": "http://elsewhere", "MLFLOW_TRACKING_PASSWORD": "x"})
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert "MLFLOW_TRACKING_URI" not in env and "MLFLOW_TRACKING_PASSWORD" not in env  # a client's, not the server's
    assert SECRET_KEY_ENV not in env and "MLFLOW_AUTH_CONFIG_PATH" not in env


def test_with_auth_the_secrets_stay_in_the_environment(tmp_path):
    spec = TrackingServer(tmp_path / ".stein", 5123, auth=True, default_permission="NO_PERMISSIONS")
    assert spec.command()[-2:] == ["--app-name", "basic-auth"]
    base = {"PATH": "/bin", ADMIN_PASSWORD_ENV: PASSWORD}
    env1, env2 = spec.environment(base), spec.environment(base)
    assert env1[ADMIN_PASSWORD_ENV] == PASSWORD
    # a random secret key for each start when none is given; the one given is kept
    assert re.fullmatch(r"[0-9a-f]{64}", env1[SECRET_KEY_ENV]) and env1[SECRET_KEY_ENV] != env2[SECRET_KEY_ENV]
    assert spec.environment(base | {SECRET_KEY_ENV: "k" * 40})[SECRET_KEY_ENV] == "k" * 40
    assert env1["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / ".stein" / "mlflow-auth.ini")
    spec.prepare()
    written = {p: p.read_bytes() for p in (tmp_path / ".stein").rglob("*") if p.is_file()}
    assert set(written) == {spec.auth_config}
    text = written[spec.auth_config].decode()
    assert PASSWORD not in text and "admin_password" not in text and env1[SECRET_KEY_ENV] not in text
    assert f"database_uri = sqlite:///{tmp_path / '.stein' / 'mlflow-auth.db'}" in text
    assert "default_permission = NO_PERMISSIONS" in text and "admin_username = admin" in text
    assert "auth_cache_ttl_seconds = 60" in text  # else every request pays the password hash (~1 s here)


@pytest.mark.parametrize(("password", "why"), [
    (None, "there is no default"), ("", "there is no default"), ("eleven-char", "at least 12"),
    ("password1234", "well-known default"),
])
def test_an_unusable_admin_password_is_refused(password, why):
    with pytest.raises(ServerSetupError, match=why):
        check_admin_password(password)


def test_an_unknown_default_permission_is_refused(tmp_path):
    with pytest.raises(ServerSetupError, match="NO_PERMISSIONS"):
        TrackingServer(tmp_path, 5000, auth=True, default_permission="WRITE")


# ----------------------------------------------------------------------------------------- bad input: exit 2


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--auth"], {}, f"--auth needs the admin user's password in ${ADMIN_PASSWORD_ENV} (there is no default)"),
    (["--auth"], {ADMIN_PASSWORD_ENV: "short"}, "is 5 characters long; MLflow needs at least 12"),
    (["--auth"], {ADMIN_PASSWORD_ENV: "password1234"}, "well-known default of older MLflow releases"),
    (["--default-permission", "EDIT"], {}, "--default-permission EDIT needs --auth"),
], ids=["no-password", "short-password", "legacy-password", "permission-without-auth"])
def test_bad_input_exits_2_with_one_line_and_starts_nothing(project, args, env, message):
    port = free_port()
    proc = stein_server(project, *args, "--port", str(port), **env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not any((project / ".stein" / f).exists() for f in ("mlflow.db", "mlflow-auth.ini", "mlflow-server.log"))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens


def test_a_port_in_use_exits_2(project):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = stein_server(project, "--port", str(port))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: port {port} on 127.0.0.1 is in use (Address already in use): "
                                   "choose another with --port")
    assert not (project / ".stein" / "mlflow.db").exists()


# ------------------------------------------------------------------------------------------------ a real start


def _mlflow_server_processes(port: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ("mlflow server" in cmd or "uvicorn" in cmd) and f"--port {port}" in cmd:
            found.append(p)
    return found


@pytest.mark.slow
# SIGKILL (the kernel's parent-death signal) is proven for the Prefect server in tests/stages/test_servers.py and
# for `stein run` in tests/e2e/test_signals.py; here it is heavy, to keep `make test` under 15 minutes
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.heavy)],
                         ids=["SIGTERM", "SIGKILL"])
def test_stein_server_serves_the_project_store_and_stops_with_the_command(project, monkeypatch, sig):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "--port", str(port)], cwd=project,
                            env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    server: list[psutil.Process] = []
    try:
        first = proc.stdout.readline()
        if not first.startswith(f"MLflow tracking server on http://127.0.0.1:{port} (started in"):
            proc.wait(timeout=30)
            pytest.fail(f"stein server did not start (exit {proc.returncode}): {first}{proc.stderr.read()}")
        print(first.strip())
        server = _mlflow_server_processes(port)
        assert server, f"no mlflow server process on port {port}"
        for p in server:  # nothing listens beyond the loopback interface
            for conn in p.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    assert conn.laddr.ip == "127.0.0.1", conn

        # a stage's run over HTTP: the experiment gets the server's proxied location, the artifact goes through
        # the server into .stein/mlartifacts/<experiment id>/, and the run is in the project's store
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        import mlflow

        from tasks.tracking.log import experiment_id, stage_run

        out = project / "out.txt"
        out.write_text("hello\n")
        with stage_run("demo", "prepare", params={"a": 1}, outputs={"out": out}, root=project) as run:
            mlflow.log_artifact(str(out), artifact_path="files")
        exp = experiment_id("demo", project)
        client = mlflow.MlflowClient()
        assert client.get_experiment(exp).artifact_location == f"mlflow-artifacts:/{exp}"
        stored = project / ".stein" / "mlartifacts" / exp / run.info.run_id / "artifacts" / "files" / "out.txt"
        assert stored.read_text() == "hello\n"
        import sqlite3

        with sqlite3.connect(project / ".stein" / "mlflow.db") as db:
            assert db.execute("select status from runs where run_uuid = ?", (run.info.run_id,)).fetchone() == ("FINISHED",)
        # the store the server created, its log and the folder are the owner's alone (no other local user reads runs)
        assert _mode(project / ".stein") == 0o700
        for name in ("mlflow.db", "mlflow-server.log"):
            assert _mode(project / ".stein" / name) == 0o600, name

        proc.send_signal(sig)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while (alive := [p for p in server if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive, f"left running after {sig.name}: {[p.pid for p in alive]}"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in server:
            if p.is_running():
                p.kill()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_any_stein_command_makes_the_state_folder_and_its_stores_owner_only(project):
    """A project from before (or a copy made with a loose umask): .stein/ 0755 with 0644 stores. The next `stein`
    command makes the folder 0700 and each store 0600; what is not a store keeps its mode."""
    state = project / ".stein"
    (state / "prefect").mkdir(parents=True, exist_ok=True)
    stores = [state / "mlflow.db", state / "mlflow-auth.db", state / "prefect" / "prefect.db", state / "mlflow.db-wal"]
    for f in stores:
        f.write_bytes(b"")
        os.chmod(f, 0o644)
    other = state / "notes.txt"
    other.write_text("mine\n")
    os.chmod(other, 0o644)
    os.chmod(state, 0o755)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "status", "gmm2d"], cwd=project, env=_cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # up to date or stale: either way it ran
    assert _mode(state) == 0o700
    assert {f.name: _mode(f) for f in stores} == {f.name: 0o600 for f in stores}
    assert _mode(other) == 0o644


def _ui_processes(port: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ("mlflow" in cmd or "uvicorn" in cmd) and f"--port {port}" in cmd and "flows.cli" not in cmd:
            found.append(p)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.heavy)],
                         ids=["SIGTERM", "SIGKILL"])  # SIGKILL heavy, as for `stein server`: make test under 10 min
def test_stein_ui_serves_and_stops_with_the_command(project, sig):
    """`stein ui` runs `mlflow ui` as a child under the rules of `stein server` (its own session, a parent-death
    signal): before, it exec'd into it, and after a SIGKILL its uvicorn served on with no parent."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], cwd=project,
                            env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ui: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not _http_ok(f"http://127.0.0.1:{port}/health"):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "mlflow ui did not answer within 120 s"
            time.sleep(0.3)
        ui = _ui_processes(port)
        assert ui and all(p.pid != proc.pid for p in ui), [(p.pid, p.cmdline()) for p in ui]
        proc.send_signal(sig)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while (alive := [p for p in ui if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not alive, f"left running after {sig.name}: {[(p.pid, p.cmdline()) for p in alive]}"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in ui:
            if p.is_running():
                p.kill()


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


# ------------------------------------------------------------------------------------ Ray workers as clients


def test_ray_workers_get_the_server_and_user_and_only_a_joined_cluster_the_password(tmp_path, monkeypatch):
    """Rank 0 logs with the driver's MLflow settings. A local Ray's workers inherit the password from the driver;
    Ray writes every runtime env into its session logs, so the password travels there only to a cluster Ray joins
    (whose workers inherit nothing from us)."""
    from tasks.infra.ray_client import ray_runtime_env
    from tasks.infra.runtime import RuntimeSettings

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    local = ray_runtime_env(RuntimeSettings(), tmp_path, 1)["env_vars"]
    assert local["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000" and local["MLFLOW_TRACKING_USERNAME"] == "pipeline"
    assert PASSWORD not in json.dumps(local)
    joined = ray_runtime_env(RuntimeSettings(ray_address="ray://head:10001"), tmp_path, 1)["env_vars"]
    assert joined["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
