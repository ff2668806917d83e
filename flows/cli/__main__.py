"""``python -m flows.cli``: the ``stein`` command (what each DVC stage runs)."""

from flows.cli.main import main

main()
