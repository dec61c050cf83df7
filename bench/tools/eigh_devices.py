"""Batched `eigh` on 1/2/4/8 fake CPU devices, old and new dispatch, with and without a busy neighbour.

    python -m bench eigh_devices                            # the whole table (~30 min on a busy 2-core host)
    python -m bench eigh_devices --devices 1,8 --workloads step --busy yes
    python -m bench eigh_devices --stacks                   # on a hang, count the stuck native threads (gdb)

The bug it reproduces: `train.py` with `--xla_force_host_platform_device_count=8` never finished its
first step. The cause (gcp_jax/batched_eigh.py has the details): jaxlib 0.10's CPU `syevd` kernel
splits a batch into chunks on XLA:CPU's intra-op pool and blocks its thread until they are done
(`jax::ParallelBatchMap` → `BlockingCounter::Wait`). In a train step the thunk executor runs the eigh
on a thread of that same pool, whose size is max(cores, devices); once every pool thread holds one
device's eigh, the queued chunks have no thread left and the process sleeps forever.

Each cell is a fresh process (the device count is fixed when JAX starts) with that many fake CPU
devices and the batch sharded over them:

* `eigh`: jit(eigh(a)[0]) of a [16, 256, 256] float32 SPD batch, ms per call (median).
* `step`: the project's train step (`steps.make_train_step`) of a small GCP classifier (one 3×3
  conv, then the demo's GCP head: 1×1 conv to d = 32, BN, covariance, SEB, classifier), global batch
  32 of 16×16 images: 4 covariances per device on 8 devices, the demo's eigh size. ms per step.

`old` is `jnp.linalg.eigh` on the whole batch (before the fix), `new` is `batched_eigh.eigh`.
`busy` runs one spinning process per core beside it. A cell that does not finish within --timeout
says HANG when the process used no CPU in its last 2 s (a deadlock), else TIMEOUT.

The `eigh` program alone does not hang with either dispatch: a short chain of thunks runs on the
calling (PjRt client) thread, so its blocked waits leave every pool thread free for the chunks. The
train step is a graph of many thunks, which XLA:CPU spreads over the intra-op pool; there the old
dispatch hung in 5 of the 6 multi-device cells of one run (2 shared cores, jaxlib 0.10.2), the
new never, and one device is the same compiled program either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

from bench import common, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("eigh", "step")


# ----------------------------------------------------------------------------------------------
# In the child process (JAX starts here, with its device count)


def _child(args):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax
    import numpy as np

    from gcp_jax import batched_eigh

    if args.dispatch == "old":
        batched_eigh.devices_per_batch = lambda shape: None  # the plain batched call everywhere
    if args.workload == "eigh":
        result = _time_eigh(jax, np, args)
    elif args.workload == "step":
        result = _time_step(jax, np, args)
    else:
        result = _stress(jax, np, args)
    print(json.dumps(result), flush=True)


def _mesh(jax, np, devices=None):
    from gcp_jax import sharding

    return sharding.make_mesh(devices if devices is not None else jax.devices())


def _time_eigh(jax, np, args):
    from gcp_jax import batched_eigh, sharding

    mesh = _mesh(jax, np)
    x = np.random.default_rng(0).normal(size=(16, 512, 256)).astype(np.float32)
    a = sharding.global_batch({"a": np.einsum("bmc,bmd->bcd", x, x) / 512}, mesh)["a"]
    fn = jax.jit(lambda a: batched_eigh.eigh(a)[0])
    return _timed(jax, lambda: fn(a), args.calls)


def tiny_gcp_classifier(gcp_dim=32):
    """One 3×3 conv (16 channels, stride 2) and the demo's GCP head with `gcp_dim`, 10 classes."""
    import flax.linen as nn

    from configs import demo
    from gcp_jax import pooling
    from gcp_jax.models.classifier import Classifier

    class Stem(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv")(x))

    gcp = {**demo.get_config().gcp.to_dict(), "dim": gcp_dim}
    return Classifier(backbone=Stem(), num_classes=10, head=pooling.gcp_head_from_config(gcp))


def host_variables(jax, np, model, image_size, seed=0):
    """{"params", "batch_stats"} drawn in NumPy (He-normal kernels, unit scales and variances, zero
    biases and means) in the shapes of `model.init`, which is only traced: compiling the real
    initialiser (threefry for every kernel) costs more CPU than the train step itself."""
    shapes = jax.eval_shape(model.init, jax.random.key(seed), np.zeros((1, image_size, image_size, 3), np.float32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
        return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, {"params": shapes["params"], "batch_stats": shapes["batch_stats"]})


def train_setup(jax, np, mesh, variables=None, batch_size=32, image_size=16, seed=0):
    """(jitted train step, its first state, 3 global batches) of `tiny_gcp_classifier` on `mesh`,
    from `variables` (host arrays; default `host_variables`)."""
    from configs import demo
    from gcp_jax import optim, sharding, steps

    config = demo.get_config()
    model = tiny_gcp_classifier()
    tx = optim.make_optimizer(config.optim, optim.learning_rate_schedule(config.optim, 10, 100))
    if variables is None:
        variables = host_variables(jax, np, model, image_size, seed)
    state = steps.create_train_state(sharding.replicate(variables, mesh), tx, mesh)
    step = steps.make_train_step(model, tx, mesh)
    rng = np.random.default_rng(seed)
    batches = [
        sharding.global_batch(
            {
                "image": rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
                "label": rng.integers(0, 10, batch_size).astype(np.int32),
            },
            mesh,
        )
        for _ in range(3)
    ]
    return step, state, batches


def _time_step(jax, np, args):
    step, state, batches = train_setup(jax, np, _mesh(jax, np))
    holder = {"state": state, "i": 0}

    def one():
        holder["state"], metrics = step(holder["state"], batches[holder["i"] % len(batches)])
        holder["i"] += 1
        return metrics["loss"]

    return _timed(jax, one, args.calls)


def _stress(jax, np, args):
    """The 8-device paths under test: `calls` train steps on all devices (eigh on every device at
    once, the demo's sizes), then the first 3 again on one device from the same variables.

    Returns the step times and the largest gaps between the two runs (losses, relative params).
    """
    mesh = _mesh(jax, np)
    step, state, batches = train_setup(jax, np, mesh)
    first = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    losses, params, seconds = [], None, []
    for i in range(max(args.calls, 3)):
        start = time.perf_counter()
        state, metrics = step(state, batches[i % 3])
        losses.append(float(metrics["loss"]))
        seconds.append(time.perf_counter() - start)
        print(f"call {i + 1}: {seconds[-1] * 1e3:.1f} ms", file=sys.stderr, flush=True)
        if i == 2:
            params = jax.device_get(state.params)
    step1, state1, batches1 = train_setup(jax, np, _mesh(jax, np, jax.devices()[:1]), variables=first)
    losses1 = []
    for batch in batches1:
        state1, metrics = step1(state1, batch)
        losses1.append(float(metrics["loss"]))
    params1 = jax.device_get(state1.params)
    gaps = [
        float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params1))
    ]
    return {
        "devices": len(jax.devices()),
        "first_s": seconds[0],
        "median_ms": 1e3 * sorted(seconds[1:])[len(seconds[1:]) // 2],
        "losses": losses[:3],
        "losses_one_device": losses1,
        "loss_gap": float(np.max(np.abs(np.asarray(losses[:3]) - np.asarray(losses1)))),
        "param_gap": max(gaps),
    }


def _timed(jax, call, calls):
    start = time.perf_counter()
    jax.block_until_ready(call())
    compile_s = time.perf_counter() - start
    print(f"compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
    samples = []
    for i in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(call())
        samples.append(time.perf_counter() - start)
        print(f"call {i + 1}/{calls}: {samples[-1] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return {"first_s": compile_s, "median_ms": 1e3 * sorted(samples)[len(samples) // 2], "calls": calls}


# ----------------------------------------------------------------------------------------------
# In the parent process


@contextlib.contextmanager
def busy_cores(n=None):
    """`n` (default: one per core, at most 8) processes spinning at 100 % CPU for the duration."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(n or min(os.cpu_count() or 1, 8))
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def child_command(workload, devices, dispatch="new", calls=10):
    """The command of one cell: a fresh process (tuned by `python -m bench`) with `devices` fake CPU devices."""
    return [
        sys.executable,
        "-m",
        "bench",
        "eigh_devices",
        "--child",
        workload,
        f"--devices={devices}",
        f"--dispatch={dispatch}",
        f"--repeats={calls}",
    ]


def cpu_seconds(pid):
    """User + system CPU seconds of a live process (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_child(command, timeout, stacks=False):
    """({"ok": result} | {"hang": ...} | {"timeout": ...} | {"error": ...}, seconds).

    A child still running after `timeout` s is a hang when it used no CPU in the next 2 s.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        before = cpu_seconds(proc.pid)
        time.sleep(2.0)
        after = cpu_seconds(proc.pid)
        stuck = before is not None and after is not None and after - before < 0.01
        detail = native_stacks(proc.pid) if stacks and stuck else ""
        proc.kill()
        out, err = proc.communicate()
        progress = [line for line in err.splitlines() if line.startswith(("compiled", "call"))]
        outcome = "hang" if stuck else "timeout"
        return {outcome: f"after {progress[-1] if progress else 'start-up'}" + detail}, time.perf_counter() - start
    if proc.returncode != 0:
        return {
            "error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
        }, time.perf_counter() - start
    return {"ok": json.loads(out.strip().splitlines()[-1])}, time.perf_counter() - start


def native_stacks(pid):
    """'; k intra-op threads in ParallelBatchMap → BlockingCounter::Wait' from gdb, or ''."""
    try:
        text = subprocess.run(
            ["gdb", "-p", str(pid), "-batch", "-ex", "set pagination off", "-ex", "thread apply all bt"],
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    threads = text.split("\nThread ")
    pool = [t for t in threads if '"tf_XLAEigen"' in t.splitlines()[0]]
    stuck = [t for t in pool if "ParallelBatchMap" in t and "BlockingCounter::Wait" in t]
    return f"; gdb: {len(stuck)}/{len(pool)} intra-op threads in ParallelBatchMap → BlockingCounter::Wait"


def _cell(outcome, timeout):
    if "ok" in outcome:
        return f"{outcome['ok']['median_ms']:.1f}"
    if "hang" in outcome:
        return f"HANG (>{timeout:.0f} s, 0 % CPU)"
    if "timeout" in outcome:
        return f"TIMEOUT (>{timeout:.0f} s)"
    return "error: " + outcome["error"][:60]


def main(argv: list[str]) -> int:
    parser = common.parser("eigh_devices", __doc__, repeats=10, repeats_note="; the median counts here")
    parser.add_argument("--devices", type=common.listed(int), default=[1, 2, 4, 8], help="Fake CPU device counts.")
    parser.add_argument("--workloads", type=common.listed(), default=list(WORKLOADS), help="eigh, step.")
    parser.add_argument("--busy", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--dispatch", type=common.listed(), default=["old", "new"], help="old, new.")
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds per cell before it counts as stuck.")
    parser.add_argument("--stacks", action="store_true", help="On a hang, count stuck threads with gdb.")
    parser.add_argument("--child", choices=(*WORKLOADS, "stress"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.workload, args.calls = args.child, args.repeats
        args.devices, args.dispatch = args.devices[0], args.dispatch[0]
        return _child(args) or 0
    print(f"{os.cpu_count()} cores; OPENBLAS_NUM_THREADS=1; ms per call (median of {args.repeats}) after compile")
    rows, notes = [], []
    for busy in {"no": [False], "yes": [True], "both": [False, True]}[args.busy]:
        with busy_cores() if busy else contextlib.nullcontext():
            for workload in args.workloads:
                for devices in args.devices:
                    row = [workload, devices, "yes" if busy else "no"]
                    for dispatch in args.dispatch:
                        command = child_command(workload, devices, dispatch, args.repeats)
                        outcome, seconds = run_child(command, args.timeout, args.stacks)
                        row.append(_cell(outcome, args.timeout))
                        if "ok" not in outcome:
                            notes.append(
                                f"{workload} {devices} dev busy={row[2]} {dispatch}: {next(iter(outcome.values()))}"
                            )
                        print(
                            f"  {workload:4} devices={devices} busy={row[2]:3} {dispatch}: {row[-1]} ({seconds:.0f} s)",
                            flush=True,
                        )
                    rows.append(row)
    print()
    print(tables.markdown(["workload", "devices", "busy", *(f"{d} dispatch" for d in args.dispatch)], rows))
    for note in notes:
        print("  " + note)
    return 0
