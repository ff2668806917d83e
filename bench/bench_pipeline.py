"""Benchmark the default pipeline: each stage's wall time split into compute and overhead, the whole
``stein run`` from scratch, and the no-op rerun.

It works on a fresh ``git clone`` of the committed repository in a temporary folder, with the shipped settings,
so the figures describe what a user gets from ``make run`` after install. Three measurements:

1. ``stein run PIPELINE`` from scratch (includes starting the local Prefect server) and again (the no-op);
2. each stage once more as its own process (``python -m flows.cli stage S``, exactly what dvc.yaml runs) against
   one Prefect server, timed from outside; its MLflow run says how much of that was compute
   (``compute_seconds``; for train the workers' loop) and, for train, how long Ray took to start and to run
   the fit around the loop;
3. the cost of starting Python with the stage's imports (torch, Prefect, MLflow), measured alone.

Overhead = stage wall time − compute, split into process start + imports, Ray (init + Train's actors and
reporting) and the rest (Prefect flow/task runs, MLflow run and artifacts, reading and writing files).

    python bench/bench_pipeline.py [--pipeline gmm2d] [--json bench/out/pipeline.json] [--keep]
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
STAGES = ("prepare", "train", "sample", "evaluate")


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="gmm2d")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "pipeline.json", help="where to write the figures")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = ap.parse_args()
    args.json = args.json.resolve()  # the benchmark changes directory into its temporary clone

    work = Path(tempfile.mkdtemp(prefix="stein-bench-"))
    root = work / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
    env = clean_env(root)
    py = [sys.executable]
    cli = [*py, "-m", "flows.cli"]
    out: dict = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores", "pipeline": args.pipeline,
                 "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()}
    try:
        print(f"[bench] full `stein run {args.pipeline}` from scratch in {root} ...", flush=True)
        out["full_run_seconds"] = timed([*cli, "run", args.pipeline], root, env)
        out["noop_rerun_seconds"] = timed([*cli, "run", args.pipeline], root, env)
        out["import_seconds"] = timed([*py, "-c", "import torch, prefect, mlflow, pyarrow, flows.cli, tasks.data.io"], root, env)

        sys.path.insert(0, str(root))
        os.chdir(root)
        os.environ.update({"PREFECT_HOME": env["PREFECT_HOME"], "STEIN_PROJECT_ROOT": str(root)})
        from flows.local import prefect_server

        stages = {}
        with prefect_server() as url:
            env_stage = env | {"PREFECT_API_URL": url}
            for stage in STAGES:
                print(f"[bench] stage {stage} ...", flush=True)
                wall = timed([*cli, "stage", stage, "--pipeline", args.pipeline], root, env_stage)
                m = stage_metrics(root, args.pipeline, stage)
                compute = m.get("compute_seconds", float("nan"))
                row = {"wall": wall, "compute": compute, "overhead": wall - compute, "imports": out["import_seconds"]}
                if stage == "train":
                    row["ray"] = m["ray_init_seconds"] + m["fit_seconds"] - m["train_loop_seconds"]
                    row["ray_init"] = m["ray_init_seconds"]
                row["other"] = row["overhead"] - row["imports"] - row.get("ray", 0.0)
                stages[stage] = row
        out["stages"] = stages
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nmachine: {out['machine']}, commit {out['commit']}")
    print(f"whole `stein run {args.pipeline}` from scratch: {out['full_run_seconds']:.1f} s; no-op rerun: {out['noop_rerun_seconds']:.2f} s")
    print("\n| stage | wall s | compute s | overhead s | of which: process start + imports | Ray | Prefect, MLflow, I/O |")
    print("|---|---|---|---|---|---|---|")
    for stage, r in out["stages"].items():
        ray = f"{r['ray']:.1f}" if "ray" in r else "-"
        print(f"| {stage} | {r['wall']:.1f} | {r['compute']:.1f} | {r['overhead']:.1f} | {r['imports']:.1f} | {ray} | {r['other']:.1f} |")


if __name__ == "__main__":
    main()
