"""What every Ray worker process of the project runs before its first task: Ray's ``worker_process_setup_hook``,
named in the runtime env :func:`tasks.infra.ray_client.ray_runtime_env` gives every job (a local Ray and a joined cluster
alike). Standard library and ``ray`` only: it runs in every worker, Train's controller and helpers included.

Two things Ray gets wrong in its own worker processes, each set right here by configuration rather than in the
stages' code:

- **RAY_ADDRESS, the worker's own cluster.** Ray Train's ``PlacementGroupCleaner`` (a detached actor every
  ``fit`` starts) asks Ray's state API about the controller every second, without an address. The state client
  then looks for "the" Ray of the machine: ``RAY_ADDRESS``, else every running ``gcs_server`` process
  (``ray._private.services.find_gcs_addresses``). With another Ray on the machine (another user's, another
  ``stein`` command's, a ``stein cluster``) it finds two, raises ``ConnectionError: Found multiple active Ray
  instances``, which is not the ``RayStateApiException`` the cleaner catches, and its monitor thread dies with a
  traceback streamed to the driver's terminal. Given the worker's own GCS address it asks its own cluster, as on a
  machine with one Ray. (Without a dashboard, as the project runs Ray, the state API never answers: the cleaner
  logs a warning each second, below the ERROR level Ray's worker logs are kept at, and cannot do its job, which
  for a local Ray the driver's ``ray.shutdown`` does anyway. That was so before, with one Ray on the machine.)
- **Train V2's "Reporting training result N: TrainingReport(...)" lines.** ``ray.train.v2._internal.execution
  .context`` logs one INFO line per ``ray.train.report`` call, but through a logger named after its file path
  (``logging.getLogger(__file__)``), so that Train's own level filter, which matches only loggers named
  ``ray.train.*``, lets it through whatever ``RunConfig(logging_config=LoggingConfig(log_level=...))`` says, and
  Train's worker log config sends the root logger (INFO) to the console. This sets that logger to WARNING, the
  level the train stage asks of Train; Train's log files under the Ray session keep their system records.
"""

from __future__ import annotations

import logging
import os

#: The module, under the ``ray`` package, whose logger is named after its file (see the module docstring).
_TRAIN_REPORT_MODULE = ("train", "v2", "_internal", "execution", "context.py")


def train_report_logger_name() -> str:
    """The name of the logger of Train V2's "Reporting training result" lines: its module's ``__file__``, which is
    the ``ray`` package's folder joined with the module's path (a submodule is found through its package's
    ``__path__``), so it is known without importing the module."""
    import ray

    return os.path.join(os.path.dirname(ray.__file__), *_TRAIN_REPORT_MODULE)


def setup() -> None:
    """The worker set-up hook. Never raises: a failing hook would make Ray stop the worker."""
    try:
        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - a worker without the address still works, as Ray made it
        pass
    try:
        # dictConfig leaves loggers it is not given, and that are not below one it is given, as they are: Train's
        # worker log config (ray.train and root) keeps this level.
        logging.getLogger(train_report_logger_name()).setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001
        pass
