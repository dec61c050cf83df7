"""Stanford Cars (Krause et al., 2013) as a TFDS builder, from files downloaded by hand.

196 classes (make, model, year; e.g. "Ram C/V Cargo Van Minivan 2012"), `train` (8,144 images)
and `test` (8,041), with bounding boxes. The original download page is gone (and so is the URL of
TFDS's `cars196`), so the files come from a mirror into manual_dir, in any of these forms:
the original archives `car_devkit.tgz`, `cars_train.tgz`, `cars_test.tgz` plus
`cars_test_annos_withlabels.mat`, or their extracted contents (`devkit/cars_meta.mat`,
`devkit/cars_train_annos.mat`, `cars_train/`, `cars_test/`; folders may be nested one level, as
in the Kaggle copy). Images are stored as they come; boxes are the devkit's 1-based pixel corners,
normalised.
"""

from typing import ClassVar

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from gcp_jax.data.builders import _files

HOMEPAGE = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
SOURCE = (
    "a mirror of the original (the page is gone), e.g. https://www.kaggle.com/datasets/"
    "jessicali9530/stanford-cars-dataset for the images and https://github.com/pytorch/vision/"
    "issues/7545 for car_devkit.tgz and cars_test_annos_withlabels.mat"
)
ARCHIVES = {"car_devkit.tgz": None, "cars_train.tgz": None, "cars_test.tgz": None}
EXPECTED = (
    "cars_meta.mat, cars_train_annos.mat (from car_devkit.tgz), cars_test_annos_withlabels.mat "
    "and the cars_train/ and cars_test/ image folders (or cars_train.tgz, cars_test.tgz)"
)
_CITATION = """@inproceedings{krause20133d,
  title = {3D Object Representations for Fine-Grained Categorization},
  author = {Jonathan Krause and Michael Stark and Jia Deng and Li Fei-Fei},
  booktitle = {4th International IEEE Workshop on 3D Representation and Recognition (3dRR-13)},
  year = {2013}}"""


class StanfordCars(tfds.core.GeneratorBasedBuilder):
    """Stanford Cars: image, label, file name, bounding box."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put {EXPECTED} in manual_dir; get them from {SOURCE}."

    def _info(self) -> tfds.core.DatasetInfo:
        return _files.fgvc_info(self, description=__doc__, homepage=HOMEPAGE, citation=_CITATION)

    def _split_generators(self, dl_manager):
        files = _files.require(
            _files.search_roots(dl_manager, ARCHIVES),
            ["cars_meta.mat", "cars_train_annos.mat", "cars_test_annos_withlabels.mat"],
            dirs=["cars_train", "cars_test"],
            dataset="stanford_cars",
            expected=EXPECTED,
            dl_manager=dl_manager,
            source=SOURCE,
        )
        self.info.features["label"].names = [
            str(n) for n in np.atleast_1d(_load_mat(files["cars_meta.mat"])["class_names"])
        ]
        return {
            "train": self._generate_examples(files["cars_train_annos.mat"], _images(files["cars_train"])),
            "test": self._generate_examples(files["cars_test_annos_withlabels.mat"], _images(files["cars_test"])),
        }

    def _generate_examples(self, annotations: epath.Path, images: epath.Path):
        annos = np.atleast_1d(_load_mat(annotations)["annotations"])

        def example(anno):
            name = str(anno["fname"])
            with (images / name).open("rb") as f:
                width, height = Image.open(f).size
            box = [float(anno[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")]
            return name, {
                "image": images / name,
                "label": int(anno["class"]) - 1,
                "file_name": name,
                "bbox": _files.bbox(*box, height=height, width=width),
            }

        yield from _files.parallel_map(example, annos)


def _load_mat(path: epath.Path) -> dict:
    with path.open("rb") as f:
        return scipy.io.loadmat(f, squeeze_me=True)


def _images(folder: epath.Path) -> epath.Path:
    """The folder holding the JPEGs: the Kaggle copy nests cars_train/cars_train/."""
    while (folder / folder.name).is_dir():
        folder = folder / folder.name
    return folder
