"""The local multi-node Ray cluster (`stein cluster`): start-up and shut-down per node, training throughput with 1
and 2 DDP workers on a local Ray and on a 2-node cluster, and (with ``--kill``) the time from killing a worker node's
raylet to training running again.

Everything goes through the real CLI in a temporary copy of the repository (tests/conftest.py's ``copy_project``),
with gmm2d's own training settings except ``--steps``; the stages share one Prefect server. Throughput is Ray Train
rank 0's ``train/samples_per_s`` (global batch / seconds inside the training steps, logged every ``log_every``
steps), median over the run; ``fit_seconds`` is the driver's ``trainer.fit()`` wall time.

    python bench/bench_cluster.py [--steps 1000] [--kill] [--json bench/out/cluster.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env(repo: Path, api: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STEIN_", "PREFECT_", "MLFLOW_TRACKING", "RAY_ADDRESS", "RAY_AUTH"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env | {"STEIN_THREADS": "1", "PREFECT_API_URL": api, "PREFECT_HOME": str(repo / ".stein" / "prefect")} | extra


def _stein(repo: Path, env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"stein {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc, seconds


def _last_train_run(repo: Path) -> dict:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / '.stein' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gmm2d")
    run = next(r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
               if r.data.tags.get("stein.family"))
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "train/samples_per_s")]
    m = run.data.metrics
    return {"samples_per_s_median": statistics.median(rates), "fit_seconds": m.get("fit_seconds"),
            "train_loop_seconds": m.get("train_loop_seconds"), "ray_init_seconds": m.get("ray_init_seconds"),
            "worker_nodes": len(set(run.data.tags.get("ray.worker_nodes", "").split(",")))}


def _kill_run(repo: Path, env: dict[str, str], state: dict) -> dict:
    """Train with 2 workers on the cluster; at step >= 1/3 of the run kill the worker node's raylet, restart the
    node with `stein cluster up`, and time the recovery from the lines rank 0 prints."""
    worker = next(r for r in state["nodes"] if r["role"] == "worker")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "stage", "train"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    import queue
    import threading

    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put((time.monotonic(), line))

    threading.Thread(target=read, daemon=True).start()
    out: dict = {}
    t_kill = None
    try:
        while proc.poll() is None or not lines.empty():
            try:
                t, line = lines.get(timeout=1)
            except queue.Empty:
                continue
            m = re.search(r"\[train\] step (\d+)/(\d+)", line)
            if t_kill is None and m and int(m.group(1)) * 3 >= int(m.group(2)):
                os.kill(worker["raylet_pid"], signal.SIGKILL)
                t_kill = time.monotonic()
                out["killed_at_step"] = int(m.group(1))
                up, seconds = _stein(repo, _env(repo, env["PREFECT_API_URL"]), "cluster", "up")
                out["node_restart_seconds"] = round(seconds, 1)
            elif t_kill is not None and "node_group_seconds" not in out and "on 2 Ray node(s)" in line:
                out["node_group_seconds"] = round(t - t_kill, 1)
            elif t_kill is not None and "first_step_seconds" not in out and m:
                out["first_step_seconds"] = round(t - t_kill, 1)
                out["resumed_at_step"] = int(m.group(1))
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    if proc.returncode != 0:
        raise SystemExit(f"the training with a killed node failed ({proc.returncode})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="training steps of each run (gmm2d's batch and network)")
    ap.add_argument("--kill", action="store_true", help="also time the recovery from a killed worker node")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "cluster.json")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    import yaml
    from conftest import copy_project

    from flows.local import prefect_server

    result: dict = {"steps": args.steps, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        def steps(dst: Path) -> None:
            path = dst / "conf" / "gmm2d.yaml"
            raw = yaml.safe_load(path.read_text())
            raw["train"].update({"n_steps": args.steps, "checkpoint_every": max(1, args.steps // 4)})
            path.write_text(yaml.safe_dump(raw, sort_keys=False))

        repo = copy_project(Path(tmp) / "repo", set_params=steps)
        os.environ.pop("PREFECT_API_URL", None)
        os.environ["PREFECT_HOME"] = str(repo / ".stein" / "prefect")
        with prefect_server(timeout=180) as api:
            base = _env(repo, api)
            _stein(repo, base, "stage", "prepare")
            try:
                up, seconds = _stein(repo, base, "cluster", "up", "--nodes", "2", "--cpus-per-node", "1")
                state = json.loads((repo / ".stein" / "cluster" / "state.json").read_text())
                result["cluster_up_seconds"] = round(seconds, 1)
                result["node_up_seconds"] = {r["name"]: r["up_seconds"] for r in state["nodes"]}
                print(up.stdout)
                for where in ("local", "cluster"):
                    for workers in (1, 2):
                        extra = {"STEIN_NUM_WORKERS": str(workers)}
                        if where == "cluster":
                            extra["RAY_ADDRESS"] = state["address"]
                        _, seconds = _stein(repo, _env(repo, api, **extra), "stage", "train")
                        row = _last_train_run(repo) | {"stage_seconds": round(seconds, 1)}
                        result[f"{where}_{workers}w"] = row
                        print(f"{where:<8} {workers} worker(s): {row['samples_per_s_median']:>9,.0f} samples/s  "
                              f"fit {row['fit_seconds']:.1f} s  loop {row['train_loop_seconds']:.1f} s  "
                              f"stage {seconds:.1f} s  on {row['worker_nodes']} node(s)", flush=True)
                if args.kill:
                    env = _env(repo, api, STEIN_NUM_WORKERS="2", RAY_ADDRESS=state["address"])
                    result["kill"] = _kill_run(repo, env, state)
                    print(f"node kill: {result['kill']}", flush=True)
            finally:
                down, seconds = _stein(repo, base, "cluster", "down")
                result["cluster_down_seconds"] = round(seconds, 1)
                result["node_down_seconds"] = {m.group(1): float(m.group(2)) for m in
                                               re.finditer(r"^(\S+) \(\w[^)]*\) stopped in ([\d.]+) s", down.stdout, re.M)}
                print(down.stdout)
    result["load_avg_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
