"""Eigenvalue spectra of a trained model over a data set: collected per image, averaged per class."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gcp_jax import spectrum


def per_class_log_spectrum(eigs, labels, num_classes):
    """Mean log10 eigenvalue per class and rank, [num_classes, d] (NaN for absent classes)."""
    logs = np.log10(np.asarray(eigs, np.float64))
    out = np.full((num_classes, logs.shape[1]), np.nan)
    for c in np.unique(labels):
        out[c] = logs[labels == c].mean(axis=0)
    return out


def collect(model, variables, batches, *, max_images=None):
    """Clamped eigenvalues and labels over eval batches (masked padding dropped)."""
    fn = jax.jit(lambda v, x: spectrum.eigenvalues(model, v, x))
    eigs, labels = [], []
    for batch in batches:
        keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)))
        eigs.append(np.asarray(fn(variables, jnp.asarray(batch["image"])))[keep])
        labels.append(np.asarray(batch["label"])[keep])
        if max_images and sum(map(len, labels)) >= max_images:
            break
    eigs, labels = np.concatenate(eigs), np.concatenate(labels)
    return (eigs[:max_images], labels[:max_images]) if max_images else (eigs, labels)
