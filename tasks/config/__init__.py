"""The configuration layer: the typed config sections (sections.py), the pipeline config models (pipelines.py) and
the path catalog of every artifact (paths.py)."""
