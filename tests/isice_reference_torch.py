"""iSICE as its paper and released code describe it, rewritten in plain PyTorch (float64, autograd).

An independent check of `gcp_jax.linalg.isice`: no shared code, every step written out from the
published description, the inverse roots differentiated by autograd through their iteration (not by
a hand-written backward), the jitter at rand = ½ and the last (zero-size) step computed in full.
"""

import torch


def inverse_root(x, iterations=7):
    """Coupled Newton–Schulz on X/tr X, output Z·(tr X)^{-1/2}."""
    d = x.shape[-1]
    eye = torch.eye(d, dtype=x.dtype).expand_as(x)
    trace = torch.diagonal(x, dim1=-2, dim2=-1).sum(-1)[..., None, None]
    y, z = x / trace, eye
    for _ in range(iterations):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return z / torch.sqrt(trace)


def isice(sigma, steps=5, lr=5.0, sparsity=0.01):
    """P/√tr P after `steps` projected gradient steps from P₀ = (C + J)^{-1}, C = Σ/tr Σ."""
    d = sigma.shape[-1]
    c = sigma / torch.diagonal(sigma, dim1=-2, dim2=-1).sum(-1)[..., None, None]
    jitter = 1e-10 + 1e-9 * torch.diag(torch.full((d,), 0.5, dtype=sigma.dtype))
    root = inverse_root(c + jitter)
    p = root @ root
    for i in range(steps):
        plus, minus = torch.relu(p), torch.relu(-p)
        root = inverse_root(p + jitter)
        gradient = -root @ root + 0.5 * (c + c.transpose(-1, -2))
        decay = 1 - i / (steps - 1.0)
        plus = torch.relu(plus - lr * decay * (gradient + sparsity))
        minus = torch.relu(minus - lr * decay * (-gradient + sparsity))
        p = plus - minus
        p = 0.5 * (p + p.transpose(-1, -2))
    return p / torch.sqrt(torch.diagonal(p, dim1=-2, dim2=-1).sum(-1))[..., None, None]
