"""Images of `synthetic_fgvc`: classes that share every first-order statistic and differ in the second.

Each image is a grey (0.5) canvas with a soft elliptical "object" filled with a sinusoidal
grating. A class fixes the grating orientation and the colour direction of its modulation: the
signs s ∈ {±1}³ with which the three channels follow the grating (all together = luminance, or
colour-opponent pairs). Every class therefore has the same mean colour and the same per-channel
variance; what separates them is the covariance between channels and between neighbouring
positions (orientation). Nuisances: position, size and rotation of the object, grating frequency
and phase, contrast, a background grating of random orientation whose channels are uncorrelated,
and pixel noise. Orientations lie in [0°, 90°], so a horizontal flip (θ → 180° − θ) never turns
one class into another. Pure NumPy and deterministic in (seed, split, class).
"""

import math

import numpy as np

COLOURS = (((1, 1, 1), "grey"), ((1, -1, 1), "magenta-green"), ((1, 1, -1), "yellow-blue"), ((-1, 1, 1), "cyan-red"))
_SPLIT_IDS = {"train": 0, "test": 1}


def class_grid(num_classes: int) -> tuple[int, int]:
    """(orientations, colours): up to 4 colour directions, 5 or more orientations."""
    colours = min(len(COLOURS), math.ceil(num_classes / 5))
    return math.ceil(num_classes / colours), colours


def class_attributes(label: int, num_classes: int) -> tuple[float, int]:
    """(orientation in degrees, colour index) of a class."""
    orientations, _ = class_grid(num_classes)
    step = 90.0 / max(orientations - 1, 1)
    return (label % orientations) * step, label // orientations


def class_names(num_classes: int) -> list[str]:
    """Readable names, e.g. '22.5deg magenta-green'."""
    names = []
    for label in range(num_classes):
        angle, colour = class_attributes(label, num_classes)
        names.append(f"{angle:g}deg {COLOURS[colour][1]}")
    return names


def generate(label: int, count: int, *, num_classes: int, size: int, split: str, seed: int = 0) -> np.ndarray:
    """`count` images of class `label`, uint8 [count, size, size, 3]."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], label])
    angle, colour = class_attributes(label, num_classes)
    orientations, _ = class_grid(num_classes)
    jitter = 0.15 * 90.0 / max(orientations - 1, 1)
    coords = (np.arange(size) + 0.5) / size
    y, x = coords[None, :, None], coords[None, None, :]

    def grating(theta_deg, cycles, phase):
        t = np.deg2rad(theta_deg)[:, None, None]
        along = x * np.cos(t) + y * np.sin(t)
        return np.sin(2 * np.pi * cycles[:, None, None] * along + phase[:, None, None])

    def u(lo, hi):
        return rng.uniform(lo, hi, count)

    theta = angle + rng.normal(0.0, jitter, count)
    texture = grating(theta, u(4.0, 7.0), u(0.0, 2 * np.pi))
    cx, cy, rx, ry, rot = u(0.35, 0.65), u(0.35, 0.65), u(0.22, 0.4), u(0.22, 0.4), u(0, np.pi)
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    c, s = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    dist = ((dx * c + dy * s) / rx[:, None, None]) ** 2 + ((dy * c - dx * s) / ry[:, None, None]) ** 2
    mask = 1.0 / (1.0 + np.exp(-8.0 * (1.0 - dist)))
    signs = np.asarray(COLOURS[colour][0], np.float64)
    fg = (u(0.12, 0.25)[:, None, None] * mask * texture)[..., None] * signs

    bg_theta, bg_cycles = u(0.0, 180.0), u(3.0, 8.0)
    bg = np.stack([grating(bg_theta, bg_cycles, u(0.0, 2 * np.pi)) for _ in range(3)], axis=-1)
    bg *= (u(0.04, 0.1)[:, None, None] * (1.0 - mask))[..., None]
    noise = rng.normal(0.0, 0.05, (count, size, size, 3))
    image = 0.5 + fg + bg + noise
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
