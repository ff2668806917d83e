"""Pipeline stages as Prefect tasks: they read inputs, call ``stein_core``, write outputs and log to MLflow.

Configuration is validated here (``tasks.config.sections``), at the edge, and passed down to ``stein_core`` as plain
arguments. Importing this package does no work: no Ray, MLflow or Prefect start-up happens at import time.
"""
