"""Where examples come from: TFDS builders (the catalog's and ours) and image folders, one interface.

A `Source` knows its class names and split sizes, resolves TFDS split specs ("train[:90%]",
"train+validation", `tfds.even_splits` parts) to example counts, and reads a split as a
tf.data.Dataset of {"image": encoded bytes, "label": int32, "file_name": string}.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath

from gcp_jax.data import _tf, offline
from gcp_jax.data.errors import MissingDataError, missing_data_message

# The data sets of gcp_jax/data/builders (a test checks that these are the ones registered with TFDS).
OWN_BUILDERS = ("fgvc_aircraft", "stanford_cars", "synthetic_fgvc")
IMAGE_FOLDER = "image_folder"
FOLDER_SPLITS = ("train", "trainval", "val", "validation", "test")
TRAIN_FOLDERS = ("train", "trainval")
_NAMED_MAX = 20  # Ignored files named in one log line.
log = logging.getLogger("gcp_jax.data")
_FILE_NAME_KEYS = ("file_name", "image/filename", "id")  # What the catalog's builders call it.
KNOWN = (
    f"{', '.join(OWN_BUILDERS)} (fgvc_aircraft/variant, /family or /manufacturer), {IMAGE_FOLDER}, or a TFDS "
    "catalog name such as caltech_birds2011, stanford_dogs, oxford_flowers102, i_naturalist2017"
)


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """A data set's metadata and a reader of its splits (hashed by identity: one per opened data set)."""

    name: str
    class_names: tuple[str, ...]
    split_sizes: Mapping[str, int]
    read: Callable[..., Any]  # read(split, *, shuffle_files: bool, seed: int | None) -> tf.data.Dataset
    skipped: set[str] = dataclasses.field(default_factory=set)  # Undecodable files already named in the log.

    def ranges(self, split) -> list[tuple[str, int, int]]:
        """The (split name, start, stop) ranges that a split spec or sub-split selects."""
        return _ranges(self.name, self.split_sizes, split)

    def num_examples(self, split) -> int:
        return sum(stop - start for _, start, stop in self.ranges(split))


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [""])[0]


def _ranges(name: str, sizes: Mapping[str, int], split) -> list[tuple[str, int, int]]:
    """Resolves `split` with TFDS's own slicing rules against split sizes {name: count}."""
    tfds = _tf.tfds()
    spec = tfds.core.ReadInstruction.from_spec(split) if isinstance(split, str) else split
    infos = {k: types.SimpleNamespace(num_examples=v, shard_lengths=[v]) for k, v in sizes.items()}
    try:
        absolute = spec.to_absolute(infos)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"Split {split!r} of data set {name!r} is invalid ({e}); its splits are {dict(sizes)}."
        ) from None
    return [(a.splitname, a.from_ or 0, sizes[a.splitname] if a.to is None else a.to) for a in absolute]


def open_source(cfg) -> Source:
    """The source that `cfg` (a resolved data config) names, prepared if it is a TFDS builder."""
    synthetic = tuple(cfg.synthetic[k] for k in ("num_classes", "train_per_class", "test_per_class", "image_size"))
    return _open(cfg.name, cfg.data_dir, cfg.manual_dir, synthetic)


@functools.lru_cache(maxsize=8)
def _open(name: str, data_dir: str, manual_dir: str, synthetic: tuple[int, ...]) -> Source:
    if name == IMAGE_FOLDER:
        return _image_folder(manual_dir)
    return _tfds_source(name, data_dir, manual_dir, synthetic)


def _tfds_source(name: str, data_dir: str, manual_dir: str, synthetic: tuple[int, ...]) -> Source:
    tfds = _tf.tfds()
    kwargs = {"data_dir": data_dir or None}
    if name == "synthetic_fgvc":
        from gcp_jax.data.builders import synthetic_config

        config = synthetic_config(*synthetic)
        predefined = {c.name for c in tfds.builder_cls(name).BUILDER_CONFIGS}
        kwargs["config"] = config.name if config.name in predefined else config
    try:
        builder = tfds.builder(name, **kwargs)
    except ValueError as e:  # tfds.core.registered.DatasetNotFoundError, or an unknown config.
        raise ValueError(f"Unknown data set {name!r} ({_first_line(e)}); use {KNOWN}.") from None
    if not (builder.data_path.exists() and builder.is_prepared()):  # (TFDS warns about a folder it lacks.)
        _prepare(builder, manual_dir)
    file_key = next((k for k in _FILE_NAME_KEYS if k in builder.info.features), None)
    return Source(
        name=name,
        class_names=tuple(builder.info.features["label"].names),
        split_sizes={k: v.num_examples for k, v in builder.info.splits.items()},
        read=functools.partial(_read_tfds, builder, file_key),
    )


def _prepare(builder, manual_dir: str) -> None:
    """download_and_prepare; a catalog builder's failure becomes a MissingDataError saying what to fetch.

    An unreachable download fails at once, and a failure leaves data_dir as it was (see `offline`).
    """
    tfds = _tf.tfds()
    root = os.fspath(builder.data_dir_root)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    try:
        with offline.removed_on_failure(root), offline.downloads_fail_fast():
            builder.download_and_prepare(download_config=config)
    except MissingDataError as e:
        raise MissingDataError(str(e)) from None  # The own builders' message, without TFDS's stack.
    except Exception as e:
        if builder.name in OWN_BUILDERS:
            raise
        manual = manual_dir or os.path.join(root, "downloads", "manual")
        raise MissingDataError(
            _catalog_message(builder, manual)
            + f" (Preparing it failed with {type(e).__name__}: {_first_line(e)[:200]})"
        ) from e


def _catalog_message(builder, manual: str) -> str:
    """What a TFDS catalog data set downloads, from its registered checksums."""
    try:
        urls = type(builder).url_infos or {}
    except Exception:  # Some builders keep no checksums.
        urls = {}
    named = {}  # {file name: its URLs}: a file may have several (a mirror, an old address).
    for url, info in urls.items():
        if info.filename:
            named.setdefault(info.filename, []).append(url)
    if named:
        files = ", ".join(sorted(named))
        sources = ", ".join(f"{' or '.join(found)} ({fname})" for fname, found in sorted(named.items()))
        return missing_data_message(builder.name, files, manual, sources)
    return (
        f"Data set {builder.name!r} is not prepared and TFDS could not download it; TFDS cannot read its "
        f"files from a manual folder, so prepare it where downloads work (`tfds build {builder.name} "
        f"--data_dir DIR`) and copy DIR to data.data_dir (see {builder.info.homepage})."
    )


def _read_tfds(builder, file_key: str | None, split, *, shuffle_files: bool, seed: int | None):
    """The split as encoded examples (images are not decoded here, nor other features at all)."""
    tf, tfds = _tf.tf(), _tf.tfds()
    wanted = {"image": True, "label": True, **({file_key: True} if file_key else {})}
    ds = builder.as_dataset(
        split=split,
        shuffle_files=shuffle_files,
        decoders=tfds.decode.PartialDecoding(wanted, decoders={"image": tfds.decode.SkipDecoding()}),
        # Without a file name feature, TFDS's example id ("<file>__<index>") names an example.
        read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False, add_tfds_id=file_key is None),
    )

    def select(ex):
        name = ex[file_key or "tfds_id"]
        if name.dtype != tf.string:
            name = tf.strings.as_string(name)
        return {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32), "file_name": name}

    return ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)


def _image_folder(root: str) -> Source:
    """A folder of class subfolders, or of split subfolders (train/, test/, ...) of class subfolders.

    Hidden folders (names starting with "." or "_", e.g. .ipynb_checkpoints, __MACOSX) and hidden
    files (".DS_Store") are ignored; other files that are not images are named in the log; a class
    folder without images is left out with a warning; a class without training images is an error.
    """
    if not root or not epath.Path(root).is_dir():
        raise MissingDataError(
            f"image_folder needs data.manual_dir to be a folder with one subfolder of images per "
            f"class (optionally inside train/ and test/ folders); got {root!r}."
        )
    base = epath.Path(root)
    subdirs = [p for p in base.iterdir() if p.is_dir() and not _hidden(p)]
    if subdirs and all(p.name in FOLDER_SPLITS for p in subdirs):
        split_dirs = {p.name: p for p in subdirs}
    else:
        split_dirs = {"train": base}
    listed = {split: _class_images(base, folder) for split, folder in split_dirs.items()}
    _check_train_classes(listed, root)
    classes = sorted({c for per_class in listed.values() for c in per_class})
    index = {name: i for i, name in enumerate(classes)}
    files = {}
    for split, per_class in listed.items():
        found = [(path, index[c]) for c, paths in per_class.items() for path in paths]
        # A fixed pseudo-random order (by name hash), so that "train[:90%]" is a random 90 %.
        files[split] = sorted(found, key=lambda f: hashlib.md5(f[0].encode()).hexdigest())
    if not any(files.values()):
        raise MissingDataError(
            f"image_folder found no images (files Pillow reads, such as .jpg, .png, .webp, .tif) in class "
            f"subfolders of {root}; put each class's images in a subfolder named after the class."
        )
    sizes = {k: len(v) for k, v in files.items()}
    return Source(
        name=IMAGE_FOLDER,
        class_names=tuple(classes),
        split_sizes=sizes,
        read=functools.partial(_read_folder, base, files, sizes),
    )


@functools.cache
def image_extensions() -> frozenset[str]:
    """The file extensions (lower case, with the dot) of every format Pillow can open."""
    from PIL import Image, ImageFile

    def readable(fmt):  # Stub plugins (HDF5, GRIB, BUFR) only recognise files; they cannot read them.
        factory = Image.OPEN.get(fmt, (None,))[0]
        return factory is not None and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))

    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if readable(fmt))


def _hidden(path: epath.Path) -> bool:
    """A hidden folder (".git", "__MACOSX", "_build") or file (".DS_Store", "._photo.jpg")."""
    return path.name.startswith(".") or (path.name.startswith("_") and path.is_dir())


def _class_images(base: epath.Path, folder: epath.Path) -> dict[str, list[str]]:
    """{class: its image files relative to base} of the class subfolders of `folder`, logging the rest."""
    images, ignored, extensions = {}, [], image_extensions()
    for entry in sorted(p for p in folder.iterdir() if not _hidden(p)):
        if not entry.is_dir():
            ignored.append(entry)  # Not inside a class folder.
            continue
        found = []
        for path in sorted(p for p in entry.iterdir() if not _hidden(p)):
            (found if path.suffix.lower() in extensions else ignored).append(path)
        if found:
            images[entry.name] = [os.fspath(p.relative_to(base)) for p in found]
        else:
            log.warning(
                "image_folder: left out the class folder %s of %s: it holds no images.", entry.relative_to(base), base
            )
    if ignored:
        names = ", ".join(os.fspath(p.relative_to(base)) for p in ignored[:_NAMED_MAX])
        more = f" and {len(ignored) - _NAMED_MAX} more" if len(ignored) > _NAMED_MAX else ""
        log.warning("image_folder: ignored what is not an image (by its extension) in %s: %s%s.", base, names, more)
    return images


def _check_train_classes(listed: Mapping[str, Mapping[str, list]], root: str) -> None:
    """Every class of an evaluation folder (test/, val/, ...) must have images in a training folder."""
    train = [split for split in TRAIN_FOLDERS if split in listed]
    if not train:
        return
    trained = {c for split in train for c in listed[split]}
    for split, per_class in listed.items():
        missing = sorted(set(per_class) - trained)
        if missing:
            what = (
                f"class {missing[0]!r} of {split}/ has" if len(missing) == 1 else f"classes {missing} of {split}/ have"
            )
            raise MissingDataError(
                f"image_folder: {what} no images in {' or '.join(s + '/' for s in train)} of {root}, so no "
                f"model can learn them; add training images or remove these classes from {split}/."
            )


def _read_folder(base, files: dict, sizes: dict, split, *, shuffle_files: bool, seed: int | None):
    """The selected files, read (not decoded) in parallel; shuffle_files shuffles the whole list."""
    tf = _tf.tf()
    chosen = [f for name, start, stop in _ranges(IMAGE_FOLDER, sizes, split) for f in files[name][start:stop]]
    ds = tf.data.Dataset.from_tensor_slices(
        {
            "path": np.array([os.fspath(base / rel) for rel, _ in chosen], dtype=str),
            "label": np.array([label for _, label in chosen], dtype=np.int32),
            "file_name": np.array([rel for rel, _ in chosen], dtype=str),
        }
    )
    if shuffle_files and len(chosen) > 1:
        ds = ds.shuffle(len(chosen), seed=seed)
    return ds.map(
        lambda ex: {"image": tf.io.read_file(ex["path"]), "label": ex["label"], "file_name": ex["file_name"]},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
