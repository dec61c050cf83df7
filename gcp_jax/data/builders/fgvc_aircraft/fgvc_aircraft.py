"""FGVC-Aircraft 2013b (Maji et al., 2013) as a TFDS builder.

Labels at the variant (100 classes), family (70) or manufacturer (30) level, one config each;
splits `trainval` (6,667 images) and `test` (3,333), the standard fine-grained protocol. Class
names are the archive's own (`variants.txt`, `families.txt`, `manufacturers.txt`), e.g.
"F/A-18" or "Cessna 172". As the archive's README asks, the 20-pixel copyright banner at the
bottom of every image is cropped away (the crop is re-encoded as JPEG, quality 95); the bounding
box (`data/images_box.txt`, 1-based pixel corners) is given relative to the cropped image.
The archive is read from manual_dir (as downloaded or extracted) or else downloaded.
"""

import dataclasses
import io
from typing import ClassVar

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from gcp_jax.data.builders import _files
from gcp_jax.data.errors import MissingDataError, missing_data_message

HOMEPAGE = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/"
URL = HOMEPAGE + "archives/fgvc-aircraft-2013b.tar.gz"
ARCHIVE = "fgvc-aircraft-2013b.tar.gz"
ARCHIVE_MD5 = "d4acdd33327262359767eeaa97a4f732"
BANNER = 20
LEVEL_FILES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
SPLITS = ("trainval", "test")
_EXPECTED = f"{ARCHIVE} (2.75 GB) or its extracted fgvc-aircraft-2013b/ folder"
_CITATION = """@techreport{maji13fine-grained,
  title = {Fine-Grained Visual Classification of Aircraft},
  author = {S. Maji and J. Kannala and E. Rahtu and M. Blaschko and A. Vedaldi},
  year = {2013}, eprint = {1306.5151}, archivePrefix = {arXiv}}"""


@dataclasses.dataclass
class FgvcAircraftConfig(tfds.core.BuilderConfig):
    """Which level of the aircraft hierarchy is the label."""

    level: str = "variant"


class FgvcAircraft(tfds.core.GeneratorBasedBuilder):
    """FGVC-Aircraft 2013b: image, label, file name, bounding box; banner cropped."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar = [
        FgvcAircraftConfig(name=level, level=level, description=f"Labels are aircraft {level} names.")
        for level in LEVEL_FILES
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Optional: put {_EXPECTED} in manual_dir to avoid the download from {URL}."

    def _info(self) -> tfds.core.DatasetInfo:
        return _files.fgvc_info(self, description=__doc__, homepage=HOMEPAGE, citation=_CITATION)

    def _split_generators(self, dl_manager):
        data = self._find_data(dl_manager)
        level = self.builder_config.level
        self.info.features["label"].names = _read_lines(data / LEVEL_FILES[level])
        boxes = {image_id: [int(v) for v in rest.split()] for image_id, rest in _read_pairs(data / "images_box.txt")}
        return {split: self._generate_examples(data, data / f"images_{level}_{split}.txt", boxes) for split in SPLITS}

    def _find_data(self, dl_manager) -> epath.Path:
        """The archive's data/ folder: from manual_dir if there, else downloaded."""
        found = _files.find(_files.search_roots(dl_manager, {ARCHIVE: ARCHIVE_MD5}), "images_box.txt")
        if found is None:
            message = missing_data_message("fgvc_aircraft", _EXPECTED, _files.manual_dir_name(dl_manager), URL)
            try:
                archive = dl_manager.download(URL)
            except Exception as e:  # offline, proxy, server down
                reason = (str(e).splitlines() or [""])[0][:200]
                raise MissingDataError(f"{message} (The download failed: {type(e).__name__}: {reason})") from None
            _files.check_md5(archive, ARCHIVE_MD5)
            found = _files.find([dl_manager.extract(archive)], "images_box.txt")
            if found is None:
                raise MissingDataError(f"{message} (The archive has no data/images_box.txt.)")
        return found.parent

    def _generate_examples(self, data: epath.Path, list_file: epath.Path, boxes: dict):
        def example(pair):
            image_id, _ = pair
            image, height, width = _crop_banner(data / "images" / f"{image_id}.jpg")
            return image_id, {
                "image": image,
                "label": pair[1],
                "file_name": f"{image_id}.jpg",
                "bbox": _files.bbox(*boxes[image_id], height=height, width=width),
            }

        yield from _files.parallel_map(example, _read_pairs(list_file))


def _read_lines(path: epath.Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_pairs(path: epath.Path) -> list[tuple[str, str]]:
    """'<image id> <rest of the line>' lines, e.g. '1025794 F/A-18'; the rest may contain spaces."""
    return [tuple(line.split(" ", 1)) for line in _read_lines(path)]


def _crop_banner(path: epath.Path) -> tuple[bytes, int, int]:
    """JPEG bytes of the image without its bottom banner, and the new height and width."""
    with path.open("rb") as f:
        image = Image.open(f).convert("RGB")
    width, height = image.size
    out = io.BytesIO()
    image.crop((0, 0, width, height - BANNER)).save(out, format="JPEG", quality=95)
    return out.getvalue(), height - BANNER, width
