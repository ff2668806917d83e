"""Back-ends of the commands that are not pipeline stages: `stein gof` (gof.py) and `stein bench` (bench.py)."""
