"""The ImageNet input normalisation that every model, weight file and pipeline of gcp_jax shares.

Models take float images (x/255 − MEAN)/STD, per RGB channel: the statistics the torchvision and
keras.applications weights were trained with.
"""

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def denormalize(images):
    """Model inputs back to RGB in [0, 1] (for pictures)."""
    return np.clip(np.asarray(images) * STD + MEAN, 0.0, 1.0)
