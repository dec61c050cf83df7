"""Weight import: Keras EfficientNet files, torchvision ResNets and the GCP field's PyTorch checkpoints.

`load_pretrained(path, arch)` reads the files people actually have:

* EfficientNet-B0…B7: keras.applications' downloads (`efficientnetb0.h5`, `…_notop.h5`: the
  tf.keras-2 HDF5 layout, one group per layer whose `weight_names` attribute lists datasets such as
  `block1a_dwconv/depthwise_kernel:0`), the same layout written by Keras 3's legacy writer, and
  Keras 3 `.weights.h5` files (`layers/<auto name>/vars/<i>`, the layer name in an attribute).
* ResNet-50/101: torchvision (or timm) state dicts, `.pth` (needs torch) or `.safetensors`, bare or
  in a `{'state_dict': …}` / `{'model': …}` wrapper; fast-MPN-COV's model-zoo files
  (`mpncovresnet50-15991845.pth`: torchvision names plus the GCP reduction `layer_reduce`,
  `layer_reduce_bn` and `fc` over the triu vector); and the `*.pth.tar` checkpoints that the
  `main.py` of fast-MPN-COV and DifferentiableSVD write (`features.<i>`, `representation.conv_dr_block`,
  `classifier`, with or without DataParallel's `module.`), whose pickled extras (argparse.Namespace,
  optimizer state) are read as inert placeholders: only tensors are taken, and no code named by
  the file runs.

The mapping is strict: every backbone tensor the architecture needs must be in the file with the
right shape, and every tensor in the file must have a place, or a ValueError names it. Our models take
images normalised as (x/255 − mean)/std; the Keras files carry that normalisation as a layer,
which is checked and dropped. A file that cannot be read at all gets one sentence naming it and
what was expected.
"""

from __future__ import annotations

import _compat_pickle
import dataclasses
import functools
import io
import os
import pickletools
import zipfile
from collections.abc import Callable
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from gcp_jax import imagenet
from gcp_jax.models import ARCHS, FAMILIES, create_model, family

KERAS_SUFFIXES = (".h5", ".hdf5")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")  # .tar: main.py's `model_best.pth.tar`

# Flax leaf → its rank within a layer, which is the order of Keras' weight lists.
_KERAS_ORDER = {"kernel": 0, "scale": 0, "bias": 1, "mean": 2, "var": 3}
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


# ----------------------------------------------------------------------------------------------
# The target model's leaves; errors for files that cannot be read


def _target_leaves(
    arch: str, num_classes: int, head: str = "gap", **model_options
) -> dict[tuple, jax.ShapeDtypeStruct]:
    """{(collection, module, ..., leaf): ShapeDtypeStruct} of `create_model(arch, ...)`, without running an init."""
    model = create_model(arch, num_classes=num_classes, head=head, **model_options)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    return traverse_util.flatten_dict(unfreeze(variables))


def _modules(leaves) -> dict[tuple, list[tuple]]:
    """Module path → its leaf keys in Keras weight order (kernel, bias / scale, bias, mean, var)."""
    modules: dict[tuple, list[tuple]] = {}
    for key in leaves:
        modules.setdefault(key[1:-1], []).append(key)
    return {m: sorted(keys, key=lambda k: _KERAS_ORDER[k[-1]]) for m, keys in modules.items()}


_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation", "(1)", "(2)")


def _reason(error: Exception) -> str:
    """The gist of a reader's exception on one line (torch's weights-only messages run to paragraphs of advice)."""
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith(_TORCH_BOILERPLATE)]
    return (lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__)[:200]


def _unreadable(path, expected: str, error: Exception) -> ValueError:
    """The one-sentence error for a file that its reader could not read."""
    return ValueError(f"{path} cannot be read ({_reason(error)}); expected {expected}.")


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
        raise _unreadable(path, "a Keras HDF5 weight file (.h5, .weights.h5)", e) from None
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
    """(target leaves, {leaf key: (name in the file, array in Flax layout)}, None) for an EfficientNet."""
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
    return leaves, out, None


# ----------------------------------------------------------------------------------------------
# PyTorch files: tensors only, read without running code the file names


class _Opaque:
    """Inert stand-in for a pickled object that is not a tensor (an argparse.Namespace, a numpy scalar).

    It keeps nothing the file gives it, so unpickling a checkpoint's extras runs no code of theirs.
    """

    qualified_name = "object"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _pickle_ops(stream) -> list[tuple[str, Any]]:
    """(opcode name, argument) of the next pickle in `stream`, disassembled (pickletools), never unpickled."""
    return [(op.name, arg) for op, arg, _ in pickletools.genops(stream)]


def _globals_in(ops) -> set[str]:
    """The classes and functions a pickle names: its GLOBAL opcodes ("module name").

    torch.save writes pickle protocol 2, where GLOBAL is the only way to name code (torch's
    weights-only unpickler accepts no other), with Python 2 names such as `__builtin__.list`;
    torch renames some of them, so each comes both as written and under its Python 3 name.
    """
    names = set()
    for opcode, arg in ops:
        if opcode == "GLOBAL":
            module, name = arg.split(" ")
            names.add(f"{module}.{name}")
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            names.add(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
    return names


_PICKLE_LONG, _TORCH_LEGACY_MAGIC = "LONG1", 0x1950A86A20F9469CFC6C  # the first pickle of torch's legacy format


def _torch_globals(path) -> set[str]:
    """The globals named by the object a torch.save file holds, in either of its formats.

    Zip format (torch ≥ 1.6): `<name>/data.pkl` in the archive. Legacy format (older torch, and
    `_use_new_zipfile_serialization=False`): three small pickles (magic number, protocol, system
    info), then the object's pickle, then the raw storages. ValueError says what is wrong otherwise.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not pickles:
                raise ValueError("a zip archive without the data.pkl that torch.save writes")
            return _globals_in(_pickle_ops(io.BytesIO(archive.read(pickles[0]))))
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise ValueError("a damaged zip archive: truncated, or an incomplete download")
        f.seek(0)
        try:
            legacy = (_PICKLE_LONG, _TORCH_LEGACY_MAGIC) in _pickle_ops(f)
        except (ValueError, EOFError):  # pickletools: ValueError for bytes that are no pickle
            legacy = False
        if not legacy:
            raise ValueError("neither of torch.save's formats, a zip archive or a legacy pickle")
        try:
            for _ in range(2):
                _pickle_ops(f)
            return _globals_in(_pickle_ops(f))
        except (ValueError, EOFError):
            raise ValueError("a damaged legacy torch.save file: truncated, or an incomplete download") from None


_TORCH_FILE = "a state dict or checkpoint written by torch.save (.pth, .pth.tar), or a .safetensors file"


def _torch_load(path):
    """torch.load(weights_only=True) with every global outside torch replaced by an inert `_Opaque`.

    main.py checkpoints pickle an argparse.Namespace or optimizer extras beside the tensors; the
    weights-only unpickler refuses unknown globals, and unsafe unpickling would run whatever the
    file names. Here they load as placeholders (torch's own allowlist, checked first, keeps tensors).
    """
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading {path} needs torch (pip install 'gcp-jax[torch]'); or convert it to "
            ".safetensors, which needs no torch."
        ) from None
    try:
        names = _torch_globals(path)
    except (ValueError, zipfile.BadZipFile) as e:
        raise _unreadable(path, _TORCH_FILE, e) from None
    modules = sorted(n for n in names if n.startswith("torch.nn.modules."))
    if modules:
        raise ValueError(
            f"{path} holds a pickled model ({modules[0]}, …), not a state dict; save "
            "torch.save(model.state_dict(), path) instead."
        )
    # torch's own names (tensor rebuilders, storages) stay with torch's allowlist: one it refuses fails
    # the load in a sentence instead of turning a tensor into a placeholder.
    foreign = sorted(n for n in names if n.split(".")[0] != "torch")
    placeholders = [(type(n.rsplit(".", 1)[-1], (_Opaque,), {"qualified_name": n}), n) for n in foreign]
    try:
        with torch.serialization.safe_globals(placeholders):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on damaged files; each becomes one sentence.
        raise _unreadable(path, _TORCH_FILE, e) from None


def _state_dict(obj, path) -> dict:
    """The state dict in what torch.load returned: the object itself, or its 'state_dict' or 'model' entry."""
    import torch

    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        raise ValueError(
            f"{path} holds a dict ({keys}) with no tensors and no 'state_dict' or 'model' entry; expected a "
            "state dict or a checkpoint holding one."
        )
    what = obj.qualified_name if isinstance(obj, _Opaque) else type(obj).__name__
    raise ValueError(
        f"{path} holds a pickled {what}, not a state dict; save torch.save(model.state_dict(), path) instead."
    )


def _read_torch(path) -> tuple[dict[str, np.ndarray], str | None]:
    """({state-dict key: array}, the checkpoint's `arch` entry or None) of a `.safetensors` file or of a
    torch.save file (its tensors only)."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path), None
        except (SafetensorError, OSError) as e:
            raise _unreadable(path, "a .safetensors file (a JSON header, then the tensors)", e) from None
    import torch

    obj = _torch_load(path)
    arch = obj.get("arch") if isinstance(obj, dict) else None
    state = {k: v.float().numpy() for k, v in _state_dict(obj, path).items() if isinstance(v, torch.Tensor)}
    return state, arch if isinstance(arch, str) else None


# Newmodel (the `main.py` model of fast-MPN-COV and DifferentiableSVD) keeps the ResNet's children as
# `features.<i>` (2, 3 and 10 are ReLU and max-pool, without tensors); with `--pretrained` from
# mpncovresnet they include the reduction (8, 9), else it is `representation.conv_dr_block`.
_NEWMODEL_FEATURES = {
    "0": "conv1",
    "1": "bn1",
    "4": "layer1",
    "5": "layer2",
    "6": "layer3",
    "7": "layer4",
    "8": "layer_reduce",
    "9": "layer_reduce_bn",
}
_NEWMODEL_PREFIXES = {
    ("representation", "conv_dr_block", "0"): "layer_reduce",
    ("representation", "conv_dr_block", "1"): "layer_reduce_bn",
    ("classifier",): "fc",
}


def _canonical_key(key: str) -> str:
    """A state-dict key in the model-zoo naming: torchvision's ResNet, `layer_reduce`, `layer_reduce_bn`, `fc`.

    Drops `module` components (DataParallel, DistributedDataParallel, wherever they wrap) and maps
    Newmodel's `features.<i>`, `representation.conv_dr_block.<i>` and `classifier`.
    """
    parts = [p for p in key.split(".") if p != "module"]
    if len(parts) > 2 and parts[0] == "features" and parts[1] in _NEWMODEL_FEATURES:
        return ".".join([_NEWMODEL_FEATURES[parts[1]], *parts[2:]])
    for prefix, name in _NEWMODEL_PREFIXES.items():
        if tuple(parts[: len(prefix)]) == prefix:
            return ".".join([name, *parts[len(prefix) :]])
    return ".".join(parts)


def _canonical_state(state: dict[str, np.ndarray], path) -> dict[str, tuple[str, np.ndarray]]:
    """{model-zoo key: (key in the file, array)}, without BatchNorm's `num_batches_tracked` counters."""
    out = {}
    for key, array in state.items():
        name = _canonical_key(key)
        if name.endswith("num_batches_tracked"):
            continue
        if name in out:
            raise ValueError(f"{path}: tensors {out[name][0]!r} and {key!r} are both {name!r}; keep one of them.")
        out[name] = (key, array)
    return out


_TORCH_MODULES = {
    ("classifier",): "fc",
    ("head", "reduce_conv"): "layer_reduce",
    ("head", "reduce_bn"): "layer_reduce_bn",
}


def _torch_key(key: tuple) -> str:
    """('params', 'backbone', 'layer1_0', 'downsample_bn', 'scale') → 'layer1.0.downsample.1.weight';
    ('batch_stats', 'head', 'reduce_bn', 'mean') → 'layer_reduce_bn.running_mean'."""
    module = key[1:-1]
    if module in _TORCH_MODULES:
        return f"{_TORCH_MODULES[module]}.{_TORCH_LEAF[key[-1]]}"
    names = [
        m.replace("_", ".").replace("downsample.conv", "downsample.0").replace("downsample.bn", "downsample.1")
        for m in module[1:]
    ]
    return ".".join(names + [_TORCH_LEAF[key[-1]]])


@functools.cache
def _gcp_model_leaves(arch: str) -> dict[tuple, jax.ShapeDtypeStruct]:
    """A GCP model's leaves (read-only; cached, as tracing a ResNet takes seconds): the backbone's, and
    the names, not the shapes, of the reduction's and the classifier's."""
    return _target_leaves(arch, 1, head="gcp", gcp={"dim": 8, "norm": "none"})


def _flax_layout(array: np.ndarray) -> np.ndarray:
    """A torch tensor in Flax's layout: conv OIHW → HWIO, linear [out, in] → [in, out]."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array.T if array.ndim == 2 else array


def _torch_tensors(path, arch):
    """(backbone leaves, {leaf key: (key in the file, array in Flax layout)}, the file's model) for a ResNet.

    The backbone must be complete; the GCP head's reduction and the classifier come along when the
    file has them, each module whole, with the file's shapes (`init_from_pretrained` fits them).
    The file's model is a checkpoint's `arch`, or "mpncovresnet" for fast-MPN-COV's model zoo.
    """
    raw, file_arch = _read_torch(path)
    if file_arch is None and "layer_reduce.weight" in raw:
        file_arch = "mpncovresnet"
    state = _canonical_state(raw, path)
    leaves = _gcp_model_leaves(arch)
    backbone = {k: v for k, v in leaves.items() if k[1] == "backbone"}
    out = {}
    for key in backbone:
        name = _torch_key(key)
        if name not in state:
            raise ValueError(f"{path}: tensor {name!r} that {arch} needs is missing; is it a state dict for {arch}?")
        file_key, array = state.pop(name)
        out[key] = (file_key, _flax_layout(array))
    for keys in _modules(k for k in leaves if k[1] != "backbone").values():
        names = [_torch_key(k) for k in keys]
        found = [n for n in names if n in state]
        if found and len(found) < len(names):
            missing = next(n for n in names if n not in state)
            raise ValueError(f"{path} has {state[found[0]][0]!r} but not {missing!r} of the same layer; is it damaged?")
        for key, name in zip(keys, names):
            if name in state:
                file_key, array = state.pop(name)
                out[key] = (file_key, _flax_layout(array))
    if state:
        raise ValueError(
            f"{path}: tensor {next(iter(state.values()))[0]!r} has no place in {arch}; the file is probably for "
            "another architecture."
        )
    return backbone, out, file_arch


# ----------------------------------------------------------------------------------------------
# Public API


# weight format (models.Family.weight_format) -> (file suffixes, what they are, the reader)
_FORMATS = {
    "keras": (
        KERAS_SUFFIXES,
        "Keras HDF5 weight files (.h5; a .keras archive holds one as model.weights.h5)",
        _keras_tensors,
    ),
    "torch": (
        TORCH_SUFFIXES + (".safetensors",),
        "PyTorch state dicts and checkpoints (.pth, .pt, .bin, .pth.tar) or .safetensors files",
        _torch_tensors,
    ),
}


def _reader(path: str, arch: str) -> Callable:
    """The tensor reader for this file and architecture, or a clear error."""
    if os.path.isdir(path):
        raise ValueError(f"Pretrained weight file {path!r} is a directory; give the weight file inside it.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Pretrained weight file {path!r} does not exist.")
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; choose one of {', '.join(ARCHS)}.")
    suffixes, files, reader = _FORMATS[family(arch).weight_format]
    if not path.endswith(suffixes):
        raise ValueError(f"{arch} loads {files}, got {path!r}.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"Pretrained weight file {path!r} is empty (0 bytes); download or copy it again.")
    return reader


def load_pretrained(path: str, arch: str) -> dict[str, Any]:
    """{"params", "batch_stats"} in gcp_jax's naming from a weight file for `arch`.

    The backbone is that of `create_model(arch, ...)` and must be complete. Beside it: `classifier`
    when the file has one (K classes: `create_model(arch, num_classes=K, head="gap")` for ImageNet
    files), and for fast-MPN-COV / DifferentiableSVD files the GCP head's reduction
    (`head/reduce_conv`, `head/reduce_bn`) with a classifier over its triu vector. The head's and a
    PyTorch classifier's shapes are the file's (`init_from_pretrained` fits them to a model). Raises
    ValueError naming the first tensor that is missing, has the wrong shape or has no place in `arch`,
    and one sentence for a file that cannot be read.
    """
    return _load(path, arch)[0]


def _load(path: str, arch: str) -> tuple[dict[str, Any], str | None]:
    """(`load_pretrained`'s variables, the model the file names: a checkpoint's `arch`, "mpncovresnet" for the
    model zoo, or None)."""
    leaves, tensors, file_arch = _reader(path, arch)(path, arch)
    flat = {}
    for key, (name, array) in tensors.items():
        if key in leaves and array.shape != leaves[key].shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {array.shape}, {arch} needs {leaves[key].shape}; "
                "the file is probably for another architecture."
            )
        flat[key] = np.asarray(array, np.float32)
    return traverse_util.unflatten_dict(flat), file_arch


def _module_names(leaf_paths) -> str:
    """'params/head/reduce_bn/scale', … → 'head/reduce_bn, …' (collection and leaf dropped, first-seen order)."""
    return ", ".join(dict.fromkeys("/".join(p.split(":")[0].split("/")[1:-1]) for p in leaf_paths))


@dataclasses.dataclass
class PretrainedReport:
    """What `init_from_pretrained` copied (`loaded`), left at its fresh init (`skipped`), as leaf paths,
    which of the file's tensors did not fit the model (`unused`: leaf path and why), and the model
    the file names (`file_arch`: a main.py checkpoint's `arch`, "mpncovresnet" for a model-zoo file)."""

    path: str
    loaded: list[str]
    skipped: list[str]
    unused: list[str] = dataclasses.field(default_factory=list)
    file_arch: str | None = None

    @property
    def file_last_stride(self) -> int | None:
        """The stride of layer4 in the model the file was trained as (weights do not show it): 1 for
        fast-MPN-COV's mpncovresnet, 2 for a main.py checkpoint of a torchvision ResNet, else None."""
        for fam in FAMILIES:
            for prefix, stride in fam.file_last_strides.items():
                if self.file_arch is not None and self.file_arch.startswith(prefix):
                    return stride
        return None

    def __str__(self):
        fresh, unused = _module_names(self.skipped), _module_names(self.unused)
        text = f"Loaded {len(self.loaded)} tensors from {self.path}; kept {len(self.skipped)} at their fresh init"
        text += f" ({fresh})" if fresh else ""
        if unused:
            text += f"; the file's {unused} did not fit the model (other shape or no such layer) and went unused"
        if self.file_last_stride:
            text += f"; the file's model is {self.file_arch} (last_stride={self.file_last_stride})"
        return text + "."


def _check_backbone(source, target, path, arch) -> None:
    """Backbone tensors must match one to one: ValueError naming the first that does not."""
    for key in source:
        if key[1] == "backbone" and key not in target:
            raise ValueError(
                f"{path}: tensor {'/'.join(key)} has no place in the model; was it built with arch={arch!r}?"
            )
    for key, value in target.items():
        if key[1] != "backbone":
            continue
        name = "/".join(key)
        if key not in source:
            raise ValueError(
                f"{path}: tensor {name} of the model's backbone is not in the file; was the model built with "
                f"arch={arch!r}?"
            )
        if source[key].shape != value.shape:
            raise ValueError(
                f"{path}: tensor {name} has shape {source[key].shape} in the file and {value.shape} in the "
                f"model; was the model built with arch={arch!r}?"
            )


def init_from_pretrained(variables, path: str, arch: str):
    """Copies pretrained weights into `variables` of a `create_model(arch, ...)` model with any head.

    The backbone must match exactly (ValueError naming the tensor otherwise). The GCP head's
    reduction and the classifier are copied when the file has them with the model's shapes (a
    fast-MPN-COV or DifferentiableSVD file into the same head; an ImageNet classifier into a
    1000-class model); otherwise they keep their init and the report says which of the file's
    tensors went unused. Returns (new variables, PretrainedReport).
    """
    variables_in_file, file_arch = _load(path, arch)
    source = traverse_util.flatten_dict(variables_in_file)
    target = traverse_util.flatten_dict(unfreeze(variables))
    _check_backbone(source, target, path, arch)
    fits = _fitting_modules(source, target)
    out, loaded, skipped = dict(target), [], []
    for key, value in target.items():
        if key[1:-1] in fits:
            out[key] = jnp.asarray(source[key], value.dtype)
            loaded.append("/".join(key))
        else:
            skipped.append("/".join(key))
    unused = [
        f"{'/'.join(key)}: {_misfit(array, target.get(key))}" for key, array in source.items() if key[1:-1] not in fits
    ]
    return traverse_util.unflatten_dict(out), PretrainedReport(path, loaded, skipped, unused, file_arch)


def _fitting_modules(source, target) -> set[tuple]:
    """Module paths whose every tensor, in the model and in the file, is in both with one shape.

    Whole layers only: a classifier whose bias fits (same class count) but whose kernel does not
    (another head) keeps its init entirely.
    """
    modules = {key[1:-1] for key in source} & {key[1:-1] for key in target}
    for key in set(source) ^ set(target):
        modules.discard(key[1:-1])
    return {m for m in modules if all(source[k].shape == target[k].shape for k in source if k[1:-1] == m)}


def _misfit(array, model_leaf) -> str:
    """Why a file tensor went unused."""
    if model_leaf is None:
        return "no such layer in the model"
    if array.shape != model_leaf.shape:
        return f"{array.shape} in the file, {model_leaf.shape} in the model"
    return f"{array.shape} fits, but other tensors of its layer do not"


def last_stride_mismatch(report: PretrainedReport, last_stride: int) -> str:
    """One sentence when the file's model ran layer4 at another stride than `last_stride`, else ""."""
    trained = report.file_last_stride
    if trained is None or trained == last_stride:
        return ""
    return (
        f"The model in {report.path} ({report.file_arch}) ran layer4 at stride {trained}, and model.last_stride is "
        f"{last_stride}; set --config.model.last_stride={trained} to run it as it was trained."
    )
