"""Prefect flows: one per pipeline stage (what each DVC stage runs), the pipeline flow that reproduces a
pipeline through DVC (what ``stein run`` and a scheduled deployment call), and the ``stein`` CLI."""
