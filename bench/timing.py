"""Wall-clock time and memory of jitted calls, and the line naming the JAX device they ran on."""

from __future__ import annotations

import time

import jax

from bench.common import host_line
from gcp_jax import aot


def time_call(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Fastest wall-clock seconds of fn(*args) over `repeats` calls, blocking on JAX outputs.

    The minimum, not the median: on a shared host other load only ever adds time. The warm-up
    calls compile.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return min(samples)


def compiled_memory_bytes(compiled) -> int:
    """XLA's buffer assignment for one compiled call: arguments + outputs + temporaries, donated buffers once.

    Per call rather than per process, and the same measure on every backend.
    """
    return aot.peak_bytes(compiled.memory_analysis())


def device_memory_limit() -> int | None:
    """Bytes the first device may allocate, where the backend says (GPU, TPU); None on a CPU."""
    stats = jax.devices()[0].memory_stats()
    return stats.get("bytes_limit") if stats else None


def device_line() -> str:
    """The JAX version and the devices it runs on."""
    devices = jax.devices()
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    return f"jax {jax.__version__} on {len(devices)}× {devices[0].platform} ({kind})"


def machine_line() -> str:
    """One line naming the machine a table was measured on."""
    return f"{device_line()}; host {host_line()}"
