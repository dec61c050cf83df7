"""Benchmarks (not tests): run as `python -m bench.<name>` from the repo root.

jaxlib's CPU `eigh` calls the LAPACK of scipy's OpenBLAS, whose worker threads fight XLA's
for the cores (a 256×256 eigh: 3 ms alone, up to 0.8 s when they compete); one OpenBLAS
thread, set before numpy loads, avoids that.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
