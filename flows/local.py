"""Local helpers that must not import Prefect: DVC calls and the project's Prefect server.

Prefect reads its settings (``PREFECT_API_URL``) when it is first imported, so the server is started and the
variable set here, before any flow module is imported. Keeping these helpers Prefect-free also keeps the
no-op ``stein run`` (a ``dvc status``) fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from flows.registry import get_pipeline
from tasks.runtime import state_dir


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC and stage commands: this interpreter's bin first on PATH (so a stage's
    ``python`` is the project's), plus ``extra``."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def dvc(*args: str, root: Path, env: dict[str, str] | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=env or tool_env(), text=True,
        capture_output=capture, check=False,
    )


def stale_stages(pipeline: str, root: Path) -> list[str] | None:
    """Stages of ``pipeline`` that ``dvc repro`` would run (an empty list: up to date); None if DVC fails."""
    spec = get_pipeline(pipeline)
    target = spec.final_stage
    proc = dvc("status", "--with-deps", "--json", target, root=root, capture=True)
    if proc.returncode != 0:
        return None
    try:
        status = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        return None
    return sorted(status)


class ProjectBusy(RuntimeError):
    """Another ``stein run`` is reproducing pipelines in this project (DVC allows one ``dvc repro`` at a time)."""


@contextlib.contextmanager
def project_lock(root: Path) -> Iterator[None]:
    """Hold ``.stein/run.lock`` (an exclusive ``flock``, released by the kernel when this process ends, however it
    ends) while a pipeline is reproduced: a second ``stein run`` fails at once, naming the first, instead of
    starting its servers and then failing inside ``dvc repro`` on DVC's repository lock."""
    path = state_dir(root) / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ProjectBusy(f"{holder} is reproducing pipelines in {root} (DVC runs one `dvc repro` at a time): "
                              f"wait for it to finish, or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"`stein run` (pid {os.getpid()})")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server(timeout: float = 90.0) -> Iterator[str]:
    """A Prefect API for the flows of one pipeline run.

    With ``PREFECT_API_URL`` set (a cluster's server), use it. Otherwise start ``prefect server`` on
    127.0.0.1 for the duration: every stage process then talks to it (about 2 s per flow) instead of starting
    its own ephemeral server (7-14 s per process on this machine). Runs persist in the project's Prefect home.
    """
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url
        return
    home = Path(os.environ.get("PREFECT_HOME") or state_dir() / "prefect")
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    logfile = home / "server.log"
    env = tool_env({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"})
    prefect_bin = Path(sys.executable).parent / "prefect"
    with open(logfile, "w") as out:
        # its own process group (a Ctrl-C of the terminal reaches only us, and we stop it after the flow's last
        # log lines), and it dies with us even when we are killed: PR_SET_PDEATHSIG on Linux
        proc = subprocess.Popen(
            [str(prefect_bin), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-scheduler"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_die_with_parent,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with code {proc.returncode}; see {logfile}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not answer on {url} within {timeout:.0f} s; see {logfile}")
            time.sleep(0.2)
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        stop_process_group(proc)


def _die_with_parent() -> None:
    """In a child before exec: ask the kernel to send it SIGTERM when its parent dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_process_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM to the process group ``proc`` leads (the server and anything it started), SIGKILL after
    ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def exit_on_termination() -> None:
    """SIGTERM and SIGHUP end this process like Ctrl-C does, through ``finally`` blocks and context managers (which
    stop the servers it started); the default action would end it on the spot and leave them running."""

    def _exit(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)
