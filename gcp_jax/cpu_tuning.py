"""CPU-only tuning of a training or benchmark process; each entry point calls `tune_process()` first.

XLA:CPU allocates each step's temporaries afresh. glibc serves allocations above 32 MiB with
mmap and hands them back on free, so every step would page-fault its working set in again. One
malloc arena without mmap and without trimming keeps freed pages in the process, and the next
step reuses them; the price is that the process keeps its peak memory. OpenBLAS, which runs
jaxlib's CPU `eigh`, gets one thread, so that its workers do not fight XLA's for the cores.
docs/benchmarks.md has the measurements. Nothing is changed for malloc on a host with an
accelerator, when `GCP_JAX_TUNE_MALLOC=0`, or when `GLIBC_TUNABLES` is set (the user's settings win).

The CPU-only fast paths of `gcp_jax.layers` are the other half; `GCP_JAX_CPU_FAST_PATHS=0` turns
them off (XLA's own convolutions and pooling everywhere), for A/B runs and debugging. They are
chosen for the platform a program is compiled for (`compile_platform`), not the host it is traced
on: a train step lowered on a CPU host for a GPU or TPU (gcp_jax.aot) must carry XLA's own
convolutions, or XLA:GPU aborts while compiling the CPU variants.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def accelerator_expected() -> bool:
    """Whether JAX will run on a GPU/TPU: `JAX_PLATFORMS` names one, or an accelerator plugin is installed."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return any(p != "cpu" for p in platforms)
    return bool(importlib.metadata.entry_points(group="jax_plugins")) or importlib.util.find_spec("libtpu") is not None


def keep_freed_memory() -> bool:
    """glibc malloc: one arena, no mmap, never trim. Returns False where that is unavailable (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # M_TRIM_THRESHOLD takes an int that glibc reads as size_t: -1 means never.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)


def tune_process() -> bool:
    """One OpenBLAS thread and, on a CPU-only host, `keep_freed_memory()`. Call before numpy and JAX start.

    Returns whether malloc was tuned.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if os.environ.get("GCP_JAX_TUNE_MALLOC", "1") == "0" or "GLIBC_TUNABLES" in os.environ or accelerator_expected():
        return False
    return keep_freed_memory()


_COMPILE_PLATFORM = contextvars.ContextVar("gcp_jax_compile_platform", default=None)


@contextlib.contextmanager
def compile_platform(platform: str):
    """Trace under this to choose code paths for `platform` (a device's `.platform`: "cpu", "gpu",
    "tpu") instead of JAX's default backend: the steps of `gcp_jax.steps` trace under their mesh's."""
    token = _COMPILE_PLATFORM.set(platform)
    try:
        yield
    finally:
        _COMPILE_PLATFORM.reset(token)


def target_platform() -> str:
    """The platform being traced for: the innermost `compile_platform`, else JAX's default backend."""
    if platform := _COMPILE_PLATFORM.get():
        return platform
    import jax  # here: this module is imported (tune_process) before JAX starts

    return jax.default_backend()


def fast_paths_enabled() -> bool:
    """Whether `gcp_jax.layers` takes its CPU fast paths: the program is for the CPU and
    GCP_JAX_CPU_FAST_PATHS is not 0. Read at trace time."""
    return os.environ.get("GCP_JAX_CPU_FAST_PATHS", "1") != "0" and target_platform() == "cpu"
