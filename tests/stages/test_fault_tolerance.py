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
from tasks.stages.train.loop import Hooks, fit

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


# ------------------------------------------------------------------- a run folder that cannot resume its training


def _run_folder(run_dir: Path, state_bytes: bytes) -> Path:
    """A run folder as Train V2 leaves it: its snapshot listing one checkpoint folder with ``state.pt``."""
    (run_dir / "checkpoint_a").mkdir(parents=True)
    (run_dir / "checkpoint_a" / "state.pt").write_bytes(state_bytes)
    (run_dir / SNAPSHOT).write_text(json.dumps({"ray_version": "2.60.0", "checkpoint_results": [
        {"version": 0, "checkpoint_dir_name": "checkpoint_a", "metrics": {"step": 250}}]}))
    return run_dir / "checkpoint_a" / "state.pt"


def _state_bytes(state: dict) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good_state():
    """A real checkpoint state of the CFG training, after 250 of its steps."""
    data = torch.randn(200, 2, generator=torch.Generator().manual_seed(1))
    states = []
    fit(FAMILIES["ncsn"], _cfg(), data, (2,), device="cpu", stop_after=250,
        hooks=Hooks(on_checkpoint=lambda state, final: states.append(state)))
    return states[-1]


def _renamed(state: dict) -> dict:
    return state | {"modules": {"critic": state["modules"]["score"]}}


def _reshaped(state: dict) -> dict:
    score = dict(state["modules"]["score"])
    key = next(k for k, v in score.items() if v.ndim == 2)
    score[key] = torch.zeros(score[key].shape[0] + 1, score[key].shape[1])
    return state | {"modules": {"score": score}}


@pytest.mark.parametrize("change,why", [
    (lambda s: s, None),
    (lambda s: s | {"family": "agd"}, "a checkpoint of the 'agd' family; this training is 'ncsn'"),
    (lambda s: {k: v for k, v in s.items() if k != "optimizers"}, "not a training state (no optimizers)"),
    (lambda s: s | {"shape": [3]}, "a checkpoint for examples of shape [3]; the data's are [2]"),
    (lambda s: s | {"step": 10**6}, "a checkpoint of step 1000000; this training has steps 0..2500"),
    (_renamed, "a checkpoint of modules ['critic']; this training has ['score']"),
    (_reshaped, "module 'score' does not match this config at"),
], ids=["matching", "another family", "no optimizers", "other examples", "past the end", "other modules",
        "another shape"])
def test_a_checkpoint_that_cannot_resume_says_why_with_its_file(tmp_path, good_state, change, why):
    import pyarrow.fs as pafs

    from tasks.stages.train.task import unresumable

    path = _run_folder(tmp_path / "run", _state_bytes(change(good_state)))
    got = unresumable(pafs.LocalFileSystem(), str(tmp_path / "run"), FAMILIES["ncsn"], _cfg(), (2,))
    if why is None:
        assert got is None
    else:
        assert got is not None and got.startswith(f"{path}: {why}"), got


def test_a_truncated_checkpoint_or_list_is_unreadable_not_a_crash(tmp_path, good_state):
    import pyarrow.fs as pafs

    from tasks.stages.train.task import unresumable

    full = _state_bytes(good_state)
    path = _run_folder(tmp_path / "run", full[: len(full) // 2])  # a disk filled mid-write
    fs, run = pafs.LocalFileSystem(), str(tmp_path / "run")
    assert unresumable(fs, run, FAMILIES["ncsn"], _cfg(), (2,)).startswith(f"{path}: unreadable (")
    (tmp_path / "run" / SNAPSHOT).write_text('{"checkpoint_results": [')
    assert unresumable(fs, run, FAMILIES["ncsn"], _cfg(), (2,)).startswith(f"{tmp_path / 'run' / SNAPSHOT}: not a Ray Train checkpoint list")
    (tmp_path / "run" / SNAPSHOT).unlink()  # a run killed before its first checkpoint: a fresh start
    assert unresumable(fs, run, FAMILIES["ncsn"], _cfg(), (2,)) is None


@pytest.mark.slow
@pytest.mark.heavy  # a full training through Ray (35 s); the checks it relies on are the quick cases above
def test_a_run_folder_that_cannot_resume_is_moved_aside_and_the_training_starts_over(project, reference, good_state,
                                                                                   caplog):
    """A truncated state.pt in the run folder of this very training (same name, same inputs): before, Ray Train
    resumed from it, failed at each of its retries, and so did every rerun. Now the stage moves the folder aside,
    says so, and trains from step 0 to the uninterrupted run's weights."""
    from tasks.data.io import write_dataset
    from tasks.infra.runtime import project_root, state_dir
    from tasks.stages.train.task import UNRESUMABLE, training_run_name

    data, ref = reference
    write_dataset(project / "train.parquet", data.numpy())
    root = project_root()
    run_name = training_run_name("test", _cfg(), [project / "train.parquet"], root)
    storage = state_dir(root) / "ray_results"
    full = _state_bytes(good_state)
    _run_folder(storage / run_name, full[: len(full) // 3])
    with caplog.at_level("WARNING", logger="stein"):
        info = _train(project)
    assert info["steps"] == CFG["n_steps"]
    _assert_weights_of(ref, project / "model.pt")
    moved = list((storage / UNRESUMABLE).glob(f"{run_name}-*"))
    assert len(moved) == 1 and (moved[0] / "checkpoint_a" / "state.pt").stat().st_size == len(full) // 3
    assert any("cannot resume this training" in r.getMessage() and "unreadable" in r.getMessage()
               and str(moved[0]) in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not (storage / run_name).exists()
