"""Data on disk: Parquet datasets, checkpoints, JSON and CSV, written atomically (io.py); the built-in and local data
sources (sources.py)."""
