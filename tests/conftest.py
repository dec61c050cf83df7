"""Test setup: 8 fake CPU devices (parallelism tests), TensorFlow kept off accelerators, and one
persistent compilation cache for the whole session: every xdist worker and every train.py
subprocess reuses what another test compiled (programs are keyed by their content, so a test
never gets another program's executable)."""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # OpenBLAS threads (eigh on CPU) would fight XLA's

# The controller (or a run without xdist) makes the cache; the workers it starts inherit the variables.
_SESSION_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="gcp_jax_tests_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE  # never the user's own cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny test models compile fast
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture
def x64():
    """64-bit JAX for one test (jax is imported here, after the environment above is set)."""
    import jax

    with jax.enable_x64(True):
        yield


def pytest_collection_modifyitems(config, items):
    """Drop tf.test.TestCase.test_session (inherited by the TFDS builder tests): a helper, not a test."""
    items[:] = [item for item in items if item.name != "test_session"]


def pytest_unconfigure(config):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def training_streams_closed(monkeypatch):
    """Every training stream a test opens is closed when the test ends (see TrainBatches.close), not freed
    by the garbage collector in the middle of a later test."""
    from gcp_jax.data import pipeline

    opened, real_init = [], pipeline.TrainBatches.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(pipeline.TrainBatches, "__init__", init)
    yield
    for stream in opened:
        stream.close()
