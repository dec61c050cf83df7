"""One-off reproductions kept beside the benchmarks: `python -m bench NAME` runs them too (bench/cli.py TOOLS)."""
