"""Benchmarks (not tests): `python -m bench NAME [flags]` from the repository root (see bench.cli).

Each writes its measurements as a JSON record (`--out bench/results/NAME.json`); `python -m bench
report` turns the committed records into the tables of README.md and docs/benchmarks.md.
Synthetic in-memory batches throughout: no TensorFlow (except bench.input_pipeline) and no download.
"""
