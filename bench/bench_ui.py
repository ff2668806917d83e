"""Time to first page of the MLflow UI, and of the read-only commands (`stein runs`, `stein status`).

The UI: what `stein ui` starts (one server worker, MLflow's GenAI job runner off) against plain ``mlflow ui`` (four
workers and the job runner), interleaved, on the project's store. Each start is timed from the command to the
first ``200`` of ``/`` (the page) and of the experiments API the page calls next; the server is then stopped by
its process group. The commands: the wall time of each, run ``--repeats`` times.

    python bench/bench_ui.py [--repeats 3] [--port 5091]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _first_page(cmd: list[str], port: int, env: dict[str, str], limit: float = 300.0) -> tuple[float, float]:
    """Seconds from start to the first answer of ``/`` and of the experiments search."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    page = None
    try:
        while time.perf_counter() - t0 < limit:
            try:
                if page is None:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
                    page = time.perf_counter() - t0
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=50",
                                       timeout=30).read()
                return page, time.perf_counter() - t0
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"no page after {limit:.0f} s: {' '.join(cmd)}")
    finally:
        from flows.local import stop_process_group

        stop_process_group(proc)


def _command_seconds(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(BIN / "stein"), *args], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--port", type=int, default=5091)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tasks.infra.runtime import OFFLINE_ENV

    env = os.environ | OFFLINE_ENV
    store = f"sqlite:///{REPO / '.stein' / 'mlflow.db'}"
    plain = [str(BIN / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(args.port), "--backend-store-uri", store]
    variants = {"mlflow ui (4 workers, job runner)": plain,
                "stein ui (1 worker, no job runner)": [str(BIN / "stein"), "ui", "--port", str(args.port)]}
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, cmd in variants.items():
            times[name].append(_first_page(cmd, args.port, env))
    for name, ts in times.items():
        print(f"{name:<36} page {statistics.median(t[0] for t in ts):6.1f} s   experiments API "
              f"{statistics.median(t[1] for t in ts):6.1f} s   (median of {len(ts)}: {[round(t[0], 1) for t in ts]})")
    for cmd in (["runs"], ["runs", "gmm2d", "--json"], ["status"], ["status", "gmm2d"], ["--help"]):
        try:
            ts = [_command_seconds(cmd) for _ in range(args.repeats)]
        except subprocess.CalledProcessError as exc:
            print(f"stein {' '.join(cmd):<20} failed: {exc}")
            continue
        print(f"stein {' '.join(cmd):<20} {statistics.median(ts):5.2f} s  (median of {len(ts)})")
    print(f"# load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
