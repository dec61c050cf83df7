"""The own TFDS builders on their dummy data: fgvc_aircraft, stanford_cars, synthetic_fgvc."""

import hashlib
import os
import socket
import tarfile
import time
from typing import ClassVar
from unittest import mock

import numpy as np
import pytest

from gcp_jax import data
from gcp_jax.data import _tf, offline, sources, synthetic
from gcp_jax.data.builders import FgvcAircraft, StanfordCars, SyntheticFgvc, synthetic_config
from gcp_jax.data.builders.fgvc_aircraft import fgvc_aircraft
from gcp_jax.data.errors import MissingDataError

tfds = _tf.tfds()
AIRCRAFT_DUMMY = FgvcAircraft.code_path.parent / "dummy_data"
CARS_DUMMY = StanfordCars.code_path.parent / "dummy_data"


class FgvcAircraftTest(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = FgvcAircraft
    SPLITS: ClassVar = {"trainval": 4, "test": 2}


class StanfordCarsTest(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = StanfordCars
    SPLITS: ClassVar = {"train": 3, "test": 2}


class SyntheticFgvcTest(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = SyntheticFgvc
    BUILDER_CONFIG_NAMES_TO_TEST: ClassVar = [synthetic_config(3, 2, 1, 16)]
    SPLITS: ClassVar = {"train": 6, "test": 3}
    EXAMPLE_DIR = SyntheticFgvc.code_path.parent  # Nothing is downloaded.


def _prepare(name, tmp_path, manual_dir):
    builder = tfds.builder(name, data_dir=str(tmp_path))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def _examples(builder, split):
    return sorted(tfds.as_numpy(builder.as_dataset(split=split)), key=lambda ex: ex["file_name"])


def test_aircraft_levels_banner_and_boxes(tmp_path):
    expected = {
        "variant": ["707-320", "Cessna 172", "F/A-18"],
        "family": ["Boeing 707", "Cessna 172", "F/A-18"],
        "manufacturer": ["Boeing", "Cessna", "McDonnell Douglas"],
    }
    for level, names in expected.items():
        builder = _prepare(f"fgvc_aircraft/{level}", tmp_path, AIRCRAFT_DUMMY)
        assert builder.info.features["label"].names == names
    test = _examples(builder, "test")
    assert [ex["file_name"] for ex in test] == [b"1514522.jpg", b"2074164.jpg"]
    assert [names[ex["label"]] for ex in test] == ["McDonnell Douglas", "Cessna"]
    image = test[0]["image"]
    assert image.shape == (50 - fgvc_aircraft.BANNER, 48, 3)  # The dummy images are 48 x 50.
    assert image[-3:].mean() < 150  # The white banner is gone.
    # Box "3 2 40 35" (1-based) in a 48 x 30 crop: ymax is clipped to the crop.
    np.testing.assert_allclose(test[0]["bbox"], [1 / 30, 2 / 48, 1.0, 40 / 48], rtol=1e-6)


def test_aircraft_reads_the_archive_and_checks_it(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    manual.mkdir()
    archive = manual / fgvc_aircraft.ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(AIRCRAFT_DUMMY / "fgvc-aircraft-2013b", arcname="fgvc-aircraft-2013b")
    monkeypatch.setattr(fgvc_aircraft, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(ValueError, match="damaged"):
        _prepare("fgvc_aircraft/variant", tmp_path / "bad", manual)
    monkeypatch.setattr(fgvc_aircraft, "ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    builder = _prepare("fgvc_aircraft/variant", tmp_path / "good", manual)
    assert builder.info.splits["trainval"].num_examples == 4


def test_cars_names_labels_and_boxes(tmp_path):
    builder = _prepare("stanford_cars", tmp_path, CARS_DUMMY)
    names = builder.info.features["label"].names
    assert "Ram C/V Cargo Van Minivan 2012" in names and len(names) == 3
    train = _examples(builder, "train")  # Read from the nested cars_train/cars_train/ (Kaggle layout).
    assert [ex["label"] for ex in train] == [0, 1, 2]
    assert train[0]["image"].shape == (24, 36, 3)
    np.testing.assert_allclose(train[0]["bbox"], [2 / 24, 1 / 36, 20 / 24, 30 / 36], rtol=1e-6)


def test_missing_files_name_the_data_set_files_place_and_source(tmp_path):
    empty = tmp_path / "manual"
    empty.mkdir()
    with pytest.raises(MissingDataError) as cars:
        _prepare("stanford_cars", tmp_path / "data", empty)
    message = str(cars.value)
    for part in ("stanford_cars", "cars_meta.mat", "cars_test_annos_withlabels.mat", str(empty), "kaggle"):
        assert part in message
    offline = mock.patch.object(tfds.download.DownloadManager, "download", side_effect=ConnectionError("offline"))
    with offline, pytest.raises(MissingDataError) as air:
        _prepare("fgvc_aircraft/variant", tmp_path / "data", empty)
    for part in ("fgvc_aircraft", fgvc_aircraft.ARCHIVE, str(empty), fgvc_aircraft.URL, "ConnectionError"):
        assert part in str(air.value)


def _closed_port() -> int:
    """A local TCP port nobody listens on: connecting to it is refused at once, network or not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs)


def _absent_offline(cfg, root, seconds=20):
    """Opens an absent data set in data_dir `root` holding a user's files; returns the error message."""
    (root / "downloads" / "mine").mkdir(parents=True)
    (root / "downloads" / "mine" / "archive.zip").write_bytes(b"a user's file")
    (root / "notes.txt").write_text("keep me")
    before = _tree(root)
    start = time.perf_counter()
    with pytest.raises(data.MissingDataError) as error:
        data.dataset_info({**cfg, "data_dir": str(root)})
    assert time.perf_counter() - start < seconds
    assert _tree(root) == before  # Nothing left behind, nothing of the user's removed.
    return str(error.value)


def test_absent_data_set_without_network_fails_at_once_and_leaves_nothing(tmp_path, monkeypatch):
    """The own builder's download, its host unreachable: one try, the message, data_dir as it was.
    (TFDS alone retries ten times with growing pauses: minutes.)"""
    monkeypatch.setattr(fgvc_aircraft, "URL", f"http://127.0.0.1:{_closed_port()}/{fgvc_aircraft.ARCHIVE}")
    sources._open.cache_clear()
    message = _absent_offline({"name": "fgvc_aircraft/variant"}, tmp_path / "tfds")
    for part in (fgvc_aircraft.ARCHIVE, str(tmp_path / "tfds" / "downloads" / "manual"), "ConnectionError"):
        assert part in message


def test_absent_catalog_data_set_offline_real_path(tmp_path, monkeypatch):
    """A TFDS catalog data set, unmodified: TFDS's real downloader through a proxy that refuses connections
    (deterministic whether this machine has network or not)."""
    proxy = f"http://127.0.0.1:{_closed_port()}"
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, proxy)
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    message = _absent_offline({"name": "caltech_birds2011"}, tmp_path / "tfds")
    for part in ("CUB_200_2011.tgz", str(tmp_path / "tfds" / "downloads" / "manual"), "cannot reach 127.0.0.1"):
        assert part in message


def test_check_reachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        offline.check_reachable(f"http://127.0.0.1:{server.getsockname()[1]}/file.tar")
    for url in (f"https://127.0.0.1:{_closed_port()}/x", "https://no-such-host.invalid/x"):
        start = time.perf_counter()
        with pytest.raises(ConnectionError, match="cannot reach"):
            offline.check_reachable(url, timeout=2.0)
        assert time.perf_counter() - start < 3.0


def test_removed_on_failure_removes_only_what_is_new(tmp_path):
    root = tmp_path / "data"
    (root / "old" / "deep").mkdir(parents=True)
    (root / "old" / "deep" / "keep.txt").write_text("x")
    with offline.removed_on_failure(str(root)):
        (root / "made").mkdir()  # Kept: no failure.
    before = _tree(root)
    with pytest.raises(KeyboardInterrupt), offline.removed_on_failure(str(root)):
        (root / "new" / "a" / "b" / "c").mkdir(parents=True)
        (root / "old" / "deep" / "new.tmp").write_text("y")
        (root / "old" / "fresh").mkdir()
        (root / "downloads" / "cub" / "CUB.tgz.tmp.0123abcd").mkdir(parents=True)  # Unfinished: goes.
        (root / "downloads" / "cub" / "CUB.tgz.tmp.0123abcd" / "CUB.tgz").write_text("half")
        (root / "downloads" / "cub" / "segmentations.tgz").write_text("done")  # Finished: stays.
        (root / "downloads" / "extracted" / "incomplete.0123abcd_TAR.CUB.tgz").mkdir(parents=True)
        raise KeyboardInterrupt  # Ctrl-C, say, while preparing.
    assert _tree(root) == sorted([*before, "downloads", "downloads/cub", "downloads/cub/segmentations.tgz"])
    with pytest.raises(RuntimeError), offline.removed_on_failure(str(tmp_path / "absent")):
        (tmp_path / "absent" / "downloads").mkdir(parents=True)
        raise RuntimeError("preparation failed")
    assert not (tmp_path / "absent").exists()


def test_synthetic_is_deterministic_and_second_order():
    """Same seed, same images; per-channel means carry no class information, the colour covariance does."""
    a = synthetic.generate(3, 4, num_classes=10, size=32, split="train")
    np.testing.assert_array_equal(a, synthetic.generate(3, 4, num_classes=10, size=32, split="train"))
    assert not np.array_equal(a, synthetic.generate(3, 4, num_classes=10, size=32, split="test"))
    # Class 0 (grey) and class 5 (magenta-green) share orientation 0: same mean colour, but the
    # green channel follows the red one in class 0 and opposes it in class 5.
    stats = {}
    for label in (0, 5):
        x = synthetic.generate(label, 200, num_classes=10, size=32, split="train").astype(np.float64) / 255
        flat = x.reshape(len(x), -1, 3)
        centred = flat - flat.mean(1, keepdims=True)
        stats[label] = (flat.mean(1).mean(0), (centred[..., 0] * centred[..., 1]).mean(1).mean())
    np.testing.assert_allclose(stats[0][0], stats[5][0], atol=0.01)
    assert stats[0][1] > 0.002 > -0.002 > stats[5][1]
    assert synthetic.class_names(10)[5] == "0deg magenta-green"


def test_the_own_data_sets_are_the_registered_builders():
    """sources.OWN_BUILDERS (read without TensorFlow) names exactly the builders gcp_jax/data/builders registers."""
    from gcp_jax.data import builders

    registered = {
        getattr(builders, name).name for name in builders.__all__ if isinstance(getattr(builders, name), type)
    }
    assert registered == set(sources.OWN_BUILDERS)
