"""The end-to-end modules share the session's Prefect server (``prefect_api`` in tests/conftest.py)."""
