"""Images/s of the jitted train step, and the share of it spent in the spectral head.

  python -m bench.train_step                                   # the README table (2-core CPU: ~15 minutes)
  python -m bench.train_step --archs resnet50 --torch off      # ResNet-50 rows only
  python -m bench.train_step --archs resnet50 --heads seb --batch 16   # e.g. on a GPU
  python -m bench.train_step --archs resnet50 --batch 16 --dtype bfloat16 --torch off

For each backbone and head (gap, gcp with sqrt, gcp with SEB; 256-d reduction; ResNet layer4 at
stride 1, the GCP protocol) it times `gcp_jax.training.make_train_step` (forward, backward, SGD
update; synthetic in-memory batches, no TensorFlow) and, separately, the spectral part of the head alone
(covariance -> eigh -> normalisation -> triu, forward and backward, on reduced features of the
same shape). When torch is importable it adds the PyTorch reference recipe for ResNet-50 + SEB:
a ResNet-50 written here (layer4 at stride 1), the 256-d reduction, the covariance and SEB in
float64 by SVD with the ordinary-K eigen backward (docs/method.md §3) as a torch.autograd.Function,
SGD with clipping -- the comparison column, its steps alternating with ours (a child process).
On a GPU the reference runs as published: backbone on the GPU (cuDNN autotuned), covariance
eigendecomposition and its backward in float64 on the CPU.
Times are the fastest of `--steps` timed steps after compile and one warm-up (bench.common).
Memory is XLA's buffer assignment for the compiled step (parameters, optimiser state, batch,
temporaries; donated buffers once) and, for torch, its allocator's peak on the GPU.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from bench.common import compiled_memory_bytes, machine_line, print_table, time_call
from gcp_jax import linalg, models, optim, sharding, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEADS = {"gap": None, "sqrt": "sqrt", "seb": "seb"}
GCP_DIM = 256


def optim_config() -> ConfigDict:
    """The protocol's SGD (docs/method.md §6)."""
    return ConfigDict(
        dict(
            learning_rate=3e-3,
            momentum=0.9,
            nesterov=False,
            classifier_lr_factor=5.0,
            weight_decay=1e-4,
            grad_clip_norm=5.0,
            schedule="step",
            decay_epochs=(),
            decay_factor=0.1,
            warmup_epochs=0.0,
        )
    )


def seconds(fn) -> float:
    """Wall seconds of one call of fn() (which blocks on its result)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def jax_step(arch: str, head: str, size: int, batch: int, dtype: str = "float32", num_classes: int = 100):
    """(train_once, model, variable shapes, compiled step): the train step of `arch` + `head` on a synthetic batch.

    `dtype` is the backbone's compute dtype; the spectral head stays in float32.
    """
    norm = HEADS[head]
    model = models.create_model(
        arch,
        num_classes=num_classes,
        head="gap" if norm is None else "gcp",
        gcp=dict(dim=GCP_DIM, norm=norm or "seb"),
        last_stride=1 if arch.startswith("resnet") else 2,  # the GCP protocol; EfficientNets keep theirs
        dtype=dtype,
    )
    mesh = sharding.make_mesh()
    schedule = optim.learning_rate_schedule(optim_config(), 100, 100)
    tx = optim.make_optimizer(optim_config(), schedule)
    state = training.create_train_state(training.init_variables(model, size, 0, mesh), tx, mesh)
    step = training.make_train_step(model, tx, mesh)
    rng = np.random.default_rng(0)
    batch_data = sharding.global_batch(
        {
            "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, num_classes, batch).astype(np.int32),
        },
        mesh,
    )
    shapes = jax.eval_shape(lambda: {"params": state.params, "batch_stats": state.batch_stats})
    compiled = step.lower(state, batch_data).compile()
    holder = [state]

    def train_once():
        holder[0], metrics = compiled(holder[0], batch_data)
        jax.block_until_ready(metrics["loss"])

    return train_once, model, shapes, compiled


def bench_jax(arch: str, head: str, size: int, batch: int, steps: int, dtype: str = "float32") -> dict:
    """Train-step seconds, memory (and spectral-head seconds) for one backbone/head."""
    norm = HEADS[head]
    start = time.perf_counter()
    train_once, model, variables, compiled = jax_step(arch, head, size, batch, dtype)
    compile_s = time.perf_counter() - start
    step_s = time_call(train_once, repeats=steps, warmup=1)
    result = {
        "arch": arch,
        "head": head,
        "dtype": dtype,
        "size": size,
        "batch": batch,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "compile_s": compile_s,
        "memory_gib": compiled_memory_bytes(compiled) / 2**30,
        "spectral_s": None,
    }
    if norm is not None:
        features = jax.eval_shape(
            lambda v, x: model.apply(v, x, method=model.features),
            variables,
            jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        )
        positions = features.shape[1] * features.shape[2]
        result["spectral_s"] = spectral_seconds(norm, batch, positions, steps)
        result["positions"] = positions
    return result


def spectral_seconds(norm: str, batch: int, positions: int, steps: int) -> float:
    """Seconds of covariance -> normalisation -> triu, forward + backward, on [batch, positions, 256]."""
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (batch, positions, GCP_DIM)))
    w = jax.random.normal(jax.random.key(1), (batch, GCP_DIM * (GCP_DIM + 1) // 2))

    def loss(x, w):  # w an argument: as a closed-over constant XLA would constant-fold the triu backward
        return jnp.sum(linalg.triu_vec(linalg.normalize(linalg.covariance(x), linalg.SpectralOptions(norm=norm))) * w)

    return time_call(jax.jit(jax.grad(loss)), x, w, repeats=steps, warmup=1)


# ----------------------------------------------------------------------------------------------
# The PyTorch reference recipe (imported only when asked for and available).


def torch_step(size: int, batch: int, device: str, num_classes: int = 100):
    """(train_once, peak_bytes) of the PyTorch reference recipe: ResNet-50 + 256-d float64 SVD SEB head, SGD.

    `device` ("cpu" or "cuda") holds the backbone; the eigendecomposition and its backward run
    on the CPU either way, as in the reference code.
    """
    import torch  # pylint: disable=g-import-not-at-top
    from torch import nn  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(os.cpu_count() or 1)
    torch.backends.cudnn.benchmark = True

    class SEBFunction(torch.autograd.Function):
        """(1 + c) Σ^{1/2} by SVD in float64; backward: ordinary-K eigen VJP + the branch term (docs/method.md §2c, §3)."""

        @staticmethod
        def forward(ctx, cov):
            device, cov = cov.device, cov.cpu()
            u, s, _ = torch.linalg.svd(cov)
            s = torch.clamp(s, min=float(np.finfo(np.float64).eps))
            root = u @ torch.diag_embed(s.sqrt()) @ u.transpose(1, 2)
            c = (s * torch.exp(-2 * s)).sum(-1).sqrt()
            ctx.save_for_backward(u, s, c, root)
            return ((1 + c)[:, None, None] * root).to(device)

        @staticmethod
        def backward(ctx, g):
            device, g = g.device, g.cpu()
            u, s, c, root = ctx.saved_tensors
            gs = (1 + c)[:, None, None] * g
            ut = u.transpose(1, 2)
            grad_u = (gs + gs.transpose(1, 2)) @ u @ torch.diag_embed(s.sqrt())
            grad_s = torch.diagonal(ut @ gs @ u, dim1=1, dim2=2) / (2 * s.sqrt())
            k = 1.0 / (s[:, :, None] - s[:, None, :])
            k.diagonal(dim1=1, dim2=2).zero_()
            finite = k[torch.isfinite(k)]
            k = torch.nan_to_num(k, posinf=float(finite.max()), neginf=float(finite.min()))
            inner = k.transpose(1, 2) * (ut @ grad_u) + torch.diag_embed(grad_s)
            gc = (g * root).sum((1, 2))
            w = (1 - 2 * s) * torch.exp(-2 * s) * (gc / (2 * c))[:, None]
            return (u @ (inner + torch.diag_embed(w)) @ ut).to(device)

    class Bottleneck(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            cout = planes * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, planes, 1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                nn.Conv2d(planes, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))

    class ResNet50SEB(nn.Module):
        def __init__(self):
            super().__init__()
            layers = [
                nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            ]
            cin = 64
            for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 1)):  # layer4 at stride 1
                for i in range(blocks):
                    layers.append(Bottleneck(cin, planes, stride if i == 0 else 1))
                    cin = planes * 4
            self.backbone = nn.Sequential(*layers)
            self.reduce = nn.Sequential(
                nn.Conv2d(cin, GCP_DIM, 1, bias=False), nn.BatchNorm2d(GCP_DIM), nn.ReLU(inplace=True)
            )
            self.fc = nn.Linear(GCP_DIM * (GCP_DIM + 1) // 2, num_classes)
            self.rows, self.cols = torch.triu_indices(GCP_DIM, GCP_DIM)

        def forward(self, x):
            f = self.reduce(self.backbone(x)).flatten(2).double()  # [B, d, M]
            f = f - f.mean(-1, keepdim=True)
            cov = f @ f.transpose(1, 2) / f.shape[-1]
            z = SEBFunction.apply(cov)[:, self.rows.to(cov.device), self.cols.to(cov.device)]
            return self.fc(z.float())

    torch.manual_seed(0)
    net = ResNet50SEB().train().to(device)
    fc = list(net.fc.parameters())
    rest = [p for n, p in net.named_parameters() if not n.startswith("fc.")]
    opt = torch.optim.SGD([{"params": rest}, {"params": fc, "lr": 5 * 3e-3}], lr=3e-3, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)

    def train_once():
        opt.zero_grad()
        nn.functional.cross_entropy(net(images), labels).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    def peak_bytes():
        return torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")

    return train_once, peak_bytes


def torch_worker(size: int, batch: int, device: str) -> None:
    """Child process: one reference train step per line read from stdin; "seconds peak_bytes" written to stdout."""
    step, peak_bytes = torch_step(size, batch, device)
    for _ in sys.stdin:
        print(seconds(step), peak_bytes(), flush=True)


def bench_versus_torch(size: int, batch: int, steps: int) -> dict:
    """ResNet-50 + SEB: ours and the torch recipe, steps alternating (same machine load).

    The torch recipe runs in a child process, so that the two runtimes' thread pools never share
    a process; each side gets 2 warm-up steps (compile included) before `steps` timed ones. It
    runs on the GPU when ours does.
    """
    ours, _, _, compiled = jax_step("resnet50", "seb", size, batch)
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.train_step",
            "--torch-worker",
            f"--size={size}",
            f"--batch={batch}",
            f"--torch-device={device}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )

    memory = {"jax": compiled_memory_bytes(compiled) / 2**30}

    def reference():
        child.stdin.write("\n")
        child.stdin.flush()
        line = child.stdout.readline()
        if not line:
            raise RuntimeError("The torch reference process stopped; its error is printed above.")
        step_s, peak = map(float, line.split())
        memory["torch"] = peak / 2**30
        return step_s

    try:
        for _ in range(2):
            ours()
            reference()
        times = {"jax": [], "torch": []}
        for _ in range(steps):
            times["jax"].append(seconds(ours))
            times["torch"].append(reference())
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
        **{f"{k}_memory_gib": v for k, v in memory.items()},
    }


# ----------------------------------------------------------------------------------------------


def print_rows(rows: list[dict]) -> None:
    def cells(r):
        spectral = r["spectral_s"]
        return [
            r["arch"],
            "gap" if r["head"] == "gap" else f"gcp({r['head']})",
            r["dtype"],
            r["size"],
            r["batch"],
            f"{r['images_per_s']:.2f}",
            f"{r['step_s']:.3f}",
            f"{r['memory_gib']:.2f}",
            "—" if spectral is None else f"{spectral:.3f}",
            "—" if spectral is None else f"{100 * spectral / r['step_s']:.1f} %",
            f"{r['compile_s']:.0f}",
        ]

    print_table(
        [
            "backbone",
            "head",
            "backbone dtype",
            "px",
            "batch",
            "images/s",
            "step (s)",
            "step memory (GiB)",
            "spectral fwd+bwd (s)",
            "spectral share",
            "set-up + compile (s)",
        ],
        [cells(r) for r in rows],
    )


def print_versus(r: dict) -> None:
    where = "backbone on the GPU, SVD on the CPU" if r["torch_device"] == "cuda" else "CPU"
    names = {
        "jax": "gcp_jax (float32, eigh, exact backward)",
        "torch": f"PyTorch reference recipe (float64 SVD, ordinary-K backward; {where})",
    }
    rows = [
        [
            name,
            r["size"],
            r["batch"],
            f"{r[f'{k}_images_per_s']:.2f}",
            f"{r[f'{k}_step_s']:.3f}",
            "—" if np.isnan(r[f"{k}_memory_gib"]) else f"{r[f'{k}_memory_gib']:.2f}",
        ]
        for k, name in names.items()
    ]
    ratio = r["jax_images_per_s"] / r["torch_images_per_s"]
    print_table(
        ["ResNet-50 (layer4 stride 1) + 256-d SEB, train step", "px", "batch", "images/s", "step (s)", "memory (GiB)"],
        rows + [["ratio ours / torch", "", "", f"{ratio:.2f}", "", ""]],
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="resnet50,efficientnet_b0,efficientnet_b5")
    parser.add_argument("--heads", default="gap,sqrt,seb")
    parser.add_argument("--size", type=int, default=448, help="Image side (pixels).")
    parser.add_argument("--batch", type=int, default=2, help="Global batch.")
    parser.add_argument(
        "--steps", type=int, default=3, help="Timed steps per row (fastest; after compile + 1 warm-up)."
    )
    parser.add_argument(
        "--torch",
        default="auto",
        choices=("auto", "on", "off"),
        help="ResNet-50 + SEB against the PyTorch reference recipe (a child process), steps alternating; "
        "auto = when torch is importable.",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="Backbone compute dtype (our rows)."
    )
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--torch-device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        return torch_worker(args.size, args.batch, args.torch_device)
    versus_torch = args.torch == "on" or (args.torch == "auto" and importlib.util.find_spec("torch") is not None)
    if versus_torch:  # leave the GPU room for the torch process (JAX would otherwise take 75 % of it)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    print(f"{machine_line()}, {os.cpu_count()} CPUs", flush=True)
    rows = []
    for arch in filter(None, args.archs.split(",")):
        for head in args.heads.split(","):
            rows.append(bench_jax(arch, head, args.size, args.batch, args.steps, args.dtype))
            print(rows[-1], flush=True)
    if rows:
        print_rows(rows)
    if versus_torch:
        versus = bench_versus_torch(args.size, args.batch, args.steps)
        print(versus, flush=True)
        print_versus(versus)


if __name__ == "__main__":
    main()
