"""Fault tolerance of training, proven by killing things: a Ray Train worker killed with SIGKILL mid-training is
restarted from the last checkpoint Train registered, and a training whose driver was killed resumes when it runs
again with the same inputs (the Ray Train run is named after them, :func:`tasks.stages.train.task.training_run_name`), from
the project's folder or from S3-compatible storage. Either way the final weights are those of an uninterrupted
run: the loop is a pure function of (seed, step), so replayed steps (Train can lose a checkpoint reported in the
~2 s before a crash) change nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from tasks.families import FAMILIES
from tasks.stages.train.loop import fit

REPO = Path(__file__).resolve().parents[2]
CFG = {"family": "ncsn", "n_steps": 2500, "batch_size": 32, "log_every": 250, "checkpoint_every": 250, "lr": 3e-3,
       "net": {"kind": "mlp", "hidden": 16, "n_layers": 2}, "n_sigmas": 4, "ema_decay": 0.9}
RESUMED = "[train] resuming from the checkpoint of step"


def _cfg(**kw):
    return FAMILIES["ncsn"].config.model_validate(CFG | kw)


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run, in this process: 500 rows of a 2-D Gaussian, then the bare loop."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(500, 2, generator=g) * torch.tensor([1.0, 0.5]) + torch.tensor([1.0, -1.0])
    return data, fit(FAMILIES["ncsn"], _cfg(), data, (2,), device="cpu")


def _assert_weights_of(reference_state: dict, model_path: Path) -> None:
    from tasks.data.io import load_checkpoint

    ckpt = load_checkpoint(model_path)
    assert ckpt["step"] == CFG["n_steps"]
    # 1 worker, 1 thread, the same (seed, step) batches: a resumed run repeats the same float operations
    for k, v in reference_state["modules"]["score"].items():
        torch.testing.assert_close(ckpt["raw_modules"]["score"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    for k, v in reference_state["extra"]["ema"]["shadow"].items():
        torch.testing.assert_close(ckpt["modules"]["score"][k], v, rtol=1e-6, atol=1e-7, msg=k)


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Train V2's record of the checkpoints it registered


def _registered(snapshot: str | None) -> int:
    """How many checkpoints a Train snapshot (its JSON text) lists: these, and only these, survive a crash."""
    return len(json.loads(snapshot).get("checkpoint_results", [])) if snapshot else 0


def _checkpoints(storage: Path) -> int:
    return max((_registered(p.read_text()) for p in storage.glob(f"test-train-*/{SNAPSHOT}")), default=0)


def _wait_for(predicate, what: str, timeout: float = 240, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {what}:\n{log.read_text()[-3000:] if log else ''}")
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)
    return found


def _train(project: Path, **settings):
    from tasks.infra.runtime import RuntimeSettings
    from tasks.stages.train.task import train_model

    return train_model.fn(
        _cfg(), data_path=project / "train.parquet", heldout_path=None, model_path=project / "model.pt",
        curves_dir=project / "plots", pipeline="test", checkpoints_dir=project / "checkpoints", mlflow_run_id=None,
        mlflow_tracking_uri=None, settings=RuntimeSettings(num_workers=1, use_gpu=False, threads=1, **settings),
    )


def _ray_train_workers() -> list[psutil.Process]:
    """This test process's Ray Train worker processes (Ray titles them ``ray::RayTrainWorker...``)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_the_run_name_follows_the_inputs(tmp_path):
    """Same config and inputs: the same name (a killed run resumes); any change of config, data or code (a file
    inside an input folder): another name (a fresh run). Byte-code is not an input."""
    from tasks.stages.train.task import training_run_name

    data, code = tmp_path / "train.parquet", tmp_path / "code"
    data.write_bytes(b"rows")
    (code / "__pycache__").mkdir(parents=True)
    (code / "loop.py").write_text("x = 1\n")
    name = training_run_name("p", _cfg(), [data, code], tmp_path)
    assert name.startswith("p-train-") and name == training_run_name("p", _cfg(), [data, code], tmp_path)
    (code / "__pycache__" / "loop.cpython-311.pyc").write_bytes(b"\0")
    assert training_run_name("p", _cfg(), [data, code], tmp_path) == name
    assert training_run_name("p", _cfg(lr=1e-3), [data, code], tmp_path) != name
    assert training_run_name("q", _cfg(), [data, code], tmp_path) != name
    (code / "loop.py").write_text("x = 2\n")
    changed_code = training_run_name("p", _cfg(), [data, code], tmp_path)
    data.write_bytes(b"other rows")
    assert len({name, changed_code, training_run_name("p", _cfg(), [data, code], tmp_path)}) == 3


@pytest.mark.slow
@pytest.mark.heavy  # Ray Train's own restart (FailureConfig); the node kill of tests/e2e/test_cluster.py is heavy too
def test_a_killed_ray_train_worker_is_restarted_from_the_last_checkpoint(project, reference, capfd,
                                                                        assert_resumed_where_it_stopped):
    """SIGKILL to the (only) Ray Train worker once a checkpoint exists: Train restarts the worker group, the new
    worker resumes from the checkpoint, and the final weights equal the uninterrupted run's."""
    from tasks.data.io import write_dataset

    data, ref = reference
    write_dataset(project / "train.parquet", data.numpy())
    storage = project / ".stein" / "ray_results"
    killed: list[float] = []  # seconds from the kill: to a new worker process, to its first new checkpoint

    def kill_once() -> None:
        before = _wait_for(lambda: _checkpoints(storage), "checkpoint")
        worker = _wait_for(_ray_train_workers, "Ray Train worker")[0]
        worker.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _wait_for(lambda: [p for p in _ray_train_workers() if p.pid != worker.pid], "restarted worker")
        killed.append(time.monotonic() - t0)
        _wait_for(lambda: _checkpoints(storage) > before, "checkpoint after the restart")
        killed.append(time.monotonic() - t0)

    killer = threading.Thread(target=kill_once, daemon=True)
    killer.start()
    info = _train(project)
    killer.join(timeout=5)
    assert len(killed) == 2, "the worker was not killed, or training ended before its first checkpoint was seen"
    out = capfd.readouterr().out
    with capfd.disabled():
        print(f"\nworker killed: a new worker {killed[0]:.1f} s later, its first checkpoint {killed[1]:.1f} s later")
    assert RESUMED in out, out[-3000:]
    assert_resumed_where_it_stopped(out)
    assert info["steps"] == CFG["n_steps"]
    _assert_weights_of(ref, project / "model.pt")
    steps = sorted(int(p.stem.split("_")[1]) for p in (project / "checkpoints").iterdir())
    assert steps == list(range(250, CFG["n_steps"] + 1, 250)), steps  # every checkpoint exported, none twice
    assert not any(storage.glob("test-train-*")), "the finished run's folder was left behind"


DRIVER = """
import json, sys
from pathlib import Path
from tasks.families import FAMILIES
from tasks.infra.runtime import RuntimeSettings
from tasks.stages.train.task import train_model

project, cfg, storage = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
train_model.fn(
    FAMILIES["ncsn"].config.model_validate(cfg), data_path=project / "train.parquet", heldout_path=None,
    model_path=project / "model.pt", curves_dir=project / "plots", pipeline="test",
    checkpoints_dir=project / "checkpoints", mlflow_run_id=None, mlflow_tracking_uri=None,
    settings=RuntimeSettings(num_workers=1, use_gpu=False, threads=1, ray_storage=storage[0] if storage else None),
)
"""


def _kill_driver_after_a_checkpoint(project: Path, has_checkpoint, storage_arg: list[str], env: dict) -> int:
    """Run the training in a child process and SIGKILL it (its process group: the driver and the Ray it
    started) once ``has_checkpoint()``; return how many of its processes were alive then (all must die)."""
    log = project / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(project), json.dumps(CFG), *storage_arg], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        _wait_for(has_checkpoint, "checkpoint", proc=proc, log=log)
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (project / "model.pt").exists()
        _wait_for(lambda: not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
                  "end of every process of the killed training", timeout=60)
        return len(tree)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                pass


# 70 s each; the project-folder case stays in `make test`, the one resume through Ray Train checked there (that the
# resumed worker's first step is the checkpoint's + 1); the S3 case is heavy (`make test-all`)
@pytest.mark.slow
@pytest.mark.parametrize("where", ["project", pytest.param("s3", marks=pytest.mark.heavy)])
def test_a_training_whose_driver_was_killed_resumes_when_run_again(project, reference, capfd, where, request,
                                                                  assert_resumed_where_it_stopped):
    """The whole training killed with SIGKILL after a checkpoint (driver, Ray, worker: as when ``stein run`` dies),
    then run again with the same inputs: it resumes from that run's last checkpoint (in the project's
    .stein/ray_results, or in an S3 bucket through ``STEIN_RAY_STORAGE``) and ends with the uninterrupted run's
    weights; the finished run is removed from the storage."""
    from tasks.data.io import write_dataset

    data, ref = reference
    write_dataset(project / "train.parquet", data.numpy())
    env = dict(os.environ) | {"PYTHONPATH": str(REPO)}
    if where == "s3":
        import boto3

        s3 = request.getfixturevalue("s3_server")
        bucket = s3.bucket(f"ray-{os.getpid()}")
        client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        keys = lambda: [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]  # noqa: E731
        has_checkpoint = lambda: any(  # noqa: E731
            _registered(client.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys() if k.endswith(SNAPSHOT))
        storage = [f"s3://{bucket}/ray"]
        env |= s3.env
        for k, v in s3.env.items():
            request.getfixturevalue("monkeypatch").setenv(k, v)
    else:
        has_checkpoint = lambda: _checkpoints(project / ".stein" / "ray_results")  # noqa: E731
        storage = []
    assert _kill_driver_after_a_checkpoint(project, has_checkpoint, storage, env) >= 3  # driver, gcs, raylet, ...
    capfd.readouterr()
    info = _train(project, **({"ray_storage": storage[0]} if storage else {}))
    out = capfd.readouterr().out
    assert RESUMED in out, out[-3000:]
    assert_resumed_where_it_stopped(out)
    assert info["steps"] == CFG["n_steps"]
    _assert_weights_of(ref, project / "model.pt")
    if where == "s3":
        assert keys() and not [k for k in keys() if "test-train-" in k], "the finished run was left in the bucket"
    else:
        assert not any((project / ".stein" / "ray_results").glob("test-train-*"))
