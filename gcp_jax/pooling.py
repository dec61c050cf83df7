"""The global covariance pooling (GCP) head: reduce → covariance → normalise → triu vector."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gcp_jax import checks, layers, linalg


class GCPHead(nn.Module):
    """Backbone map [B, H, W, C] → triu(N(Σ)) of length d(d+1)/2, in the spectral dtype.

    `dim` > 0 adds the 1×1 conv (no bias, Kaiming fan-out) + BatchNorm + ReLU reduction of the
    iSQRT-COV protocol. `spectral` chooses the normalisation, its gradient and the dtype of the
    spectral part (float32 or float64, whatever the backbone's compute dtype); matmuls run at
    precision HIGHEST.
    """

    dim: int = 256
    spectral: linalg.SpectralOptions = linalg.SpectralOptions()
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def positions(self, features, train: bool = False):
        """The reduced features as [B, M, d] in the spectral dtype."""
        if features.ndim != 4:
            raise ValueError(f"GCPHead expects NHWC features, got shape {features.shape}.")
        dtype = jnp.dtype(self.spectral.dtype)
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
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
        return x.reshape(b, h * w, c).astype(dtype)

    def covariance(self, features, train: bool = False):
        """Σ per image, [B, d, d]."""
        return linalg.covariance(self.positions(features, train))

    def normalize(self, cov):
        """N(Σ): the head's matrix normalisation of covariances [B, d, d]."""
        return linalg.normalize(cov, self.spectral)

    def __call__(self, features, train: bool = False):
        return linalg.triu_vec(self.normalize(self.covariance(features, train)))


def gcp_head_from_config(cfg: Mapping[str, Any], **overrides) -> GCPHead:
    """A GCPHead from the `config.gcp` fields: `dim` and the SpectralOptions fields (gcp_jax.config)."""
    fields = {**dict(cfg), **overrides}
    checks.raise_if_any(head_problems(fields), "gcp")
    dim = fields.pop("dim", GCPHead.dim)
    return GCPHead(dim=dim, spectral=linalg.SpectralOptions(**fields))


def head_problems(fields: Mapping[str, Any]) -> list[str]:
    """Every problem with these `config.gcp` fields (`dim`: 0 for no reduction), one sentence each."""
    fields = dict(fields)
    problems = checks.integer_at_least("dim", fields.pop("dim", GCPHead.dim), 0)
    return problems + linalg.spectral_problems(fields, also_known=("dim",))
