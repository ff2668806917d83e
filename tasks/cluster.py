"""Ray for every stage that fans work out: joining a cluster or starting a local Ray, and mapping a function
over items as Ray tasks with a progress bar.

Wiring, not computation: like :mod:`tasks.runtime` this module is not a DVC dependency of any stage.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tasks.runtime import OFFLINE_ENV, RuntimeSettings

log = logging.getLogger("stein")


def ray_runtime_env(settings: RuntimeSettings, root: Path, threads: int) -> dict[str, Any]:
    """Environment of the Ray workers: the project importable, offline, thread counts capped."""
    env = dict(OFFLINE_ENV) | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p),
    }
    runtime_env: dict[str, Any] = {"env_vars": env}
    if settings.ray_ship_code:
        runtime_env["working_dir"] = str(root)
        runtime_env["excludes"] = [".venv", ".stein", ".git", ".dvc/cache", "data", "models", "samples", "plots"]
    return runtime_env


def init_ray(settings: RuntimeSettings, root: Path, threads: int) -> bool:
    """Join ``RAY_ADDRESS`` if set, else start a local Ray sized to this machine. Returns True if started here
    (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = settings.resolved_ray_address()
    runtime_env = ray_runtime_env(settings, root, threads)
    t0 = time.perf_counter()
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # A local Ray turns on token auth by default; nothing but this process talks to it.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # No dashboard (it needs ray[default]); without it Train's placement-group cleaner cannot reach the
        # state API and warns every few seconds, so Ray's own worker logs are kept to errors. Our progress
        # lines are printed, not logged, and still reach the driver.
        ray.init(
            num_cpus=max(os.cpu_count() or 1, settings.num_workers),
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
            logging_config=ray.LoggingConfig(log_level="ERROR"),
        )
    log.info("Ray %s in %.1f s", f"joined at {address}" if address else "started locally", time.perf_counter() - t0)
    return True


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
                    result = ray.get(ref)
                    bar.update(1)
                    yield refs[ref], result
        finally:
            for ref in pending:
                ray.cancel(ref)
