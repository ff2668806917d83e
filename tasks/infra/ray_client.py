"""The stages' Ray client: joining a cluster (``RAY_ADDRESS``, a ``stein cluster`` found by its recorded state) or
starting a local Ray, the torch process group on loopback for Ray Train, and mapping a function over items as Ray
tasks with a progress bar. The local multi-node cluster itself is :mod:`tasks.infra.cluster`.

Wiring, not computation: like :mod:`tasks.infra.runtime` this module is not a DVC dependency of any stage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tasks.config.sections import ConfigError
from tasks.infra.cluster import (
    _RAY_LOCAL_ONLY_ENV,
    PIPELINE_RAY_ENV,
    PIPELINE_RAY_PID_ENV,
    PIPELINE_RAY_SUBDIR,
    _loopback_interface,
    _use_cluster_auth,
    node_alive,
    pipeline_ray_ready,
    recorded_cluster_for,
)
from tasks.infra.runtime import OFFLINE_ENV, RuntimeSettings

log = logging.getLogger("stein")


def ray_runtime_env(settings: RuntimeSettings, root: Path, threads: int) -> dict[str, Any]:
    """Environment of the Ray workers: the project importable, offline, thread counts capped, and the MLflow client
    settings rank 0 logs the step metrics with (a tracking server's URL and user).

    The MLflow password (or token) is passed on only to a cluster Ray joins: Ray writes every runtime env into its
    session logs on each node, and a local Ray's workers inherit it from this process anyway, so on one machine it
    stays in the processes' environments and never reaches a disk."""
    env = dict(OFFLINE_ENV) | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p),
    }
    mlflow_env = ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME"]
    if settings.resolved_ray_address() and not os.environ.get(PIPELINE_RAY_ENV):  # the pipeline's Ray is local
        mlflow_env += ["MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"]
    env |= {k: os.environ[k] for k in mlflow_env if os.environ.get(k)}
    # tasks.infra.ray_worker.setup runs first in every worker: RAY_ADDRESS set to the worker's own cluster (Train's
    # placement-group cleaner would otherwise fail on "multiple active Ray instances" when another Ray runs on the
    # machine) and Train V2's per-report INFO lines kept below WARNING (see that module).
    runtime_env: dict[str, Any] = {"env_vars": env, "worker_process_setup_hook": "tasks.infra.ray_worker.setup"}
    if settings.ray_ship_code:
        runtime_env["working_dir"] = str(root)
        runtime_env["excludes"] = [".venv", ".stein", ".git", ".dvc/cache", "data", "models", "samples", "plots"]
    return runtime_env


@contextlib.contextmanager
def _driver_logging_kept() -> Iterator[None]:
    """Keep this process's root logger (level and handlers) through ``ray.init``: Ray applies the
    ``logging_config`` given for its workers to the driver's root logger too, which silenced the stage's own INFO
    lines once Ray had started."""
    root_logger = logging.getLogger()
    level, handlers = root_logger.level, list(root_logger.handlers)
    try:
        yield
    finally:
        root_logger.setLevel(level)
        root_logger.handlers[:] = handlers


def init_ray(settings: RuntimeSettings, root: Path, threads: int) -> bool:
    """Join ``RAY_ADDRESS`` if set, else start a local Ray sized to this machine. Returns True if started here
    (the caller then shuts it down).

    A local Ray is reachable from this machine only, and only with a token:

    - Every Ray listener binds 127.0.0.1: the node IP is 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, else
      ``ray.init`` turns ``_node_ip_address="127.0.0.1"`` into the machine's outward address), and Ray's C++ gRPC
      servers (GCS, raylet node manager and object manager, every worker's core worker) listen on 127.0.0.1 instead
      of ``[::]`` exactly when the node IP is "127.0.0.1"; the runtime-env agent and the metrics agent bind the node
      IP. There is no dashboard (``include_dashboard=False``; it needs ``ray[default]``).
    - Torch's collectives stay on the loopback interface: ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` name it.
      Rank 0's rendezvous store listens on ``[::]`` unless the trainer is given ``local_torch_config()``.
    - Token auth is on (``RAY_AUTH_MODE=token``) with a random token for this process (``RAY_AUTH_TOKEN``, which the
      Ray processes inherit): nothing is written to disk, and Ray does not write its default ``~/.ray/auth_token``.

    Joining a cluster changes none of this: its network and auth are the cluster's. When ``RAY_ADDRESS`` is the
    head of the project's own local cluster (``stein cluster up``, recorded under ``.stein/cluster/``), this process
    takes that cluster's token file and its loopback setting from the record, so that nothing else is needed.
    """
    if address := settings.resolved_ray_address():
        import ray

        if ray.is_initialized():
            return False
        extra = {}
        if os.environ.get(PIPELINE_RAY_ENV):  # `stein run`'s own Ray: wait until it is up, then join it
            t0 = time.perf_counter()
            if not pipeline_ray_ready():
                log.warning("the pipeline's Ray did not come up (its log: .stein/%s/last-node.log, once the run "
                            "ends): this stage starts a Ray of its own", PIPELINE_RAY_SUBDIR)
                for key in (PIPELINE_RAY_ENV, PIPELINE_RAY_PID_ENV, "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
                    os.environ.pop(key, None)
                return init_ray(settings, root, threads)
            if (waited := time.perf_counter() - t0) > 0.5:
                log.info("waited %.1f s for the pipeline's Ray to come up", waited)
            _use_cluster_auth(os.environ["RAY_AUTH_TOKEN_PATH"])
            extra["logging_config"] = ray.LoggingConfig(log_level="ERROR")
        elif (cluster := recorded_cluster_for(address, root)) is not None:
            if not node_alive(cluster["nodes"][0]):
                raise ConfigError("environment or runtime.env", "RAY_ADDRESS", f"{address} is this project's local "
                                  "cluster, and its head is not running: `stein cluster up` starts it again")
            _use_cluster_auth(cluster["token_path"])
            address = cluster["address"]
            # no dashboard there either: Ray's own worker logs kept to errors, as for a local Ray (below)
            extra["logging_config"] = ray.LoggingConfig(log_level="ERROR")
        t0 = time.perf_counter()
        with _driver_logging_kept():
            ray.init(address=address, runtime_env=ray_runtime_env(settings, root, threads), log_to_driver=True, **extra)
        which = "the pipeline's Ray" if os.environ.get(PIPELINE_RAY_ENV) else "Ray"
        log.info("%s joined at %s in %.1f s", which, address, time.perf_counter() - t0)
        return True

    os.environ[_RAY_LOCAL_ONLY_ENV] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    # One token per process, kept across the local Rays it starts: the driver's token loader caches the first one.
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    if lo := _loopback_interface():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # On SIGTERM (`stein run` stopped or killed) the driver of a head node first drains it, for up to 30 s, for
    # Serve replicas: nothing here needs that, and a training would go on meanwhile.
    os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    import ray
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    if ray.is_initialized():
        return False
    # Both settings are read once per process, the first when ray is imported and the second into Ray's cached
    # config, and ray may have been imported before they were set: refresh both, as Ray does when it turns token
    # auth on by itself.
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray_constants.RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S = float(os.environ["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    t0 = time.perf_counter()
    # No dashboard (it needs ray[default]); without it Train's placement-group cleaner cannot reach the state API
    # and warns every few seconds, so Ray's own worker logs are kept to errors. Our progress lines are printed, not
    # logged, and still reach the driver.
    with _driver_logging_kept():
        ray.init(
            # "local": always a new Ray of our own. Without an address ray.init joins the last cluster `ray start`
            # started on this machine (a `stein cluster`, or someone else's), which RAY_ADDRESS did not ask for.
            address="local",
            num_cpus=max(os.cpu_count() or 1, settings.num_workers),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env=ray_runtime_env(settings, root, threads),
            log_to_driver=True,
            logging_config=ray.LoggingConfig(log_level="ERROR"),
        )
    _stop_ray_at_once_on_sigterm()
    node_ip = ray._private.worker.global_worker.node_ip_address
    if node_ip != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"the local Ray took node IP {node_ip}, not 127.0.0.1: it would listen on every interface")
    log.info("Ray started locally in %.1f s", time.perf_counter() - t0)
    return True


def _stop_ray_at_once_on_sigterm() -> None:
    """On SIGTERM (a `stein run` stopped or killed), SIGKILL the local Ray this process started, then exit.

    Ray's own handler stops the node gracefully: 2-3 s until the raylet goes, and the workers, in process groups of
    their own, go only with it. Meanwhile a Ray Train worker trains on and registers checkpoints nobody asked for
    (a small training even runs to its end). A stopped run should stop training now. What the workers wrote is
    consistent (Ray Train registers whole checkpoints), so the next run resumes from the last one. Then SystemExit
    unwinds this process as Ray's handler does (the flow and its tracking runs end as failed). Only in the main
    thread, as Ray's own handler."""
    import signal
    import threading

    import psutil

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, _frame):
        signal.signal(signum, signal.SIG_IGN)  # once: a second SIGTERM must not interrupt the unwinding
        for proc in psutil.Process().children(recursive=True):  # the raylet, the GCS, the workers, Ray's helpers
            with contextlib.suppress(psutil.Error):
                proc.kill()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


#: Rank 0's rendezvous store while its process group lives (see ``local_torch_config``).
_RENDEZVOUS_STORE: Any = None


def _serve_rendezvous_on_loopback(world_size: int, timeout_s: int) -> int:
    """Start torch's rendezvous store (a ``TCPStore`` server) on a socket bound to 127.0.0.1 and return its port.
    Without ``master_listen_fd`` a ``TCPStore`` server listens on ``[::]``; torch keeps multi-tenant servers by
    port, so the ``init_process_group`` that follows on this port reuses this one."""
    import datetime
    import socket

    import torch.distributed as dist

    global _RENDEZVOUS_STORE
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    _RENDEZVOUS_STORE = dist.TCPStore(
        "127.0.0.1", port, world_size, is_master=True, multi_tenant=True, master_listen_fd=sock.detach(),
        wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s),
    )
    return port


def _close_rendezvous() -> None:
    global _RENDEZVOUS_STORE
    _RENDEZVOUS_STORE = None


def _set_master(port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)


def local_torch_config() -> Any:
    """Ray Train's ``TorchConfig`` for the Ray that ``init_ray`` started locally, or None (Train's default) when
    any Ray node is off loopback. Train's own torch backend has rank 0 serve the rendezvous store on ``[::]``: the
    one listener of a training run that would be reachable from other machines. This one serves it on 127.0.0.1
    and then sets up the process group as Train does (``MASTER_ADDR``/``MASTER_PORT``, torch's distributed
    environment, ``init_process_group`` with ``env://``)."""
    import ray
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup

    if any(node["NodeManagerAddress"] != "127.0.0.1" for node in ray.nodes() if node["Alive"]):
        return None

    class LoopbackTorchBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            if isinstance(worker_group, V1WorkerGroup):  # Train V1 sets torch's environment elsewhere
                return super().on_start(worker_group, backend_config)
            n = len(worker_group)
            port = worker_group.execute_single(0, _serve_rendezvous_on_loopback, n, backend_config.timeout_s)
            worker_group.execute(_set_master, port)
            worker_group.execute(_set_torch_distributed_env_vars)
            ray.get([
                worker_group.execute_single_async(
                    i, _setup_torch_process_group, backend=backend_config.backend, world_rank=i, world_size=n,
                    init_method="env://", timeout_s=backend_config.timeout_s,
                )
                for i in range(n)
            ])

        def on_shutdown(self, worker_group, backend_config):
            super().on_shutdown(worker_group, backend_config)
            worker_group.execute_single(0, _close_rendezvous)

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackTorchBackend

    return LoopbackTorchConfig()


def ray_map(
    fn: Callable[..., Any],
    items: Iterable[Any],
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
    desc: str = "ray tasks",
    **kwargs: Any,
) -> Iterator[tuple[int, Any]]:
    """Run ``fn(item, **kwargs)`` for every item as a Ray task (``num_cpus``/``num_gpus`` each); yield
    ``(index, result)`` as tasks finish, with a progress bar. Ray must be initialised. A failing task raises its
    exception here after the tasks still running are cancelled."""
    import ray
    from tqdm.auto import tqdm

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)(fn)
    shared = {k: ray.put(v) for k, v in kwargs.items()}
    refs = {remote.remote(item, **shared): i for i, item in enumerate(items)}
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="task") as bar:
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # bad input raised in a task: the error itself
                        if isinstance(exc.cause, ConfigError):
                            raise exc.cause from None
                        raise
                    bar.update(1)
                    yield refs[ref], result
        finally:
            for ref in pending:
                ray.cancel(ref)
