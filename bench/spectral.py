"""Spectral-layer benchmark: gcp_jax.linalg against plain autodiff and the reference recipe.

    python -m bench.spectral                # batch 8 and 32, d = 256, float32 and float64
    python -m bench.spectral --batches 8 --repeats 3

Table 1: forward and forward+backward time of each normalisation, with its ratio to
`jnp.linalg.eigh` + plain autodiff of U diag(√λ) Uᵀ in the same run and dtype.
Table 2: the whole GCP+SEB layer (covariance → seb → triu_vec) from float32 features
[8, 196, 256], forward+backward, against the reference recipe (float64, SVD, eigen-level
backward with the ordinary K and the batch-wide overflow fix) written in NumPy, and against
the floor, the batched `eigh` alone.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import machine_line, print_table, time_call
from gcp_jax import linalg


def spd_batch(batch, d, dtype, seed=0):
    """Covariances of ReLU features with M = 2d positions: full rank, BN-like scale."""
    x = np.maximum(np.random.default_rng(seed).normal(size=(batch, 2 * d, d)), 0.0)
    return linalg.covariance(jnp.asarray(x, dtype))


def eigh_autodiff_sqrtm(a):
    lam, u = jnp.linalg.eigh(a)
    return (u * jnp.sqrt(jnp.maximum(lam, 0.0))[..., None, :]) @ jnp.swapaxes(u, -1, -2)


def candidates():
    """name → function of a [B, d, d] batch, the first being the baseline."""
    fns = {"eigh+autodiff (baseline)": eigh_autodiff_sqrtm}
    for grad in linalg.SQRTM_GRADS:
        fns[f"sqrtm grad={grad}"] = lambda a, g=grad: linalg.sqrtm(a, grad=g)
    fns["seb (code, exact)"] = linalg.seb
    fns["newton_schulz_sqrtm iters=5"] = linalg.newton_schulz_sqrtm
    return fns


def forward_and_backward(fn):
    """jit(fn) and jit(grad of <fn(a), weights>), the weights an argument (no constant folding)."""
    return jax.jit(fn), jax.jit(jax.grad(lambda a, weights: jnp.sum(fn(a) * weights)))


def spectral_table(batches, dtypes, repeats):
    rows = []
    for dtype in dtypes:
        for batch in batches:
            a = spd_batch(batch, 256, dtype)
            weights = jnp.asarray(np.random.default_rng(1).normal(size=a.shape), dtype)
            base_f = base_b = None
            for name, fn in candidates().items():
                forward, backward = forward_and_backward(fn)
                tf = time_call(forward, a, repeats=repeats)
                tb = time_call(backward, a, weights, repeats=repeats)
                base_f, base_b = base_f or tf, base_b or tb
                rows.append(
                    (
                        jnp.dtype(dtype).name,
                        batch,
                        name,
                        f"{tf * 1e3:.1f}",
                        f"{tf / base_f:.2f}",
                        f"{tb * 1e3:.1f}",
                        f"{tb / base_b:.2f}",
                    )
                )
                print(*rows[-1], sep="  ", flush=True)  # progress: the table comes at the end
    print_table(("dtype", "batch", "function", "fwd ms", "fwd ×", "fwd+bwd ms", "fwd+bwd ×"), rows)


# ------------------------------------------------------------------------------------------------
# The reference recipe (docs/method.md §2c, §3): float64, SVD, eigen-level backward, ordinary K.


def _replace_inf_batchwide(x):
    finite = x[np.isfinite(x)]
    if finite.size:
        x = np.where(x == np.inf, finite.max(), np.where(x == -np.inf, finite.min(), x))
    return x


def reference_seb_layer(x32, weights):
    """Forward and backward of covariance → SEB → triu as the reference code computes them."""
    x = x32.astype(np.float64)
    m = x.shape[1]
    xc = x - x.mean(axis=1, keepdims=True)
    cov = np.einsum("bmc,bmd->bcd", xc, xc) / m
    u, s, _ = np.linalg.svd(cov)
    s = np.where(s <= np.finfo(np.float64).eps, np.finfo(np.float64).eps, s)
    ut = np.swapaxes(u, 1, 2)
    q = (u * np.sqrt(s)[:, None, :]) @ ut
    branch = (u * np.exp(-s)[:, None, :]) @ ut
    a = q @ np.swapaxes(branch, 1, 2)
    c = np.linalg.norm(a, axis=(1, 2))
    z = q * (1 + c)[:, None, None]
    rows, cols = np.triu_indices(cov.shape[-1])
    out = z[:, rows, cols].astype(np.float32)
    # backward: triu scatter, then the eigen-level VJP with the ordinary K.
    g = np.zeros_like(z)
    g[:, rows, cols] = weights
    g_c = np.sum(g * q, axis=(1, 2))
    g_q = g * (1 + c)[:, None, None]
    g_u = (g_q + np.swapaxes(g_q, 1, 2)) @ (u * np.sqrt(s)[:, None, :])
    w = (1 - 2 * s) * np.exp(-2 * s)
    g_s = (
        np.einsum("bii->bi", ut @ g_q @ u) / (2 * np.sqrt(s)) + g_c[:, None] * w / (2 * np.maximum(c, 1e-300))[:, None]
    )
    with np.errstate(divide="ignore"):
        k = 1.0 / (s[:, :, None] - s[:, None, :])
    k[:, np.arange(len(s[0])), np.arange(len(s[0]))] = 0.0
    k = _replace_inf_batchwide(k)
    inner = _replace_inf_batchwide(np.swapaxes(k, 1, 2) * (ut @ g_u) + g_s[:, :, None] * np.eye(s.shape[1]))
    g_cov = _replace_inf_batchwide(u @ inner @ ut)
    g_x = xc @ (g_cov + np.swapaxes(g_cov, 1, 2)) / m
    return out, g_x.astype(np.float32)


def layer_table(repeats):
    x = np.maximum(np.random.default_rng(2).normal(size=(8, 196, 256)), 0.0).astype(np.float32)
    weights = np.random.default_rng(3).normal(size=(8, 256 * 257 // 2)).astype(np.float32)
    xj, wj = jnp.asarray(x), jnp.asarray(weights)

    def layer(feats, **kw):
        return linalg.triu_vec(linalg.seb(linalg.covariance(feats), **kw))

    # Weights are arguments, not closed-over constants, so XLA cannot fold the backward scatter.
    ours = jax.jit(jax.value_and_grad(lambda f, w: jnp.sum(layer(f) * w)))
    ordinary = jax.jit(jax.value_and_grad(lambda f, w: jnp.sum(layer(f, grad="ordinary") * w)))
    eigh_only = jax.jit(lambda f: jnp.linalg.eigh(linalg.covariance(f)))
    t_ref = time_call(lambda: reference_seb_layer(x, weights), repeats=repeats)
    rows = [("reference recipe (NumPy float64, SVD, ordinary K)", t_ref)]
    rows.append(("gcp_jax seb, float32, grad=exact", time_call(ours, xj, wj, repeats=repeats)))
    rows.append(("gcp_jax seb, float32, grad=ordinary", time_call(ordinary, xj, wj, repeats=repeats)))
    rows.append(("floor: covariance + eigh forward only, float32", time_call(eigh_only, xj, repeats=repeats)))
    if jax.config.jax_enable_x64:
        x64 = jnp.asarray(x, jnp.float64)
        rows.append(("gcp_jax seb, float64, grad=exact", time_call(ours, x64, wj.astype(jnp.float64), repeats=repeats)))
    # agreement: our gradient against the reference's, on this full-rank-ish input
    _, g_ref = reference_seb_layer(x, weights)
    _, g_ours = ours(xj, wj)
    err = float(np.max(np.abs(np.asarray(g_ours) - g_ref)) / np.max(np.abs(g_ref)))
    print_table(
        ("GCP+SEB layer, [8,196,256] fwd+bwd", "ms", "speed-up vs reference"),
        [(name, f"{t * 1e3:.1f}", f"{t_ref / t:.1f}×") for name, t in rows],
    )
    print(f"max relative difference of ∂L/∂X, ours (float32, exact) vs reference: {err:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if "float64" in args.dtypes:
        jax.config.update("jax_enable_x64", True)
    print(machine_line() + f"; {os.cpu_count()} CPU cores")
    spectral_table(args.batches, [jnp.dtype(d) for d in args.dtypes], args.repeats)
    print()
    layer_table(args.repeats)


if __name__ == "__main__":
    main()
