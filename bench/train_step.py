"""Train-step benchmark: images/s of gcp_jax.steps' jitted train step, its forward, memory, the spectral head's share.

    python -m bench train_step                    # the docs table: 3 backbones × gap/sqrt/seb, 448 px (2-core CPU: ~15 min)
    python -m bench train_step --archs resnet50 --heads seb --torch on       # + the PyTorch reference recipe
    python -m bench train_step --archs resnet50,efficientnet_b0 --heads gap,seb --sizes 224,448 --last-stride 2
    python -m bench train_step --archs resnet50 --batch 16 --dtypes float32,bfloat16   # e.g. on a GPU

Each backbone × head (gap; gcp with sqrt or SEB, 256-d reduction) × image size × backbone dtype is
built as a run builds it (`gcp_jax.config` defaults with the backbone's protocol: ResNets with
layer4 at stride 1 unless --last-stride says otherwise) and timed on a synthetic in-memory batch
(no TensorFlow, no download):

- the train step of `gcp_jax.steps.make_train_step` (forward, backward through the spectral
  layer, SGD with clipping and weight decay, BatchNorm updates, donated state): images/s, seconds;
- the forward alone (`model.apply`, inference mode);
- the spectral part of the head alone (covariance → eigh → normalisation → triu, forward and
  backward, on reduced features of the step's shape), and its share of the step;
- `step × gap`: the step's time over the gap step of the same backbone, size and dtype.

"set-up + compile" runs from building the model to the compiled step. "step memory" is XLA's
buffer assignment for the compiled step (parameters, optimiser state, batch, temporaries, donated
buffers once). `--torch on` (or auto, when torch is installed) adds ResNet-50 + SEB against the
PyTorch reference recipe (bench.reference_torch) in a child process, their steps alternating.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, tables
from bench.timing import compiled_memory_bytes, device_memory_limit, machine_line, time_call
from gcp_jax import assembly, config, linalg, models, optim, sharding, steps

HEADS = ("gap", "sqrt", "seb")
NUM_CLASSES = 100


class DoesNotFit(RuntimeError):
    """The compiled step needs more memory than the device has."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration; `last_stride` None is the backbone's protocol (ResNets: 1)."""

    arch: str
    head: str
    size: int
    batch: int
    dtype: str = "float32"
    last_stride: int | None = None


def case_config(case: Case):
    """The run config of `case`: gcp_jax.config's defaults, the backbone's protocol, the head and dtype."""
    c = config.with_backbone(config.get_config(), case.arch)
    c.model.head = "gap" if case.head == "gap" else "gcp"
    if case.head != "gap":
        c.gcp.norm = case.head
    c.model.dtype = case.dtype
    if case.last_stride is not None and case.last_stride in models.family(case.arch).last_strides:
        c.model.last_stride = case.last_stride
    return c


@dataclasses.dataclass
class Prepared:
    """A compiled train step with its state and synthetic batch; `step_once()` runs one step and waits."""

    model: object
    step: object
    state: steps.TrainState
    batch: dict
    setup_s: float

    def step_once(self) -> None:
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics["loss"])


def prepare(case: Case, mesh) -> Prepared:
    """Model, optimiser, state and compiled step of `case`, as a run builds them; raises DoesNotFit."""
    start = time.perf_counter()
    cfg = case_config(case)
    model = assembly.build_model(cfg, NUM_CLASSES)
    tx = optim.make_optimizer(cfg.optim, optim.learning_rate_schedule(cfg.optim, 100, 100))
    state = steps.create_train_state(steps.init_variables(model, case.size, 0, mesh), tx, mesh)
    rng = np.random.default_rng(0)
    local = {
        "image": rng.normal(size=(case.batch, case.size, case.size, 3)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, case.batch).astype(np.int32),
    }
    batch = sharding.global_batch(local, mesh)
    step = steps.make_train_step(model, tx, mesh).lower(state, batch).compile()
    limit = device_memory_limit()
    if limit is not None and compiled_memory_bytes(step) > limit:
        raise DoesNotFit(f"needs {compiled_memory_bytes(step) / 2**30:.1f} GiB of {limit / 2**30:.1f}")
    return Prepared(model, step, state, batch, time.perf_counter() - start)


def feature_side(prepared: Prepared, case: Case) -> int:
    """Side of the backbone's feature map (28 for a ResNet at layer4 stride 1 and 448 px)."""
    variables = {"params": prepared.state.params, "batch_stats": prepared.state.batch_stats}
    image = jax.ShapeDtypeStruct((1, case.size, case.size, 3), jnp.float32)
    features = jax.eval_shape(lambda v, x: prepared.model.apply(v, x, method=prepared.model.features), variables, image)
    return features.shape[1]


def spectral_seconds(norm: str, batch: int, positions: int, dim: int, repeats: int) -> float:
    """Seconds of covariance → normalisation → triu, forward + backward, on ReLU features [batch, positions, dim]."""
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (batch, positions, dim)))
    w = jax.random.normal(jax.random.key(1), (batch, dim * (dim + 1) // 2))
    options = linalg.SpectralOptions(norm=norm)

    def loss(x, w):  # w an argument: as a closed-over constant XLA would fold the triu backward
        return jnp.sum(linalg.triu_vec(linalg.normalize(linalg.covariance(x), options)) * w)

    return time_call(jax.jit(jax.grad(loss)), x, w, repeats=repeats)


def forward_seconds(p: Prepared, repeats: int) -> float:
    """Seconds of the inference forward (`model.apply`) on the step's batch; call before a step donates the state."""
    variables = {"params": p.state.params, "batch_stats": p.state.batch_stats}
    return time_call(jax.jit(lambda v, x: p.model.apply(v, x)), variables, p.batch["image"], repeats=repeats)


def measure(case: Case, mesh, repeats: int, forward: bool = True) -> dict:
    """The row of `case`: step (and forward) time, memory, spectral share, set-up + compile."""
    p = prepare(case, mesh)
    side = feature_side(p, case)
    forward_s = forward_seconds(p, repeats) if forward else None
    step_s = time_call(p.step_once, repeats=repeats)
    row = {
        "arch": case.arch,
        "head": case.head,
        "size": case.size,
        "batch": case.batch,
        "dtype": case.dtype,
        "map": side,
        "images_per_s": case.batch / step_s,
        "step_s": step_s,
        "forward_s": forward_s,
        "memory_gib": compiled_memory_bytes(p.step) / 2**30,
        "spectral_s": None,
        "spectral_share": None,
        "compile_s": p.setup_s,
    }
    if case.head != "gap":
        dim = case_config(case).gcp.dim
        row["spectral_s"] = spectral_seconds(case.head, case.batch, side * side, dim, repeats)
        row["spectral_share"] = row["spectral_s"] / step_s
    return row


def largest_fitting(case: Case, batches: list[int], mesh, repeats: int, forward: bool = True) -> dict:
    """The row of `case` at the largest of `batches` whose step fits in device memory (compiled or when run)."""
    tried = []
    for batch in sorted(batches, reverse=True):
        try:
            row = measure(dataclasses.replace(case, batch=batch), mesh, repeats, forward)
            return {**row, "batches_tried": tried + [batch]}
        except (DoesNotFit, jax.errors.JaxRuntimeError) as e:
            if isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" not in str(e):
                raise
            tried.append(batch)
            print(f"# batch {batch} does not fit: {str(e).splitlines()[0]}", flush=True)
            jax.clear_caches()
            gc.collect()
    raise DoesNotFit(f"no batch of {batches} fits")


def add_gap_ratios(rows: list[dict]) -> list[dict]:
    """step_vs_gap: each row's step time over the gap row of the same backbone, size, dtype and batch."""
    key = lambda r: (r["arch"], r["size"], r["dtype"], r["batch"])
    gap = {key(r): r["step_s"] for r in rows if r["head"] == "gap"}
    for r in rows:
        r["step_vs_gap"] = r["step_s"] / gap[key(r)] if key(r) in gap else None
    return rows


def versus_torch(size: int, batch: int, repeats: int, mesh) -> dict:
    """ResNet-50 + SEB: ours and the torch recipe (a child process), steps alternating under the same load.

    Each side gets 2 warm-up steps before `repeats` timed ones; the fastest counts. The recipe runs
    its backbone on the GPU when ours does.
    """
    ours = prepare(Case("resnet50", "seb", size, batch), mesh)
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    args = ["reference_torch", f"--size={size}", f"--batch={batch}", f"--device={device}"]
    child = subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=common.ROOT,
    )
    peak = {"torch": float("nan")}

    def reference_step() -> float:
        child.stdin.write("\n")
        child.stdin.flush()
        line = child.stdout.readline()
        if not line:
            raise RuntimeError("The torch reference process stopped; its error is printed above.")
        step_s, peak["torch"] = map(float, line.split())
        return step_s

    times = {"jax": [], "torch": []}
    try:
        for i in range(2 + repeats):
            start = time.perf_counter()
            ours.step_once()
            jax_s, torch_s = time.perf_counter() - start, reference_step()
            if i >= 2:
                times["jax"].append(jax_s)
                times["torch"].append(torch_s)
    finally:
        child.stdin.close()
        child.wait()
    step_s = {k: min(v) for k, v in times.items()}
    return {
        "size": size,
        "batch": batch,
        "torch_device": device,
        **{f"{k}_step_s": v for k, v in step_s.items()},
        **{f"{k}_images_per_s": batch / v for k, v in step_s.items()},
        "jax_memory_gib": compiled_memory_bytes(ours.step) / 2**30,
        "torch_memory_gib": None if np.isnan(peak["torch"]) else peak["torch"] / 2**30,
        "ratio": step_s["torch"] / step_s["jax"],
    }


def main(argv: list[str]) -> int:
    p = common.parser("train_step", __doc__, repeats=3)
    p.add_argument("--archs", type=common.listed(), default=["resnet50", "efficientnet_b0", "efficientnet_b5"])
    p.add_argument("--heads", type=common.listed(), default=list(HEADS), help="Any of gap,sqrt,seb (all).")
    p.add_argument("--sizes", type=common.listed(int), default=[448], help="Image sides in pixels (448).")
    p.add_argument("--batch", type=int, default=2, help="Global batch (2).")
    p.add_argument("--dtypes", type=common.listed(), default=["float32"], help="Backbone compute dtypes (float32).")
    p.add_argument("--last-stride", type=int, default=None, help="ResNet layer4 stride (default 1: the GCP protocol).")
    p.add_argument(
        "--torch",
        default="auto",
        choices=("auto", "on", "off"),
        help="ResNet-50 + SEB against the PyTorch reference recipe at the first size (auto: when torch is installed).",
    )
    args = p.parse_args(argv)
    versus = args.torch == "on" or (args.torch == "auto" and importlib.util.find_spec("torch") is not None)
    if versus:  # leave a GPU room for the torch process (JAX would otherwise take 75 % of it)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    mesh = sharding.make_mesh()
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            for dtype in args.dtypes:
                for head in args.heads:
                    rows.append(
                        measure(Case(arch, head, size, args.batch, dtype, args.last_stride), mesh, args.repeats)
                    )
                    print(rows[-1], flush=True)
    extra = {"versus": versus_torch(args.sizes[0], args.batch, args.repeats, mesh)} if versus else {}
    machine = f"{machine_line()}; {common.versions('torch')}" if versus else machine_line()
    rec = common.record("train_step", argv, machine, add_gap_ratios(rows), **extra)
    tables.print_record(rec)
    common.write_record(args.out, rec)
    return 0
