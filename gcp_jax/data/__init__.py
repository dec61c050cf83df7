"""Input pipelines for fine-grained recognition: TFDS data sets, own builders, image folders, demo data.

The trainer's interface (host-local numpy batches, ImageNet-normalised NHWC float32 images):

    info = data.dataset_info(config.data)
    for batch in data.train_batches(config.data, batch_size=b, seed=s, start_step=k): ...
    for batch in data.eval_batches(config.data, batch_size=b): ...  # has a bool "mask"

Importing this package does not import TensorFlow; the first call does (CPU only).
"""

from gcp_jax.config import data_config as default_config
from gcp_jax.data.errors import CorruptImageError, MissingDataError
from gcp_jax.data.pipeline import (
    DatasetInfo,
    EvalBatches,
    TrainBatches,
    dataset_info,
    eval_batches,
    steps_per_epoch,
    train_batches,
)

__all__ = [
    "CorruptImageError",
    "DatasetInfo",
    "EvalBatches",
    "MissingDataError",
    "TrainBatches",
    "dataset_info",
    "default_config",
    "eval_batches",
    "steps_per_epoch",
    "train_batches",
]
