"""The input pipeline: config, shapes and ranges, seeded order, exact resume, process shards,
padded and masked evaluation, caching, image folders, corrupt images, clear errors, quiet preparation."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import logging as absl_logging
from PIL import Image

from gcp_jax import data, imagenet
from gcp_jax.config import resolve_data
from gcp_jax.data import _tf, preprocess, sources

LOW = min(-imagenet.MEAN / imagenet.STD)
HIGH = max((1 - imagenet.MEAN) / imagenet.STD)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """A tiny synthetic_fgvc: 3 classes, 8 train and 5 test images each, 20 px, cropped to 16."""
    return dict(
        name="synthetic_fgvc",
        data_dir=str(tmp_path_factory.mktemp("tfds")),
        image_size=16,
        resize_size=18,
        train_split="train",
        eval_split="test",
        shuffle_buffer=100,
        synthetic=dict(num_classes=3, train_per_class=8, test_per_class=5, image_size=20),
    )


def _train(cfg, n, **kwargs):
    kwargs = {"batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1, **kwargs}
    it = data.train_batches(cfg, **kwargs)
    return it, [next(it) for _ in range(n)]


def _eval(cfg, batch_size, process_index=0, process_count=1):
    return list(data.eval_batches(cfg, batch_size=batch_size, process_index=process_index, process_count=process_count))


def _key(image):
    """An example's identity under a horizontal flip (centre crops only)."""
    return min(image.tobytes(), image[:, ::-1].tobytes())


def test_import_does_not_load_tensorflow():
    code = "import sys, gcp_jax.data; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_config_defaults_merging_and_errors():
    defaults = data.default_config()
    assert {
        "name",
        "data_dir",
        "manual_dir",
        "image_size",
        "resize_size",
        "resize_mode",
        "random_crop",
        "train_split",
        "eval_split",
        "shuffle_buffer",
        "on_corrupt",
        "cache",
        "synthetic",
    } <= set(defaults)
    merged = resolve_data({"image_size": 32, "synthetic": {"num_classes": 4}})
    assert merged.image_size == 32 and merged.synthetic.num_classes == 4 and merged.resize_size == 512
    for bad, word in (
        ({"imagesize": 3}, "imagesize"),
        ({"on_corrupt": "ignore"}, "on_corrupt"),
        ({"image_size": 600}, "resize_size"),
        ({"resize_mode": "crop"}, "resize_mode"),
    ):
        with pytest.raises(ValueError, match=word):
            resolve_data(bad)


def test_dataset_info(cfg):
    info = data.dataset_info(cfg)
    assert (info.name, info.num_classes, info.num_train, info.num_eval) == ("synthetic_fgvc", 3, 24, 15)
    assert info.class_names == ("0deg grey", "45deg grey", "90deg grey")


def test_generated_data_set_is_cached(cfg):
    """A second opening reads what the first wrote instead of generating again."""
    info_file = next(p for p in _files(cfg["data_dir"]) if p.endswith("dataset_info.json"))
    before = os.stat(info_file).st_mtime_ns
    sources._open.cache_clear()
    assert data.dataset_info(cfg).num_train == 24
    assert os.stat(info_file).st_mtime_ns == before


def _files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def test_train_batches_shapes_dtypes_ranges(cfg):
    it, batches = _train(cfg, 3)
    assert it.steps_per_epoch == 6
    for batch in batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1, 2}
        assert batch["image"].min() >= LOW - 1e-5 and batch["image"].max() <= HIGH + 1e-5


def test_train_order_is_seeded_and_resumes_exactly(cfg):
    _, run = _train(cfg, 14)
    _, again = _train(cfg, 14)
    _, other = _train(cfg, 6, seed=1)
    _, resumed = _train(cfg, 7, start_step=7)  # Mid-epoch 1 (6 steps per epoch).
    for a, b in zip(run, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(run, other))
    for a, b in zip(run[7:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    epoch0, epoch1 = (np.concatenate([b["label"] for b in run[k : k + 6]]) for k in (0, 6))
    assert sorted(epoch0) == sorted(epoch1) and not np.array_equal(epoch0, epoch1)


def test_train_processes_read_disjoint_parts(cfg):
    centre = {**cfg, "random_crop": False}
    seen = []
    for p in range(2):
        it, batches = _train(centre, 3, batch_size=3, process_index=p, process_count=2)
        assert it.steps_per_epoch == 4  # 24 // (3 * 2)
        seen.append({_key(im) for b in batches for im in b["image"]})
    assert len(seen[0]) == len(seen[1]) == 9 and not seen[0] & seen[1]


def test_eval_two_processes_count_each_example_once(cfg):
    single = _eval(cfg, 4)
    assert len(single) == 4 and [b["mask"].sum() for b in single] == [4, 4, 4, 3]
    reference = sorted(_key(im) for b in single for im, m in zip(b["image"], b["mask"]) if m)
    assert len(set(reference)) == 15
    per_process = [_eval(cfg, 3, p, 2) for p in range(2)]  # 8 + 7 examples: 3 padded batches each.
    assert [len(b) for b in per_process] == [3, 3]
    assert [sum(b["mask"].sum() for b in bs) for bs in per_process] == [8, 7]
    covered = sorted(_key(im) for bs in per_process for b in bs for im, m in zip(b["image"], b["mask"]) if m)
    assert covered == reference
    for batch in per_process[1]:
        assert batch["image"].shape == (3, 16, 16, 3) and batch["mask"].dtype == bool


def test_cache_changes_nothing_but_speed(cfg):
    cached = {**cfg, "cache": True}
    for a, b in zip(_eval(cfg, 8), _eval(cached, 8)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    _, run = _train(cached, 8)
    _, resumed = _train(cached, 3, start_step=5)
    for a, b in zip(run[5:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_resize_modes():
    tf = _tf.tf()
    image = tf.zeros([30, 60, 3], tf.uint8)
    assert preprocess.resize(image, 20, "shorter").shape == (20, 40, 3)
    assert preprocess.resize(image, 20, "square").shape == (20, 20, 3)
    assert preprocess.center_crop(preprocess.resize(image, 20, "shorter"), 16).shape == (16, 16, 3)


def _folder(root, layout):
    rng = np.random.default_rng(0)
    for split, per_class in layout.items():
        for cls in ("Boeing 707", "F-A 18"):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def test_image_folder_layouts(tmp_path):
    flat = _folder(tmp_path / "flat", {"": 5})
    cfg = dict(
        name="image_folder",
        manual_dir=str(flat),
        image_size=16,
        resize_size=18,
        train_split="train[:80%]",
        eval_split="train[80%:]",
    )
    info = data.dataset_info(cfg)
    assert info.class_names == ("Boeing 707", "F-A 18") and (info.num_train, info.num_eval) == (8, 2)
    split = _folder(tmp_path / "split", {"train": 3, "test": 2})
    cfg = {**cfg, "manual_dir": str(split), "train_split": "train", "eval_split": "test"}
    assert data.dataset_info(cfg)[2:4] == (6, 4)
    _, batches = _train(cfg, 2, batch_size=3)
    assert batches[0]["image"].shape == (3, 16, 16, 3)


def test_corrupt_images_are_skipped_counted_or_fatal(tmp_path):
    root = _folder(tmp_path / "imgs", {"train": 4, "test": 2})
    (root / "train" / "F-A 18" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "test" / "Boeing 707" / "broken.png").write_bytes(b"\x89PNG\r\n truncated")
    cfg = dict(
        name="image_folder", manual_dir=str(root), image_size=16, resize_size=18, train_split="train", eval_split="test"
    )
    it, _ = _train(cfg, 4, batch_size=4)  # 9 files, 8 readable: 2 full epochs.
    assert it.steps_per_epoch == 2 and it.num_skipped == 1  # Distinct images, however many epochs met it.
    evals = data.eval_batches(cfg, batch_size=4, process_index=0, process_count=1)
    assert sum(b["mask"].sum() for b in evals) == 4 and evals.num_skipped == 1
    fail = {**cfg, "on_corrupt": "fail"}
    with pytest.raises(data.CorruptImageError, match=r"broken\.jpg"):
        _train(fail, 4, batch_size=4)
    with pytest.raises(data.CorruptImageError, match=r"broken\.png"):
        _eval(fail, 4)


def test_clear_errors(cfg, tmp_path):
    with pytest.raises(ValueError, match="Unknown data set 'no_such_set'"):
        data.dataset_info({"name": "no_such_set", "data_dir": str(tmp_path)})
    with pytest.raises(data.MissingDataError, match="manual_dir"):
        data.dataset_info({"name": "image_folder", "manual_dir": str(tmp_path / "absent")})
    with pytest.raises(ValueError, match="Split 'validation'"):
        data.dataset_info({**cfg, "eval_split": "validation"})
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.train_batches(cfg, batch_size=16, process_index=0, process_count=2)


def test_quiet_preparation_and_reading(tmp_path, caplog, capfd):
    """Generating and reading synthetic_fgvc prints one line and logs no TFDS chatter about TFDS itself
    (deprecated fields, the folder it has yet to make, a custom config, "Unknown size", progress bars);
    real warnings still show."""
    synthetic = dict(num_classes=2, train_per_class=4, test_per_class=2, image_size=16)
    cfg = dict(name="synthetic_fgvc", data_dir=str(tmp_path), image_size=16, resize_size=16, synthetic=synthetic)
    caplog.set_level(logging.WARNING)
    next(data.train_batches({**cfg, "train_split": "train"}, batch_size=4, process_index=0, process_count=1))
    absl_logging.warning("a real warning")
    out, err = capfd.readouterr()
    assert out.strip().splitlines() == [
        f"Generating synthetic_fgvc (12 images, 16 px) in {_variant_dir(tmp_path)}, once."
    ]
    assert "examples" not in err and "Unknown size" not in err
    assert [r.getMessage() for r in caplog.records] == ["a real warning"]
    # TFDS and TensorFlow warn of a deprecation only so often per process: the filters themselves.
    tfds_call = "From /site-packages/tensorflow_datasets/core/reader.py:102: CounterV2 (from tf) is deprecated"
    for logger, message, shown in (
        ("absl", "`FeatureConnector.dtype` is deprecated. Please change", False),
        ("tensorflow", tfds_call, False),
        ("absl", "a dtype problem", True),
        ("tensorflow", "From /home/me/train.py:3: f (from tf) is deprecated", True),
    ):
        record = logging.LogRecord(logger, logging.WARNING, "f.py", 1, message, None, None)
        assert bool(logging.getLogger(logger).filter(record)) == shown


def _variant_dir(root):
    (variant,) = (d for d, _, fs in os.walk(root) if "dataset_info.json" in fs)
    return variant


def test_examples_without_a_file_name_are_named_by_their_tfds_id(tmp_path, caplog):
    """(To name undecodable images.) And TFDS's use of a deprecated TensorFlow function is not logged."""
    import tensorflow_datasets.testing as tfds_testing

    builder = tfds_testing.DummyMnist(data_dir=str(tmp_path))
    builder.download_and_prepare()
    caplog.set_level(logging.WARNING)
    ds = sources._read_tfds(builder, None, "train[:3]", shuffle_files=False, seed=None)
    names = [ex["file_name"].decode() for ex in ds.as_numpy_iterator()]
    assert names == [f"dummy_mnist-train.tfrecord-00000-of-00001__{i}" for i in range(3)]
    assert not caplog.records
