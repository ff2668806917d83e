"""Quiet, honest output: no traceback for a condition that is not an error, no line per training report, no link to
a UI that does not exist, and telemetry off in every entry point of the project however it is started.

- Ray Train with another Ray running on the machine: Train's placement-group cleaner (a detached actor) used to
  look "the" Ray up among every ``gcs_server`` of the machine and die with ``ConnectionError: Found multiple active
  Ray instances``, a traceback in the driver's output; Train V2 logged "Reporting training result N: ..." for every
  ``ray.train.report``. Both are set right by ``tasks.infra.ray_worker.setup``, the workers' set-up hook.
- Prefect printed "View at http://127.0.0.1:PORT/runs/flow-run/..." for every flow run against the server
  ``stein run`` starts, which has no UI and is gone when the run ends; a server the user names keeps its links.
- Each entry point, started with none of the project's offline settings in its environment, has all of them in
  its environment when it first imports a tool (Ray, MLflow, Prefect, DVC), in every process it starts.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tasks.infra.runtime import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _popen_group(cmd, **kw) -> subprocess.Popen:
    """A process in its own process group (stopped with :func:`flows.local.stop_process_group`)."""
    return subprocess.Popen(cmd, start_new_session=True, **kw)


@pytest.fixture(scope="module")
def other_ray(tmp_path_factory):
    """Another Ray on the machine (as another user's, or another command's, would be): a local Ray started in a
    process of its own, up until the module ends."""
    from flows.local import stop_process_group

    log = tmp_path_factory.mktemp("other_ray") / "ray.log"
    script = textwrap.dedent("""
        import sys, time
        import ray
        ray.init(address="local", include_dashboard=False, num_cpus=1, object_store_memory=80 * 2**20,
                 _node_ip_address="127.0.0.1")
        print("UP", ray.get_runtime_context().gcs_address, flush=True)
        while True:
            time.sleep(1)
    """)
    # on loopback only, as the project's own local Ray (tasks.infra.ray_client.init_ray)
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = _popen_group([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        import time

        deadline = time.monotonic() + 120
        while "UP " not in log.read_text():
            assert proc.poll() is None, f"the other Ray exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the other Ray did not come up within 120 s"
            time.sleep(0.5)
        yield log.read_text().split("UP ", 1)[1].split()[0]
    finally:
        stop_process_group(proc, timeout=20)


TRAIN_SCRIPT = """
import sys
from pathlib import Path

from tasks.infra.runtime import RuntimeSettings, apply_offline_env

apply_offline_env()  # as every stage command does
import logging
logging.basicConfig(level=logging.INFO)

import torch
from tasks.families import FAMILIES
from tasks.data.io import write_dataset
from tasks.stages.train.task import train_model

d = Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
write_dataset(d / "train.parquet", (torch.randn(256, 2, generator=g) + 1.0).numpy())
cfg = FAMILIES["ncsn"].config.model_validate({
    "family": "ncsn", "n_steps": 30, "batch_size": 32, "log_every": 10, "checkpoint_every": 10, "lr": 3e-3,
    "net": {"kind": "mlp", "hidden": 16, "n_layers": 2}, "n_sigmas": 4,
})
info = train_model.fn(
    cfg, data_path=d / "train.parquet", heldout_path=None, model_path=d / "model.pt", curves_dir=d / "plots",
    pipeline="quiet", checkpoints_dir=d / "checkpoints", mlflow_run_id=None, mlflow_tracking_uri=None,
    settings=RuntimeSettings(num_workers=1, use_gpu=False, threads=1),
)
print("TRAINED", info["steps"], flush=True)
"""


@pytest.mark.heavy  # 30 s; keeps make test near 15 minutes (make test-all runs it)
def test_ray_train_beside_another_ray_prints_no_traceback_and_no_report_lines(other_ray, tmp_path):
    """The train stage's Ray Train fit (a local Ray of its own, 3 checkpoints) while another Ray runs: its output
    holds the training's own lines, and neither the cleaner's "Found multiple active Ray instances" traceback nor
    Train's three "Reporting training result" lines (both were there before the workers' set-up hook)."""
    from flows.local import stop_process_group

    env = os.environ | {"STEIN_PROJECT_ROOT": str(tmp_path), "PYTHONPATH": str(REPO)}
    for key in ("RAY_ADDRESS", "STEIN_RAY_STORAGE", "STEIN_NUM_WORKERS"):
        env.pop(key, None)
    proc = _popen_group([sys.executable, "-c", TRAIN_SCRIPT, str(tmp_path)], cwd=tmp_path, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        stop_process_group(proc)
    assert proc.returncode == 0 and "TRAINED 30" in out, out[-4000:]
    assert "Found multiple active Ray instances" not in out, out[-4000:]
    assert "PlacementGroupCleanerMonitor" not in out and "Traceback" not in out, out[-4000:]
    assert "Reporting training result" not in out, out[-4000:]
    # the condition held: the other Ray was up throughout (its GCS still answers a client)
    from ray._private.services import find_gcs_addresses

    find_gcs_addresses.cache_clear()
    assert other_ray in find_gcs_addresses()


def test_the_worker_setup_hook_names_the_logger_train_reports_with():
    """The hook quiets the logger Train's "Reporting training result" lines go through: the one named after the
    module's file (a Ray upgrade that renames the module, or names its logger properly, shows here)."""
    import logging

    from ray.train.v2._internal.execution import context

    from tasks.infra.ray_worker import train_report_logger_name

    assert context.logger.name == train_report_logger_name()
    assert context.logger is logging.getLogger(train_report_logger_name())


def test_ray_runtime_env_runs_the_worker_setup_hook(tmp_path):
    from tasks.infra.ray_client import ray_runtime_env
    from tasks.infra.runtime import RuntimeSettings

    for settings in (RuntimeSettings(), RuntimeSettings(ray_address="ray://head:10001", ray_ship_code=True)):
        env = ray_runtime_env(settings, tmp_path, 1)
        assert env["worker_process_setup_hook"] == "tasks.infra.ray_worker.setup"


FLOW_SCRIPT = """
from flows.local import prefect_server

with prefect_server():  # PREFECT_API_URL is set: the server named there, as a stage process uses it
    from prefect import flow

    @flow(name="quiet-output")
    def hello():
        return 1

    hello()
"""


@pytest.mark.heavy  # 25 s; keeps make test near 15 minutes (make test-all runs it)
def test_prefect_prints_no_link_to_the_ui_less_server_of_a_run_but_keeps_a_users(tmp_path, monkeypatch):
    """A flow against the server `stein run` starts (run as a stage runs: a process with the driver's environment)
    prints no "View at" line; the variable is restored when the server stops. With PREFECT_API_URL set by the user
    (a server of their own, with a UI), ``prefect_server`` changes nothing and Prefect still links the UI."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings
    from prefect.utilities.urls import url_for

    from flows.local import prefect_server, tool_env

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    with prefect_server(timeout=180):
        proc = subprocess.run([sys.executable, "-c", FLOW_SCRIPT], env=tool_env({"PYTHONPATH": str(REPO)}), cwd=REPO,
                              capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Finished in state Completed" in out, out[-3000:]
    assert "View at" not in out and "/runs/flow-run/" not in out, out[-3000:]
    assert "PREFECT_UI_URL" not in os.environ and "PREFECT_API_URL" not in os.environ

    users = "http://127.0.0.1:4200/api"
    monkeypatch.setenv("PREFECT_API_URL", users)
    with prefect_server() as url:
        assert url == users and "PREFECT_UI_URL" not in os.environ
    run_id = "123e4567-e89b-12d3-a456-426614174000"
    with temporary_settings(updates={PREFECT_API_URL: users}, restore_defaults={PREFECT_UI_URL}):
        assert url_for("flow-run", obj_id=run_id) == f"http://127.0.0.1:4200/runs/flow-run/{run_id}"


# --- telemetry off in every entry point ---------------------------------------------------------------------

#: Installed as ``sitecustomize`` in every process an entry point starts: at the first import of a tool it records
#: the process and the offline settings in its environment, then ends the process (exit 0) before the tool runs.
PROBE = """
import json, os, sys

_KEYS = json.loads(os.environ["STEIN_TEST_PROBE_KEYS"])
_OUT = os.environ["STEIN_TEST_PROBE_OUT"]
_TOOLS = {"ray", "mlflow", "prefect", "dvc"}


class _Probe:
    def find_spec(self, name, path=None, target=None):
        if path is None and name in _TOOLS:
            rec = {"tool": name, "argv": sys.argv, "env": {k: os.environ.get(k) for k in _KEYS}}
            with open(_OUT, "a") as f:
                f.write(json.dumps(rec) + "\\n")
            sys.stdout.flush()
            os._exit(0)
        return None


sys.meta_path.insert(0, _Probe())
"""


class _Health(http.server.BaseHTTPRequestHandler):
    """A stand-in Prefect API that says it is healthy (``stein worker`` checks that before it imports Prefect)."""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_prefect_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()


def _stein(*args: str) -> list[str]:
    exe = VENV_BIN / "stein"
    return [str(exe), *args] if exe.is_file() else [sys.executable, "-m", "flows.cli", *args]


def test_every_entry_point_turns_telemetry_off_before_any_tool_starts(tmp_path, fake_prefect_api):
    """Started from an environment with none of OFFLINE_ENV's settings (not under `make`), each entry point -- and
    each process it starts (`stein run`'s DVC, `stein ui`'s and `stein server`'s MLflow) -- has every one of them
    when it first imports Ray, MLflow, Prefect or DVC."""
    from tasks.infra.runtime import free_port

    project = tmp_path / "project"  # a project to run in: the configs and dvc.yaml of this one, in git for DVC
    (project / "conf").mkdir(parents=True)
    for p in (REPO / "conf").glob("*.yaml"):
        (project / "conf" / p.name).write_text(p.read_text())
    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    records = tmp_path / "records.jsonl"

    base = {k: v for k, v in os.environ.items()
            if k not in OFFLINE_ENV and not k.startswith(("PREFECT_", "MLFLOW_", "RAY_", "STEIN_", "DVC_"))}
    base |= {"PYTHONPATH": os.pathsep.join([str(probe_dir), str(REPO)]), "STEIN_TEST_PROBE_OUT": str(records),
             "STEIN_TEST_PROBE_KEYS": json.dumps(sorted(OFFLINE_ENV)), "HOME": str(tmp_path / "home")}
    entry_points = {
        "stein run": (_stein("run", "gmm2d"), {}),
        "stein stage (a DVC stage's command)": ([sys.executable, "-m", "flows.cli", "stage", "prepare"], {}),
        "stein ui": (_stein("ui", "--port", str(free_port())), {}),
        "stein server": (_stein("server", "--port", str(free_port())), {}),
        "stein worker": (_stein("worker"), {"PREFECT_API_URL": fake_prefect_api}),
        "python -m tasks.infra.cluster (a node's launcher)": (
            [sys.executable, "-m", "tasks.infra.cluster", "--name", "probe", "--head", "--port", str(free_port()),
             "--num-cpus", "1", "--object-store-bytes", str(100 * 2**20), "--ready-file", str(tmp_path / "ready")],
            {}),
    }
    reached = {}
    for name, (cmd, extra) in entry_points.items():
        before = records.read_text().count("\n") if records.exists() else 0
        proc = subprocess.run(cmd, cwd=project, env=base | extra, capture_output=True, text=True, timeout=120)
        lines = records.read_text().splitlines()[before:] if records.exists() else []
        assert lines, f"{name} imported no tool (exit {proc.returncode}): {proc.stderr[-2000:]}"
        reached[name] = [json.loads(line) for line in lines]
    for name, recs in reached.items():
        for rec in recs:
            wrong = {k: v for k, v in rec["env"].items() if v != OFFLINE_ENV[k]}
            assert not wrong, f"{name}: {rec['tool']} imported in {rec['argv'][:3]} with {wrong}"
    # the processes the commands start are covered too, not only the commands themselves
    tools = {name: {r["tool"] for r in recs} for name, recs in reached.items()}
    assert "dvc" in tools["stein run"] and "mlflow" in tools["stein ui"]
