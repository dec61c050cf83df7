"""The truncation experiment: accuracy when the n smallest (or largest) eigenvalues are set to eps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gcp_jax import batched_eigh, linalg
from gcp_jax.spectrum import head_covariance, require_gcp

WHICH = ("smallest", "largest")


def truncate_spectrum(cov, n, which):
    """Σ rebuilt with its n smallest or largest eigenvalues replaced by the clamp floor."""
    if which not in WHICH:
        raise ValueError(f"which={which!r} must be one of {', '.join(WHICH)}.")
    lam, u = batched_eigh.eigh(cov, symmetrize_input=True)
    d = lam.shape[-1]
    index = jnp.arange(d)
    hit = index < n if which == "smallest" else index >= d - n
    lam = jnp.where(hit, linalg.default_eps(lam), linalg.clamp_eigenvalues(lam))
    return (u * lam[..., None, :]) @ jnp.swapaxes(u, -1, -2)


def _truncated_logits(module, images, n, which):
    cov = head_covariance(module, images)
    if n:
        cov = truncate_spectrum(cov, n, which)
    return module.classifier(linalg.triu_vec(module.head.normalize(cov)))


def truncated_logits(model, variables, images, n, which="smallest"):
    """Logits of a trained GCP model with n eigenvalues of each covariance truncated (n = 0: unchanged)."""
    require_gcp(model)
    return model.apply(variables, images, n, which, method=_truncated_logits)


def truncation_curve(model, variables, batches, ns, which="smallest", *, progress=None):
    """Top-1 accuracy for each n in `ns` over the (masked) eval batches: [(n, accuracy)]."""
    batches = list(batches)
    results = []
    for n in ns:
        fn = jax.jit(functools.partial(truncated_logits, model, n=int(n), which=which))
        correct = total = 0
        for batch in batches:
            keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)))
            predicted = np.asarray(jnp.argmax(fn(variables, jnp.asarray(batch["image"])), axis=-1))
            correct += int(np.sum((predicted == np.asarray(batch["label"])) & keep))
            total += int(keep.sum())
        results.append((int(n), correct / max(total, 1)))
        if progress:
            progress(f"truncate {which} n={n}: top1 {results[-1][1]:.4f}")
    return results
