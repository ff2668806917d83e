"""The ``stein`` commands: ``main`` (the group, the stage and pipeline commands) and one module per command
family (``cluster``, ``exp``, ``runs``, ``schedule``, ``server``), all on the shared helpers in ``common``.
``python -m flows.cli`` is what every DVC stage runs."""

from flows.cli.main import main

__all__ = ["main"]
