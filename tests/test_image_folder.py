"""Image folders as users have them: every format and mode Pillow reads, hidden and empty folders,
files that are not images, classes missing from train, undecodable images named once and counted."""

import io
import logging

import numpy as np
import pytest
from PIL import Image, ImageOps

from gcp_jax import data, imagenet
from gcp_jax.data import _tf, preprocess

GREEN, GREY = (0, 255, 0), (156, 156, 156)
SIZE = 16


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _green(mode: str) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), GREEN).convert(mode)  # "P": the web palette holds pure green.


def _grey16() -> Image.Image:
    return Image.fromarray(np.full((SIZE, SIZE), GREY[0] * 257, np.uint16))  # Mode "I;16".


def _grey(mode: str) -> Image.Image:
    return Image.new("L", (SIZE, SIZE), GREY[0]).convert(mode)


# (file name, encoded image, the colour it shows): one per format and mode worth checking.
GREEN_FILES = {
    "rgb.jpg": _encode(_green("RGB"), "JPEG", quality=95),
    "cmyk.JPEG": _encode(_green("CMYK"), "JPEG", quality=95),
    "palette.png": _encode(_green("P"), "PNG"),
    "rgba.png": _encode(_green("RGBA"), "PNG"),
    "palette.Bmp": _encode(_green("P"), "BMP"),  # TensorFlow's decoder gives the palette indices.
    "rgb.bmp": _encode(_green("RGB"), "BMP"),
    "palette.gif": _encode(_green("P"), "GIF"),
    "rgb.webp": _encode(_green("RGB"), "WEBP", lossless=True),
    "rgba.WEBP": _encode(_green("RGBA"), "WEBP", lossless=True),
    "rgb.tiff": _encode(_green("RGB"), "TIFF"),
    "cmyk.TIF": _encode(_green("CMYK"), "TIFF"),
    "palette.tif": _encode(_green("P"), "TIFF"),
}
GREY_FILES = {
    "l.jpg": _encode(_grey("L"), "JPEG", quality=95),
    "l.png": _encode(_grey("L"), "PNG"),
    "la.png": _encode(_grey("LA"), "PNG"),
    "i16.png": _encode(_grey16(), "PNG"),
    "i16.tiff": _encode(_grey16(), "TIFF"),  # Pillow's own conversion would clip it to white.
    "l.webp": _encode(_grey("L"), "WEBP", lossless=True),
}


def _decode(contents: bytes) -> tuple[np.ndarray, bool]:
    tf = _tf.tf()
    ds = tf.data.Dataset.from_tensors({"image": tf.constant(contents), "label": 0, "file_name": "x"})
    example = next(preprocess.decode(ds).as_numpy_iterator())
    return example["image"], bool(example["ok"])


@pytest.mark.parametrize("name", [*GREEN_FILES, *GREY_FILES])
def test_every_format_and_mode_decodes_to_its_rgb_colour(name):
    contents, colour = (GREEN_FILES[name], GREEN) if name in GREEN_FILES else (GREY_FILES[name], GREY)
    image, ok = _decode(contents)
    assert ok and image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), colour, atol=3)


def test_what_cannot_be_decoded_is_flagged():
    floats = _encode(Image.fromarray(np.full((SIZE, SIZE), 0.5, np.float32)), "TIFF")  # Mode "F": no range.
    truncated = _encode(_green("RGB"), "PNG")[:60]
    for contents in (b"plain text, not an image", floats, truncated, b""):
        image, ok = _decode(contents)
        assert not ok and image.shape == (1, 1, 3)


def _write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, contents in files.items():
        (folder / name).write_bytes(contents)


def _config(root, **overrides):
    return {
        "name": "image_folder",
        "manual_dir": str(root),
        "image_size": SIZE,
        "resize_size": SIZE,
        "train_split": "train",
        "eval_split": "test",
        **overrides,
    }


def _colours(cfg):
    """(label, mean RGB) of every real example of the eval split, un-normalised."""
    out = []
    for batch in data.eval_batches(cfg, batch_size=8, process_index=0, process_count=1):
        pixels = imagenet.denormalize(batch["image"]) * 255
        out += [(label, p.reshape(-1, 3).mean(0)) for label, p, m in zip(batch["label"], pixels, batch["mask"]) if m]
    return out


def test_messy_folder_reads_every_image_and_ignores_the_rest(tmp_path, caplog):
    root = tmp_path / "birds"
    _write(root / "train" / "green", {**GREEN_FILES, "notes.txt": b"seen on Tuesday", ".DS_Store": b"\0"})
    _write(root / "train" / "grey", {**GREY_FILES, "._l.jpg": b"AppleDouble metadata"})
    _write(root / "train" / "grey" / ".ipynb_checkpoints", {"l-checkpoint.png": GREY_FILES["l.png"]})
    _write(root / "train" / ".ipynb_checkpoints" / "cache", {"x.png": GREY_FILES["l.png"]})
    (root / "train" / "empty").mkdir()
    _write(root / "test" / "green", {"a.webp": GREEN_FILES["rgb.webp"]})
    _write(root / "test" / "grey", {"a.tiff": GREY_FILES["i16.tiff"]})
    _write(root / "__MACOSX" / "train" / "green", {"._rgb.jpg": b"AppleDouble metadata"})
    _write(root / ".ipynb_checkpoints", {"untitled.ipynb": b"{}"})

    with caplog.at_level(logging.WARNING, logger="gcp_jax.data"):
        info = data.dataset_info(_config(root))
    assert info.class_names == ("green", "grey")
    assert (info.num_train, info.num_eval) == (len(GREEN_FILES) + len(GREY_FILES), 2)
    logged = caplog.text
    assert "notes.txt" in logged and "empty" in logged
    assert "DS_Store" not in logged and "checkpoint" not in logged and "._l.jpg" not in logged

    for split in ("train", "test"):
        colours = _colours(_config(root, eval_split=split))
        assert len(colours) == (info.num_train if split == "train" else 2)
        for label, mean in colours:
            np.testing.assert_allclose(mean, (GREEN, GREY)[label], atol=4)


def test_a_class_missing_from_train_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    for split, classes in (("train", ("a",)), ("test", ("a", "b c"))):
        for cls in classes:
            _write(root / split / cls, {"x.png": GREY_FILES["l.png"]})
    with pytest.raises(data.MissingDataError, match=r"class 'b c' of test/ has no images in train/"):
        data.dataset_info(_config(root))


def test_an_empty_class_folder_is_not_a_class(tmp_path, caplog):
    root = tmp_path / "flat"
    _write(root / "a", {"x.png": GREY_FILES["l.png"]})
    _write(root / "b", {"readme.md": b"nothing here yet"})
    with caplog.at_level(logging.WARNING, logger="gcp_jax.data"):
        info = data.dataset_info(_config(root, eval_split="train"))
    assert info.class_names == ("a",)
    assert "left out the class folder" in caplog.text and "readme.md" in caplog.text


def _skip_messages(caplog):
    return [r.args[0] for r in caplog.records if r.getMessage().startswith("Skipped image")]


def test_every_undecodable_image_is_named_once_and_counted(tmp_path, caplog):
    root = tmp_path / "imgs"
    bad = {f"bad{i}.jpg": b"\xff\xd8\xff not a jpeg" for i in range(3)}
    for cls in ("a", "b"):
        _write(root / "train" / cls, {f"{i}.png": GREY_FILES["l.png"] for i in range(4)})
        _write(root / "test" / cls, {f"{i}.png": GREY_FILES["l.png"] for i in range(2)})
    _write(root / "train" / "a", bad)
    _write(root / "test" / "b", {"bad_eval1.png": b"\x89PNG\r\n\x1a\n cut", "bad_eval2.gif": b"GIF89a cut"})
    cfg = _config(root)
    caplog.set_level(logging.WARNING, logger="gcp_jax.data")

    # 8 readable + 3 undecodable, batch 8: one step per epoch, and the skipped ones of an epoch all
    # fall in its one batch (the old count named only the last of them).
    it = data.train_batches(cfg, batch_size=8, seed=0, process_index=0, process_count=1)
    for _ in range(10):  # An epoch stops at its 8th readable image: it may not reach all 3.
        next(it)
        if it.num_skipped == 3:
            break
    names = _skip_messages(caplog)
    assert sorted(names) == sorted({f"train/a/{n}" for n in bad}) and it.num_skipped == 3

    caplog.clear()
    for _ in range(2):  # A new EvalBatches per evaluation, as the training loop makes them.
        evals = data.eval_batches(cfg, batch_size=8, process_index=0, process_count=1)
        assert sum(b["mask"].sum() for b in evals) == 4 and evals.num_skipped == 2
    assert sorted(_skip_messages(caplog)) == ["test/b/bad_eval1.png", "test/b/bad_eval2.gif"]


# What the EXIF orientation tag asks for: Pillow's reading of the tag, independent of the pipeline's.
def _shown(contents: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(contents)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def _blocks(height: int, width: int) -> Image.Image:
    """Six flat colour blocks (2 rows x 3 columns): any mirroring or turn moves them."""
    colours = np.array([[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]])
    rows, cols = np.arange(height) * 2 // height, np.arange(width) * 3 // width
    return Image.fromarray(colours[rows[:, None], cols[None, :]].astype(np.uint8))


def _with_orientation(fmt: str, orientation: int, **kwargs) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(_blocks(24, 36), fmt, exif=exif, **kwargs)


@pytest.mark.parametrize(
    "fmt, orientation",
    [*(("JPEG", o) for o in range(1, 9)), ("PNG", 6), ("WEBP", 8)],
    ids=lambda v: str(v),
)
def test_exif_orientation_is_applied(fmt, orientation):
    """Every orientation a camera writes, through TensorFlow's decoders (JPEG, PNG) and Pillow's (WebP)."""
    contents = _with_orientation(fmt, orientation, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    image, ok = _decode(contents)
    expected = _shown(contents)
    assert ok and image.shape == expected.shape == ((36, 24, 3) if orientation > 4 else (24, 36, 3))
    assert np.abs(image.astype(int) - expected).mean() < 2


def test_phone_photos_are_upright_in_training_and_evaluation(tmp_path):
    """A photo stored sideways (orientation 6, as phones write them): blue on top and red below when shown."""
    halves = [np.full((16, 8, 3), colour, np.uint8) for colour in ((0, 0, 255), (255, 0, 0))]
    stored = Image.fromarray(np.concatenate(halves, axis=1))
    exif = Image.Exif()
    exif[0x0112] = 6  # Turned 90° clockwise to be shown: the stored left (blue) half comes on top.
    contents = _encode(stored, "JPEG", quality=100, exif=exif)
    shown = _shown(contents)
    assert shown.shape == (16, 16, 3) and shown[0, 8, 2] > 200 and shown[-1, 8, 0] > 200
    root = tmp_path / "photos"
    for split in ("train", "test"):
        _write(root / split / "upright", {"IMG_0001.JPG": contents})
    cfg = _config(root, random_crop=False)
    train = next(data.train_batches(cfg, batch_size=1, seed=0, process_index=0, process_count=1))
    evals = next(iter(data.eval_batches(cfg, batch_size=1, process_index=0, process_count=1)))
    for batch in (train, evals):
        pixels = imagenet.denormalize(batch["image"][0]) * 255
        np.testing.assert_allclose(pixels[:6].reshape(-1, 3).mean(0), shown[:6].reshape(-1, 3).mean(0), atol=8)
        np.testing.assert_allclose(pixels[-6:].reshape(-1, 3).mean(0), shown[-6:].reshape(-1, 3).mean(0), atol=8)


def test_mislabelled_files_decode_by_their_contents(tmp_path):
    """A PNG named .jpg, a JPEG named .png, a WebP named .jpeg, a TIFF named .png, a GIF named .bmp."""
    green = {
        "png.jpg": GREEN_FILES["rgba.png"],
        "jpeg.png": GREEN_FILES["rgb.jpg"],
        "webp.jpeg": GREEN_FILES["rgb.webp"],
        "tiff.png": GREEN_FILES["cmyk.TIF"],
        "gif.bmp": GREEN_FILES["palette.gif"],
    }
    root = tmp_path / "mislabelled"
    _write(root / "train" / "green", green)
    _write(root / "test" / "green", green)
    colours = _colours(_config(root))
    assert len(colours) == len(green)
    for _, colour in colours:
        np.testing.assert_allclose(colour, GREEN, atol=3)


def test_sixteen_bit_rgb_png_decodes_to_its_colour():
    """16 bits per channel (scanners, HDR exports), which Pillow cannot write: TensorFlow's encoder."""
    tf = _tf.tf()
    rgb16 = np.broadcast_to(np.array(GREEN, np.uint16) * 257, (SIZE, SIZE, 3))
    image, ok = _decode(tf.io.encode_png(tf.constant(rgb16)).numpy())
    assert ok and image.dtype == np.uint8
    np.testing.assert_array_equal(image.reshape(-1, 3).mean(0), GREEN)


def test_oversized_images_are_named_and_skipped_or_fatal_without_decoding(tmp_path, caplog):
    """A 12000 x 12000 scan (1 bit per pixel: 18 MB as pixels, 432 MB decoded to RGB) is read no
    further than its header; data.max_image_pixels decides."""
    root = tmp_path / "scans"
    small = _encode(_grey("L").resize((8, 8)), "PNG")
    _write(root / "train" / "leaf", {"0.png": GREY_FILES["l.png"], "1.png": GREY_FILES["l.png"]})
    _write(root / "train" / "leaf", {"huge.png": _encode(Image.new("1", (12000, 12000)), "PNG")})
    _write(root / "test" / "leaf", {"big.png": GREY_FILES["l.png"], "0.png": small, "1.png": small, "2.png": small})
    caplog.set_level(logging.WARNING, logger="gcp_jax.data")
    cfg = _config(root)
    it = data.train_batches(cfg, batch_size=2, seed=0, process_index=0, process_count=1)
    while it.num_skipped == 0:
        next(it)
    assert caplog.messages == [
        "Skipped image 'train/leaf/huge.png' of image_folder: it is 12000 x 12000 pixels, more than "
        "data.max_image_pixels=89478485 (1 so far)."
    ]
    with pytest.raises(data.CorruptImageError, match=r"'train/leaf/huge.png' .*12000 x 12000 pixels"):
        for _ in data.train_batches(
            {**cfg, "on_corrupt": "fail"}, batch_size=2, seed=0, process_count=1, process_index=0
        ):
            pass
    limited = {**cfg, "max_image_pixels": SIZE * SIZE - 1}  # Evaluation: the 16 x 16 image is one too many.
    evals = data.eval_batches(limited, batch_size=4, process_index=0, process_count=1)
    assert sum(b["mask"].sum() for b in evals) == 3 and evals.num_skipped == 1
    assert (
        "'test/leaf/big.png' of image_folder: it is 16 x 16 pixels, more than data.max_image_pixels=255" in caplog.text
    )
