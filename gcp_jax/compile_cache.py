"""The persistent XLA compilation cache: a restarted or re-evaluated run reuses its compiled steps.

A preempted job pays set-up and compilation again on every restart (tens of seconds on a CPU for
EfficientNet-B0 at 448 px, minutes for B5). JAX can keep compiled executables on disk, keyed by
the program, the devices and the jax/XLA versions, so the same command (or another run of the
same model) skips compilation. The cache is shared by all runs and workdirs of a user; entries
are derived data: deleting the directory at any time is safe. A damaged entry (a process killed
while writing it) is reported by JAX as a warning and compiled afresh.
"""

import logging
import os

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

DEFAULT = "auto"  # config.compile_cache_dir's default: $JAX_COMPILATION_CACHE_DIR, else default_dir()
# Compilations shorter than this are not worth a file: reading one back costs about as much.
MIN_COMPILE_TIME_S = 0.5

_LOGGER = logging.getLogger("gcp_jax")


def default_dir() -> str:
    """$XDG_CACHE_HOME/gcp_jax/xla, ~/.cache/gcp_jax/xla when XDG_CACHE_HOME is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gcp_jax", "xla")


def resolve(directory: str = DEFAULT) -> str:
    """The directory `directory` stands for: DEFAULT → JAX_COMPILATION_CACHE_DIR if set, else
    default_dir(); '' → '' (no cache); any other path → itself, with ~ expanded."""
    if directory == DEFAULT:
        return os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir()
    return os.path.abspath(os.path.expanduser(directory)) if directory else ""


def enable(directory: str = DEFAULT) -> str:
    """Points JAX's persistent compilation cache at resolve(directory) ('' turns it off).

    Returns the directory in use ('' when off). An unusable directory (not creatable, not
    writable) costs a warning and the run goes on without a cache. Call before the first
    compilation you want cached; calling again with another directory switches caches.
    """
    path = resolve(directory)
    if path:
        try:
            os.makedirs(path, exist_ok=True)
            usable = os.access(path, os.W_OK | os.X_OK)
        except OSError:
            usable = False
        if not usable:
            _LOGGER.warning(
                f"compile cache: cannot write to {path}; compiling afresh each run "
                "(set --config.compile_cache_dir to a writable directory, or '' to silence this)."
            )
            path = ""
    if path != (jax.config.jax_compilation_cache_dir or ""):
        jax_cache.reset_cache()  # JAX opens its cache once per process: let it reopen at the new path
    jax.config.update("jax_compilation_cache_dir", path or None)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's own choice wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    return path
