"""Compile a run's train and eval steps for a GPU or TPU that is not there (deviceless ahead-of-time).

    python -m gcp_jax.aot --config configs/cub.py:resnet50 --target h100
    python -m gcp_jax.aot --config configs/cub.py --target v5e-16 --config.model.dtype=bfloat16 --max_batch
    python -m gcp_jax.aot --config configs/demo.py --target h100x8 --per_device_batch 32 --out h100x8.json

The model, optimiser and jitted steps are `gcp_jax.assembly.Run`'s, as train.py builds them, over a
mesh of the target's devices (`jax.experimental.topologies`: a TPU slice of any size, one or many
hosts, or N GPUs of one host). Nothing runs and no data is read: the class count comes from the
data set's metadata where that needs no download (else --num_classes). XLA reports each step's
memory per device (arguments, outputs, temporaries, donated buffers) and its FLOPs; the step fits
when the peak is within what a JAX process can use of the device (a GPU client takes 75 % of it by
default). These are compile-time facts, not speeds: without the device, XLA:GPU cannot autotune.

Compiles run in a child process: XLA aborts the process on some internal errors, and the abort is
reported in one line. Needs the `aot` extra (libtpu, the CUDA plugin and ptxas): see docs/aot.md.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

GiB = 1 << 30
EXTRA = "pip install 'gcp-jax[aot]' (in a checkout: pip install -e '.[aot]'), best in an environment of its own (docs/aot.md)"
GPU_CLIENT_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION's default: the GPU client preallocates 75 %
MAX_BATCH_COMPILES = 8  # --max_batch: compiles of the train step at most (two to fit a line, then refine)
CHILD_ENV = {
    "JAX_PLATFORMS": "cpu",  # the host runs nothing; the target's devices come from the topology
    "TPU_SKIP_MDS_QUERY": "1",  # libtpu: no GCE metadata server to ask
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # libtpu's lockfile would keep a second compile (or test worker) out
    "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",  # the CUDA plugin: no driver to check
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow's, where TFDS reads a data set's class count
}


class AotError(Exception):
    """A problem the user can act on: its message is one line."""


# ----------------------------------------------------------------------------------------------
# Device facts


@dataclasses.dataclass(frozen=True)
class Gpu:
    """An NVIDIA GPU as XLA's GpuDeviceInfoProto describes it (xla/stream_executor/device_description.proto)."""

    kind: str  # jax's device_kind (what nvidia-smi names it)
    memory_bytes: int
    cores: int  # streaming multiprocessors
    capability: tuple[int, int]
    shared_per_core: int
    shared_per_block_optin: int
    threads_per_core: int
    l2_bytes: int
    bandwidth: int  # bytes/s
    clock_ghz: float
    source: str
    fpus_per_core: int = 128  # FP32 lanes per SM: 128 on Hopper and Ada, 64 on the A100


@dataclasses.dataclass(frozen=True)
class Tpu:
    """A Cloud TPU generation: what libtpu calls it and how its slices are shaped."""

    topology: str  # libtpu's name ("v5e"), as in topology_name "v5e:2x2"
    kind: str  # jax's device_kind
    memory_bytes: int  # HBM per chip
    chips_per_host: int  # of a multi-host slice (a single-host slice may have more: max_single_host)
    max_single_host: int  # chips of the largest single-host slice
    cores_per_chip: int  # TensorCores: the accelerator type's number counts these (v4-8: 4 chips)
    dims: int  # torus dimensions: 3 (v4, v5p) or 2 (v5e, v6e)
    source: str


_A100 = "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020), table 3; A100 datasheet (40/80 GB)"
GPUS = {
    "h100": Gpu(
        "NVIDIA H100 80GB HBM3", 84929347584, 132, (9, 0), 233472, 232448, 2048, 52428800, 3352320000000, 1.98,
        "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), SXM5; memory as CUDA reports it (openxla/xla#25919)",
    ),
    "h200": Gpu(
        "NVIDIA H200", 150754820096, 132, (9, 0), 233472, 232448, 2048, 52428800, 4800000000000, 1.98,
        "NVIDIA H200 Tensor Core GPU datasheet (2024), SXM: 141 GB HBM3e (143771 MiB), 4.8 TB/s; H100 SM",
    ),
    "a100-40gb": Gpu(
        "NVIDIA A100-SXM4-40GB", 42505273344, 108, (8, 0), 167936, 166912, 2048, 41943040, 1555000000000, 1.41, _A100, 64
    ),
    "a100-80gb": Gpu(
        "NVIDIA A100-SXM4-80GB", 85899345920, 108, (8, 0), 167936, 166912, 2048, 41943040, 2039000000000, 1.41, _A100, 64
    ),
    "l4": Gpu(
        "NVIDIA L4", 24152899584, 58, (8, 9), 102400, 101376, 1536, 50331648, 300000000000, 2.04,
        "NVIDIA L4 datasheet (2023) and Ada tuning guide (sm_89: 100 KB shared, 1536 threads per SM)",
    ),
}  # fmt: skip
_CLOUD_TPU = "cloud.google.com/tpu/docs/system-architecture-tpu-vm and the per-version pages"
TPUS = {
    "v4": Tpu("v4", "TPU v4", 32 * GiB, 4, 4, 2, 3, _CLOUD_TPU + " (v4: 32 GiB HBM2 per chip, 4 chips per host)"),
    "v5e": Tpu("v5e", "TPU v5 lite", 16 * GiB, 4, 8, 1, 2, _CLOUD_TPU + " (v5e: 16 GiB HBM2 per chip)"),
    "v5p": Tpu("v5p", "TPU v5", 95 * GiB, 4, 4, 2, 3, _CLOUD_TPU + " (v5p: 95 GiB HBM2e per chip)"),
    "v6e": Tpu("v6e", "TPU v6 lite", 32 * GiB, 4, 8, 1, 2, _CLOUD_TPU + " (v6e Trillium: 32 GiB HBM per chip)"),
}
TPU_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for: `devices` devices of one kind over `hosts` hosts."""

    name: str
    platform: str  # "gpu" or "tpu" (jax's device.platform)
    device: Gpu | Tpu
    devices: int
    hosts: int
    topology: str  # the TPU topology ("4x4") or the GPU one ("1x1x8": slices x hosts x devices per host)
    host_bounds: tuple[int, int, int] = (1, 1, 1)  # TPU chips per host

    @property
    def capacity_bytes(self) -> int:
        return self.device.memory_bytes

    @property
    def usable_bytes(self) -> int:
        """What one JAX process may allocate: 75 % on a GPU (or XLA_PYTHON_CLIENT_MEM_FRACTION), all HBM on a TPU."""
        if self.platform == "tpu":
            return self.capacity_bytes
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_CLIENT_FRACTION))
        return int(self.capacity_bytes * fraction)

    @property
    def label(self) -> str:
        return f"{self.device.kind}" if self.platform == "gpu" else f"TPU {self.device.topology}"


def _known_targets() -> str:
    return f"a GPU ({', '.join(GPUS)}, with xN for N in one host: h100x8) or a Cloud TPU type (v4-8, v5e-4, v5e-16, v5p-8, v6e-8, ...)"


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def tpu_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape of `chips` chips: 2-D 1x1, 2x2, 2x4, 4x4, 4x8, …; 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, …"""
    if dims == 2:
        x = 1 << (chips.bit_length() - 1) // 2
        return x, chips // x
    shape, doubled = [2, 2, 1], 4
    while doubled < chips:  # double the last of the smallest sides
        i = max(j for j in range(3) if shape[j] == min(shape))
        shape[i] *= 2
        doubled *= 2
    return tuple(shape)


def parse_target(name: str) -> Target:
    """h100, h100x8, a100-40gb, l4; v4-8, v5e-4, v5e-16, v5litepod-16, v5p-8, v6e-8 (Cloud TPU accelerator types)."""
    text = name.strip().lower()
    gpu = re.fullmatch(r"(.+?)(?:x(\d+))?", text)
    if gpu and gpu.group(1) in GPUS:
        count = int(gpu.group(2) or 1)
        if not 1 <= count <= 16:
            raise AotError(f"--target={name}: {count} GPUs in one host; give 1 to 16 (h100x8).")
        return Target(text, "gpu", GPUS[gpu.group(1)], count, 1, f"1x1x{count}")
    tpu = re.fullmatch(r"(v\d+[a-z]*|v5litepod)-(\d+)", text)
    if not tpu or TPU_ALIASES.get(tpu.group(1), tpu.group(1)) not in TPUS:
        raise AotError(f"unknown --target={name!r}; give {_known_targets()}.")
    spec = TPUS[TPU_ALIASES.get(tpu.group(1), tpu.group(1))]
    number = int(tpu.group(2))
    chips = number // spec.cores_per_chip
    smallest = spec.cores_per_chip * (1 if spec.dims == 2 else 4)
    if number % spec.cores_per_chip or not _power_of_two(chips) or number < smallest:
        counts = "TensorCores, 2 per chip" if spec.cores_per_chip == 2 else "chips"
        raise AotError(
            f"--target={name}: {spec.topology} accelerator types count {counts}: give a power of two of at least {smallest} ({spec.topology}-{smallest})."
        )
    shape = tpu_shape(chips, spec.dims)
    per_host = chips if chips <= spec.max_single_host else spec.chips_per_host
    bounds = (*tpu_shape(per_host, 2), 1) if spec.dims == 2 else tpu_shape(per_host, 3)
    return Target(text, "tpu", spec, chips, chips // per_host, "x".join(map(str, shape)), bounds)


def gpu_target_config(gpu: Gpu) -> str:
    """XLA's GPU TargetConfig text proto for `gpu` (what a CPU host compiles against)."""
    major, minor = gpu.capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_per_core}
  threads_per_core_limit: {gpu.threads_per_core}
  core_count: {gpu.cores}
  fpus_per_core: {gpu.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {gpu.bandwidth}
  l2_cache_size: {gpu.l2_bytes}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory_bytes}
  shared_memory_per_block_optin: {gpu.shared_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{gpu.kind}"
"""


# ----------------------------------------------------------------------------------------------
# The target's devices (needs the aot extra)


def installed(module: str) -> bool:
    """Whether `module` can be imported (find_spec raises where a parent package is missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def missing_plugin(target: Target) -> str | None:
    """The one-line reason the target cannot be compiled for here (a missing or mismatched plugin), or None."""
    if target.platform == "tpu":
        if not installed("libtpu"):
            return f"compiling for {target.label} needs libtpu: {EXTRA}."
        return None
    if not (installed("jax_plugins.xla_cuda12") and installed("nvidia.cuda_nvcc")):
        return f"compiling for {target.label} needs the CUDA plugin and ptxas: {EXTRA}."
    plugin, jaxlib = importlib.metadata.version("jax-cuda12-plugin"), importlib.metadata.version("jaxlib")
    if plugin != jaxlib:
        return f"jax-cuda12-plugin {plugin} does not match jaxlib {jaxlib}: {EXTRA}."
    return None


def target_devices(target: Target) -> list:
    """The target's devices, from a topology description (no hardware)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        topology = topologies.get_topology_desc(
            platform="tpu",
            topology_name=f"{target.device.topology}:{target.topology}",
            chip_config_name="megacore" if target.device.cores_per_chip == 2 else "default",
            chips_per_host_bounds=target.host_bounds,
            num_slices=1,
        )
    else:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=gpu_target_config(target.device), topology=target.topology
        )
    return list(topology.devices)


# ----------------------------------------------------------------------------------------------
# One compile (in the child process)


def peak_bytes(memory) -> int:
    """XLA's buffer assignment for one call of a compiled step: arguments + outputs + temporaries,
    donated buffers once (the same measure as bench.timing)."""
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )


_HBM_OOM = re.compile(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", re.IGNORECASE)
_UNITS = {None: 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def hbm_overflow(message: str) -> int | None:
    """The bytes a TPU compile that ran out of HBM says the program needs ("Used 21.3G of 15.75G hbm"), else None."""
    match = _HBM_OOM.search(message)
    return None if match is None else int(float(match.group(1)) * _UNITS[match.group(2) and match.group(2).upper()])


def abstract_batch(config, mesh, step: str, per_device: int, num_devices: int) -> dict:
    """ShapeDtypeStructs of a global batch of the step, split over the mesh as train.py's batches are."""
    import jax
    import jax.numpy as jnp

    from gcp_jax import sharding

    n, size = per_device * num_devices, config.data.image_size
    sh = sharding.batch_sharded(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32, sharding=sh),
        "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sh),
    }
    if step == "eval":
        batch["mask"] = jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=sh)
    return batch


def compile_step(run, step: str, per_device: int) -> dict[str, Any]:
    """Lower and compile run's train or eval step at `per_device` examples per device: the record of one row."""
    import jax

    from gcp_jax import sharding, steps

    mesh, devices = run.mesh, run.mesh.devices.size
    state = run.abstract_state()
    batch = abstract_batch(run.config, mesh, step, per_device, devices)
    if step == "train":
        args = (state, batch)
        fn = run.train_step
    else:
        totals = steps.eval_totals(run.num_classes, mesh, flip=run.config.eval_flip, abstract=True)
        args = (state, batch, totals)
        fn = run.eval_step
    start = time.perf_counter()
    lowered = fn.lower(*args)
    record: dict[str, Any] = {"step": step, "per_device_batch": per_device}
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        needed = hbm_overflow(str(e))
        if needed is None:
            raise
        unknown = dict.fromkeys(("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "flops"))
        return {
            **record,
            **unknown,  # the TPU compiler said only the total
            "peak_bytes": needed,
            "fits": False,
            "compile_s": time.perf_counter() - start,
            "refused": True,
        }
    record["compile_s"] = time.perf_counter() - start
    m = compiled.memory_analysis()
    record.update(
        argument_bytes=m.argument_size_in_bytes,
        output_bytes=m.output_size_in_bytes,
        temp_bytes=m.temp_size_in_bytes,
        alias_bytes=m.alias_size_in_bytes,
        code_bytes=m.generated_code_size_in_bytes,
        peak_bytes=peak_bytes(m),
        flops=_flops(compiled),
        conv_ops=lowered.as_text().count("stablehlo.convolution"),
        platform=sharding.platform(mesh),
        device_kind=mesh.devices.flat[0].device_kind,
        hosts=len({d.process_index for d in mesh.devices.flat}),
    )
    return record


def _flops(compiled) -> float | None:
    """FLOPs per call where XLA reports them (TPU; XLA:GPU reports none without a device)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def build_run(config, target: Target, num_classes: int):
    """gcp_jax.assembly.Run of `config` over the target's devices, with the class count given (no data set)."""
    from gcp_jax import assembly, sharding
    from gcp_jax.data import DatasetInfo

    mesh = sharding.make_mesh(target_devices(target))
    # The sizes only set the learning-rate schedule's length, which no buffer depends on.
    info = DatasetInfo(config.data.name, num_classes, config.batch_size, config_eval_batch(config), ())
    return assembly.Run(config, mesh, info=info)


def config_eval_batch(config) -> int:
    """The global eval batch (gcp_jax.config, imported here: this module starts without JAX)."""
    from gcp_jax import config as config_lib

    return config_lib.eval_batch_size(config)


def child_main(config, target: Target, num_classes: int, requests: list[tuple[str, int]], records_path: str) -> None:
    """Compile each (step, per-device batch), appending one JSON line per record to records_path as it is done."""
    from gcp_jax import assembly

    config.compile_cache_dir = ""  # a real run on the device never reads these entries (docs/aot.md)
    assembly.configure_jax(config)
    run = build_run(config, target, num_classes)
    for step, batch in requests:
        record = compile_step(run, step, batch)
        with open(records_path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# The parent: child processes, the batch search, the report


# What says why a child died, most telling first: XLA's failed check, a fatal log line, Python's, the signal.
_FATAL = tuple(
    map(re.compile, (r"Check failed:.*", r"^F\d{4} .*", r"Fatal Python error:.*", r"\*\*\* SIG\w+ received.*"))
)


def abort_line(stderr: str, returncode: int) -> str:
    """One line for a child that died: the most telling of XLA's fatal messages, else its last line of stderr."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    found = ([m.group(0) for line in lines if (m := pattern.search(line))] for pattern in _FATAL)
    reason = next((matches[-1] for matches in found if matches), lines[-1] if lines else f"exit status {returncode}")
    return reason if len(reason) <= 300 else reason[:297] + "..."


def compile_in_child(argv: list[str], requests: list[tuple[str, int]]) -> list[dict]:
    """Run `requests` in a child process (`python -m gcp_jax.aot ARGV --requests ...`) and return its records.

    An XLA abort (or any crash) of the child becomes an AotError naming the compile it died in.
    """
    with tempfile.TemporaryDirectory(prefix="gcp_jax_aot_") as tmp:
        records_path = os.path.join(tmp, "records.jsonl")
        spec = ",".join(f"{step}:{batch}" for step, batch in requests)
        cmd = [sys.executable, "-m", "gcp_jax.aot", *argv, f"--requests={spec}", f"--records={records_path}"]
        child = subprocess.run(
            cmd,
            env={**os.environ, **CHILD_ENV},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        records = []
        if os.path.exists(records_path):
            with open(records_path) as f:
                records = [json.loads(line) for line in f]
    if child.returncode == 0:
        return records
    step, batch = requests[len(records)] if len(records) < len(requests) else requests[-1]
    last = child.stderr.strip().splitlines()[-1] if child.stderr.strip() else ""
    if last.startswith("error: "):  # the child's own one-line error
        raise AotError(last[len("error: ") :])
    fd, log = tempfile.mkstemp(prefix="gcp_jax_aot_", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(child.stderr)
    raise AotError(
        f"{died_how(child.returncode)} while compiling the {step} step at batch {batch} per device: "
        f"{abort_line(child.stderr, child.returncode)} (its output: {log})"
    )


def died_how(returncode: int) -> str:
    """How a child process ended: 'XLA aborted (SIGABRT)', 'the compiler crashed (SIGSEGV)', 'the compiler exited (1)'."""
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"the compiler exited ({returncode})"
    return f"XLA aborted ({name})" if name == "SIGABRT" else f"the compiler crashed ({name})"


def next_probe(points: dict[int, tuple[int, bool]], usable: int) -> int | None:
    """The next per-device batch to compile in the search for the largest that fits, or None when done.

    points: batch → (peak bytes, fits). The memory line through the two batches nearest the
    boundary (the largest known to fit, the smallest known not to) predicts it; the prediction is
    kept strictly between those two, and without any batch known to fit or not, it doubles or halves.
    """
    fit = [b for b, (_, ok) in points.items() if ok]
    over = [b for b, (_, ok) in points.items() if not ok]
    lo, hi = max(fit, default=0), min(over, default=None)
    if hi is not None and hi <= lo + 1:
        return None
    nearest = sorted(points, key=lambda b: min(abs(b - lo), abs(b - (hi or lo))))[:2]
    if len(nearest) < 2:
        return 2 * lo if hi is None else max(hi // 2, 1)
    (b0, (m0, _)), (b1, (m1, _)) = sorted((b, points[b]) for b in nearest)
    slope = (m1 - m0) / (b1 - b0)
    guess = math.floor(b0 + (usable - m0) / slope) if slope > 0 else 2 * max(lo, 1)
    return min(max(guess, lo + 1), hi - 1) if hi is not None else max(guess, lo + 1)


def largest_fitting(
    compile_train, usable: int, first: tuple[int, int] = (1, 4), budget: int = MAX_BATCH_COMPILES
) -> tuple[int, bool, list[dict]]:
    """(the largest per-device batch whose train step fits, whether that is exact: the next one was
    compiled and does not fit, the records), by compiling at most `budget` times: two batches for a
    memory line, then refinement. `compile_train(batches)` returns a record per batch."""
    records = compile_train(list(first))
    points = {r["per_device_batch"]: (r["peak_bytes"], r["peak_bytes"] <= usable) for r in records}
    while len(points) < budget and (probe := next_probe(points, usable)) is not None:
        (r,) = compile_train([probe])
        records.append(r)
        points[probe] = (r["peak_bytes"], r["peak_bytes"] <= usable)
    fit = [b for b, (_, ok) in points.items() if ok]
    lo = max(fit, default=0)
    exact = lo + 1 in points or (lo == 0 and 1 in points)
    return lo, exact, records


def gib(n: int) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"


def step_table(target: Target, record: dict) -> str:
    """The report of one compiled step: a short two-column table."""
    rows = [("per-device batch", record["per_device_batch"])]
    if record.get("refused"):
        rows.append(("needs (TPU compiler)", gib(record["peak_bytes"])))
    else:
        rows += [
            ("arguments", gib(record["argument_bytes"])),
            ("outputs", gib(record["output_bytes"])),
            ("temporaries", gib(record["temp_bytes"])),
            ("aliased (donated)", gib(record["alias_bytes"])),
            ("peak = args + outputs + temps − aliased", gib(record["peak_bytes"])),
        ]
    rows += [
        ("device memory", gib(target.capacity_bytes)),
        ("usable by JAX", gib(target.usable_bytes) + (" (GPU client 75 %)" if target.platform == "gpu" else "")),
        ("fits", "yes" if record["fits"] else "no"),
        ("compile", f"{record['compile_s']:.1f} s"),
        ("FLOPs per step", f"{record['flops']:.3g}" if record.get("flops") else "— (not reported)"),
    ]
    width = max(len(name) for name, _ in rows)
    title = f"{record['step']} step on {target.name}: {target.devices}× {target.device.kind}, {target.hosts} host(s)"
    return "\n".join([title, *(f"  {name.ljust(width)}  {value}" for name, value in rows)])


def too_big(target: Target, record: dict) -> str:
    return (
        f"the {record['step']} step needs {record['peak_bytes'] / GiB:.1f} GiB per device at batch "
        f"{record['per_device_batch']}, {target.usable_bytes / GiB:.1f} GiB usable on {target.label}; "
        "--max_batch finds the largest that fits."
    )


def report(target: Target, records: dict[str, dict], max_batch: tuple[int, bool] | None) -> dict:
    """The JSON record of a compile: the target and, per step, its memory figures."""
    compiled = next((r for r in records.values() if "device_kind" in r), {})
    out: dict[str, Any] = {
        "target": target.name,
        "platform": target.platform,
        "devices": target.devices,
        "hosts": compiled.get("hosts", target.hosts),  # as the topology's devices say
        "device_kind": compiled.get("device_kind", target.device.kind),
        "topology": target.topology,
        "capacity_bytes": target.capacity_bytes,
        "usable_bytes": target.usable_bytes,
        "source": target.device.source,
        **records,
    }
    if max_batch is not None:
        out["train"]["max_per_device_batch"], out["train"]["max_per_device_batch_exact"] = max_batch
    return out


def with_fits(target: Target, record: dict) -> dict:
    return {**record, "fits": record.get("fits", True) and record["peak_bytes"] <= target.usable_bytes}


def compile_target(argv, target: Target, per_device: int, eval_per_device: int, search: bool) -> dict:
    """Compile the train and eval steps (and with `search`, find the largest per-device train batch that fits)."""
    train, evaluation = (
        with_fits(target, r) for r in compile_in_child(argv, [("train", per_device), ("eval", eval_per_device)])
    )
    best = None
    if search:
        compile_train = lambda batches: [
            with_fits(target, r) for r in compile_in_child(argv, [("train", b) for b in batches])
        ]
        best = largest_fitting(compile_train, target.usable_bytes, first=(1, max(2, per_device)))[:2]
    return report(target, {"train": train, "eval": evaluation}, best)


# ----------------------------------------------------------------------------------------------
# The command line


def argument_parser():
    """aot's own flags (the --config file and its overrides are gcp_jax.cli's, as for train.py); a
    mistake raises AotError (one line) instead of printing the usage."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise AotError(f"{message} (python -m gcp_jax.aot --help)")

    p = Parser(prog="python -m gcp_jax.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="Config file with a get_config(); `file.py:arg` passes arg (default: the demo).")
    p.add_argument("--target", required=True, help=f"What to compile for: {_known_targets()}.")
    p.add_argument("--out", help="Also write the report as JSON to this file.")
    p.add_argument("--max_batch", action="store_true", help="Find the largest per-device train batch that fits.")
    p.add_argument("--num_classes", type=int, help="Classes of the data set, where its metadata needs a download.")
    p.add_argument("--per_device_batch", type=int, help="Train and eval batch per device (default: the config's).")
    p.add_argument("--requests", help=argparse.SUPPRESS)  # the child: step:batch,... to compile
    p.add_argument("--records", help=argparse.SUPPRESS)  # the child: where it appends its records
    return p


def dataset_classes(data_config) -> int | None:
    """The class count of config.data from metadata that needs no download (TFDS builders' features), or None."""
    if data_config.name == "synthetic_fgvc":
        return data_config.synthetic.num_classes
    if data_config.name == "image_folder":
        return None
    try:
        from gcp_jax.data import _tf

        builder = _tf.tfds().builder(data_config.name, data_dir=data_config.data_dir or None)
        return int(builder.info.features["label"].num_classes)
    except Exception:  # an unknown or unregistered builder: the user gives --num_classes
        return None


def settled_config(config, target: Target, per_device: int | None):
    """The config with --per_device_batch applied and checked for the target's device count."""
    from gcp_jax import config as config_lib

    if per_device is not None:
        if per_device < 1:
            raise AotError(f"--per_device_batch must be at least 1, got {per_device}.")
        config.batch_size = config.eval_batch_size = per_device * target.devices
    batches = config.batch_size, config_lib.eval_batch_size(config)
    if any(isinstance(b, int) and b >= 1 and b % target.devices for b in batches):
        raise AotError(
            f"the config's batches (train {batches[0]}, eval {batches[1]}) do not split over the {target.devices} "
            f"devices of {target.name}; give --per_device_batch N."
        )
    if problems := config_lib.value_problems(config, num_devices=target.devices):
        raise AotError(config_lib.describe(problems))
    return config


def main(argv: list[str]) -> int:
    for name, value in CHILD_ENV.items():  # before JAX starts here too (the plugins probe for devices)
        os.environ.setdefault(name, value)
    from gcp_jax import cli

    try:
        command = cli.parse(argv)
    except cli.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_USAGE
    try:
        args = argument_parser().parse_args(command.rest[1:])
    except AotError as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_USAGE
    try:
        target = parse_target(args.target)
        config = settled_config(command.config, target, args.per_device_batch)
        num_classes = args.num_classes or dataset_classes(config.data)
        if not num_classes:
            raise AotError(
                f"the class count of data set {config.data.name!r} is not known without it: give --num_classes N."
            )
        if args.requests:  # the child
            requests = [(s, int(b)) for s, _, b in (item.partition(":") for item in args.requests.split(","))]
            child_main(config, target, num_classes, requests, args.records)
            return 0
        if problem := missing_plugin(target):
            raise AotError(problem)
        child_argv = argv[1:] + ([] if args.num_classes else [f"--num_classes={num_classes}"])  # no TFDS again
        per_device, eval_per_device = config.batch_size // target.devices, config_eval_batch(config) // target.devices
        result = compile_target(child_argv, target, per_device, eval_per_device, args.max_batch)
    except AotError as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_ERROR
    for step in ("train", "eval"):
        print(step_table(target, result[step]) + "\n")
    if args.max_batch:
        best, exact = result["train"]["max_per_device_batch"], result["train"]["max_per_device_batch_exact"]
        print(f"largest per-device train batch that fits: {best}" + ("" if exact else " (the next was not compiled)"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    failed = next((result[s] for s in ("train", "eval") if not result[s]["fits"]), None)
    if failed is not None and not args.max_batch:
        print(f"error: {too_big(target, failed)}", file=sys.stderr)
        return cli.EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
