"""Benchmarks (not tests): run as `python -m bench.<name>` from the repo root.

Every benchmark process (the PyTorch reference's child process too) starts with
`gcp_jax.cpu_tuning.tune_process()`, as `train.py` does: one OpenBLAS thread (jaxlib's CPU `eigh`
runs on scipy's OpenBLAS, whose worker threads fight XLA's for the cores: a 256×256 eigh took
3 ms alone, up to 0.8 s when they competed) and, on a CPU-only host, glibc malloc settings that
keep freed memory in the process instead of page-faulting it in again every step.
"""

from gcp_jax import cpu_tuning

cpu_tuning.tune_process()
