"""Runtime settings: what changes between a laptop and a cluster, never tracked by DVC.

Read from the environment (prefix ``STEIN_``) or from an optional, git-ignored ``runtime.env`` file in the
project root. The pipeline's *parameters* live in ``conf/`` and are tracked by DVC; these settings decide only
where and how the same computation runs (number of Ray workers, GPUs, threads), so changing them does not make
a stage stale.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.infra.venv_hook import TELEMETRY_OFF

log = logging.getLogger("stein")

#: Environment that keeps every tool offline and quiet. Applied with ``setdefault``: a user's value wins. The
#: telemetry switches come from the venv hook, which sets them in every program of the venv (tasks/infra/venv_hook.py).
OFFLINE_ENV = {
    **TELEMETRY_OFF,
    "PREFECT_UI_ENABLED": "false",
    # Ray Train's controller polls its workers every 2 s by default, which adds up to 2 s of idle time
    # at the start and end of every fit on a small job; 0.5 s costs nothing measurable.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Train V2 re-logs every print() of a worker, which log_to_driver already streams: lines came out twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def project_root() -> Path:
    """The project root: ``STEIN_PROJECT_ROOT`` if set, else the nearest parent of the cwd with a dvc.yaml."""
    env = os.environ.get("STEIN_PROJECT_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file():
            return candidate
    return here


def state_dir(root: Path | None = None) -> Path:
    """Project-local, git-ignored state: the MLflow store, Prefect's home, Ray results, the DVC remote."""
    return (root or project_root()) / ".stein"


#: The stores under ``.stein/`` that hold what other local users must not read: runs, users and password hashes.
PRIVATE_STORES = ("mlflow.db", "mlflow-auth.db", "prefect/prefect.db")


def private_state_dir(root: Path | None = None) -> Path:
    """``.stein/``, created or made owner-only (0700: no other local user lists or opens anything in it), with each
    store of :data:`PRIVATE_STORES` there and its SQLite side files made 0600 too. Servers started here create
    their files under umask 077 (:func:`flows.local.private_child`); a store this process opens is created 0600
    by :func:`private_file` first."""
    state = state_dir(root)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.chmod(state, 0o700)
        for name in PRIVATE_STORES:
            for path in (state / name, *(state / f"{name}{side}" for side in ("-wal", "-shm", "-journal"))):
                if path.is_file():
                    os.chmod(path, 0o600)
    except PermissionError as exc:  # another user's .stein/: theirs to tighten; say so, do not fail the command
        import logging

        logging.getLogger("stein").warning("cannot make %s owner-only (%s): it is not yours", exc.filename, exc.strerror)
    return state


def private_file(path: Path) -> Path:
    """``path`` created empty and owner-only if missing (an empty file is a new SQLite database), else made
    owner-only."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server we are about to start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply_offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # Prefect keeps its database and settings inside the project unless the user points it elsewhere.
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        home = state_dir() / "prefect"
        home.mkdir(parents=True, exist_ok=True)  # Prefect creates only the last path component
        os.environ["PREFECT_HOME"] = str(home)


class RuntimeSettings(BaseSettings):
    """Where and how to run. Every field can be set as ``STEIN_<NAME>`` in the environment or runtime.env."""

    model_config = SettingsConfigDict(env_prefix="STEIN_", env_file="runtime.env", extra="ignore")

    num_workers: int = Field(
        1, ge=1, le=100_000,
        description="Ray Train workers (DDP processes) for training stages; MIN-MAX (e.g. 1-2) trains elastically: "
        "with MAX workers when the cluster has room, on as few as MIN when nodes are lost. Read as the maximum.",
    )
    min_workers: int | None = Field(
        None, ge=1, le=100_000, description="Set by STEIN_NUM_WORKERS=MIN-MAX (elastic training); unset: fixed size."
    )
    use_gpu: bool | None = Field(
        None, description="Train on GPUs; unset means: use them when CUDA is available."
    )
    threads: int | None = Field(
        None, ge=1, le=4096, description="torch/BLAS threads per process; unset means: cores / workers."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join (also read from RAY_ADDRESS); unset starts a local Ray."
    )
    pipeline_ray: bool = Field(
        True,
        description="A pipeline run (`stein run`, a scheduled run) starts one local Ray for all its stages, which "
        "join it; false: each stage that uses Ray starts its own, as a stage run alone always does. Not used when "
        "RAY_ADDRESS names a cluster.",
    )
    elastic_resize_s: float = Field(
        60.0, ge=1, le=86_400,
        description="Elastic training (STEIN_NUM_WORKERS=MIN-MAX): how often Ray Train looks for room to grow the "
        "worker group back (each resize restarts the group from its last checkpoint).",
    )
    ray_storage: str | None = Field(
        None,
        description="Where Ray Train keeps the checkpoints of a running training (its storage_path): a directory "
        "every node sees, or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL, credentials from AWS_*). Unset: "
        ".stein/ray_results, enough on one machine.",
    )
    ray_ship_code: bool = Field(
        False,
        description="Ship the project to Ray workers with runtime_env working_dir (a cluster without a "
        "shared file system). Locally, workers import it from the project path.",
    )

    @model_validator(mode="before")
    @classmethod
    def _worker_range(cls, data):
        """``num_workers="MIN-MAX"`` -> ``min_workers=MIN, num_workers=MAX`` (MIN <= MAX, checked)."""
        value = data.get("num_workers") if isinstance(data, dict) else None
        if isinstance(value, str) and "-" in value.strip().lstrip("-"):
            low, _, high = value.strip().partition("-")
            try:
                low_n, high_n = int(low), int(high)
            except ValueError:
                raise ValueError("must be N or MIN-MAX with integers") from None
            if not 1 <= low_n <= high_n:
                raise ValueError("MIN-MAX needs 1 <= MIN <= MAX")
            data = dict(data) | {"num_workers": high_n, "min_workers": low_n}
        return data

    @property
    def worker_counts(self) -> range:
        """Every number of workers a training may run with: one size, or MIN..MAX when elastic."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)

    @property
    def workers_spec(self) -> str:
        """STEIN_NUM_WORKERS as given: ``N``, or ``MIN-MAX`` when elastic."""
        return f"{self.min_workers}-{self.num_workers}" if self.min_workers else str(self.num_workers)

    def resolved_use_gpu(self) -> bool:
        if self.use_gpu is not None:
            return self.use_gpu
        import torch

        return torch.cuda.is_available()

    def resolved_ray_address(self) -> str | None:
        return self.ray_address or os.environ.get("RAY_ADDRESS") or None

    def resolved_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        cores = os.cpu_count() or 1
        return max(1, cores // self.num_workers)


def load_settings() -> RuntimeSettings:
    """The runtime settings; a bad ``STEIN_*`` value is a ConfigError naming the variable (exit 2)."""
    from pydantic import ValidationError

    from tasks.config.sections import ConfigError

    try:
        return RuntimeSettings()
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err["loc"] or ("num_workers",)  # the one model-level check: the MIN-MAX form of num_workers
        got = err.get("input")
        if isinstance(got, dict):
            got = got.get(loc[0])
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError("environment or runtime.env", f"STEIN_{'_'.join(map(str, loc)).upper()}", f"{msg} (got {got!r})") from None


def check_batch_split(cfg, settings: RuntimeSettings, config_file: str = "the train section") -> None:
    """Every worker takes an equal slice of the global batch: fail before Ray starts if it does not split, for
    every size an elastic training may take."""
    bad = [n for n in settings.worker_counts if cfg.batch_size % n]
    if bad:
        from tasks.config.sections import ConfigError

        which = (f"STEIN_NUM_WORKERS={bad[0]}" if settings.min_workers is None
                 else f"{bad[0]} (STEIN_NUM_WORKERS={settings.workers_spec} may train on {bad[0]})")
        raise ConfigError(config_file, "train.batch_size", f"{cfg.batch_size} is not a multiple of {which}: every "
                          "worker takes an equal slice of the global batch")


def configure_threads(threads: int) -> None:
    """Cap torch and BLAS threads: more threads than cores makes numeric code many times slower on a small
    shared machine. Logged so that a slow run can be traced to its thread count."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)
    log.info("torch/BLAS threads: %d (cores: %s)", threads, os.cpu_count())
