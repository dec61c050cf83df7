"""Pictures of the analyses (matplotlib, Agg backend): spectra, truncation curves, attribution grids."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from gcp_jax.imagenet import denormalize


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_spectra(eigs, labels, class_log_spectrum, path, *, class_names=None, max_lines=40):
    """Left: per-image spectra (descending, log scale); right: per-class mean log spectrum."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ranks = np.arange(1, eigs.shape[1] + 1)
    colours = plt.cm.tab10(np.asarray(labels) % 10)
    for e, colour in list(zip(eigs, colours))[:max_lines]:
        left.semilogy(ranks, e[::-1], color=colour, alpha=0.5, lw=0.8)
    left.set(
        xlabel="eigenvalue rank (largest first)",
        ylabel="λ (clamped at ε·λ_max)",
        title=f"per image ({min(len(eigs), max_lines)} shown)",
    )
    for c, row in enumerate(class_log_spectrum):
        if np.all(np.isnan(row)):
            continue
        name = class_names[c] if class_names is not None else str(c)
        right.plot(ranks, row[::-1], color=plt.cm.tab10(c % 10), lw=1, label=name if c < 10 else None)
    right.set(xlabel="eigenvalue rank (largest first)", ylabel="mean log10 λ", title="per class")
    right.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_truncation(curves, path, *, baseline=None):
    """Accuracy against the number of truncated eigenvalues, one line per `which`."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for which, points in curves.items():
        ns, acc = zip(*points)
        ax.plot(ns, acc, marker="o", label=f"{which} n set to eps")
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=0.8, label="no truncation")
    ax.set(xlabel="n eigenvalues truncated", ylabel="top-1 accuracy", ylim=(0, 1.02), title="Truncation experiment")
    ax.legend()
    return _save(fig, path)


def plot_attribution_grid(images, maps, path, *, titles=None):
    """One row per image: the image, then each map (name → [2, H, W]: large, small) overlaid."""
    columns = [(name, part) for name in maps[0] for part in range(2)]
    fig, axes = plt.subplots(
        len(images), 1 + len(columns), figsize=(2.1 * (1 + len(columns)), 2.2 * len(images)), squeeze=False
    )
    for row, (image, image_maps) in enumerate(zip(images, maps)):
        rgb = denormalize(image)
        axes[row, 0].imshow(rgb)
        axes[row, 0].set_title(titles[row] if titles else "image", fontsize=8)
        for col, (name, part) in enumerate(columns, start=1):
            heat = image_maps[name][part]
            scale = np.max(np.abs(heat)) or 1.0
            axes[row, col].imshow(rgb.mean(axis=-1), cmap="gray")
            axes[row, col].imshow(heat / scale, cmap="jet", alpha=0.5, vmin=-1 if heat.min() < 0 else 0, vmax=1)
            axes[row, col].set_title(f"{name}: {('large', 'small')[part]}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    return _save(fig, path)
