"""The `config.data` fields: defaults, and merging a user mapping over them with validation."""

from collections.abc import Mapping
from typing import Any

from ml_collections import config_dict

RESIZE_MODES = ("shorter", "square")
ON_CORRUPT = ("skip", "fail")


def default_config() -> config_dict.ConfigDict:
    """The `data` ConfigDict with its defaults (FGVC-Aircraft variants, 448 crops of 512 resizes)."""
    c = config_dict.ConfigDict()
    c.name = "fgvc_aircraft/variant"  # TFDS name[/config][:version], "image_folder" or "synthetic_fgvc".
    c.data_dir = ""  # Where prepared TFDS data lives; "" = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    c.manual_dir = ""  # Downloaded archives / image_folder root; "" = <data_dir>/downloads/manual.
    c.image_size = 448  # Side of the square crop fed to the network.
    c.resize_size = 512  # Resize before cropping: the shorter side, or both sides (resize_mode).
    c.resize_mode = "shorter"  # "shorter": keep aspect, shorter side = resize_size; "square": resize_size^2.
    c.random_crop = True  # Train crop: random (True) or centre (False); eval is always the centre crop.
    c.train_split = "trainval"  # TFDS split spec trained on, e.g. "train", "train[:90%]", "train+validation".
    c.eval_split = "test"  # TFDS split spec evaluated on, each example exactly once.
    c.shuffle_buffer = 10_000  # Train shuffle buffer in examples (encoded; decoded+resized when cache=True).
    c.on_corrupt = "skip"  # An undecodable image: "skip" (drop it, count it, log its name) or "fail".
    c.cache = False  # Keep decoded, resized uint8 images in memory after the first pass (small data sets).
    c.synthetic = config_dict.ConfigDict()  # The generated data set, used when name = "synthetic_fgvc".
    c.synthetic.num_classes = 10  # Classes: grating orientation x colour correlation.
    c.synthetic.train_per_class = 300  # Train images per class.
    c.synthetic.test_per_class = 50  # Test images per class.
    c.synthetic.image_size = 64  # Side of the generated images in pixels.
    return c


def resolve(cfg: Mapping[str, Any]) -> config_dict.ConfigDict:
    """`cfg` (a ConfigDict or any mapping, possibly partial) over the defaults, validated."""
    out = default_config()
    _update(out, cfg, "data")
    if out.on_corrupt not in ON_CORRUPT:
        raise ValueError(f"data.on_corrupt={out.on_corrupt!r} is not one of {ON_CORRUPT}.")
    if out.resize_mode not in RESIZE_MODES:
        raise ValueError(f"data.resize_mode={out.resize_mode!r} is not one of {RESIZE_MODES}.")
    if not 0 < out.image_size <= out.resize_size:
        raise ValueError(
            f"data.image_size={out.image_size} must be positive and at most "
            f"data.resize_size={out.resize_size}, the size the crop is taken from."
        )
    if out.shuffle_buffer < 1:
        raise ValueError(f"data.shuffle_buffer={out.shuffle_buffer} must be at least 1 (1 = no shuffling).")
    for key, value in out.synthetic.items():
        if value < 1:
            raise ValueError(f"data.synthetic.{key}={value} must be at least 1.")
    return out


def _update(target: config_dict.ConfigDict, source: Mapping[str, Any], prefix: str) -> None:
    """Copies `source` into `target` key by key; an unknown key is an error naming it."""
    for key, value in source.items():
        if key not in target:
            raise ValueError(f"Unknown config field {prefix}.{key}; the fields are {sorted(target.keys())}.")
        if isinstance(target[key], config_dict.ConfigDict):
            _update(target[key], value, f"{prefix}.{key}")
        else:
            target[key] = value
