"""Wiring, not computation (no DVC stage depends on these files): the stages' Ray client, the local multi-node
cluster, runtime settings, the tracking server, the venv and Ray worker hooks, the offline plots page."""
