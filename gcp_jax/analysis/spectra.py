"""Eigenvalue spectra of the GCP covariance: per image, per class, and their summaries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gcp_jax import linalg


def require_gcp(model):
    """The analyses read the GCP head's covariance: a `gap` model has none."""
    if getattr(model, "head", None) is None:
        raise ValueError(
            "This analysis needs a model with the GCP head (model.head='gcp'), not global average pooling."
        )


def head_covariance(module, images):
    """Flax method-function: the GCP head's Σ of the backbone map, eval mode."""
    return module.head.covariance(module.features(images, train=False), train=False)


def covariances(model, variables, images):
    """Σ per image [B, d, d] in the head's spectral dtype (eval mode)."""
    require_gcp(model)
    return model.apply(variables, images, method=head_covariance)


def eigenvalues(model, variables, images):
    """Ascending eigenvalues [B, d] of each image's covariance."""
    return linalg.eigenvalues(covariances(model, variables, images))


def clamp(eigs):
    """Eigenvalues [B, d] floored at max(ε₃₂·λ_max, 1e-20) per image, the clamp of the float32 layer."""
    eigs = np.asarray(eigs, np.float64)
    floor = np.maximum(np.finfo(np.float32).eps * eigs[:, -1:], 1e-20)
    return np.maximum(eigs, floor)


def summarize(eigs, *, k=10):
    """Per-image spectrum statistics from ascending eigenvalues [B, d] (numpy in, numpy out).

    condition: λ_max / λ_min after the clamp (`clamp`); small_share: fraction of the trace in the
    k smallest eigenvalues; effective_rank: exp(entropy of λ/trace), between 1 and d.
    """
    eigs = clamp(eigs)
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


def per_class_log_spectrum(eigs, labels, num_classes):
    """Mean log10 eigenvalue per class and rank, [num_classes, d] (NaN for absent classes)."""
    logs = np.log10(clamp(eigs))
    out = np.full((num_classes, logs.shape[1]), np.nan)
    for c in np.unique(labels):
        out[c] = logs[labels == c].mean(axis=0)
    return out


def collect(model, variables, batches, *, max_images=None):
    """Eigenvalues and labels over eval batches (masked padding dropped)."""
    fn = jax.jit(lambda v, x: eigenvalues(model, v, x))
    eigs, labels = [], []
    for batch in batches:
        keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)))
        eigs.append(np.asarray(fn(variables, jnp.asarray(batch["image"])))[keep])
        labels.append(np.asarray(batch["label"])[keep])
        if max_images and sum(map(len, labels)) >= max_images:
            break
    eigs, labels = np.concatenate(eigs), np.concatenate(labels)
    return (eigs[:max_images], labels[:max_images]) if max_images else (eigs, labels)
