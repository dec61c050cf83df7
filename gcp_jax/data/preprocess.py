"""Image preprocessing in tf.data: decoding that survives corrupt files, resizing, crops, flips.

Examples are dicts {"image", "label", "file_name"}; `decode` adds "ok" (False for an image that
could not be decoded, whose image is then a 1×1 black placeholder). Images stay uint8 until
`normalize`, so that the resized images can be cached compactly and cached and uncached runs
see identical pixels. Random ops are stateless: the same seed gives the same crop and flip.
"""

import io

import numpy as np
from PIL import Image

from gcp_jax import imagenet
from gcp_jax.data import _tf

_FAST_HEADS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # How JPEG and PNG files begin.


def decode(ds):
    """Decodes "image" to uint8 [H, W, 3] in parallel, flagging failures in "ok".

    JPEG and PNG (by their first bytes, whatever the file name) go to TensorFlow's decoders, fast
    and right for every mode of these formats; anything else (BMP, GIF, WebP, TIFF, ...) to
    Pillow, which TensorFlow does not match: it reads no TIFF and gives a palette BMP's indices.
    """
    tf = _tf.tf()

    def decode_one(example):
        contents = example["image"]
        fast = tf.reduce_any([tf.strings.substr(contents, 0, len(h)) == h for h in _FAST_HEADS])
        image = tf.cond(
            fast,
            lambda: tf.io.decode_image(contents, channels=3, expand_animations=False),
            lambda: tf.numpy_function(pillow_rgb, [contents], tf.uint8, stateful=False),
        )
        image.set_shape([None, None, 3])
        return {**example, "image": image, "ok": tf.constant(True)}

    def try_decode(example):
        # A one-element dataset whose decode error is swallowed by ignore_errors, then the
        # placeholder: take(1) yields the decoded image, or the placeholder when decoding failed.
        good = tf.data.Dataset.from_tensors(example).map(decode_one).ignore_errors()
        bad = tf.data.Dataset.from_tensors(
            {**example, "image": tf.zeros([1, 1, 3], tf.uint8), "ok": tf.constant(False)}
        )
        return good.concatenate(bad).take(1)

    return ds.interleave(
        try_decode,
        cycle_length=tf.data.AUTOTUNE,
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def pillow_rgb(contents: bytes) -> np.ndarray:
    """An encoded image (any format Pillow reads; its first frame) as uint8 RGB [H, W, 3].

    Palette, grey, alpha and CMYK modes go through Pillow's conversion; 16-bit grey is scaled
    to 8 bits (Pillow's conversion would clip it to white). Raises for what it cannot read, and
    for floating-point images, whose range is unknown.
    """
    with Image.open(io.BytesIO(contents)) as image:
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
