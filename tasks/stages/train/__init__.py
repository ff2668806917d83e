"""The train stage: the Ray Train run of a family (task.py) and the one training loop every family shares
(loop.py)."""
