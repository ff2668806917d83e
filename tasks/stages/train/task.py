"""Train stage: any model family, through the one training loop (:mod:`tasks.stages.train.loop`) on Ray Train.

The driver (this process) starts or joins Ray, creates nothing itself but the trainer, and after ``fit`` exports
every checkpoint Ray kept as a model checkpoint (``models/<pipeline>/checkpoints/step_NNNNNNN.pt``) and the last
one as the stage's model, atomically; the training curves go to CSV files for ``dvc plots``. Rank 0 of the
workers logs every metric of the family's step into the MLflow run the driver created (the driver passes the run
id and an absolute tracking URI).

Fault tolerance: Ray Train restarts a failed worker group from the last checkpoint it registered
(``FailureConfig``), and a training whose driver died (a killed ``stein run``) resumes when the stage runs again
with the same inputs: the Ray Train run is named after them (:func:`training_run_name`), and a trainer that finds
a run of its name in its storage resumes it. The loop is a pure function of (seed, step), so either way the final
weights are those of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.infra.ray_client import init_ray, local_torch_config
from tasks.config.paths import HELDOUT_CURVE, TRAIN_CURVE
from tasks.families import FAMILIES, model_payload
from tasks.data.io import atomic_path, file_md5, save_torch, write_rows
from tasks.config.sections import ConfigError
from tasks.infra.runtime import RuntimeSettings, check_batch_split, project_root, state_dir
from tasks.stages.train.loop import STATE_FILE, TrainingDiverged, fatal_error, train_loop_per_worker

log = logging.getLogger("stein")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def _files(paths: Iterable[Path]) -> list[Path]:
    """The files of ``paths`` (directories walked, byte-code skipped as .dvcignore skips it), in a fixed order."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc")
        elif p.is_file():
            out.append(p)
    return out


def training_run_name(pipeline: str, cfg, inputs: Iterable[Path], root: Path) -> str:
    """The Ray Train run name of a training: ``<pipeline>-train-<digest>``, the digest a SHA-256 of the train
    section and of the content of every input (the data and the code the DVC stage depends on).

    A trainer finding a run of its name in its storage resumes from that run's last checkpoint, so: the same
    inputs resume a training that was killed (a rerun of the stage after ``kill -9``), and any change of config,
    data or code starts a fresh one instead of silently continuing a stale run. A finished training removes its
    run, so a forced rerun trains from scratch."""
    h = hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode())
    for f in _files(inputs):
        h.update(str(f.resolve().relative_to(root.resolve()) if f.resolve().is_relative_to(root.resolve()) else f).encode())
        h.update(file_md5(f).encode())
    return f"{pipeline}-train-{h.hexdigest()[:16]}"


def _storage(settings: RuntimeSettings, root: Path) -> tuple[str, object | None]:
    """Ray Train's (storage_path, storage_filesystem): ``STEIN_RAY_STORAGE`` or ``.stein/ray_results``. An s3://
    path with ``AWS_ENDPOINT_URL`` set (an S3-compatible server) gets a filesystem pointed at that endpoint."""
    path = settings.ray_storage or str(state_dir(root) / "ray_results")
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if path.startswith("s3://") and endpoint:
        import pyarrow.fs

        scheme, _, host = endpoint.partition("://")
        fs = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme,
                                     region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        return path.removeprefix("s3://"), fs
    return path, None


def _remove_run(result) -> None:
    """Remove Ray Train's folder of a finished run (on whatever filesystem it lives)."""
    if not result.path:
        return
    fs = getattr(result, "filesystem", None)
    if fs is None:
        shutil.rmtree(result.path, ignore_errors=True)
        return
    import pyarrow.fs

    if fs.get_file_info(result.path).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(result.path)


#: Where a run folder that cannot resume its training is moved, beside the runs (``<storage>/unresumable/``).
UNRESUMABLE = "unresumable"


def _example_shape(path: Path) -> tuple[int, ...]:
    """The shape of one example of a dataset, from its Parquet schema alone (the data is not read)."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    meta = schema.metadata or {}
    if b"shape" in meta:
        return tuple(json.loads(meta[b"shape"]))
    return (schema.field("x").type.list_size,)


def unresumable(fs, run_dir: str, family, cfg, shape: tuple[int, ...]) -> str | None:
    """Why the run folder ``run_dir`` (on the pyarrow filesystem ``fs``) cannot resume this training, naming the
    file, or None: no folder or no checkpoint yet (a fresh start), or every checkpoint Ray registered loads and
    matches (:func:`~tasks.stages.train.loop.resume_mismatch`). A truncated ``state.pt`` (a disk filled mid-write)
    is one such case, a checkpoint of another family, other modules or other shapes another."""
    import io

    import pyarrow.fs as pafs
    import torch

    from tasks.stages.train.loop import resume_mismatch

    snapshot = f"{run_dir}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(snapshot).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(snapshot) as f:
            results = json.loads(f.read())["checkpoint_results"]
        names = [r["checkpoint_dir_name"] for r in results]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{snapshot}: not a Ray Train checkpoint list ({type(exc).__name__}: {exc})"
    for name in names:
        path = f"{run_dir}/{name}/{STATE_FILE}"
        try:
            with fs.open_input_stream(path) as f:
                state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a missing, truncated or foreign file: each is this case
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            return f"{path}: unreadable ({type(exc).__name__}: {first})"
        if (why := resume_mismatch(family, cfg, shape, state)) is not None:
            return f"{path}: {why}"
    return None


def set_aside_unresumable(storage_path: str, storage_fs, run_name: str, family, cfg, data_path: Path) -> str | None:
    """Before a training starts: if its run folder holds a checkpoint that cannot resume it, move the folder to
    ``<storage>/unresumable/<run>-<time>`` (kept for a look, out of Ray's way) and say so; the training then
    starts over. Without this, Ray Train resumed from it, failed on the same error at each of its retries, and so
    did every later rerun (the folder is named after the stage's inputs). Returns where the folder went, or None."""
    import pyarrow.fs as pafs

    if storage_fs is not None:
        fs = storage_fs
    elif "://" in storage_path:  # s3://... without AWS_ENDPOINT_URL: the filesystem Ray would pick
        fs, storage_path = pafs.FileSystem.from_uri(storage_path)
    else:
        fs, storage_path = pafs.LocalFileSystem(), os.path.abspath(storage_path)
    run_dir = f"{storage_path.rstrip('/')}/{run_name}"
    if fs.get_file_info(run_dir).type != pafs.FileType.Directory:
        return None
    problem = unresumable(fs, run_dir, family, cfg, _example_shape(Path(data_path)))
    if problem is None:
        return None
    aside = f"{storage_path.rstrip('/')}/{UNRESUMABLE}/{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    fs.create_dir(aside.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(run_dir, aside)
    else:  # an object store moves no folder: copy, then delete
        pafs.copy_files(run_dir, aside, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(run_dir)
    log.warning("[train] the interrupted run cannot resume this training: %s; moved it to %s, training from "
                "step 0", problem, aside)
    return aside


@task(name="train", cache_policy=NO_CACHE)
def train_model(
    cfg,
    *,
    data_path: Path,
    heldout_path: Path | None,
    model_path: Path,
    curves_dir: Path,
    pipeline: str,
    run_name: str | None = None,
    checkpoints_dir: Path | None = None,
    mlflow_run_id: str | None,
    mlflow_tracking_uri: str | None,
    settings: RuntimeSettings | None = None,
    config_file: str = "the train section",
) -> dict[str, float]:
    """Train the family ``cfg.family`` names with Ray Train's TorchTrainer; write the final model, every kept
    checkpoint and the curves (``train_loss.csv``: the step metrics; ``heldout.csv``: the held-out MMD against
    step, epoch and seconds, when ``heldout_every`` is set). ``run_name`` names the Ray Train run (default:
    :func:`training_run_name` of the config and the data): a run of that name left by a killed training resumes."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    family = FAMILIES[cfg.family]
    settings = settings or RuntimeSettings()
    check_batch_split(cfg, settings, config_file)
    root = project_root()
    threads = settings.resolved_threads()
    use_gpu = settings.resolved_use_gpu()
    t_init = time.perf_counter()
    if run_name is None:
        run_name = training_run_name(pipeline, cfg, [data_path, *([heldout_path] if heldout_path else [])], root)
    from tasks.families.base import meta_shapes, too_large

    if (why := too_large(meta_shapes(lambda: family.build(cfg, _example_shape(Path(data_path)))))) is not None:
        raise ConfigError(config_file, "train.net", why)
    storage_path, storage_fs = _storage(settings, root)
    set_aside_unresumable(storage_path, storage_fs, run_name, family, cfg, data_path)
    workers = (settings.min_workers, settings.num_workers) if settings.min_workers else settings.num_workers
    started = init_ray(settings, root, threads)
    ray_init_seconds = time.perf_counter() - t_init
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "family": family.name,
                "train": cfg.model_dump(),
                "data_path": str(Path(data_path).resolve()),  # workers change directory: absolute paths
                "heldout_path": str(Path(heldout_path).resolve()) if heldout_path else None,
                "threads": threads,
                "mlflow_run_id": mlflow_run_id,
                "mlflow_tracking_uri": mlflow_tracking_uri,
            },
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         elastic_resize_monitor_interval_s=settings.elastic_resize_s),
            torch_config=local_torch_config(),  # a local Ray: the rendezvous store on 127.0.0.1 too
            run_config=RunConfig(
                name=run_name,  # named after the inputs: a killed training resumes, a changed one starts fresh
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                checkpoint_config=CheckpointConfig(num_to_keep=None),
                # a lost worker or node: restart the group from the last checkpoint (deterministic: same result)
                failure_config=FailureConfig(max_failures=3),
                # Train's INFO lines (two per reported checkpoint) would drown the workers' progress lines; its
                # system log files under the Ray session keep every level.
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        log.info("training %s on %s Ray worker(s), use_gpu=%s; Ray Train run %s in %s", family.name,
                 settings.workers_spec, use_gpu, run_name,
                 settings.ray_storage or "the project's .stein/ray_results")
        t0 = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    fatal = fatal_error(result.metrics)
    if isinstance(fatal, TrainingDiverged):
        raise TrainingDiverged(f"{fatal}; Ray kept its checkpoints under {result.path}")
    if fatal is not None:
        _remove_run(result)  # nothing to resume: the input was bad
        raise fatal
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint: {result.error}")
    # Every checkpoint Ray kept (all of them: num_to_keep=None) becomes a model checkpoint, so that the evaluate
    # stage can follow the metrics along training; the last one is the stage's model.
    states = {}
    for ckpt, _metrics in result.best_checkpoints or [(result.checkpoint, {})]:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        states[int(state["step"])] = state
    state = states[max(states)]
    if checkpoints_dir is not None:
        with atomic_path(checkpoints_dir, directory=True) as tmp:
            for step, s in sorted(states.items()):
                save_torch(tmp / checkpoint_name(step), model_payload(family, cfg, s))
    save_torch(model_path, model_payload(family, cfg, state))
    _remove_run(result)  # exported above; Ray's copies only served resumption
    write_rows(Path(curves_dir) / TRAIN_CURVE, state["history"])
    if cfg.heldout_every:
        write_rows(Path(curves_dir) / HELDOUT_CURVE, state["heldout"])
    last = state["history"][-1] if state["history"] else {}
    steps = int(state["step"])
    out = {f"final_{k}": float(v) for k, v in last.items() if k != "step"}
    if state["heldout"]:
        out["final_mmd_heldout"] = float(state["heldout"][-1]["mmd_heldout"])
    return out | {
        "steps": steps,
        "ray_init_seconds": ray_init_seconds,
        "fit_seconds": fit_seconds,
        # time inside the workers' training steps (all attempts); fit_seconds minus this is Ray Train's own
        # overhead: controller and worker actors, process group, checkpoint reporting, held-out evaluations
        "train_loop_seconds": float(state["train_seconds"]),
        "seconds_per_step": float(state["train_seconds"]) / max(steps, 1),
        "seconds_per_epoch": float(state["train_seconds"]) / max(steps, 1) * state["n_train"] / cfg.batch_size,
    }
