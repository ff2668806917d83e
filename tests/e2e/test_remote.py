"""A DVC remote shared through S3 (moto's server on 127.0.0.1): clone A runs gmm2d and pushes (`stein run --push`),
a fresh clone B pulls, is clean, and `stein run` there is a no-op that changes no file.

The remote is configured the way a team would: its URL and endpoint committed in ``.dvc/config`` of A (so every
clone has it), the credentials kept out of git, from ``AWS_*`` variables in A and from ``dvc remote modify
--local`` (``.dvc/config.local``, git-ignored) in B, whose environment has no ``AWS_*`` variable at all. The
objects are checked in the bucket itself with boto3, against the hashes ``dvc.lock`` records.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.heavy]  # minutes: a whole gmm2d run, then DVC against S3

BIN = Path(sys.executable).parent
BUCKET = "stein-shared-remote"
PREFIX = "stein-cache"

#: gmm2d in seconds: two training checkpoints (a directory output), each evaluated on 100 samples.
TINY = {
    "prepare": {"n_train": 2000, "n_test": 400},
    "train": {"n_steps": 100, "net": {"kind": "mlp", "hidden": 32, "n_layers": 2}, "n_sigmas": 5, "batch_size": 128,
              "log_every": 50, "checkpoint_every": 50},
    "sample": {"n_samples": 200, "n_steps_each": 5, "batch_size": 200},
    "evaluate": {"n_eval": 100, "n_bootstrap": 20, "checkpoints": {"metrics": ["mmd"], "n_samples": 100, "sampler": "sample"}},
}




def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the caller's Stein, Prefect, MLflow, Ray and AWS settings, the venv's bin first on
    PATH (as an activated venv has it), plus ``extra``."""
    drop = ("STEIN_", "PREFECT_", "MLFLOW_TRACKING", "RAY_ADDRESS", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["STEIN_THREADS"] = "1"
    return env | extra


def sh(cwd: Path, *cmd: str, env: dict[str, str], timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; the group is stopped if the call ends any other way than by the
    command exiting (a timeout, an interrupt)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=15)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        raise
    print(f"$ {' '.join(cmd)}  (rc {proc.returncode})", out[-3000:], err[-4000:], sep="\n")
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}: {err[-2000:]}"
    return result


def git(cwd: Path, *args: str) -> str:
    env = os.environ | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@localhost"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def tree_md5(root: Path) -> dict[str, str]:
    """MD5 of every file of a clone but git's and DVC's internals and the project's git-ignored state (.stein/)."""
    skip = (".git", ".dvc/tmp", ".dvc/cache", ".stein")
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not str(p.relative_to(root)).startswith(skip)}


def cache_keys(root: Path) -> set[str]:
    """The remote object keys the cached outputs in ``dvc.lock`` need (DVC 3 layout ``files/md5/ab/cdef...``): each
    file's hash and, for a directory, its ``.dir`` listing plus every file in it."""
    def key(md5: str) -> str:
        return f"{PREFIX}/files/md5/{md5[:2]}/{md5[2:]}"

    uncached = {path for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values()
                for kind in ("outs", "metrics", "plots") for entry in stage.get(kind, []) if isinstance(entry, dict)
                for path, opts in entry.items() if isinstance(opts, dict) and opts.get("cache") is False}
    keys = set()
    for stage in yaml.safe_load((root / "dvc.lock").read_text())["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] in uncached:  # metrics/*.json: they travel with git
                continue
            keys.add(key(out["md5"]))
            if out["md5"].endswith(".dir"):
                cached = root / ".dvc" / "cache" / "files" / "md5" / out["md5"][:2] / out["md5"][2:]
                keys |= {key(entry["md5"]) for entry in json.loads(cached.read_text())}
    return keys


@pytest.fixture(scope="module")
def bucket_objects(s3_server):
    """A function listing (key, size) of every object in the test bucket."""
    import boto3

    s3_server.bucket(BUCKET)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")

    def objects() -> dict[str, int]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    return objects


@pytest.fixture(scope="module")
def clone_a(tmp_path_factory, project_copier, s3_server, bucket_objects) -> Path:
    """Clone A: the project with tiny gmm2d settings and the shared S3 remote committed as the default."""
    root = project_copier(tmp_path_factory.mktemp("remote") / "A", params={"gmm2d": TINY})
    env = clean_env()
    sh(root, "dvc", "remote", "add", "-d", "shared", f"s3://{BUCKET}/{PREFIX}", env=env)
    sh(root, "dvc", "remote", "modify", "shared", "endpointurl", s3_server.endpoint, env=env)
    git(root, "add", ".dvc/config")
    git(root, "commit", "-q", "-m", "the team's DVC remote")
    return root


def test_push_from_one_clone_pull_into_another(clone_a, s3_server, bucket_objects, tmp_path_factory):
    a = clone_a
    # 1. clone A runs the pipeline and pushes: every cached output of dvc.lock is in the bucket, nothing else
    env_a = clean_env(**s3_server.env)
    t0 = time.perf_counter()
    run = sh(a, "stein", "run", "gmm2d", "--push", env=env_a)
    run_seconds = time.perf_counter() - t0
    assert "Pushing the outputs of 'gmm2d' to DVC remote 'shared'" in run.stdout
    pushed = re.search(r"Pushed to 'shared' in ([0-9.]+) s", run.stdout)
    assert pushed, run.stdout[-2000:]
    objects = bucket_objects()
    expected = cache_keys(a)
    assert len(expected) >= 8  # 2 data files, model, checkpoints .dir + 2 files, samples, plots
    assert set(objects) == expected
    print(f"gmm2d (tiny): run + push {run_seconds:.1f} s, push {pushed.group(1)} s, {len(objects)} objects, "
          f"{sum(objects.values()) / 1e6:.2f} MB in s3://{BUCKET}/{PREFIX}")
    git(a, "add", "dvc.lock", "metrics")
    git(a, "commit", "-q", "-m", "gmm2d results")

    # 2. clone B: only git's files, credentials from its git-ignored local config, no AWS_* variables
    b = tmp_path_factory.mktemp("remote") / "B"
    git(a.parent, "clone", "-q", str(a), str(b))
    env_b = clean_env()
    assert not any(k.startswith("AWS_") for k in env_b)
    sh(b, "dvc", "remote", "modify", "--local", "shared", "access_key_id", "testing", env=env_b)
    sh(b, "dvc", "remote", "modify", "--local", "shared", "secret_access_key", "testing", env=env_b)
    assert not (b / "data").exists() and not (b / "models").exists()
    t0 = time.perf_counter()
    # the pipeline's stages only: a bare `dvc pull` exits 1 here, as the stages of pipelines never run in A have
    # no hashes in dvc.lock ("missing files")
    sh(b, "dvc", "pull", "--with-deps", "gmm2d-evaluate", env=env_b)
    print(f"dvc pull into a fresh clone: {time.perf_counter() - t0:.1f} s")
    for rel in ("data/gmm2d/train.parquet", "data/gmm2d/test.parquet", "models/gmm2d/model.pt",
                "models/gmm2d/checkpoints/step_0000050.pt", "samples/gmm2d/samples.parquet", "plots/gmm2d/samples.png"):
        assert (b / rel).read_bytes() == (a / rel).read_bytes(), rel
    status = sh(b, "dvc", "status", "--with-deps", "gmm2d-evaluate", env=env_b)
    assert "Data and pipelines are up to date." in status.stdout
    cloud = sh(b, "dvc", "status", "--cloud", "--with-deps", "gmm2d-evaluate", env=env_b)
    assert "Cache and remote 'shared' are in sync." in cloud.stdout

    # 3. `stein run` in B is a no-op: no stage, no MLflow run, no file changed
    before = tree_md5(b)
    noop = sh(b, "stein", "run", "gmm2d", env=env_b)
    assert "Pipeline 'gmm2d' is up to date: nothing to reproduce." in noop.stdout
    assert "To run:" not in noop.stdout
    assert tree_md5(b) == before
    assert not (b / ".stein" / "mlflow.db").exists()
    assert git(b, "status", "--porcelain") == ""

    # 4. --push when already up to date: nothing to run, nothing new to upload, still exit 0
    again = sh(b, "stein", "run", "gmm2d", "--push", env=env_b)
    assert "up to date" in again.stdout and "Pushed to 'shared'" in again.stdout
    assert bucket_objects() == objects


def test_push_errors(clone_a, s3_server):
    """Bad input (an unknown remote, --remote without --push) exits 2 before anything runs; a push that fails
    (a bucket that does not exist) exits 1 with one line naming the remote and DVC's reason."""
    a = clone_a
    env = clean_env(**s3_server.env)
    status_before = git(a, "status", "--porcelain")

    unknown = sh(a, "stein", "run", "gmm2d", "--push", "--remote", "nosuch", env=env, check=False)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1] == (
        "error: --push: --remote 'nosuch' is not a configured DVC remote (configured: local, shared); see "
        "`dvc remote list`")
    without_push = sh(a, "stein", "run", "--remote", "shared", env=env, check=False)
    assert without_push.returncode == 2 and "--remote shared needs --push" in without_push.stderr
    assert "To run:" not in unknown.stdout + without_push.stdout

    sh(a, "dvc", "remote", "add", "--local", "broken", "s3://no-such-bucket/cache", env=env)
    sh(a, "dvc", "remote", "modify", "--local", "broken", "endpointurl", s3_server.endpoint, env=env)
    try:
        failed = sh(a, "stein", "run", "gmm2d", "--push", "--remote", "broken", env=env, check=False)
    finally:
        sh(a, "dvc", "remote", "remove", "--local", "broken", env=env)
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pipeline 'gmm2d' is reproduced, but pushing its outputs to DVC remote 'broken' "
                           "(s3://no-such-bucket/cache) failed: ERROR:"), last
    assert "Pushing the outputs of 'gmm2d' to DVC remote 'broken'" in failed.stdout
    assert git(a, "status", "--porcelain") == status_before
