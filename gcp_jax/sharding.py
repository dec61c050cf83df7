"""Device mesh, shardings and host-local -> global batches.

One mesh axis, "data", over all devices of all processes: parameters and optimiser state are
replicated, batches are split along their leading axis. `jax.jit` over such global arrays
runs unchanged on one CPU, several GPUs and a multi-host TPU pod, and reductions over the
batch (BatchNorm statistics, the mean loss) are over the global batch.
"""

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gcp_jax import cpu_tuning

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis ("data",) mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def platform(mesh: Mesh) -> str:
    """The platform of the mesh's devices ("cpu", "gpu", "tpu"): the one its programs are compiled for."""
    return mesh.devices.flat[0].platform


def traced_for(mesh: Mesh, fn: Callable) -> Callable:
    """`fn`, traced with the code paths of the mesh's platform (`cpu_tuning.compile_platform`), so
    that a program lowered on a CPU host for GPU or TPU devices carries no CPU-only variant."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with cpu_tuning.compile_platform(platform(mesh)):
            return fn(*args, **kwargs)

    return traced


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a value held whole by every device (parameters, optimiser state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of a global batch; the global batch must split evenly over devices."""
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {num_devices} devices; "
            f"use a multiple of {num_devices}."
        )
    return global_batch_size // jax.process_count()


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's host-local numpy batch into global arrays sharded over "data".

    Process p contributes rows [p * b, (p + 1) * b) of the global batch, b = local batch size.
    """
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a host pytree (identical on every process) on every device of `mesh`."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def _cluster_has_several_processes() -> bool:
    """Whether a job launcher says this job has several processes (SLURM, Open MPI)."""
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    force: bool = False,
) -> bool:
    """`jax.distributed.initialize` when several processes are configured; returns whether it ran.

    Configured means: a coordinator address or num_processes > 1 given, a SLURM/Open MPI job of
    several tasks (JAX reads their variables), or `force` (let JAX detect e.g. a Cloud TPU pod).
    Must run before anything touches the devices.
    """
    if not (coordinator_address or (num_processes or 1) > 1 or force or _cluster_has_several_processes()):
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True


def total_over_processes(count: int) -> int:
    """The sum of a per-process count over all processes (every process must call this)."""
    if jax.process_count() == 1:
        return int(count)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int32(count))))
