"""The spectrum of a GCP model: each image's covariance Σ, its clamped eigenvalues, and their summaries.

Training logs `mean_summary` of the train batch to TensorBoard; `gcp_jax.analysis` builds the
spectra, truncation and attribution analyses on the same functions.
"""

from __future__ import annotations

import numpy as np

from gcp_jax import linalg


def require_gcp(model) -> None:
    """These functions read the GCP head's covariance: a `gap` model has none."""
    if getattr(model, "head", None) is None:
        raise ValueError(
            "This analysis needs a model with the GCP head (model.head='gcp'), not global average pooling."
        )


def head_covariance(module, images):
    """Flax method-function: the GCP head's Σ of the backbone map, eval mode."""
    return module.head.covariance(module.features(images, train=False), train=False)


def _head_eigenvalues(module, images):
    lam = linalg.eigenvalues(head_covariance(module, images))
    return linalg.clamp_eigenvalues(lam, module.head.spectral.eps)


def covariances(model, variables, images):
    """Σ per image [B, d, d] in the head's spectral dtype (eval mode)."""
    require_gcp(model)
    return model.apply(variables, images, method=head_covariance)


def eigenvalues(model, variables, images):
    """Ascending eigenvalues [B, d] of each image's covariance, clamped as the head clamps them (λ̂)."""
    require_gcp(model)
    return model.apply(variables, images, method=_head_eigenvalues)


def summarize(eigs, *, k=10):
    """Per-image statistics of clamped ascending eigenvalues [B, d] (numpy in, numpy out).

    condition: λ_max / λ_min; small_share: fraction of the trace in the k smallest eigenvalues;
    effective_rank: exp(entropy of λ/trace), between 1 and d.
    """
    eigs = np.asarray(eigs, np.float64)
    top = eigs[:, -1]
    trace = eigs.sum(axis=-1)
    p = eigs / trace[:, None]
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return {
        "lambda_max": top,
        "lambda_min": eigs[:, 0],
        "condition": top / eigs[:, 0],
        "small_share": eigs[:, :k].sum(axis=-1) / trace,
        "effective_rank": np.exp(entropy),
    }


def mean_summary(eigs, *, k=10):
    """Batch means of `summarize`, as plain floats (for TensorBoard and JSON)."""
    return {name: float(np.mean(v)) for name, v in summarize(eigs, k=k).items()}
