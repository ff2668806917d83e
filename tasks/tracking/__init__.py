"""MLflow: stage and pipeline runs, the model registry (log.py); `stein runs` (runs.py) and `stein compare`
(compare.py)."""
