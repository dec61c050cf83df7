"""Lazy, CPU-only TensorFlow and TFDS: the rest of gcp_jax never imports them."""

import contextlib
import functools
import logging
import os
import re


@functools.cache
def tf():
    """The tensorflow module, hidden from GPUs so that JAX keeps the accelerator memory."""
    # Errors only from TensorFlow's C++ side: its INFO and WARNING lines (oneDNN, CPU features, rendezvous,
    # "All log messages before absl::InitializeLog()") are about TensorFlow, not the user's data.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    with contextlib.suppress(RuntimeError):  # TensorFlow was initialised before us; nothing left to hide.
        tensorflow.config.set_visible_devices([], "GPU")
    return tensorflow


@functools.cache
def tfds():
    """The tensorflow_datasets module, with this package's builders registered."""
    tf()
    import tensorflow_datasets

    from gcp_jax.data import builders  # noqa: F401  (registers the own builders with TFDS)

    for logger in ("absl", "tensorflow"):
        logging.getLogger(logger).addFilter(_drop_tfds_chatter)
    return tensorflow_datasets


_CHATTER = re.compile(
    r"`\w+\.dtype` is deprecated"  # TFDS's own decoders use the deprecated field.
    r"|From \S*tensorflow_datasets\S*: .* is deprecated"  # TensorFlow functions TFDS still calls.
    r"|Using custom data configuration: SyntheticFgvcConfig\("  # Every synthetic_fgvc size but the demo's.
)


def _drop_tfds_chatter(record: logging.LogRecord) -> bool:
    """False for TFDS warnings about TFDS's own code, which a user cannot act on; True for the rest."""
    return not _CHATTER.match(record.getMessage())
