"""Shared benchmark helpers: wall-clock timing of (jitted) callables and a plain-text table."""

from __future__ import annotations

import platform
import time

import jax


def time_call(fn, *args, repeats=5, warmup=1):
    """Fastest wall-clock seconds of fn(*args) over `repeats`, blocking on JAX outputs.

    The minimum, not the median: on a shared host other load only ever adds time. Warm-up
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
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def machine_line():
    """One line naming the machine a table was measured on."""
    device = jax.devices()[0]
    return (
        f"jax {jax.__version__} on {device.platform} ({getattr(device, 'device_kind', '?')}, "
        f"{len(jax.devices())} device(s)); host {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}"
    )


def print_table(header, rows):
    """Markdown table, columns padded to width."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines), flush=True)
