"""Process settings for training on a CPU-only host; call `tune_cpu_host()` before JAX starts.

XLA:CPU allocates each step's temporaries afresh. glibc serves allocations above 32 MiB with
mmap and hands them back on free, so every step page-faults its working set in again (1.3 GiB,
0.6 s of kernel time per ResNet-50 step at 448 px on 2 cores). One malloc arena without mmap and
without trimming keeps freed pages in the process, and the next step reuses them. The price is
that the process keeps its peak memory. Nothing is changed on a host with an accelerator plugin,
when `GCP_JAX_TUNE_MALLOC=0`, or when `GLIBC_TUNABLES` is set (the user's malloc settings win).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")


def accelerator_expected() -> bool:
    """Whether JAX will run on a GPU/TPU: `JAX_PLATFORMS` names one, or a plugin is installed."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return any(p != "cpu" for p in platforms)
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def keep_freed_memory() -> bool:
    """glibc malloc: one arena, no mmap, never trim. Returns False where that is unavailable (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # M_TRIM_THRESHOLD takes an int that glibc reads as size_t: -1 means never.
    return all(
        mallopt(param, value) == 1 for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    )


def tune_cpu_host() -> bool:
    """One OpenBLAS thread (it runs jaxlib's CPU eigh and would fight XLA's threads), and, on a
    CPU-only host, `keep_freed_memory()`. Call before numpy and JAX start. Returns whether malloc was tuned.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if os.environ.get("GCP_JAX_TUNE_MALLOC", "1") == "0" or "GLIBC_TUNABLES" in os.environ or accelerator_expected():
        return False
    return keep_freed_memory()
