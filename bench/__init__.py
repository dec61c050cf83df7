"""Benchmarks (not tests): run as `python -m bench.<name>` from the repo root."""
