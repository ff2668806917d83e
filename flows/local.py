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
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from flows.registry import get_pipeline
from tasks.infra.runtime import free_port, state_dir


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC and stage commands: this interpreter's bin first on PATH (so a stage's
    ``python`` is the project's), plus ``extra``."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def dvc(*args: str, root: Path, env: dict[str, str] | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    """Run DVC, capturing its output or not. Either way it runs in its own process group, which is stopped
    whatever way this call ends (an exception, Ctrl-C, SIGTERM turned into SystemExit), and which the kernel
    signals when this process dies: no stage command, nor the Ray it started, outlives ``stein``.
    Without ``capture`` the output streams to ours as it comes, and the result's ``stderr`` holds the last 8 KiB
    of it (where DVC's ERROR line is)."""
    cmd = [sys.executable, "-m", "flows.dvc_main", *args]  # DVC that ends its stage command when it is ended
    proc = subprocess.Popen(cmd, cwd=root, env=env or tool_env(), stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=die_with_parent)
    try:
        if capture:
            out, err = proc.communicate()
        else:
            out, err = None, _tee(proc.stderr, sys.stderr)
            proc.wait()
    except BaseException:
        stop_process_group(proc)
        raise
    decode = lambda b: b.decode(errors="replace") if b is not None else None  # noqa: E731
    return subprocess.CompletedProcess(cmd, proc.returncode, decode(out), decode(err))


def _tee(src, dst, keep: int = 8192) -> bytes:
    """Copy ``src`` to ``dst`` chunk by chunk as it arrives (progress bars redraw with ``\\r``, not lines) until
    EOF; return the last ``keep`` bytes."""
    tail = b""
    out = getattr(dst, "buffer", None)
    while chunk := os.read(src.fileno(), 65536):
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            dst.write(chunk.decode(errors="replace"))
        tail = (tail + chunk)[-keep:]
    return tail


#: The environment variable naming the file where a failing ``stein stage`` records its error for ``stein run``.
STAGE_ERROR_ENV = "STEIN_STAGE_ERROR_FILE"


class StageFailed(RuntimeError):
    """A stage run by ``dvc repro`` failed; the message is the stage's own error, ``exit_code`` its exit code (2
    for bad input)."""

    def __init__(self, message: str, exit_code: int = 1):
        self.exit_code = exit_code
        super().__init__(message)

    def __reduce__(self):
        return type(self), (str(self), self.exit_code)


def record_stage_error(stage: str, exc: BaseException, exit_code: int) -> None:
    """In a stage command run under ``stein run``: write the error's first line for the driver (a no-op
    otherwise). The full traceback, if any, stays in the stage's output above."""
    path = os.environ.get(STAGE_ERROR_ENV)
    if not path:
        return
    lines = str(exc).strip().splitlines() or [""]
    message = lines[0][:2000] + (" [...]" if len(lines) > 1 else "")
    if exit_code != 2:
        message = f"{type(exc).__name__}: {message}"
    with open(path, "w") as f:
        json.dump({"stage": stage, "exit_code": exit_code, "message": message}, f)


def read_stage_error(path: Path) -> StageFailed | None:
    """The error a stage recorded with :func:`record_stage_error`, or None."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return StageFailed(f"stage {rec['stage']}: {rec['message']}", int(rec["exit_code"]))


def dvc_remotes(root: Path) -> tuple[dict[str, str], str | None]:
    """The DVC remotes configured for the project (name -> URL) and the default remote's name (None if unset),
    merged over DVC's system, global, repository and ``--local`` config levels exactly as ``dvc push`` merges
    them: one ``dvc config --list`` call. Raises RuntimeError with DVC's message if DVC cannot read its config."""
    proc = dvc("config", "--list", root=root, capture=True)
    if proc.returncode != 0:
        errors = [ln for ln in (proc.stderr or "").splitlines() if ln.startswith("ERROR")]
        raise RuntimeError(errors[-1] if errors else f"`dvc config --list` exited with {proc.returncode}")
    remotes: dict[str, str] = {}
    default = None
    for line in (proc.stdout or "").splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "core.remote":
            default = value
        elif key.startswith("remote.") and key.endswith(".url"):
            remotes[key[len("remote."):-len(".url")]] = value
    return remotes, default


class ProjectBusy(RuntimeError):
    """Another ``stein run`` is reproducing pipelines in this project (DVC allows one ``dvc repro`` at a time)."""


def dvc_lock_holder(root: Path) -> str | None:
    """The process holding DVC's repository lock of ``root`` (``.dvc/tmp/lock``: an ``flock`` its holder writes its
    pid into), as ``process PID (`its command line`)``; None when it is free. The probe takes the lock for an
    instant and gives it back (DVC retries a busy lock for a few seconds)."""
    path = root / ".dvc" / "tmp" / "lock"
    try:
        f = open(path)  # noqa: SIM115 - closed below
    except OSError:
        return None  # no DVC command has run here yet
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = f.read().strip()
            try:
                cmd = " ".join(Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
            except (OSError, ValueError):
                cmd = ""
            who = f"process {pid or '(pid not recorded)'}"
            return f"{who} (`{cmd[:200]}`)" if cmd else who
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def project_lock(root: Path, holder: str = "`stein run`") -> Iterator[None]:
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
        if (dvc_holder := dvc_lock_holder(root)) is not None:  # a bare `dvc repro` (or dvc exp, dvc push, ...)
            raise ProjectBusy(f"{dvc_holder} holds DVC's lock of {root} (.dvc/tmp/lock): wait for it to finish, or "
                              "stop it")
        f.seek(0)
        f.truncate()
        f.write(f"{holder} (pid {os.getpid()})")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    logfile = home / "server.log"
    env = tool_env({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"})
    prefect_bin = Path(sys.executable).parent / "prefect"
    with open_private_log(logfile) as out:
        # its own process group (a Ctrl-C of the terminal reaches only us, and we stop it after the flow's last
        # log lines), and it dies with us even when we are killed: PR_SET_PDEATHSIG on Linux
        proc = subprocess.Popen(
            [str(prefect_bin), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-scheduler"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=private_child,
        )
    ui_url = os.environ.get("PREFECT_UI_URL")
    try:
        wait_until_healthy(proc, f"{url}/health", timeout, "prefect server", logfile)
        os.environ["PREFECT_API_URL"] = url
        # This server has no UI and stops with the run: an empty UI URL keeps Prefect from printing "View at
        # http://127.0.0.1:PORT/runs/flow-run/..." links that lead nowhere (Prefect's url_for gives None without a
        # base URL). A server named by the user's PREFECT_API_URL (above) keeps its links.
        os.environ["PREFECT_UI_URL"] = ""
        yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        if ui_url is None:
            os.environ.pop("PREFECT_UI_URL", None)
        else:
            os.environ["PREFECT_UI_URL"] = ui_url
        stop_process_group(proc)


def wait_until_healthy(proc: subprocess.Popen, health_url: str, timeout: float, name: str, log: Path) -> None:
    """Wait until ``health_url`` answers 200 (an HTTP error status counts as not yet). RuntimeError, naming the log,
    when ``proc`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:  # refused, or an HTTP error status (urllib's HTTPError is an OSError)
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not answer on {health_url} within {timeout:.0f} s; see {log}")
        time.sleep(0.2)


def open_private_log(path: Path):
    """``path`` opened for writing (truncated), owner-only: a server's log names its users and runs."""
    out = open(path, "w", opener=lambda p, flags: os.open(p, flags, 0o600))  # noqa: SIM115 - the caller closes it
    os.chmod(path, 0o600)  # a log from before, created 0644
    return out


def private_child() -> None:
    """In a server's child before exec: files it creates are owner-only (umask 077: its database, its log), and it
    dies with its parent (:func:`die_with_parent`)."""
    os.umask(0o077)
    die_with_parent()


def die_with_parent() -> None:
    """In a child before exec: ask the kernel to send it SIGTERM when its parent dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


#: The environment variable by which ``flows.dvc_main`` tells the stage commands its PID.
DVC_PID_ENV = "STEIN_DVC_PID"


def _parent_of(pid: int) -> int | None:
    """The parent PID of ``pid`` from /proc (None: gone, or not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces; then state, ppid


def _descends_from(ancestor: int) -> bool:
    """Whether this process still descends from ``ancestor`` (a few generations up: the stage's shell between).
    A dead ancestor's children are re-parented, so the chain no longer reaches it, zombie or reused PID alike."""
    pid = os.getppid()
    for _ in range(8):
        if pid == ancestor:
            return True
        if pid is None or pid <= 1:
            return False
        pid = _parent_of(pid)
    return False


def end_with_dvc(poll: float = 0.5) -> None:
    """In a stage command DVC started (``STEIN_DVC_PID`` set): a daemon thread that sends this process SIGTERM
    once DVC is no longer among its ancestors, whatever ended DVC. The parent-death signal (:func:`die_with_parent`)
    covers a stage whose parent is DVC; this covers one whose parent is DVC's shell, should the shell outlive DVC."""
    import threading

    raw = os.environ.get(DVC_PID_ENV, "")
    if not raw.isdigit() or not Path("/proc/self/stat").exists() or not _descends_from(int(raw)):
        return
    ancestor = int(raw)

    def watch() -> None:
        while _descends_from(ancestor):
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="end-with-dvc", daemon=True).start()


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
