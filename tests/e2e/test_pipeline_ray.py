"""One Ray per pipeline run: `stein run` starts a local Ray for the whole pipeline and its stages join it
(``tasks.infra.cluster.pipeline_ray``), instead of each stage that uses Ray starting and stopping its own.

The outputs must not depend on it: the same tiny ``gmm2d`` run with each stage starting its own Ray
(``STEIN_PIPELINE_RAY=false``, what a stage run alone always does) and with the shared one (the default) writes
byte-identical data, model, checkpoints, samples and metrics. Both runs say in their logs which Ray each stage used,
and the shared one leaves neither a process nor its token behind. (Stopping such a run with SIGTERM or SIGKILL:
tests/e2e/test_signals.py, whose runs use the shared Ray by default.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.heavy]

TINY = {
    "prepare": {"n_train": 1000, "n_test": 300},
    "train": {"n_steps": 60, "net": {"kind": "mlp", "hidden": 32, "n_layers": 2}, "n_sigmas": 5, "batch_size": 128,
              "log_every": 20, "checkpoint_every": 30},
    "sample": {"n_samples": 200, "n_steps_each": 5, "batch_size": 200},
    "evaluate": {"n_eval": 150, "checkpoints": {"metrics": ["mmd"], "n_samples": 100, "sampler": "sample"}},
}

#: What the two runs must write byte for byte (everything but the plots' PNG renderings).
OUTS = ("data/gmm2d/train.parquet", "data/gmm2d/test.parquet", "models/gmm2d/model.pt",
        "models/gmm2d/checkpoints/step_0000030.pt", "models/gmm2d/checkpoints/step_0000060.pt",
        "samples/gmm2d/samples.parquet", "metrics/gmm2d.json", "plots/gmm2d/checkpoints.csv")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, project_copier) -> Path:
    def tiny(dst: Path) -> None:
        path = dst / "conf" / "gmm2d.yaml"
        raw = yaml.safe_load(path.read_text())
        for section, values in TINY.items():
            raw[section].update(values)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))

    return project_copier(tmp_path_factory.mktemp("pipeline_ray") / "repo", set_params=tiny)


def _stein(repo: Path, prefect_api: str, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEIN_", "PREFECT_", "MLFLOW_TRACKING", "RAY_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env |= {"STEIN_THREADS": "1", "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(repo / ".stein" / "prefect")}
    env |= env_extra
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)
    print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
    return proc


def _outputs(repo: Path) -> dict[str, bytes]:
    return {rel: (repo / rel).read_bytes() for rel in OUTS}


def _pipeline_nodes(repo: Path) -> list[psutil.Process]:
    """Processes of a pipeline Ray started in ``repo`` (its launcher, by the node name on its command line)."""
    out = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = p.info["cmdline"] or []
        if "tasks.infra.cluster" in cmd and "stein-pipeline" in cmd and p.info["cwd"] == str(repo):
            out.append(p)
    return out


def test_a_pipeline_run_on_one_shared_ray_writes_what_stages_with_their_own_ray_write(repo, prefect_api):
    own = _stein(repo, prefect_api, "run", "gmm2d", STEIN_PIPELINE_RAY="false")
    assert own.returncode == 0
    log_own = own.stdout + own.stderr
    assert log_own.count("Ray started locally") == 2  # train, and evaluate's checkpoint tasks
    assert "the pipeline's Ray" not in log_own
    first = _outputs(repo)

    shared = _stein(repo, prefect_api, "run", "gmm2d", "--force")
    assert shared.returncode == 0
    log_shared = shared.stdout + shared.stderr
    assert log_shared.count("the pipeline's Ray joined") == 2 and "Ray started locally" not in log_shared
    second = _outputs(repo)
    assert [rel for rel in OUTS if first[rel] != second[rel]] == []

    # nothing of the shared Ray is left: no launcher, and its run folder (with the token) is gone
    assert _pipeline_nodes(repo) == []
    assert [p.name for p in (repo / ".stein" / "pipeline-ray").iterdir()] == ["last-node.log"]
