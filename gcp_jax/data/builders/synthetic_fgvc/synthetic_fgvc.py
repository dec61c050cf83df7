"""synthetic_fgvc: the generated fine-grained data set (gcp_jax.data.synthetic) as a TFDS builder.

No download: the images are computed from a fixed seed, PNG-encoded (lossless, so that the
subtle second-order statistics survive) and written once into data_dir; later runs read them.
One config per size setting, named after it (e.g. `c10_train300_test50_px64`), so that
different settings are cached side by side.
"""

import contextlib
import dataclasses
import io
from collections.abc import Iterator
from typing import ClassVar

import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core.utils import tqdm_utils

from gcp_jax.data import synthetic


@dataclasses.dataclass
class SyntheticFgvcConfig(tfds.core.BuilderConfig):
    """Sizes of the generated set."""

    num_classes: int = 10
    train_per_class: int = 300
    test_per_class: int = 50
    image_size: int = 64


def synthetic_config(
    num_classes: int, train_per_class: int, test_per_class: int, image_size: int
) -> SyntheticFgvcConfig:
    """The config for these sizes, named after them."""
    return SyntheticFgvcConfig(
        name=f"c{num_classes}_train{train_per_class}_test{test_per_class}_px{image_size}",
        description=f"{num_classes} classes, {train_per_class}/{test_per_class} train/test images "
        f"per class, {image_size}x{image_size} px.",
        num_classes=num_classes,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        image_size=image_size,
    )


class SyntheticFgvc(tfds.core.GeneratorBasedBuilder):
    """Gratings whose classes differ only in orientation and colour correlation."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar = [synthetic_config(10, 300, 50, 64)]

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=synthetic.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(cfg.image_size, cfg.image_size, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=synthetic.class_names(cfg.num_classes)),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _download_and_prepare(self, dl_manager, download_config=None):
        """TFDS's generation without its progress bars: a few seconds of computing, nothing to watch."""
        with _no_progress_bars():
            super()._download_and_prepare(dl_manager, download_config)

    def _log_download_bytes(self):
        """One line instead of TFDS's "Downloading and preparing dataset Unknown size ..."."""
        cfg = self.builder_config
        images = cfg.num_classes * (cfg.train_per_class + cfg.test_per_class)
        print(f"Generating synthetic_fgvc ({images} images, {cfg.image_size} px) in {self.data_dir}, once.")

    def _log_download_done(self):
        """Nothing: TFDS would print that the data set was "downloaded"."""

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.train_per_class),
            "test": self._generate_examples("test", cfg.test_per_class),
        }

    def _generate_examples(self, split: str, per_class: int):
        cfg = self.builder_config
        for label in range(cfg.num_classes):
            images = synthetic.generate(label, per_class, num_classes=cfg.num_classes, size=cfg.image_size, split=split)
            for i, image in enumerate(images):
                name = f"{split}_{label:03d}_{i:05d}.png"
                out = io.BytesIO()
                Image.fromarray(image).save(out, format="PNG", compress_level=1)
                yield name, {"image": out.getvalue(), "label": label, "file_name": name}


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """TFDS's progress bars off, then back as they were."""
    shown = getattr(tqdm_utils, "_active", True)  # TFDS has a setter, no getter.
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(shown)
