"""A process that started a local Ray and gets SIGTERM (its `stein run` stopped or killed) takes that Ray down,
workers included, and exits with an error.

The stage's handler SIGKILLs its Ray rather than letting Ray's handler stop the node gracefully: in a training, that
took 5-6 s here, during which the Ray Train worker trained on and registered checkpoints nobody asked for (a small
training ran to its end, and the rerun had nothing left to resume). This actor, a thread working on as Train's
does, is not slowed by the graceful path as much (0.6 s to its end there, 0.05 s here: measured, not asserted);
tests/e2e/test_kill_e2e.py is where the graceful path fails."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

DRIVER = textwrap.dedent("""
    import signal, sys, threading, time
    from pathlib import Path
    import ray
    from tasks.infra.ray_client import init_ray
    from tasks.infra.runtime import RuntimeSettings

    init_ray(RuntimeSettings(num_workers=1, threads=1), Path(sys.argv[1]), threads=1)

    @ray.remote
    class Busy:  # as a Ray Train worker: an actor whose work runs on in a thread of its own
        def start(self):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

            def work():
                end = time.monotonic() + 60
                while time.monotonic() < end:
                    time.sleep(0.05)

            threading.Thread(target=work).start()

    busy = Busy.remote()
    ray.get(busy.start.remote())
    print("started", flush=True)
    while True:  # as Train's controller: the driver polls
        time.sleep(0.1)
""")


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:  # ended meanwhile
            pass
    return out


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


@pytest.mark.slow
def test_sigterm_takes_the_local_ray_down_at_once_workers_included(project):
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(project)], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not any(_name(p) == "ray::Busy" for p in _alive(tree)):  # the task is running on a worker
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the Ray task did not start within 120 s"
            with contextlib.suppress(psutil.Error, OSError):  # a process that ends while psutil reads it
                tree = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.2)
        assert {"raylet", "gcs_server"} <= {_name(p) for p in tree}
        worker = next(p for p in tree if _name(p) == "ray::Busy")
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while _alive([worker]) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        worker_gone = time.monotonic() - t0
        while (alive := _alive(tree)) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        gone_after = time.monotonic() - t0
        proc.wait(timeout=30)
        print(f"worker gone after {worker_gone:.2f} s, every Ray process after {gone_after:.2f} s, "
              f"driver after {time.monotonic() - t0:.2f} s")
        assert not alive, [(p.pid, _name(p)) for p in alive]
        assert proc.returncode != 0, proc.stdout.read()[-3000:]  # SystemExit(143) unwinds as 1 through Ray's exit
    finally:
        for p in _alive(tree):
            p.kill()
        if proc.poll() is None:
            proc.kill()
