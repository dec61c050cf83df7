"""The input pipeline the trainer calls: `dataset_info`, `train_batches`, `eval_batches`.

Every process reads its own contiguous part of a split (`tfds.even_splits`, sizes differing by at
most one) and yields host-local numpy batches. Training: epoch e of process p reads its part in an
order drawn from (seed, e, p) (file order and shuffle buffer), resizes, crops (random or centre),
flips and normalises with stateless randomness keyed by the example's position in the epoch, so
that resuming at any step reproduces the uninterrupted stream exactly. Evaluation: resize, centre
crop, every process yields the same number of batches, padded with masked examples.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from gcp_jax.config import resolve_data as resolve
from gcp_jax.data import _tf, preprocess
from gcp_jax.data.errors import CorruptImageError
from gcp_jax.data.sources import Source, open_source

log = logging.getLogger("gcp_jax.data")
_FILE_ORDER, _SHUFFLE, _AUGMENT = range(3)  # Purposes of the derived seeds.
_SEP = "\0"  # Joins the names of skipped files and why: no file name contains it.


class DatasetInfo(NamedTuple):
    """What the trainer needs to know before reading: sizes and class names."""

    name: str
    num_classes: int
    num_train: int
    num_eval: int
    class_names: tuple[str, ...]


def dataset_info(cfg: Mapping[str, Any]) -> DatasetInfo:
    """Sizes and class names of the data set that `cfg` (config.data) names; prepares it if needed."""
    cfg = resolve(cfg)
    src = open_source(cfg)
    return DatasetInfo(
        cfg.name,
        len(src.class_names),
        src.num_examples(cfg.train_split),
        src.num_examples(cfg.eval_split),
        src.class_names,
    )


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Batches in a training epoch: the remainder of the split is dropped."""
    return num_examples // global_batch_size


def train_batches(
    cfg: Mapping[str, Any],
    *,
    batch_size: int,
    seed: int = 0,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainBatches:
    """Infinite iterator of {"image": float32 [b, S, S, 3], "label": int32 [b]}, b = batch_size (host-local).

    Epoch e is shuffled with (seed, e); `start_step` resumes exactly where an uninterrupted run
    would be; the remainder is dropped: steps_per_epoch = num_train // (batch_size * process_count).
    Process index and count default to JAX's. `close()` it when done (see TrainBatches.close).
    """
    return TrainBatches(resolve(cfg), batch_size, seed, start_step, *_process(process_index, process_count))


def eval_batches(
    cfg: Mapping[str, Any], *, batch_size: int, process_index: int | None = None, process_count: int | None = None
) -> EvalBatches:
    """Finite, re-iterable batches {"image", "label", "mask" (bool)} of the eval split.

    Every process yields the same number of batches; the last ones are padded, and over all
    processes the masks select each example exactly once (minus skipped corrupt images).
    """
    return EvalBatches(resolve(cfg), batch_size, *_process(process_index, process_count))


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must lie in [0, process_count={count}).")
    return index, count


def _seed(*parts: int) -> int:
    """A 32-bit seed drawn from integers (seed, epoch, process, purpose)."""
    return int(np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(1)[0])


def _decode_resize(ds, resize_size: int, resize_mode: str, max_pixels: int):
    """Encoded examples → decoded (with "ok" and "problem"), resized uint8 images."""
    tf = _tf.tf()
    ds = preprocess.decode(ds, max_pixels)
    return ds.map(
        lambda ex: {**ex, "image": preprocess.resize(ex["image"], resize_size, resize_mode)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def _options(ds):
    options = _tf.tf().data.Options()
    options.deterministic = True
    return ds.with_options(options)


class TrainBatches(Iterator):
    """The training stream of one process; see `train_batches`.

    `steps_per_epoch`: batches per epoch. `num_skipped`: how many distinct images this process has
    skipped so far because they could not be decoded or were too large (each is named once in the log).
    """

    def __init__(self, cfg, batch_size: int, seed: int, start_step: int, process_index: int, process_count: int):
        if batch_size < 1 or start_step < 0:
            raise ValueError(f"batch_size={batch_size} must be positive and start_step={start_step} non-negative.")
        self._cfg, self._batch, self._seed, self._process = cfg, batch_size, seed, process_index
        self._src = open_source(cfg)
        num_train = self._src.num_examples(cfg.train_split)
        self.steps_per_epoch = steps_per_epoch(num_train, batch_size * process_count)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"Split {cfg.train_split!r} of {cfg.name!r} has {num_train} examples, fewer than one "
                f"global batch ({batch_size} x {process_count} processes); use a smaller batch."
            )
        self._shard = _tf.tfds().even_splits(cfg.train_split, n=process_count)[process_index]
        # Spare examples read after the epoch's own, in case corrupt ones leave it short.
        self._spares = max(batch_size, self._src.num_examples(self._shard) // 100)
        self._cached = None
        if cfg.cache:
            examples = self._src.read(self._shard, shuffle_files=False, seed=None)
            self._cached = _decode_resize(examples, cfg.resize_size, cfg.resize_mode, cfg.max_image_pixels).cache()
            log.info("Caching %s (%s) in memory...", cfg.name, cfg.train_split)
            self._cached.reduce(0, lambda n, _: n + 1)  # One full pass fills the cache.
        self._skipped: set[str] = set()
        self._stream = self._generate(start_step)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._stream)

    @property
    def num_skipped(self) -> int:
        return len(self._skipped)

    def close(self) -> None:
        """Ends the stream now: its tf.data pipelines (the next epoch's, started early, too) are freed here.

        The stream and its generator refer to each other, so without this only the garbage collector
        frees them, at any later moment; freeing a tf.data iterator waits for its threads, and such
        waits stalled the process for up to a minute, at a random line of other code.
        """
        self._stream.close()

    def _generate(self, start_step: int):
        """Epoch after epoch; the next epoch's pipeline starts (shuffle buffer, first batch) in a
        background thread during the last tenth of the current one, so epochs follow without a stall."""
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        with concurrent.futures.ThreadPoolExecutor(1) as starter:
            upcoming = starter.submit(self._start_epoch, epoch, offset)
            while True:
                batches, expected = upcoming.result(), self.steps_per_epoch - offset
                upcoming, count = None, 0
                for batch in batches:
                    count += 1
                    if upcoming is None and count >= expected - max(1, expected // 10):
                        upcoming = starter.submit(self._start_epoch, epoch + 1, 0)
                    self._note_skipped(_skipped(batch["skipped"]))
                    yield {"image": batch["image"], "label": batch["label"]}
                if count == 0:
                    raise ValueError(
                        f"No decodable image in this process's part of {self._cfg.name!r} "
                        f"({self._cfg.train_split!r}); check the data set files."
                    )
                if count < expected:
                    log.warning("Epoch %d had %d of %d batches: too many corrupt images.", epoch, count, expected)
                upcoming = upcoming or starter.submit(self._start_epoch, epoch + 1, 0)
                epoch, offset = epoch + 1, 0

    def _start_epoch(self, epoch: int, offset: int):
        """An iterator over the epoch's numpy batches, its first batch already made."""
        batches = self._epoch(epoch, offset).as_numpy_iterator()
        first = next(batches, None)
        return batches if first is None else itertools.chain([first], batches)

    def _note_skipped(self, skipped: list[tuple[str, str]]) -> None:
        """Counts the skipped images and names new ones in the log; with data.on_corrupt='fail', raises."""
        if skipped and self._cfg.on_corrupt == "fail":
            raise CorruptImageError(_unusable_message(self._cfg, self._cfg.train_split, *skipped[0]))
        self._skipped.update(name for name, _ in skipped)
        _log_skipped(self._src, skipped)

    def _epoch(self, epoch: int, offset: int):
        """This process's batches of `epoch`, from batch `offset` on."""
        tf, cfg, size = _tf.tf(), self._cfg, self._cfg.image_size
        file_seed, shuffle_seed, aug_seed = (
            _seed(self._seed, epoch, self._process, k) for k in (_FILE_ORDER, _SHUFFLE, _AUGMENT)
        )
        if self._cached is not None:
            ds = spares = self._cached
        else:
            ds = self._src.read(self._shard, shuffle_files=True, seed=file_seed)
            spares = self._src.read(self._shard, shuffle_files=False, seed=None)
        if cfg.shuffle_buffer > 1:
            ds = ds.shuffle(cfg.shuffle_buffer, seed=shuffle_seed)
        ds = ds.concatenate(spares.take(self._spares))
        ds = ds.enumerate().map(lambda i, ex: {**ex, "position": i}).skip(offset * self._batch)
        if self._cached is None:
            ds = _decode_resize(ds, cfg.resize_size, cfg.resize_mode, cfg.max_image_pixels)
        ds = _count_and_drop_corrupt(ds).take((self.steps_per_epoch - offset) * self._batch)

        def augment(ex):
            seed = tf.stack([tf.constant(aug_seed, tf.int64), ex["position"]])
            crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            image = (
                preprocess.random_crop(ex["image"], size, crop_seed)
                if cfg.random_crop
                else preprocess.center_crop(ex["image"], size)
            )
            image = preprocess.random_flip(image, flip_seed)
            return {
                "image": preprocess.normalize(image),
                "label": ex["label"],
                "skipped": ex["skipped"],
            }

        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        return _options(ds.batch(self._batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def _count_and_drop_corrupt(ds):
    """Drops examples whose image did not decode; each kept one names, in "skipped", those dropped
    since the previous kept one (each name and problem followed by _SEP), so that every skipped file
    is reported."""
    tf = _tf.tf()

    def carry(pending, ex):
        named = tf.strings.join([pending, ex["file_name"], _SEP, ex["problem"], _SEP])
        return tf.where(ex["ok"], "", named), {**ex, "skipped": pending}

    return ds.scan(tf.constant(""), carry).filter(lambda ex: ex["ok"])


def _unusable_message(cfg, split: str, name: str, problem: str) -> str:
    """data.on_corrupt='fail''s one line about an image that is skipped otherwise."""
    return (
        f"Cannot use image {name!r} of {cfg.name!r} ({split!r}): {problem}; replace or delete it, or set "
        "data.on_corrupt='skip' to skip such images."
    )


def _log_skipped(src: Source, skipped: list[tuple[str, str]]) -> None:
    """Names each skipped image and why in the log once per process and data set, however often it is met."""
    for name, problem in skipped:
        if name not in src.skipped:
            src.skipped.add(name)
            log.warning("Skipped image %r of %s: %s (%d so far).", name, src.name, problem, len(src.skipped))


def _skipped(column: np.ndarray) -> list[tuple[str, str]]:
    """The (file name, problem) pairs in a batch's "skipped" column, in order."""
    parts = [p.decode(errors="replace") for joined in column if joined for p in joined.split(_SEP.encode())[:-1]]
    return list(zip(parts[::2], parts[1::2]))


class EvalBatches:
    """The eval split's batches for one process; see `eval_batches`. Iterate it once per evaluation.

    `len()`: batches per pass (equal on every process). `num_examples`: this process's examples.
    `num_skipped`: images of this process's part left out (masked) because they could not be
    decoded or were too large, counted during the current pass (after a full pass: that pass's total).
    """

    def __init__(self, cfg, batch_size: int, process_index: int, process_count: int):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be positive.")
        self._cfg, self._batch, self._process, self._count = cfg, batch_size, process_index, process_count
        self._src = open_source(cfg)
        shards = _tf.tfds().even_splits(cfg.eval_split, n=process_count)
        sizes = [self._src.num_examples(s) for s in shards]
        self._shard, self.num_examples = shards[process_index], sizes[process_index]
        self._num_batches = math.ceil(max(sizes) / batch_size)
        self.num_skipped = 0

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.num_skipped = 0
        for batch in self._dataset().as_numpy_iterator():
            bad = batch["real"] & ~batch["ok"]
            skipped = [
                (n.decode(errors="replace"), p.decode(errors="replace"))
                for n, p in zip(batch["file_name"][bad], batch["problem"][bad])
            ]
            if skipped and self._cfg.on_corrupt == "fail":
                raise CorruptImageError(_unusable_message(self._cfg, self._cfg.eval_split, *skipped[0]))
            self.num_skipped += len(skipped)
            _log_skipped(self._src, skipped)
            yield {"image": batch["image"], "label": batch["label"], "mask": batch["real"] & batch["ok"]}

    def _dataset(self):
        tf, cfg, size = _tf.tf(), self._cfg, self._cfg.image_size
        padding = tf.data.Dataset.from_tensors(
            {
                "image": tf.zeros([size, size, 3], tf.uint8),
                "label": tf.constant(0, tf.int32),
                "file_name": tf.constant(""),
                "ok": tf.constant(True),
                "problem": tf.constant(""),
                "real": tf.constant(False),
            }
        ).repeat(self._num_batches * self._batch - self.num_examples)
        ds = padding
        if self.num_examples:
            decoding = (size, cfg.resize_size, cfg.resize_mode, cfg.max_image_pixels)
            examples = _eval_examples(self._src, cfg.eval_split, self._process, self._count, decoding, cfg.cache)
            ds = examples.map(lambda ex: {**ex, "real": tf.constant(True)}).concatenate(padding)
        ds = ds.map(lambda ex: {**ex, "image": preprocess.normalize(ex["image"])}, num_parallel_calls=tf.data.AUTOTUNE)
        return _options(ds.batch(self._batch).prefetch(tf.data.AUTOTUNE))


@functools.lru_cache(maxsize=4)
def _cached_eval_examples(src: Source, split: str, process_index: int, process_count: int, decoding: tuple):
    """The same, kept (with its in-memory cache) across evaluations."""
    return _eval_examples(src, split, process_index, process_count, decoding, False).cache()


def _eval_examples(src: Source, split: str, process_index: int, process_count: int, decoding: tuple, cache: bool):
    """Resized, centre-cropped uint8 examples of this process's part of `split`, in file order;
    `decoding`: (crop size, resize_size, resize_mode, max_image_pixels)."""
    if cache:
        return _cached_eval_examples(src, split, process_index, process_count, decoding)
    tf = _tf.tf()
    size, *resizing = decoding
    shard = _tf.tfds().even_splits(split, n=process_count)[process_index]
    ds = _decode_resize(src.read(shard, shuffle_files=False, seed=None), *resizing)
    return ds.map(
        lambda ex: {**ex, "image": preprocess.center_crop(ex["image"], size)}, num_parallel_calls=tf.data.AUTOTUNE
    )
