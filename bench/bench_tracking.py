"""What logging costs: MLflow's SQLite store in-process against `stein server` over HTTP, without and with basic
auth. Per mode: the start-up time of the server, one ``create_run``, the median ``log_batch`` of 6 metrics (what
rank 0 sends per logged step), one 1 MiB artifact upload. Every mode is timed in the same process, one after the
other, after a warm-up run (compare the ratios: the machine is shared).

    .venv/bin/python bench/bench_tracking.py [--calls 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PASSWORD = "bench-admin-password-1"  # a throwaway server in a temporary folder


def _time_calls(client, experiment: str, artifact: Path, calls: int) -> dict[str, float]:
    from mlflow.entities import Metric

    t0 = time.perf_counter()
    run_id = client.create_run(experiment).info.run_id
    out = {"create_run_ms": (time.perf_counter() - t0) * 1000}
    seconds = []
    for step in range(calls):
        t0 = time.perf_counter()
        client.log_batch(run_id, metrics=[Metric(f"train/m{k}", float(step * k), 0, step) for k in range(6)])
        seconds.append(time.perf_counter() - t0)
    out["log_batch_median_ms"] = statistics.median(seconds) * 1000
    t0 = time.perf_counter()
    client.log_artifact(run_id, str(artifact))
    out["artifact_1MiB_ms"] = (time.perf_counter() - t0) * 1000
    client.set_terminated(run_id)
    return out


def main() -> None:
    from mlflow import MlflowClient

    from flows.cli.server import tracking_server
    from tasks.infra.runtime import free_port
    from tasks.infra.server import TrackingServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="stein-bench-tracking-") as d:
        d = Path(d)
        artifact = d / "blob.bin"
        artifact.write_bytes(os.urandom(1 << 20))
        client = MlflowClient(f"sqlite:///{d / 'local.db'}")
        exp = client.create_experiment("bench", artifact_location=(d / "artifacts").as_uri())
        _time_calls(client, exp, artifact, 5)  # warm-up: the schema is created on first use
        results["sqlite"] = _time_calls(client, exp, artifact, args.calls)
        for auth in (False, True):
            spec = TrackingServer(d / ("auth" if auth else "plain"), free_port(), auth=auth)
            env = dict(os.environ) | ({"MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD} if auth else {})
            with tracking_server(spec, env) as server:
                if auth:
                    os.environ |= {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD}
                try:
                    client = MlflowClient(spec.url)
                    exp = client.create_experiment("bench")
                    _time_calls(client, exp, artifact, 5)
                    results["http+auth" if auth else "http"] = (
                        _time_calls(client, exp, artifact, args.calls) | {"startup_s": server.startup_seconds})
                finally:
                    os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
                    os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
    for mode, row in results.items():
        print(f"{mode:10s} " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
