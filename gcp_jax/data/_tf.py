"""Lazy, CPU-only TensorFlow and TFDS: the rest of gcp_jax never imports them."""

import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator


@functools.cache
def tf():
    """The tensorflow module, hidden from GPUs so that JAX keeps the accelerator memory."""
    # Errors only from TensorFlow's C++ side: its INFO and WARNING lines (CPU features, rendezvous, ...)
    # are about TensorFlow, not the user's data.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with start_up_noise_dropped():
        import tensorflow

    with contextlib.suppress(RuntimeError):  # TensorFlow was initialised before us; nothing left to hide.
        tensorflow.config.set_visible_devices([], "GPU")
    return tensorflow


@functools.cache
def tfds():
    """The tensorflow_datasets module, with this package's builders registered."""
    tf()
    with start_up_noise_dropped():
        import tensorflow_datasets

        from gcp_jax.data import builders  # noqa: F401  (registers the own builders with TFDS)

    for logger in ("absl", "tensorflow"):
        logging.getLogger(logger).addFilter(_drop_tfds_chatter)
    return tensorflow_datasets


# absl's C++ log line: severity, MMDD, time (before set-up "00:00:<seconds since 1970>"), thread, file:line].
_LOG_LINE = re.compile(rb"([IWEF])\d{4} [\d:.]+ +\d+ [^\s\]]+:\d+\] ")
_SEVERITIES = b"IWEF"  # TF_CPP_MIN_LOG_LEVEL 1 drops I, 2 also W, 3 also E.
_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def is_start_up_noise(line: bytes, min_level: int) -> bool:
    """True for what TensorFlow's shared libraries log while loading, before they read TF_CPP_MIN_LOG_LEVEL
    (`min_level`): C++ log lines below that level ("oneDNN custom operations are on", on CPUs where oneDNN is
    on by default) and absl's banner that logging is not set up yet. Nothing is noise at level 0."""
    if min_level <= 0:
        return False
    if line.rstrip(b"\r\n") == _BANNER:
        return True
    match = _LOG_LINE.match(line)
    return bool(match) and _SEVERITIES.index(match[1]) < min_level


def _min_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def start_up_noise_dropped() -> Iterator[None]:
    """Holds file descriptor 2 in a file meanwhile, then passes on all but `is_start_up_noise` lines.

    TensorFlow logs from its libraries' static initialisers, at load time, so only the file descriptor
    (not sys.stderr, nor TF_CPP_MIN_LOG_LEVEL) can hold the lines back. Anything else written meanwhile
    (a Python warning, an error, another thread's line) appears afterwards, in order.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # No stderr at all: nothing to keep clean.
        yield
        return
    level = _min_log_level()
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = b"".join(line for line in held if not is_start_up_noise(line, level))
            while kept:
                kept = kept[os.write(2, kept) :]


_CHATTER = re.compile(
    r"`\w+\.dtype` is deprecated"  # TFDS's own decoders use the deprecated field.
    r"|From \S*tensorflow_datasets\S*: .* is deprecated"  # TensorFlow functions TFDS still calls.
    r"|Using custom data configuration: SyntheticFgvcConfig\("  # Every synthetic_fgvc size but the demo's.
)


def _drop_tfds_chatter(record: logging.LogRecord) -> bool:
    """False for TFDS warnings about TFDS's own code, which a user cannot act on; True for the rest."""
    return not _CHATTER.match(record.getMessage())
