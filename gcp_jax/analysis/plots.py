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
    return _save(truncation_figure(curves, baseline=baseline), path)


def truncation_figure(curves, *, baseline=None):
    """The truncation plot; its legend below the axes, where it hides no curve."""
    fig, ax = plt.subplots(figsize=(5.5, 4.4))
    for which, points in curves.items():
        ns, acc = zip(*points)
        ax.plot(ns, acc, marker="o", label=f"the {which} n set to ε")
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=0.8, zorder=0, label="no truncation (n = 0)")
    ax.set(
        xlabel="n: eigenvalues of each covariance set to ε at evaluation",
        ylabel="top-1 accuracy",
        ylim=(0, 1.02),
        title="Accuracy when eigenvalues are removed",
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False, fontsize=9)
    return fig


# Attribution methods and the two parts of Σ^½, in words.
METHODS = {
    "occlusion": "occlusion\n(score drop, patch blurred)",
    "gradcam": "Grad-CAM\n(last backbone stage)",
    "gradient_input": "gradient × input",
}


def plot_attribution_grid(images, maps, path, *, titles=None, rank=None, dim=None):
    """One row per image: the image, then each map (name → [2, H, W]: large, small) overlaid."""
    return _save(attribution_figure(images, maps, titles=titles, rank=rank, dim=dim), path)


def attribution_figure(images, maps, *, titles=None, rank=None, dim=None):
    """The attribution grid: columns titled in words (which method, which part of the spectrum: the
    `rank` largest of `dim` eigenvalues, or the others), one colour bar per column."""
    columns = [(name, part) for name in maps[0] for part in range(2)]
    fig, axes = plt.subplots(
        len(images), 1 + len(columns), figsize=(2.1 * (1 + len(columns)), 2.2 * len(images) + 1.2), squeeze=False
    )
    large = f"the {rank} largest" if rank else "large"
    small = (f"the other {dim - rank}" if dim else "the others") if rank else "small"
    parts = (f"{large} eigenvalues", f"{small} eigenvalues")
    for col, (name, part) in enumerate(columns, start=1):
        heats = [image_maps[name][part] for image_maps in maps]
        signed = any(h.min() < 0 for h in heats)
        for row, (image, heat) in enumerate(zip(images, heats)):
            ax = axes[row, col]
            ax.imshow(denormalize(image).mean(axis=-1), cmap="gray")
            shown = ax.imshow(
                heat / (np.max(np.abs(heat)) or 1.0), cmap="jet", alpha=0.5, vmin=-1 if signed else 0, vmax=1
            )
        axes[0, col].set_title(f"{METHODS.get(name, name)}\n{parts[part]}", fontsize=8)
        bar = fig.colorbar(shown, ax=axes[:, col], orientation="horizontal", fraction=0.05, pad=0.02)
        bar.ax.tick_params(labelsize=7)
    for row, image in enumerate(images):
        axes[row, 0].imshow(denormalize(image))
        axes[row, 0].set_title(titles[row] if titles else "image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    split = f", split after the {rank} largest eigenvalues" if rank else ""
    fig.suptitle(
        rf"Which pixels move the class score of each part of $\Sigma^{{1/2}} = Q_{{large}} + Q_{{small}}${split}"
        "\n(colours: each map divided by its largest |value|)",
        fontsize=10,
    )
    return fig
