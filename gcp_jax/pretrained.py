"""ImageNet weight import: Keras EfficientNet files and torchvision ResNet state dicts.

`load_pretrained(path, arch)` reads the files people actually have:

* EfficientNet-B0…B7: keras.applications' downloads (`efficientnetb0.h5`, `…_notop.h5`: the
  tf.keras-2 HDF5 layout, one group per layer whose `weight_names` attribute lists datasets such as
  `block1a_dwconv/depthwise_kernel:0`), the same layout written by Keras 3's legacy writer, and
  Keras 3 `.weights.h5` files (`layers/<auto name>/vars/<i>`, the layer name in an attribute).
* ResNet-50/101: torchvision (or timm) state dicts, `.pth` (needs torch) or `.safetensors`.

The mapping is strict: every tensor the architecture needs must be in the file with the right
shape, and every tensor in the file must have a place, or a ValueError names it. Our models take
images normalised as (x/255 − mean)/std; the Keras files carry that normalisation as a layer,
which is checked and dropped.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from gcp_jax import imagenet
from gcp_jax.models import ARCHS, EFFICIENTNET_PARAMS, RESNET_PARAMS, create_model

KERAS_SUFFIXES = (".h5", ".hdf5")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")

# Flax leaf → its rank within a layer, which is the order of Keras' weight lists.
_KERAS_ORDER = {"kernel": 0, "scale": 0, "bias": 1, "mean": 2, "var": 3}
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


# ----------------------------------------------------------------------------------------------
# The target: leaves of create_model(arch, num_classes, head="gap")


def _target_leaves(arch: str, num_classes: int) -> dict[tuple, jax.ShapeDtypeStruct]:
    """{(collection, module, ..., leaf): ShapeDtypeStruct} of the gap model, without running an init."""
    model = create_model(arch, num_classes=num_classes, head="gap")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    return traverse_util.flatten_dict(unfreeze(variables))


def _modules(leaves) -> dict[tuple, list[tuple]]:
    """Module path → its leaf keys in Keras weight order (kernel, bias / scale, bias, mean, var)."""
    modules: dict[tuple, list[tuple]] = {}
    for key in leaves:
        modules.setdefault(key[1:-1], []).append(key)
    return {m: sorted(keys, key=lambda k: _KERAS_ORDER[k[-1]]) for m, keys in modules.items()}


# ----------------------------------------------------------------------------------------------
# Keras files


def _h5_list_attr(group, name) -> list[str]:
    """A list attribute of a legacy HDF5 group, re-assembled if Keras chunked it (`name0`, `name1`, …)."""
    if name in group.attrs:
        chunks = [group.attrs[name]]
    else:
        chunks, i = [], 0
        while f"{name}{i}" in group.attrs:
            chunks.append(group.attrs[f"{name}{i}"])
            i += 1
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for chunk in chunks for n in chunk]


def _read_keras_legacy(root) -> dict[str, list[tuple[str, np.ndarray]]]:
    """tf.keras-2 layout: {layer: [(weight name, array), ...]} in the file's weight order."""
    layers = {}
    for layer in root:
        group = root[layer]
        if isinstance(group, h5py.Group) and _h5_list_attr(group, "weight_names"):
            layers[layer] = [(n, np.asarray(group[n])) for n in _h5_list_attr(group, "weight_names")]
    return layers


def _read_keras3(f, path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Keras 3 `.weights.h5`: every `.../vars` group with datasets is a layer, named by its attribute."""
    layers = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and name.endswith("vars") and len(obj):
            if "name" not in obj.attrs:
                raise ValueError(
                    f"{path}: group {name!r} has no layer name (an early Keras 3 file); "
                    "load it in a recent Keras 3 and save it again."
                )
            layer = obj.attrs["name"]
            layer = layer.decode("utf8") if isinstance(layer, bytes) else str(layer)
            layers[layer] = [(f"{name}/{i}", np.asarray(obj[str(i)])) for i in range(len(obj))]

    f.visititems(visit)
    return layers


def _read_keras(path) -> dict[str, list[tuple[str, np.ndarray]]]:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file ({e}).") from None
    with f:
        root = f.get("model_weights", f)  # a full tf.keras model file keeps its weights in a group
        if _h5_list_attr(root, "layer_names"):
            return _read_keras_legacy(root)
        if "layers" in f:
            return _read_keras3(f, path)
    raise ValueError(f"{path} is neither a Keras HDF5 weight file nor a Keras 3 .weights.h5 file.")


def _check_keras_normalization(layers, path) -> None:
    """Drops the input Normalization layer after checking it is ImageNet's mean/std.

    keras.applications files store the std as the "variance" (and rescale by 1/√std after it),
    a Keras 3 model given the right statistics stores std²; both mean (x/255 − mean)/std.
    """
    for name in [n for n in layers if n.split("_")[0] == "normalization"]:
        mean, var = (np.asarray(a, np.float64).reshape(-1) for _, a in layers.pop(name)[:2])
        is_imagenet = (
            mean.shape == (3,)
            and np.allclose(mean, imagenet.MEAN, atol=1e-4)
            and (np.allclose(var, imagenet.STD, atol=1e-4) or np.allclose(var, imagenet.STD**2, atol=1e-4))
        )
        if not is_imagenet:
            raise ValueError(
                f"{path}: input layer {name!r} normalises with mean {mean.round(4).tolist()} and "
                f"variance {var.round(4).tolist()}, not ImageNet's, but gcp_jax models take "
                "(x/255 − ImageNet mean)/std images, so these weights would see wrong inputs."
            )


def _keras_layer(module: tuple) -> str:
    """('backbone', 'block2a', 'dwconv') → 'block2a_dwconv'; the classifier is Keras' 'predictions'."""
    return "predictions" if module == ("classifier",) else "_".join(module[1:])


def _keras_tensors(path, arch):
    """(target leaves, {leaf key: (name in the file, array in Flax layout)}) for an EfficientNet."""
    layers = _read_keras(path)
    _check_keras_normalization(layers, path)
    leaves = _target_leaves(arch, layers["predictions"][-1][1].shape[0] if "predictions" in layers else 1000)
    out = {}
    for module, keys in _modules(leaves).items():
        layer = _keras_layer(module)
        if layer not in layers:
            if module == ("classifier",):  # a `_notop` file
                continue
            raise ValueError(f"{path}: layer {layer!r} that {arch} needs is missing; is it a weight file for {arch}?")
        tensors = layers.pop(layer)
        if len(tensors) != len(keys):
            names = ", ".join(n for n, _ in tensors)
            raise ValueError(
                f"{path}: layer {layer!r} has {len(tensors)} tensors ({names}), {arch} needs "
                f"{len(keys)}; the file is probably for another architecture."
            )
        for key, (name, array) in zip(keys, tensors):
            if module[-1] == "dwconv":  # Keras depthwise [k, k, C, 1] → Flax grouped conv [k, k, 1, C]
                array = array.transpose(0, 1, 3, 2)
            out[key] = (name, array)
    if layers:
        name = next(iter(layers.values()))[0][0]
        raise ValueError(
            f"{path}: tensor {name!r} has no place in {arch}; the file is probably for another architecture."
        )
    return leaves, out


# ----------------------------------------------------------------------------------------------
# torchvision state dicts


def _read_torch(path) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading {path} needs torch (pip install 'gcp-jax[torch]'); or convert it to "
            ".safetensors, which needs no torch."
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict (save model.state_dict()).")
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def _torch_key(key: tuple) -> str:
    """('params', 'backbone', 'layer1_0', 'downsample_bn', 'scale') → 'layer1.0.downsample.1.weight'."""
    module = key[1:-1]
    if module == ("classifier",):
        return f"fc.{_TORCH_LEAF[key[-1]]}"
    names = [
        m.replace("_", ".").replace("downsample.conv", "downsample.0").replace("downsample.bn", "downsample.1")
        for m in module[1:]
    ]
    return ".".join(names + [_TORCH_LEAF[key[-1]]])


def _torch_tensors(path, arch):
    """(target leaves, {leaf key: (state-dict key, array in Flax layout)}) for a ResNet."""
    state = {k: v for k, v in _read_torch(path).items() if not k.endswith("num_batches_tracked")}
    has_fc = any(k.startswith("fc.") for k in state)
    leaves = _target_leaves(arch, state["fc.bias"].shape[0] if "fc.bias" in state else 1000)
    out = {}
    for key in leaves:
        name = _torch_key(key)
        if name not in state:
            if key[1] == "classifier" and not has_fc:  # a headless state dict
                continue
            raise ValueError(f"{path}: tensor {name!r} that {arch} needs is missing; is it a state dict for {arch}?")
        array = state.pop(name)
        if array.ndim == 4:  # conv OIHW → HWIO
            array = array.transpose(2, 3, 1, 0)
        elif array.ndim == 2:  # linear [out, in] → [in, out]
            array = array.T
        out[key] = (name, array)
    if state:
        raise ValueError(
            f"{path}: tensor {next(iter(state))!r} has no place in {arch}; the file is probably for "
            "another architecture."
        )
    return leaves, out


# ----------------------------------------------------------------------------------------------
# Public API


def _reader(path: str, arch: str) -> Callable:
    """The tensor reader for this file and architecture, or a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Pretrained weight file {path!r} does not exist.")
    if arch in EFFICIENTNET_PARAMS:
        if not path.endswith(KERAS_SUFFIXES):
            raise ValueError(
                f"{arch} loads Keras HDF5 weight files (.h5; a .keras archive holds one as "
                f"model.weights.h5), got {path!r}."
            )
        return _keras_tensors
    if arch in RESNET_PARAMS:
        if not path.endswith(TORCH_SUFFIXES + (".safetensors",)):
            raise ValueError(f"{arch} loads torchvision state dicts (.pth or .safetensors), got {path!r}.")
        return _torch_tensors
    raise ValueError(f"Unknown arch {arch!r}; choose one of {', '.join(ARCHS)}.")


def load_pretrained(path: str, arch: str) -> dict[str, Any]:
    """{"params", "batch_stats"} of `create_model(arch, num_classes=K, head="gap")` from a weight file.

    K is the file's class count (1000 for ImageNet). A file without a classifier (Keras `_notop`,
    a headless state dict) gives no `classifier` entry. Raises ValueError naming the first tensor
    that is missing, has the wrong shape or has no place in `arch`.
    """
    leaves, tensors = _reader(path, arch)(path, arch)
    flat = {}
    for key, (name, array) in tensors.items():
        if array.shape != leaves[key].shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {array.shape}, {arch} needs {leaves[key].shape}; "
                "the file is probably for another architecture."
            )
        flat[key] = np.asarray(array, np.float32)
    return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass
class PretrainedReport:
    """What `init_from_pretrained` copied (`loaded`) and left at its fresh init (`skipped`), as leaf paths."""

    path: str
    loaded: list[str]
    skipped: list[str]

    def __str__(self):
        fresh = sorted({"/".join(s.split("/")[1:3]) for s in self.skipped})
        return f"Loaded {len(self.loaded)} tensors from {self.path}; kept {len(self.skipped)} at their fresh init" + (
            f" ({', '.join(fresh)})." if fresh else "."
        )


def init_from_pretrained(variables, path: str, arch: str):
    """Copies pretrained weights into `variables` of a `create_model(arch, ...)` model with any head.

    The backbone must match exactly (ValueError naming the tensor otherwise); the classifier is
    copied only if its shape matches (same class count); the GCP head keeps its init.
    Returns (new variables, PretrainedReport).
    """
    source = traverse_util.flatten_dict(load_pretrained(path, arch))
    target = traverse_util.flatten_dict(unfreeze(variables))
    for key in source:
        if key[1] == "backbone" and key not in target:
            raise ValueError(
                f"{path}: tensor {'/'.join(key)} has no place in the model; was it built with arch={arch!r}?"
            )
    out, loaded, skipped = dict(target), [], []
    for key, value in target.items():
        name = "/".join(key)
        if key[1] == "backbone":
            if key not in source:
                raise ValueError(
                    f"{path}: tensor {name} of the model's backbone is not in the file; was the model "
                    f"built with arch={arch!r}?"
                )
            if source[key].shape != value.shape:
                raise ValueError(
                    f"{path}: tensor {name} has shape {source[key].shape} in the file and "
                    f"{value.shape} in the model; was the model built with arch={arch!r}?"
                )
        if key in source and source[key].shape == value.shape:
            out[key] = jnp.asarray(source[key], value.dtype)
            loaded.append(name)
        else:
            skipped.append(name)
    return traverse_util.unflatten_dict(out), PretrainedReport(path, loaded, skipped)
