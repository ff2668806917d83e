"""Servers a command starts stop with it: the Prefect server of `stein run` is gone after a SIGTERM to the command
(its `finally` runs) and after a SIGKILL (the kernel's parent-death signal), with every process of its group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import time
from flows.local import exit_on_termination, prefect_server
exit_on_termination()
with prefect_server() as url:
    print(url, flush=True)
    time.sleep(600)
"""


def _server_processes(port: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "prefect" in cmd and "server" in cmd and f"--port {port}" in cmd:
            found.append(p)
    return found


@pytest.mark.slow
@pytest.mark.heavy  # 23 s; make test covers it through tests/e2e/test_signals.py (SIGTERM to stein run: no process left)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_prefect_server_stops_with_the_command_that_started_it(project, sig):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=project, env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        port = url.rsplit(":", 1)[1].split("/")[0]
        server = _server_processes(port)
        assert server, f"no prefect server process on port {port}"
        home = project / ".stein" / "prefect"  # its store and log are the owner's alone (the server runs umask 077)
        modes = {f.name: f.stat().st_mode & 0o777 for f in (home, home / "prefect.db", home / "server.log")}
        assert modes == {"prefect": 0o700, "prefect.db": 0o600, "server.log": 0o600}, modes
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (alive := [p for p in server if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive, f"left running after {sig.name}: {[p.pid for p in alive]}"
        assert not _server_processes(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in _server_processes(port) if "port" in locals() else []:
            p.kill()


# A stand-in for `stein stage`: it arms the watch and waits to be ended.
STAGE = """
import time
from flows.local import end_with_dvc
end_with_dvc(poll=0.1)
time.sleep(120)
"""

# A stand-in for DVC: it names itself as flows.dvc_main does and runs the stage through a shell that does not exec
# it (`; true`), so the shell stays between them; then it waits.
DVC = """
import os, subprocess, sys, time
os.environ["STEIN_DVC_PID"] = str(os.getpid())
proc = subprocess.Popen(["/bin/sh", "-c", f"'{sys.argv[1]}' '{sys.argv[2]}'; true"])
print(proc.pid, flush=True)
time.sleep(120)
"""


def test_a_stage_ends_when_dvc_dies_even_if_the_shell_between_them_lives_on(tmp_path):
    """The case CI once hit: DVC gone (SIGKILL here, so no group signal), the stage's shell alive, hence no
    parent-death signal for the stage. The stage's own watch of DVC ends it, and the shell with it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    (tmp_path / "stage.py").write_text(STAGE)
    dvc = subprocess.Popen([sys.executable, "-c", DVC, sys.executable, str(tmp_path / "stage.py")], stdout=subprocess.PIPE, text=True,
                           env=env, start_new_session=True)
    try:
        shell = psutil.Process(int(dvc.stdout.readline()))
        deadline = time.monotonic() + 60
        while not (stages := shell.children()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stages, "the shell started no stage"
        stage = stages[0]
        while len(stage.threads()) < 2 and time.monotonic() < deadline:  # armed: the watch thread runs
            time.sleep(0.05)
        assert len(stage.threads()) >= 2, "the stage never armed its watch"
        os.kill(dvc.pid, signal.SIGKILL)  # DVC alone: the shell is re-parented and lives on
        dvc.wait(timeout=10)
        gone, alive = psutil.wait_procs([stage, shell], timeout=20)
        assert not alive, f"left running after DVC died: {[(p.pid, p.name()) for p in alive]}"
        assert stage.pid in {p.pid for p in gone}
    finally:
        try:
            os.killpg(dvc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
