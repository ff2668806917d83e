"""Everything between the command line and the mathematics, one folder per concept: ``config`` (typed sections,
pipeline configs, the path catalog), ``data`` (I/O, sources), ``families`` (one module per model family),
``stages`` (the stage tasks: read inputs, call ``stein_core``, write outputs), and the wiring that no stage's
outputs depend on: ``infra`` (Ray, cluster, runtime, servers), ``tracking`` (MLflow), ``tools`` (CLI back-ends).

Configuration is validated at the edge (``tasks.config``) and passed down to ``stein_core`` as plain arguments.
Importing this package does no work: no Ray, MLflow or Prefect start-up happens at import time.
"""
