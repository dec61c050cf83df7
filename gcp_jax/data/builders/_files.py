"""Shared by the own builders: finding a data set's files as downloaded or extracted, in parallel."""

import concurrent.futures
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath

from gcp_jax.data.errors import MissingDataError, missing_data_message

_MAX_DEPTH = 3


def manual_dir(dl_manager) -> epath.Path | None:
    """The manual directory, or None when it does not exist or is empty."""
    try:
        return dl_manager.manual_dir
    except AssertionError:
        return None


def manual_dir_name(dl_manager) -> str:
    """The manual directory's path for messages, whether or not it exists."""
    return os.fspath(dl_manager._manual_dir)


def search_roots(dl_manager, archives: dict[str, str | None]) -> list[epath.Path]:
    """manual_dir and the extraction of each archive of `archives` ({file name: md5 or None}) in it."""
    root = manual_dir(dl_manager)
    if root is None:
        return []
    roots = [root]
    for name, md5 in archives.items():
        path = find(roots[:1], name)
        if path is not None:
            if md5:
                check_md5(path, md5)
            roots.append(dl_manager.extract(path))
    return roots


def find(roots: Sequence[epath.Path], name: str, *, is_dir: bool = False) -> epath.Path | None:
    """The shallowest file (or folder) called `name` under any of `roots`, at most 3 levels down."""
    for root in roots:
        for depth in range(_MAX_DEPTH + 1):
            for path in sorted(root.glob("/".join(["*"] * depth + [name]))):
                if path.is_dir() == is_dir:
                    return path
    return None


def require(
    roots: Sequence[epath.Path],
    names: Sequence[str],
    *,
    dataset: str,
    expected: str,
    dl_manager,
    source: str,
    dirs: Sequence[str] = (),
) -> dict[str, epath.Path]:
    """{name: path} of every file in `names` and folder in `dirs`, or one MissingDataError for all."""
    found = {name: find(roots, name) for name in names}
    found.update({name: find(roots, name, is_dir=True) for name in dirs})
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        message = missing_data_message(dataset, expected, manual_dir_name(dl_manager), source)
        raise MissingDataError(f"{message} Missing: {', '.join(missing)}.")
    return found


def check_md5(path: epath.Path, md5: str) -> None:
    """Raises ValueError when the archive at `path` is not the expected file (truncated download)."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if digest.hexdigest() != md5:
        raise ValueError(
            f"{path} is damaged or not the official archive (md5 {digest.hexdigest()}, "
            f"expected {md5}); delete it and download it again."
        )


def parallel_map(fn: Callable, items: Iterable) -> Iterator:
    """fn over items on a thread pool (PIL releases the GIL while decoding), in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        yield from pool.map(fn, items)


def bbox(xmin: float, ymin: float, xmax: float, ymax: float, *, height: int, width: int) -> tfds.features.BBox:
    """1-based inclusive pixel corners, as the annotation files give them → a normalised, clipped box."""

    def clip(v):
        return min(max(v, 0.0), 1.0)

    top, left = clip((ymin - 1) / height), clip((xmin - 1) / width)
    return tfds.features.BBox(
        ymin=top, xmin=left, ymax=max(top, clip(ymax / height)), xmax=max(left, clip(xmax / width))
    )


def fgvc_info(builder, *, description: str, homepage: str, citation: str) -> tfds.core.DatasetInfo:
    """The DatasetInfo of the own FGVC builders: image, label, file name and bounding box."""
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(),
                "file_name": tfds.features.Text(),
                "bbox": tfds.features.BBoxFeature(),
            }
        ),
        supervised_keys=("image", "label"),
        homepage=homepage,
        citation=citation,
    )
