"""Which part of the spectrum explains a class score (docs/method.md §5).

Σ^{1/2} = Q_large + Q_small, split at eigenvalue rank k (the k largest vs the rest), each
scaled by (1 + c) for SEB. A part is scored with the trained classifier,
s_y(Q_g) = w_yᵀ triu(Q_g) + b_y, and explained by
* occlusion (perturbation): Δ_g(p) = s_y(Q_g(x)) − s_y(Q_g(x with patch p blurred));
* Grad-CAM on the last backbone stage and gradient × input (back-propagation), through the
  exact VJP of `linalg.sqrtm_split`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gcp_jax import linalg
from gcp_jax.spectrum import require_gcp


def _part_scores_from_features(module, features, label, rank):
    """[B, 2] scores of the large and small parts for class `label`."""
    head = module.head
    if head.spectral.norm not in ("sqrt", "seb"):
        raise ValueError(
            f"Spectral attribution needs a square-root head (norm sqrt or seb), not {head.spectral.norm!r}."
        )
    cov = head.covariance(features, train=False)
    parts = linalg.sqrtm_split(cov, rank, eps=head.spectral.eps)
    if head.spectral.norm == "seb":
        parts = [linalg.seb_scale(cov, eps=head.spectral.eps)[:, None, None] * q for q in parts]
    return jnp.stack([module.classifier(linalg.triu_vec(q))[:, label] for q in parts], axis=-1)


def _part_scores(module, images, label, rank):
    return _part_scores_from_features(module, module.features(images, train=False), label, rank)


def part_scores(model, variables, images, label, rank):
    """s_y(Q_large), s_y(Q_small) per image: [B, 2]."""
    require_gcp(model)
    return model.apply(variables, images, label, rank, method=_part_scores)


def blur(image, sigma=4.0):
    """Separable Gaussian blur of an [H, W, C] image (edges replicated), the occluder's fill."""
    radius = int(3 * sigma)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(np.asarray(image, np.float64), ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(t * padded[i : i + image.shape[0]] for i, t in enumerate(taps))
    return sum(t * rows[:, i : i + image.shape[1]] for i, t in enumerate(taps)).astype(np.float32)


def occlusion_maps(model, variables, image, label, rank, *, patch=None, stride=None, batch_size=16):
    """Δ_g over a grid of blurred patches: [2, H, W] (large, small), upsampled to the image."""
    h, w = image.shape[:2]
    patch = patch or max(h // 8, 2)
    stride = stride or max(patch // 2, 1)
    blurred = blur(image)
    corners = [(i, j) for i in range(0, h - patch + 1, stride) for j in range(0, w - patch + 1, stride)]
    occluded = np.repeat(np.asarray(image, np.float32)[None], len(corners), axis=0)
    for n, (i, j) in enumerate(corners):
        occluded[n, i : i + patch, j : j + patch] = blurred[i : i + patch, j : j + patch]
    score = jax.jit(lambda x: part_scores(model, variables, x, label, rank))
    base = np.asarray(score(jnp.asarray(image)[None]))[0]
    perturbed = np.concatenate(
        [np.asarray(score(jnp.asarray(occluded[s : s + batch_size]))) for s in range(0, len(corners), batch_size)]
    )
    total, count = np.zeros((2, h, w)), np.zeros((h, w))
    for (i, j), s in zip(corners, perturbed):
        total[:, i : i + patch, j : j + patch] += (base - s)[:, None, None]
        count[i : i + patch, j : j + patch] += 1
    return total / np.maximum(count, 1)


def _features_and_grads(model, variables, image, label, rank):
    """Backbone map F [h, w, C] and ∂s_g/∂F for both parts [2, h, w, C]."""
    features = model.apply(variables, jnp.asarray(image)[None], method=lambda m, x: m.features(x, train=False))

    def scores(f):
        return model.apply(variables, f, label, rank, method=_part_scores_from_features)[0]

    return features[0], jax.jacrev(scores)(features)[:, 0]


def _upsample(maps, shape):
    return np.asarray(jax.image.resize(jnp.asarray(maps, jnp.float32), (maps.shape[0],) + shape, "bilinear"))


def gradcam_maps(model, variables, image, label, rank):
    """Grad-CAM of s_y(Q_g) on the last backbone stage: ReLU(Σ_c α_c F_c), α = spatial mean gradient."""
    require_gcp(model)
    features, grads = _features_and_grads(model, variables, image, label, rank)
    alpha = grads.mean(axis=(1, 2))  # [2, C]
    cams = jax.nn.relu(jnp.einsum("hwc,gc->ghw", features.astype(jnp.float32), alpha))
    return _upsample(np.asarray(cams), image.shape[:2])


def gradient_input_maps(model, variables, image, label, rank):
    """|∂s_y(Q_g)/∂x ⊙ x| summed over colour channels: [2, H, W]."""
    require_gcp(model)
    grads = jax.jacrev(lambda x: part_scores(model, variables, x[None], label, rank)[0])(jnp.asarray(image))
    return np.asarray(jnp.abs(jnp.sum(grads * jnp.asarray(image)[None], axis=-1)))


def attribution_maps(model, variables, image, label, rank):
    """All maps of one image: {"occlusion", "gradcam", "gradient_input"} → [2, H, W] (large, small)."""
    return {
        "occlusion": occlusion_maps(model, variables, image, label, rank),
        "gradcam": gradcam_maps(model, variables, image, label, rank),
        "gradient_input": gradient_input_maps(model, variables, image, label, rank),
    }
