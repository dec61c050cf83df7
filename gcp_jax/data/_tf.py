"""Lazy, CPU-only TensorFlow and TFDS: the rest of gcp_jax never imports them."""

import functools
import os


@functools.cache
def tf():
    """The tensorflow module, hidden from GPUs so that JAX keeps the accelerator memory."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # No C++ INFO lines (oneDNN, CPU features) on import.
    import tensorflow  # pylint: disable=g-import-not-at-top

    try:
        tensorflow.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow was initialised before us; nothing left to hide.
        pass
    return tensorflow


@functools.cache
def tfds():
    """The tensorflow_datasets module, with this package's builders registered."""
    tf()
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top

    from gcp_jax.data import builders  # noqa: F401  (registers the own builders with TFDS)

    return tensorflow_datasets
