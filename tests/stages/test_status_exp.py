"""`stein status`, `stein exp` and the venv hook, through the real command line in copies of the project.

- ``stein status`` in a copy whose gmm2d stages are recorded in dvc.lock by ``dvc commit`` over placeholder outputs
  (no compute: what status reads is dvc.yaml, dvc.lock, the params, code and data hashes and DVC's caches): up to
  date; a changed ``sample.eps`` named with both values, with gmm2d-sample and the gmm2d-evaluate downstream of it;
  a changed code file named, also inside ``stein_core/``; missing outputs checked out of the cache; and a run-cache
  hit predicted and then confirmed by a real ``dvc repro``, which must restore both stages (their commands, run on
  placeholder files, would fail).
- ``stein exp`` with a key the config lacks, or a value it refuses, exits 2 before DVC starts and leaves the config
  byte for byte as it was.
- The venv hook (``tasks/infra/venv_hook.py``, installed by ``make install``): the venv's Python started with
  ``PATH=/usr/bin:/bin`` puts the venv's bin first and turns telemetry off, keeping a value the user set; and a
  ``dvc exp run`` of gmm2d started as ``.venv/bin/dvc`` from a shell without the venv on PATH runs its stages with
  the venv's ``python`` (a copy with real data and a seeded untrained model: only sample and evaluate run, small).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
VENV_BIN = Path(sys.prefix) / "bin"
PLAIN_PATH = "/usr/bin:/bin"  # a shell without the venv activated


def git(cwd: Path, *args: str) -> str:
    env = os.environ | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@localhost"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the caller's Stein, Prefect, MLflow and Ray settings, plus ``extra``."""
    drop = ("STEIN_", "PREFECT_", "MLFLOW_TRACKING", "RAY_ADDRESS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {"STEIN_THREADS": "1"} | extra


def run(repo: Path, *cmd: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(cmd)}  (rc {proc.returncode})", proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    return proc


def stein(repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return run(repo, str(BIN / "stein"), *args, env=env, timeout=timeout)


def dvc(repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = run(repo, str(BIN / "dvc"), *args, env=env, timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


def status_json(repo: Path, pipeline: str = "gmm2d") -> dict:
    proc = stein(repo, "status", pipeline, "--json")
    assert proc.returncode == 0, proc.stderr
    (out,) = json.loads(proc.stdout)["pipelines"]
    return out


def by_stage(out: dict) -> dict[str, dict]:
    return {s["stage"]: s for s in out["stages"]}


def gmm2d_outputs(repo: Path) -> list[str]:
    """Every output path (outs, metrics, plots) of the gmm2d stages in the copy's dvc.yaml."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    paths = []
    for name, block in stages.items():
        if name.startswith("gmm2d-"):  # gmm2d's and gmm2d-blindness's
            for kind in ("outs", "metrics", "plots"):
                paths += [next(iter(e)) if isinstance(e, dict) else e for e in block.get(kind, [])]
    return paths


def write_placeholders(repo: Path, paths: list[str], version: str) -> None:
    """A small file at each output path (a directory output gets one file inside), its content naming ``version``."""
    for rel in paths:
        p = repo / rel
        if p.suffix == "":  # models/gmm2d/checkpoints: a directory output
            p.mkdir(parents=True, exist_ok=True)
            (p / "step_0000001.pt").write_text(f"{rel} {version}\n")
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"placeholder": version}) if p.suffix == ".json" else f"{rel} {version}\n")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, project_copier) -> Path:
    """A copy of the project whose gmm2d and gmm2d-blindness stages dvc.lock records (``dvc commit`` of placeholder outputs: the lock,
    DVC's cache and its run cache hold them, as after a run), committed to git."""
    dst = project_copier(tmp_path_factory.mktemp("status") / "repo", commit=False)
    write_placeholders(dst, gmm2d_outputs(dst), "v1")
    git(dst, "init", "-q")
    dvc(dst, "commit", "--force", "--with-deps", "gmm2d-evaluate", "gmm2d-blindness-evaluate")
    git(dst, "add", "-A")
    git(dst, "commit", "-q", "-m", "baseline")
    return dst


@pytest.fixture
def restore(repo):
    """Put back, after the test, the files it names (their content now) and git's version of everything else."""
    saved: dict[Path, bytes] = {}

    def keep(*rels: str) -> None:
        for rel in rels:
            saved.setdefault(repo / rel, (repo / rel).read_bytes())

    yield keep
    for path, content in saved.items():
        path.write_bytes(content)
    git(repo, "checkout", "-q", "--", ".")
    git(repo, "clean", "-qfd", "--", "stein_core", "tasks", "conf")


def set_eps(repo: Path, value: str) -> None:
    """``sample.eps`` written as ``value`` (the rest of the file untouched, comments included)."""
    conf = repo / "conf" / "gmm2d.yaml"
    lines = conf.read_text().splitlines(keepends=True)
    (i,) = [i for i, ln in enumerate(lines) if ln.startswith("  eps:")]
    lines[i] = f"  eps: {value}\n"
    conf.write_text("".join(lines))


def test_up_to_date(repo):
    proc = stein(repo, "status", "gmm2d")
    assert proc.returncode == 0
    assert proc.stdout.strip() == "gmm2d: up to date (`stein run gmm2d` would run nothing)"
    out = status_json(repo)
    assert out["up_to_date"] is True and out["stages"] == [] and out["target"] == "gmm2d-evaluate"


def test_changed_param_names_key_values_and_downstream(repo, restore):
    restore("conf/gmm2d.yaml")
    set_eps(repo, "1e-3")
    out = status_json(repo)
    stages = by_stage(out)
    # gmm2d-prepare and gmm2d-train read no sample section: not listed; evaluate reads it (checkpoint sampling) and
    # the samples: it reruns for both reasons
    assert list(stages) == ["gmm2d-sample", "gmm2d-evaluate"]
    assert out["would_run"] == ["gmm2d-sample", "gmm2d-evaluate"] and out["would_restore"] == []
    change = {"file": "conf/gmm2d.yaml", "key": "sample.eps", "old": 0.002, "new": 0.001, "change": "modified"}
    assert stages["gmm2d-sample"]["params"] == [change]
    assert stages["gmm2d-sample"]["upstream"] == [] and stages["gmm2d-sample"]["action"] == "run"
    assert stages["gmm2d-evaluate"]["upstream"] == ["gmm2d-sample"]
    assert stages["gmm2d-evaluate"]["params"] == [change]
    text = stein(repo, "status", "gmm2d").stdout
    assert "would run gmm2d-sample, gmm2d-evaluate" in text
    assert "param     sample.eps: 0.002 -> 0.001   (conf/gmm2d.yaml)" in text
    assert "because   gmm2d-sample reruns" in text
    # every pipeline: gmm2d's block as above; gmm2d-blindness reuses gmm2d's model, not its sample section; the
    # others never ran in this copy
    every = stein(repo, "status")
    assert every.returncode == 0
    assert "gmm2d-blindness: up to date" in every.stdout and "sample.eps: 0.002 -> 0.001" in every.stdout
    assert "  ring8-agd-train: runs\n    never run (no entry in dvc.lock)\n" in every.stdout


def test_changed_code_names_the_file(repo, restore):
    with open(repo / "tasks" / "stages" / "sample.py", "a") as f:
        f.write("# an edit\n")
    stages = by_stage(status_json(repo))
    assert list(stages) == ["gmm2d-sample", "gmm2d-evaluate"]
    assert stages["gmm2d-sample"]["code"] == [{"path": "tasks/stages/sample.py", "change": "modified"}]
    assert stages["gmm2d-sample"]["params"] == [] and stages["gmm2d-evaluate"]["code"] == []
    assert stages["gmm2d-evaluate"]["upstream"] == ["gmm2d-sample"]

    # a stein_core module: the stages that import it, and no other; a new module and the generator objectives
    # (which gmm2d never imports): nothing. kernels.py reaches prepare too: every stage validates the train section
    # by the ncsn family, whose sampler module (stein_core/samplers.py: SVGD's RBF) imports it
    with open(repo / "stein_core" / "kernels.py", "a") as f:
        f.write("# an edit\n")
    with open(repo / "stein_core" / "generators.py", "a") as f:
        f.write("# an edit\n")
    (repo / "stein_core" / "extra.py").write_text("X = 1\n")
    stages = by_stage(status_json(repo))
    assert list(stages) == ["gmm2d-prepare", "gmm2d-train", "gmm2d-sample", "gmm2d-evaluate"]
    kernels = {"path": "stein_core/kernels.py", "change": "modified"}
    assert stages["gmm2d-train"]["code"] == [kernels] and kernels in stages["gmm2d-evaluate"]["code"]
    assert all(c["path"] != "stein_core/generators.py" for s in stages.values() for c in s["code"])
    text = stein(repo, "status", "gmm2d").stdout
    assert "code      stein_core/kernels.py (modified)" in text and "code      tasks/stages/sample.py (modified)" in text


def test_missing_output_is_checked_out_of_the_cache(repo):
    samples = repo / "samples" / "gmm2d" / "samples.parquet"
    content = samples.read_bytes()
    samples.unlink()
    try:
        out = status_json(repo)
        assert [(s["stage"], s["action"]) for s in out["stages"]] == [("gmm2d-sample", "checkout")]
        assert out["stages"][0]["outs"] == [{"path": "samples/gmm2d/samples.parquet", "change": "deleted"}]
        assert out["would_run"] == [] and out["would_restore"] == ["gmm2d-sample"]
    finally:
        dvc(repo, "checkout", "samples/gmm2d/samples.parquet")
    assert samples.read_bytes() == content


def test_run_cache_hit_is_predicted_and_dvc_restores(repo, restore):
    """eps=1e-3 'runs' (its outputs committed, as a run leaves them), then eps goes back to the baseline's value:
    DVC's run cache holds the baseline's outputs for sample and for evaluate, so status predicts two restores, and
    `dvc repro` restores both. Had status been wrong, DVC would have run a stage command on placeholder files,
    which fails."""
    restore("conf/gmm2d.yaml", "dvc.lock")
    baseline = (repo / "samples/gmm2d/samples.parquet").read_bytes()
    set_eps(repo, "1e-3")
    write_placeholders(repo, ["samples/gmm2d/samples.parquet", "metrics/gmm2d.json"], "eps=1e-3")
    dvc(repo, "commit", "--force", "gmm2d-sample", "gmm2d-evaluate")
    assert status_json(repo)["up_to_date"]
    git(repo, "checkout", "-q", "--", "conf/gmm2d.yaml")  # back to eps 2e-3, dvc.lock says 1e-3

    out = status_json(repo)
    stages = by_stage(out)
    assert [(s["stage"], s["action"]) for s in out["stages"]] == [("gmm2d-sample", "restore"), ("gmm2d-evaluate", "restore")]
    assert stages["gmm2d-sample"]["params"][0] == {"file": "conf/gmm2d.yaml", "key": "sample.eps", "old": 0.001,
                                                         "new": 0.002, "change": "modified"}
    assert stages["gmm2d-evaluate"]["upstream"] == ["gmm2d-sample"]
    assert out["would_run"] == [] and out["would_restore"] == ["gmm2d-sample", "gmm2d-evaluate"]
    assert "gmm2d-sample: restored from the run cache" in stein(repo, "status", "gmm2d").stdout

    proc = dvc(repo, "repro", "gmm2d-evaluate")
    assert "Stage 'gmm2d-sample' is cached - skipping run" in proc.stdout
    assert "Stage 'gmm2d-evaluate' is cached - skipping run" in proc.stdout
    assert (repo / "samples/gmm2d/samples.parquet").read_bytes() == baseline
    assert status_json(repo)["up_to_date"]


def test_unknown_pipeline_exits_2(repo):
    proc = stein(repo, "status", "gmm3d")
    assert proc.returncode == 2
    assert "unknown pipeline 'gmm3d'" in proc.stderr and "gmm2d" in proc.stderr


@pytest.mark.parametrize("override, key, says", [
    ("sample.epz=1e-3", "sample.epz", "not a key of conf/gmm2d.yaml"),
    ("sample.n_steps_each=1.5", "sample.n_steps_each", "valid integer"),
    ("+sample.foo=1", "sample.foo", "unknown key"),
    ("sample.eps=-1", "sample.eps", "greater than 0"),
])
def test_exp_refuses_a_bad_key_or_value_before_dvc(repo, override, key, says):
    conf = repo / "conf" / "gmm2d.yaml"
    before = conf.read_bytes()
    proc = stein(repo, "exp", "gmm2d", "-S", override, "--name", "bad")
    assert proc.returncode == 2
    assert f"conf/gmm2d.yaml: key '{key}'" in proc.stderr and says in proc.stderr
    assert conf.read_bytes() == before
    assert git(repo, "for-each-ref", "refs/exps") == ""  # DVC never started
    assert "dvc exp run" not in proc.stdout


def test_venv_hook_sets_path_and_telemetry():
    """The venv's Python started from a shell without the venv: its bin first on PATH, telemetry off; a value the user
    set is kept; an activated venv's PATH is left as it is."""
    from tasks.infra.venv_hook import PTH_NAME, TELEMETRY_OFF, pth_line

    import sysconfig

    hook = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    assert hook.is_file(), f"{hook} is missing: run `make install`"
    assert hook.read_text() == pth_line(), f"{hook} is stale: run `make install`"
    probe = "import json, os; print(json.dumps(dict(os.environ)))"
    base = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF and k not in ("PATH", "VIRTUAL_ENV")}

    env = json.loads(subprocess.run([sys.executable, "-c", probe], env=base | {"PATH": PLAIN_PATH, "DO_NOT_TRACK": "0"},
                                    capture_output=True, text=True, check=True).stdout)
    assert env["PATH"] == f"{VENV_BIN}:{PLAIN_PATH}"
    assert {k: env.get(k) for k in TELEMETRY_OFF} == TELEMETRY_OFF | {"DO_NOT_TRACK": "0"}
    # the programs it starts find the venv's python and dvc by name
    found = subprocess.run([sys.executable, "-c", "import shutil; print(shutil.which('python'), shutil.which('dvc'))"],
                           env=base | {"PATH": PLAIN_PATH}, capture_output=True, text=True, check=True).stdout.split()
    assert found == [str(VENV_BIN / "python"), str(VENV_BIN / "dvc")]

    activated = f"/opt/x:{VENV_BIN}:{PLAIN_PATH}"
    env = json.loads(subprocess.run([sys.executable, "-c", probe], env=base | {"PATH": activated},
                                    capture_output=True, text=True, check=True).stdout)
    assert env["PATH"] == activated


# ------------------------------------------------------------------------------------------------ real stages

#: gmm2d's sample and evaluate in seconds: 200 samples, 5 Langevin steps per level, no checkpoint evaluation (no Ray).
SMALL = {
    "prepare": {"n_train": 400, "n_test": 200},
    "sample": {"n_samples": 200, "n_steps_each": 5, "batch_size": 200},
    "evaluate": {"n_eval": 100, "n_bootstrap": 20, "checkpoints": None},
}


@pytest.fixture(scope="module")
def real_repo(tmp_path_factory, project_copier) -> Path:
    """A copy with real gmm2d data (the prepare task) and a seeded, untrained score network as its model, both
    recorded in dvc.lock (``dvc commit`` of prepare and train) and committed: an experiment reruns sample and
    evaluate only. Its dvc.yaml is regenerated for ``evaluate.checkpoints: null``."""
    import torch

    from flows.dvcgen import render
    from flows.registry import PIPELINES
    from stein_core import NoiseConditionalMLP
    from tasks.families import module_checkpoint
    from tasks.data.io import save_torch
    from tasks.stages.prepare import prepare_mixture

    dst = project_copier(tmp_path_factory.mktemp("exp") / "repo", params={"gmm2d": SMALL}, commit=False)
    (dst / "dvc.yaml").write_text(render(dst))
    cfg = PIPELINES["gmm2d"].load_config(dst)
    prepare_mixture.fn(cfg.prepare, dst / "data/gmm2d/train.parquet", dst / "data/gmm2d/test.parquet")
    torch.manual_seed(0)
    net = NoiseConditionalMLP(dim=2, hidden=16, n_layers=2, embed_dim=8)
    ckpt = module_checkpoint("ncsn", {"score": net}, shape=[2], sigmas=[3.0, 1.0, 0.3])
    save_torch(dst / "models/gmm2d/model.pt", ckpt)
    save_torch(dst / "models/gmm2d/checkpoints/step_0000001.pt", ckpt)
    (dst / "plots/gmm2d").mkdir(parents=True, exist_ok=True)
    (dst / "plots/gmm2d/train_loss.csv").write_text("step,dsm_loss\n1,1.0\n")
    git(dst, "init", "-q")
    dvc(dst, "commit", "--force", "--with-deps", "gmm2d-train")
    git(dst, "add", "-A")
    git(dst, "commit", "-q", "-m", "baseline")
    return dst


@pytest.mark.e2e
@pytest.mark.heavy  # make test stays under 10 minutes; make test-all (CI) runs it (28 s)
def test_dvc_exp_run_without_the_venv_on_path(real_repo, prefect_api):
    """`.venv/bin/dvc exp run -S ... gmm2d-evaluate` from PATH=/usr/bin:/bin with VIRTUAL_ENV unset: the stages'
    `python -m flows.cli stage ...` is the venv's (the system's has no Prefect, or there is no `python` at all), so
    the experiment succeeds and records its param and metrics; only sample and evaluate ran."""
    store = real_repo / ".stein" / "mlflow.db"
    env = {k: v for k, v in clean_env().items() if k not in ("PATH", "VIRTUAL_ENV")}
    env |= {"PATH": PLAIN_PATH, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}

    proc = run(real_repo, str(BIN / "dvc"), "exp", "run", "-S", "conf/gmm2d.yaml:sample.eps=1e-3", "-n", "eps-plain",
               "gmm2d-evaluate", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = proc.stdout + proc.stderr
    assert "Running stage 'gmm2d-sample'" in ran and "Running stage 'gmm2d-evaluate'" in ran
    assert "Running stage 'gmm2d-train'" not in ran and "Running stage 'gmm2d-prepare'" not in ran
    assert "No module named" not in ran

    shown = json.loads(dvc(real_repo, "exp", "show", "--json", env=env).stdout)
    exps = {e["name"]: e["revs"][0]["data"] for rev in shown for e in (rev.get("experiments") or [])}
    assert exps["eps-plain"]["params"]["conf/gmm2d.yaml"]["data"]["sample"]["eps"] == 0.001
    assert "mmd" in exps["eps-plain"]["metrics"]["metrics/gmm2d.json"]["data"]

    # MLflow: the experiment's stages are children of one pipeline run named after the DVC experiment, which
    # carries the new param and the experiment's metrics, and is FINISHED
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("gmm2d").experiment_id], max_results=100)
    (group,) = [r for r in runs if r.data.tags.get("stein.dvc_exp") == "eps-plain"]
    assert group.info.run_name == "gmm2d eps-plain" and group.info.status == "FINISHED"
    assert group.data.tags["stein.kind"] == "pipeline" and float(group.data.params["sample.eps"]) == 1e-3
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == group.info.run_id]
    assert sorted(r.data.tags["stein.dvc_stage"] for r in children) == ["gmm2d-evaluate", "gmm2d-sample"]
    assert group.data.tags["stein.stages_run"] == "gmm2d-sample,gmm2d-evaluate"
    assert group.data.metrics["mmd"] == pytest.approx(exps["eps-plain"]["metrics"]["metrics/gmm2d.json"]["data"]["mmd"])
    assert all("mlflow.parentRunId" in r.data.tags or r.data.tags.get("stein.kind") == "pipeline" for r in runs)



@pytest.mark.e2e
@pytest.mark.heavy  # another sample + evaluate; `stein exp` checks its input like the fast tests above show
def test_stein_exp_runs_and_shows_the_pipeline(real_repo):
    """`stein exp gmm2d -S sample.eps=5e-4 --name eps-stein` from the same shell (stein started by its path, as after
    `make install`, with no Prefect server given: it starts one): the experiment runs, the output says where it is,
    and `stein exp gmm2d --show` lists it with the changed param and none of the dependency hashes."""
    store = real_repo / ".stein" / "mlflow.db"
    env = {k: v for k, v in clean_env().items() if k not in ("PATH", "VIRTUAL_ENV")}
    env |= {"PATH": PLAIN_PATH, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    proc = stein(real_repo, "exp", "gmm2d", "-S", "sample.eps=5e-4", "--name", "eps-stein", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dvc exp apply eps-stein" in proc.stdout and "stein exp gmm2d --show" in proc.stdout
    assert "Running stage 'gmm2d-train'" not in proc.stdout
    shown = stein(real_repo, "exp", "gmm2d", "--show", "--md", env=env)
    assert shown.returncode == 0
    header = shown.stdout.splitlines()[0]
    assert "eps-stein" in shown.stdout and "sample.eps" in header and "mmd" in header
    assert "train.lr" not in header  # unchanged
    assert "samples/gmm2d/samples.parquet" not in header  # a dependency's hash: changed, but not a param
