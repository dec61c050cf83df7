"""`jnp.linalg.eigh` of a batch of matrices, dispatched so that multi-device XLA:CPU cannot deadlock.

jaxlib's CPU eigendecomposition (`lapack_{s,d}syevd_ffi`, jaxlib 0.10) splits a batch into chunks,
schedules them on XLA:CPU's intra-op thread pool and blocks the calling thread until they are done
(`jax::ParallelBatchMap` → `absl::BlockingCounter::Wait`); the calling thread does none of the
chunks itself. It does this when the pool has 2+ threads, the batch has 2+ matrices and
batch · 5d³ ≥ 200 000; a batch of one always runs inline. XLA:CPU often executes a step's thunks
on that same pool (the thunk executor offloads ready thunks to it and resumes on the thread that
completed an asynchronous one), and with N host devices (`--xla_force_host_platform_device_count`)
the pool has max(cores, N) threads. When every pool thread holds one device's eigh and waits for
chunks queued behind it, nothing is left to run them: the process hangs at 0 % CPU.
bench/tools/eigh_devices.py reproduces it.

So when several CPU devices share the pool, the batch is viewed as [devices, k, d, d] (a batch
sharded over the devices keeps each device's block whole: no data moves) and a `lax.map` over the k
columns calls eigh on [devices, d, d]: one matrix per device and call, which jaxlib runs inline, and
a device's calls one after another. On a mesh smaller than the process's device set a call holds
several matrices per device, but each device program still waits on one call at a time, so fewer
threads than the pool has can block. With one CPU device per process, and on GPU/TPU
(`lax.platform_dependent`), the call is `jnp.linalg.eigh` on the whole batch as before. LAPACK
factorises every matrix alone either way, so the values are bitwise the same; gradients are JAX's.
(jaxlib ≥ 0.11.1 reportedly builds the parallel path out of open-source wheels; the loop is then
simply sequential, as the batched call is there.)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def cpu_devices_sharing_pool() -> tuple[int, int]:
    """(CPU devices of this process, CPU devices of all processes); (1, 1) without a CPU backend."""
    try:
        return jax.local_device_count("cpu"), jax.device_count("cpu")
    except RuntimeError:
        return 1, 1


def devices_per_batch(shape) -> int | None:
    """How many devices the per-matrix dispatch splits the leading batch axis of `shape` over, or
    None when the plain batched call is safe (one CPU device per process, no batch, or a batch
    that is not a multiple of the CPU device count and so cannot be split evenly over them)."""
    local, total = cpu_devices_sharing_pool()
    if local < 2 or len(shape) < 3 or shape[0] % total:
        return None
    return total


def eigh(a, *, symmetrize_input: bool = False):
    """(eigenvalues [..., d] ascending, eigenvectors [..., d, d]) of the symmetric `a` [..., d, d],
    as `jnp.linalg.eigh(a, symmetrize_input=symmetrize_input)`."""
    native = functools.partial(_native, symmetrize_input=symmetrize_input)
    devices = devices_per_batch(a.shape)
    if devices is None:
        return native(a)
    return jax.lax.platform_dependent(a, cpu=functools.partial(_one_matrix_per_device, native, devices), default=native)


def _native(a, *, symmetrize_input):
    lam, u = jnp.linalg.eigh(a, symmetrize_input=symmetrize_input)
    return lam, u


def _one_matrix_per_device(native, devices, a):
    """`native` on [devices, d, d] slices, one after the other: with the batch sharded over the
    devices, one matrix per device and call, and never two calls of a device in flight at once (on
    a mesh smaller than the process's devices a call may hold several matrices, as before)."""
    *lead, d, _ = a.shape
    k = math.prod(lead) // devices
    columns = a.reshape(devices, lead[0] // devices, *lead[1:], d, d).reshape(devices, k, d, d).swapaxes(0, 1)
    lam, u = jax.lax.map(native, columns) if k > 1 else (x[None] for x in native(columns[0]))
    return lam.swapaxes(0, 1).reshape(*lead, d), u.swapaxes(0, 1).reshape(*lead, d, d)
