"""The PyTorch reference recipe of a train step: ResNet-50 (layer4 at stride 1) + 256-d SEB head, SGD.

As the released code trains it: the backbone where `device` says ("cuda": cuDNN, autotuned), the
covariance in float64, its eigendecomposition by SVD and the eigen-level backward with the
ordinary K (docs/method.md §3) in float64 on the CPU, SGD with momentum, weight decay, a 5× classifier
learning rate and gradient clipping. The ResNet-50 is bench/torch_models.py's, in torchvision's v1.5
layout (stride in the 3×3 convolution), so that neither torchvision nor timm is needed.

`python -m bench reference_torch --size S --batch B --device D` is the child process of
`python -m bench train_step --torch on`: one step per line read from stdin, "seconds peak_bytes"
written back, so that its steps alternate with ours under the same machine load.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from bench import torch_models

GCP_DIM = 256
NUM_CLASSES = 100


class SEBFunction(torch.autograd.Function):
    """(1 + c) Σ^{1/2} by SVD in float64 on the CPU; backward: ordinary-K eigen VJP + the branch term."""

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


class ResNet50SEB(nn.Module):
    """ResNet-50 with layer4 at stride 1, the 256-d 1×1 reduction, covariance, SEB, triu and the classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.backbone = nn.Sequential(collections.OrderedDict(torch_models.resnet50_trunk(last_stride=1)))
        self.reduce = torch_models.reduction(2048, GCP_DIM)
        self.fc = nn.Linear(GCP_DIM * (GCP_DIM + 1) // 2, num_classes)
        self.rows, self.cols = torch.triu_indices(GCP_DIM, GCP_DIM)

    def forward(self, x):
        f = self.reduce(self.backbone(x)).flatten(2).double()  # [B, d, M]
        f = f - f.mean(-1, keepdim=True)
        cov = f @ f.transpose(1, 2) / f.shape[-1]
        z = SEBFunction.apply(cov)[:, self.rows.to(cov.device), self.cols.to(cov.device)]
        return self.fc(z.float())


def make_train_step(size: int, batch: int, device: str, threads: int | None = None):
    """(step, peak_bytes): one blocking train step of the recipe on a random batch, and the GPU allocator's peak.

    `threads`: torch's CPU threads (default: one per core, as the recipe runs).
    """
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = ResNet50SEB().train().to(device)
    fc = list(net.fc.parameters())
    rest = [p for n, p in net.named_parameters() if not n.startswith("fc.")]
    opt = torch.optim.SGD([{"params": rest}, {"params": fc, "lr": 5 * 3e-3}], lr=3e-3, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(net(images), labels).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    def peak_bytes():
        return torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")

    return step, peak_bytes


def seconds(fn) -> float:
    """Wall seconds of one call of fn() (which blocks on its result)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    """The child process: one reference train step per line read from stdin; "seconds peak_bytes" per line out."""
    p = argparse.ArgumentParser(prog="python -m bench reference_torch", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    step, peak_bytes = make_train_step(args.size, args.batch, args.device)
    for _ in sys.stdin:
        print(seconds(step), peak_bytes(), flush=True)
    return 0
