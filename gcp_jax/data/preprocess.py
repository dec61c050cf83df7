"""Image preprocessing in tf.data: decoding that survives corrupt files, resizing, crops, flips.

Examples are dicts {"image", "label", "file_name"}; `decode` adds "ok" and "problem" (False and why,
for an image that could not be decoded or is too large, whose image is then a 1×1 black
placeholder). Images stay uint8 until `normalize`, so that the resized images can be cached
compactly and cached and uncached runs see identical pixels. Random ops are stateless: the same
seed gives the same crop and flip.
"""

import io
import struct

import numpy as np
from PIL import Image, PngImagePlugin

from gcp_jax import imagenet
from gcp_jax.data import _tf

_FAST_HEADS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # How JPEG and PNG files begin.
_ORIENTATION = 0x0112  # The EXIF tag.
_EXIF_WITHIN = 1 << 16  # JPEG's EXIF segment comes before the image data, and holds at most 64 KiB.
UNDECODABLE = "it cannot be decoded"


def decode(ds, max_pixels: int = 0):
    """Decodes "image" to uint8 [H, W, 3] in parallel, as its EXIF orientation says it is to be shown,
    flagging failures in "ok" and "problem"; images of more than `max_pixels` pixels (0: no limit),
    read from the header, are flagged without being decoded.

    JPEG and PNG (by their first bytes, whatever the file name) go to TensorFlow's decoders, fast
    and right for every mode of these formats (CMYK JPEG, 16-bit PNG); anything else (BMP, GIF,
    WebP, TIFF, ...) to Pillow, which TensorFlow does not match: it reads no TIFF and gives a
    palette BMP's indices.
    """
    tf = _tf.tf()

    def decode_one(contents, orientation):
        fast = tf.reduce_any([tf.strings.substr(contents, 0, len(h)) == h for h in _FAST_HEADS])
        image = tf.cond(
            fast,
            lambda: tf.io.decode_image(contents, channels=3, expand_animations=False),
            lambda: tf.numpy_function(pillow_rgb, [contents], tf.uint8, stateful=False),
        )
        image.set_shape([None, None, 3])
        return orient(image, orientation)

    def checked(example):
        orientation, height, width = tf.unstack(header(example["image"]))
        too_large = tf.logical_and(max_pixels > 0, height * width > max_pixels)
        message = tf.strings.format(
            "it is {} x {} pixels, more than data.max_image_pixels={}", (width, height, max_pixels)
        )
        return tf.cond(
            too_large,
            lambda: placeholder(example, message),
            lambda: {**example, "image": decode_one(example["image"], orientation), "ok": True, "problem": ""},
        )

    def placeholder(example, problem):
        return {**example, "image": tf.zeros([1, 1, 3], tf.uint8), "ok": tf.constant(False), "problem": problem}

    def try_decode(example):
        # A one-element dataset whose decode error is swallowed by ignore_errors, then the
        # placeholder: take(1) yields the decoded image, or the placeholder when decoding failed.
        good = tf.data.Dataset.from_tensors(example).map(checked).ignore_errors()
        bad = tf.data.Dataset.from_tensors(placeholder(example, tf.constant(UNDECODABLE)))
        return good.concatenate(bad).take(1)

    return ds.interleave(
        try_decode,
        cycle_length=tf.data.AUTOTUNE,
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def header(contents):
    """int64 [EXIF orientation, height, width] of an encoded image, from its header (raises for a file
    that is not an image). JPEG and PNG without EXIF data, most files of most data sets, are read by
    TensorFlow; the rest by Pillow (`image_header`), which holds Python's lock meanwhile."""
    tf = _tf.tf()
    head = tf.strings.substr(contents, 0, _EXIF_WITHIN)
    jpeg, png = (tf.strings.substr(contents, 0, len(h)) == h for h in _FAST_HEADS)
    has = lambda marker: tf.size(tf.strings.split(head, sep=marker)) > 1
    plain = tf.logical_or(jpeg & ~has(b"Exif\0\0"), png & ~has(b"eXIf"))

    def png_size():  # IHDR: width and height, 4 bytes each, big-endian, from byte 16.
        raw = tf.reshape(tf.cast(tf.io.decode_raw(tf.strings.substr(contents, 16, 8), tf.uint8), tf.int64), [2, 4])
        return tf.reduce_sum(raw * tf.constant([1 << 24, 1 << 16, 1 << 8, 1], tf.int64), axis=1)[::-1]

    def tf_header():
        size = tf.cond(jpeg, lambda: tf.cast(tf.image.extract_jpeg_shape(contents)[:2], tf.int64), png_size)
        return tf.concat([tf.constant([1], tf.int64), size], 0)

    def pillow_header():
        return tf.reshape(tf.numpy_function(image_header, [contents], tf.int64, stateful=False), [3])

    return tf.cond(plain, tf_header, pillow_header)


def orient(image, orientation):
    """`image` turned as its EXIF orientation (1: as stored, 2-8: mirrored and/or rotated) says."""
    tf = _tf.tf()
    # An einsum, not tf.transpose: TensorFlow's oneDNN rewrite (on by default on Intel CPUs) logs an
    # error line for a Transpose in an input pipeline ("oneDNN supports DT_UINT8 only on ... AVX-512").
    transposed = lambda im: tf.cast(tf.einsum("ijc->jic", tf.cast(im, tf.int32)), tf.uint8)
    return tf.switch_case(
        tf.cast(orientation, tf.int32) - 1,
        [
            lambda: image,
            lambda: image[:, ::-1],  # 2: mirrored
            lambda: image[::-1, ::-1],  # 3: turned 180°
            lambda: image[::-1],  # 4: upside down
            lambda: transposed(image),  # 5
            lambda: transposed(image[::-1]),  # 6: turned 90° clockwise (a phone held upright)
            lambda: transposed(image[::-1, ::-1]),  # 7
            lambda: transposed(image[:, ::-1]),  # 8: turned 90° counter-clockwise
        ],
    )


def image_header(contents: bytes) -> np.ndarray:
    """[EXIF orientation (1-8, 1 when absent), height, width] from the header alone, without decoding;
    [1, 0, 0] for what Pillow cannot open (the decoder then says so)."""
    try:
        with _open_unchecked(contents) as image:
            if isinstance(image, PngImagePlugin.PngImageFile):  # Its getexif() decodes to look past the pixels.
                exif = Image.Exif()
                exif.load(image.info.get("exif", b""))
            else:
                exif = image.getexif()
            orientation, (width, height) = exif.get(_ORIENTATION, 1), image.size
    except Exception:  # Whatever it is, decoding it fails too, and is reported.
        return np.array([1, 0, 0], np.int64)
    return np.array([orientation if orientation in range(1, 9) else 1, height, width], np.int64)


def _open_unchecked(contents: bytes) -> Image.Image:
    """Image.open without Pillow's decompression-bomb check (a warning from 89 megapixels, an error from
    179): data.max_image_pixels, checked on the header before decoding, is the one limit for every format."""
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        recognised = accept is None or accept(contents[:16])
        if recognised and not isinstance(recognised, str):  # A string: recognised but unreadable.
            try:
                return factory(io.BytesIO(contents), "")
            except (SyntaxError, IndexError, TypeError, struct.error):  # Not this format after all.
                continue
    raise ValueError("not an image Pillow can read")


def pillow_rgb(contents: bytes) -> np.ndarray:
    """An encoded image (any format Pillow reads; its first frame) as uint8 RGB [H, W, 3], as stored
    (`orient` applies the EXIF orientation).

    Palette, grey, alpha and CMYK modes go through Pillow's conversion; 16-bit grey is scaled
    to 8 bits (Pillow's conversion would clip it to white). Raises for what it cannot read, and
    for floating-point images, whose range is unknown.
    """
    with _open_unchecked(contents) as image:
        if image.mode.startswith("I;16") or image.mode == "I":
            grey = np.asarray(image).astype(np.float64) / 257.0  # 65535 → 255
            return np.repeat(np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
        if image.mode == "F":
            raise ValueError("32-bit floating-point images have no defined range.")
        return np.asarray(image.convert("RGB"))


def resize(image, size: int, mode: str):
    """uint8 image → uint8 image with the shorter side = size ("shorter") or size × size ("square").

    Bilinear, antialiased when shrinking (as PIL, hence torchvision, resizes; when enlarging the
    filter changes nothing but the speed), rounded back to uint8.
    """
    tf = _tf.tf()
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    if mode == "square":
        target = tf.constant([size, size])
        shrink = tf.reduce_any(hw > size)
    else:
        scale = size / tf.reduce_min(hw)
        target = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), size)
        shrink = scale < 1.0
    out = tf.cond(
        shrink, lambda: tf.image.resize(image, target, antialias=True), lambda: tf.image.resize(image, target)
    )
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def center_crop(image, size: int):
    """The central size × size window (the image is at least that large)."""
    tf = _tf.tf()
    hw = tf.shape(image)[:2]
    top, left = (hw[0] - size) // 2, (hw[1] - size) // 2
    out = image[top : top + size, left : left + size]
    out.set_shape([size, size, 3])
    return out


def random_crop(image, size: int, seed):
    """A size × size window at a position drawn from `seed` ([2] int tensor)."""
    tf = _tf.tf()
    return tf.image.stateless_random_crop(image, [size, size, 3], seed=seed)


def random_flip(image, seed):
    """Horizontal flip with probability 1/2, drawn from `seed`."""
    return _tf.tf().image.stateless_random_flip_left_right(image, seed=seed)


def normalize(image):
    """uint8 → float32 (x/255 − mean)/std with the ImageNet statistics (one multiply-add)."""
    tf = _tf.tf()
    scale = tf.constant(1.0 / (255.0 * imagenet.STD), tf.float32)
    offset = tf.constant(-imagenet.MEAN / imagenet.STD, tf.float32)
    return tf.cast(image, tf.float32) * scale + offset
