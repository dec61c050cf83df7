"""Each convolution of ResNet-50 alone: ours (XLA, through `gcp_jax.layers`) against PyTorch's.

    python -m bench conv_kernels                      # the docs table: 448 px, batch 2 (2 cores: ~20 s)
    python -m bench conv_kernels --size 224 --batch 8

Where the CPU train-step gap to the PyTorch reference (`bench train_step`) lives: for every distinct
convolution of the ResNet-50 the GCP protocol trains (its shapes at `--size` and `--batch`,
torchvision's v1.5 layout, layer4 at stride 1) the table gives the forward, the input gradient
and the kernel gradient, in ms, for both frameworks, each the fastest of `--repeats` calls, and
the model total (each time × how often the model has that convolution). The stem's input
gradient is skipped (images need none). Our side is `gcp_jax.layers.conv_general_dilated`, as
the models call it (1×1 kernels as matmuls on CPU); torch's is `nn.Conv2d` on NCHW tensors, as the
reference recipe runs it, its gradients timed with `torch.autograd.grad` on a kept graph.
"""

from __future__ import annotations

import collections
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, tables
from bench.timing import machine_line, time_call
from gcp_jax import layers

NHWC = ("NHWC", "HWIO", "NHWC")


def resnet50_convolutions(size: int, last_stride: int = 1) -> collections.Counter:
    """Counter of (side, in channels, out channels, kernel, stride) over ResNet-50 v1.5's convolutions."""
    convs = collections.Counter({(size, 3, 64, 7, 2): 1})
    side, cin = size // 4, 64
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for block in range(blocks):
            stride = 1 if stage == 0 or block > 0 else (last_stride if stage == 3 else 2)
            convs[(side, cin, planes, 1, 1)] += 1
            convs[(side, planes, planes, 3, stride)] += 1
            convs[(side // stride, planes, 4 * planes, 1, 1)] += 1
            if block == 0:
                convs[(side, cin, 4 * planes, 1, stride)] += 1
            side, cin = side // stride, 4 * planes
    return convs


def jax_times(batch, side, cin, cout, kernel, stride, repeats):
    """Fastest seconds of forward, input gradient and kernel gradient, each jitted alone."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, side, side, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)) / np.sqrt(kernel * kernel * cin), jnp.float32)
    pad = ((kernel // 2, kernel // 2),) * 2

    def conv(x, w):
        return layers.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=NHWC)

    g = jnp.ones(jax.eval_shape(conv, x, w).shape, jnp.float32)
    grad = lambda i: jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[i])  # the forward is dead code: DCE'd
    return (
        time_call(jax.jit(conv), x, w, repeats=repeats),
        None if cin == 3 else time_call(grad(0), x, w, g, repeats=repeats),
        time_call(grad(1), x, w, g, repeats=repeats),
    )


def torch_times(batch, side, cin, cout, kernel, stride, repeats):
    """The same three for torch's nn.Conv2d (NCHW), gradients from one kept graph."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    conv = torch.nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
    x = torch.randn(batch, cin, side, side, requires_grad=cin != 3)
    y = conv(x)
    g = torch.ones_like(y)
    with torch.no_grad():
        fwd = time_call(conv, x, repeats=repeats)  # torch's CPU ops return when done
    dx = None if cin == 3 else time_call(lambda: torch.autograd.grad(y, x, g, retain_graph=True), repeats=repeats)
    dw = time_call(lambda: torch.autograd.grad(y, conv.weight, g, retain_graph=True), repeats=repeats)
    return fwd, dx, dw


def main(argv: list[str]) -> int:
    p = common.parser("conv_kernels", __doc__, repeats=5)
    p.add_argument("--size", type=int, default=448, help="Image side in pixels (448).")
    p.add_argument("--batch", type=int, default=2, help="Batch (2).")
    args = p.parse_args(argv)
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("bench conv_kernels compares with PyTorch: pip install torch==2.13.0 (the CPU build) first.")
    rows = []
    for (side, cin, cout, kernel, stride), count in resnet50_convolutions(args.size).items():
        shape = (args.batch, side, cin, cout, kernel, stride)
        ours, theirs = jax_times(*shape, args.repeats), torch_times(*shape, args.repeats)
        row = dict(kernel=kernel, stride=stride, cin=cin, cout=cout, side=side, count=count)
        rows.append({**row, "ours_s": list(ours), "torch_s": list(theirs)})
        print(rows[-1], flush=True)
    totals = {k: [sum(r["count"] * (r[k][i] or 0.0) for r in rows) for i in range(3)] for k in ("ours_s", "torch_s")}
    totals["ratio"] = sum(totals["ours_s"]) / sum(totals["torch_s"])
    rec = common.record(
        "conv_kernels", argv, f"{machine_line()}; {common.versions('torch')}", rows, batch=args.batch, totals=totals
    )
    tables.print_record(rec)
    common.write_record(args.out, rec)
    return 0
