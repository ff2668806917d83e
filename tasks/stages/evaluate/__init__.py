"""The evaluate stage: the task (task.py), what an evaluation reads and writes (inputs.py), the feature space
(features.py), the metric table (metrics.py) and the plots (plots.py)."""
