"""The global covariance pooling (GCP) head: reduce → covariance → normalise → triu vector."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gcp_jax import layers, linalg

NORMS = ("sqrt", "seb", "isqrt", "none")
SPECTRAL_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def normalize(cov, *, norm, grad="exact", seb_variant="code", eps=None, isqrt_iters=5, **opts):
    """Applies the matrix normalisation `norm` (METHOD §2) to covariances [..., d, d]."""
    if norm == "sqrt":
        return linalg.sqrtm(cov, grad=grad, eps=eps, **opts)
    if norm == "seb":
        return linalg.seb(cov, grad=grad, variant=seb_variant, eps=eps, **opts)
    if norm == "isqrt":
        return linalg.newton_schulz_sqrtm(cov, iters=isqrt_iters)
    if norm == "none":
        return cov
    raise ValueError(f"Unknown GCP normalisation {norm!r}; choose one of {', '.join(NORMS)}.")


class GCPHead(nn.Module):
    """Backbone map [B, H, W, C] → triu(N(Σ)) of length d(d+1)/2, in `dtype`.

    `dim` > 0 adds the 1×1 conv (no bias, Kaiming fan-out) + BatchNorm + ReLU reduction of the
    iSQRT-COV protocol. The spectral part runs in `dtype` (float32 or float64) whatever the
    backbone's compute dtype, with matmul precision HIGHEST.
    """

    dim: int | None = 256
    norm: str = "seb"
    grad: str = "exact"
    seb_variant: str = "code"
    eps: float | None = None
    isqrt_iters: int = 5
    grad_opts: tuple = ()  # ((name, value), ...) passed to sqrtm/seb: topn, taylor_degree, ...
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def positions(self, features, train: bool = False):
        """The reduced features as [B, M, d] in the spectral dtype."""
        if features.ndim != 4:
            raise ValueError(f"GCPHead expects NHWC features, got shape {features.shape}.")
        if jnp.dtype(self.dtype) == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError("GCP dtype float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 or jax_enable_x64.")
        x = features
        if self.dim:
            x = layers.Conv(
                self.dim,
                (1, 1),
                use_bias=False,
                dtype=features.dtype,
                kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                name="reduce_conv",
            )(x)
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                dtype=features.dtype,
                name="reduce_bn",
            )(x)
            x = nn.relu(x)
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c).astype(self.dtype)

    def covariance(self, features, train: bool = False):
        """Σ per image, [B, d, d]."""
        return linalg.covariance(self.positions(features, train))

    def __call__(self, features, train: bool = False):
        z = normalize(
            self.covariance(features, train),
            norm=self.norm,
            grad=self.grad,
            seb_variant=self.seb_variant,
            eps=self.eps,
            isqrt_iters=self.isqrt_iters,
            **dict(self.grad_opts),
        )
        return linalg.triu_vec(z)


_GRAD_OPTS = ("topn", "taylor_degree", "trunc_threshold", "newton_iters")
_HEAD_FIELDS = ("dim", "norm", "grad", "seb_variant", "eps", "isqrt_iters", "dtype")


def gcp_head_from_config(cfg: Mapping[str, Any], **overrides) -> GCPHead:
    """Builds a GCPHead from the `config.gcp` fields (see configs/default.py)."""
    cfg = {**dict(cfg), **overrides}
    unknown = set(cfg) - set(_HEAD_FIELDS) - set(_GRAD_OPTS)
    if unknown:
        raise ValueError(
            f"Unknown gcp config field(s) {sorted(unknown)}; known: {', '.join(_HEAD_FIELDS + _GRAD_OPTS)}."
        )
    norm = cfg.get("norm", "seb")
    if norm not in NORMS:
        raise ValueError(f"gcp.norm={norm!r} is not one of {', '.join(NORMS)}.")
    grad = cfg.get("grad", "exact")
    if grad not in linalg.SQRTM_GRADS:
        raise ValueError(f"gcp.grad={grad!r} is not one of {', '.join(linalg.SQRTM_GRADS)}.")
    variant = cfg.get("seb_variant", "code")
    if variant not in linalg.SEB_VARIANTS:
        raise ValueError(f"gcp.seb_variant={variant!r} is not one of {', '.join(linalg.SEB_VARIANTS)}.")
    dtype = cfg.get("dtype", "float32")
    if isinstance(dtype, str):
        if dtype not in SPECTRAL_DTYPES:
            raise ValueError(f"gcp.dtype={dtype!r} is not one of {', '.join(SPECTRAL_DTYPES)}.")
        dtype = SPECTRAL_DTYPES[dtype]
    opts = {k: cfg[k] for k in _GRAD_OPTS if cfg.get(k) is not None}
    if not opts.get("topn"):
        opts.pop("topn", None)
    fields = {k: cfg[k] for k in ("dim", "eps", "isqrt_iters") if k in cfg}
    return GCPHead(
        norm=norm, grad=grad, seb_variant=variant, dtype=dtype, grad_opts=tuple(sorted(opts.items())), **fields
    )
