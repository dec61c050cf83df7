"""The reference recipe's GCP+SEB layer in NumPy (docs/method.md §2c, §3): the comparison column of bench.spectral.

Float64, SVD, the eigen-level backward with the ordinary K = 1/(λi − λj), and the overflow fix
that replaces ±∞ by the extremes of the whole batch — as the released code computes it.
"""

from __future__ import annotations

import numpy as np


def _replace_inf_batchwide(x):
    """±∞ replaced by the largest / smallest finite value of the whole tensor (the reference's overflow fix)."""
    finite = x[np.isfinite(x)]
    if finite.size:
        x = np.where(x == np.inf, finite.max(), np.where(x == -np.inf, finite.min(), x))
    return x


def seb_layer(x32, weights):
    """Forward and backward of covariance → SEB → triu as the reference code computes them.

    `x32`: float32 features [B, M, C]; `weights`: the cotangent of the triu vector [B, C(C+1)/2].
    Returns (triu output, ∂<output, weights>/∂x), both float32.
    """
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
