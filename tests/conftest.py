"""Test setup: 8 fake CPU devices (parallelism tests), TensorFlow kept off accelerators."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # OpenBLAS threads (eigh on CPU) would fight XLA's


def pytest_collection_modifyitems(config, items):
    """Drop tf.test.TestCase.test_session (inherited by the TFDS builder tests): a helper, not a test."""
    items[:] = [item for item in items if item.name != "test_session"]
