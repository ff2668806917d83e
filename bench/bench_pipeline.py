"""Benchmark the default pipeline: the whole ``stein run`` from scratch, each stage's wall time inside that run split
into compute and overhead, the same with a Ray per stage, and the no-op rerun.

It works on a fresh ``git clone`` of the committed repository in a temporary folder, with the shipped settings,
so the figures describe what a user gets from ``make run`` after install. Measurements:

1. ``stein run PIPELINE`` from scratch (includes starting the local Prefect server), with the pipeline's one
   shared Ray (the default), and again (the no-op);
2. inside that run, each stage's wall time, from DVC's "Running stage" line to the next one as they arrive (the
   stage process, DVC's hashing of its outputs and the lock); the stage's MLflow run says how much of it was compute (``compute_seconds``; for train the workers' loop) and, for train,
   how long joining Ray took and the fit around the loop. *Between stages* is the rest of the run (DVC hashing and
   lock updates, the pipeline's own MLflow run, the Prefect server's start);
3. with ``--own-ray``: the whole run again from scratch in a second clone with ``STEIN_PIPELINE_RAY=false`` (every
   stage that uses Ray starts its own, as before issue 24), the two runs one after the other on the same machine;
4. the cost of starting Python with the stage's imports (torch, Prefect, MLflow), measured alone.

Overhead = stage wall time − compute, split into process start + imports, Ray (joining or starting it + Train's
actors and reporting) and the rest (Prefect flow/task runs, MLflow run and artifacts, reading and writing files).

    python bench/bench_pipeline.py [--pipeline gmm2d] [--own-ray] [--json bench/out/pipeline.json] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def clean_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEIN_", "PREFECT_", "MLFLOW_TRACKING", "RAY_ADDRESS"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PREFECT_HOME"] = str(root / ".stein" / "prefect")
    return env


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def stage_metrics(root: Path, pipeline: str, stage: str) -> dict[str, float]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / '.stein' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(pipeline)
    runs = client.search_runs([exp.experiment_id], f"tags.`stein.stage` = '{stage}'", order_by=["attributes.start_time DESC"], max_results=1)
    return dict(runs[0].data.metrics)


def pipeline_run(root: Path, pipeline: str, env: dict[str, str], *, own_ray: bool) -> dict:
    """``stein run`` from scratch in ``root``, with each stage's wall time and MLflow metrics. A stage's wall time
    runs from DVC's "Running stage" line to its next "Updating lock file" line (the stage process, then DVC hashing
    its outputs), each stamped as it arrives (unbuffered output)."""
    env = env | {"PYTHONUNBUFFERED": "1", "STEIN_PIPELINE_RAY": "false" if own_ray else "true"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", pipeline], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - t0, line) for line in proc.stdout]
    proc.wait()
    out: dict = {"full_run_seconds": time.perf_counter() - t0}
    if proc.returncode != 0:
        sys.exit(f"`stein run {pipeline}` failed ({proc.returncode}):\n" + "".join(ln for _, ln in lines[-60:]))
    starts = [(t, line.split("'")[1].removeprefix(f"{pipeline}-")) for t, line in lines
              if line.startswith("Running stage '")]
    results = next((t for t, line in lines if line.startswith("Results:")), out["full_run_seconds"])
    stages = {}
    for i, (t_start, stage) in enumerate(starts):
        t_end = starts[i + 1][0] if i + 1 < len(starts) else results
        m = stage_metrics(root, pipeline, stage)
        row = {"wall": t_end - t_start, "compute": m.get("compute_seconds", float("nan"))}
        row["overhead"] = row["wall"] - row["compute"]
        if "ray_init_seconds" in m:
            row["ray"] = m["ray_init_seconds"] + m["fit_seconds"] - m["train_loop_seconds"]
            row["ray_init"] = m["ray_init_seconds"]
        stages[stage] = row
    out["stages"] = stages
    out["between_stages"] = out["full_run_seconds"] - sum(r["wall"] for r in stages.values())
    return out


def print_run(title: str, run: dict, imports: float) -> None:
    print(f"\n{title}: whole run {run['full_run_seconds']:.1f} s, of which between stages {run['between_stages']:.1f} s")
    print("| stage | wall s | compute s | overhead s | of which: process start + imports | Ray | Prefect, MLflow, I/O |")
    print("|---|---|---|---|---|---|---|")
    for stage, r in run["stages"].items():
        ray = f"{r['ray']:.1f}" if "ray" in r else "-"
        other = r["overhead"] - imports - r.get("ray", 0.0)
        print(f"| {stage} | {r['wall']:.1f} | {r['compute']:.1f} | {r['overhead']:.1f} | {imports:.1f} | {ray} | {other:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="gmm2d")
    ap.add_argument("--own-ray", action="store_true", help="also run the pipeline with a Ray per stage, for comparison")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "pipeline.json", help="where to write the figures")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clones")
    args = ap.parse_args()
    args.json = args.json.resolve()

    work = Path(tempfile.mkdtemp(prefix="stein-bench-"))
    out: dict = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores", "pipeline": args.pipeline,
                 "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()}
    try:
        runs = {"shared": False, **({"own": True} if args.own_ray else {})}
        for name, own_ray in runs.items():
            root = work / name / "repo"
            root.parent.mkdir()
            subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
            env = clean_env(root)
            print(f"[bench] `stein run {args.pipeline}` from scratch in {root} ({'a Ray per stage' if own_ray else 'one shared Ray'}) ...", flush=True)
            out[f"{name}_ray"] = pipeline_run(root, args.pipeline, env, own_ray=own_ray)
            if name == "shared":
                out["noop_rerun_seconds"] = timed([sys.executable, "-m", "flows.cli", "run", args.pipeline], root, env)
                out["import_seconds"] = timed([sys.executable, "-c", "import torch, prefect, mlflow, pyarrow, flows.cli, tasks.data.io"], root, env)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nmachine: {out['machine']}, commit {out['commit']}; no-op rerun {out['noop_rerun_seconds']:.2f} s; "
          f"python + the stages' imports {out['import_seconds']:.1f} s")
    print_run("one shared Ray (default)", out["shared_ray"], out["import_seconds"])
    if "own_ray" in out:
        print_run("a Ray per stage (STEIN_PIPELINE_RAY=false)", out["own_ray"], out["import_seconds"])


if __name__ == "__main__":
    main()
