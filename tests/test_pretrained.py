"""Weight import: parity with keras.applications EfficientNets and a torch ResNet-50, strict errors.

Reference models have random weights (and random BatchNorm statistics, so every tensor matters),
written in the file layouts people have: Keras 3 `.weights.h5`, the tf.keras-2 HDF5 layout of the
keras.applications downloads (built here with h5py), Keras 3's legacy full-model `.h5`, and
torchvision-style state dicts as `.pth` and `.safetensors` (bare or in `{'state_dict'|'model': …}`).
Files that cannot be read (empty, truncated, random bytes, wrong format) get one sentence, and
pickled extras in a checkpoint load as inert placeholders. No download happens. The GCP field's
checkpoints (fast-MPN-COV, DifferentiableSVD) are tests/test_pretrained_gcp.py's.
"""

import argparse
import collections
import functools
import os
import re
import subprocess

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import traverse_util
from pretrained_reference import MEAN, STD, assert_close, nchw, normalised, randomised, raw_images

from bench.torch_models import ResNet
from gcp_jax import pretrained
from gcp_jax.models import create_model

pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`")

SIZE = 64


# ----------------------------------------------------------------------------------------------
# Keras references and file layouts


def keras_efficientnet(name, include_top=True):
    """A keras.applications EfficientNet with random weights, random BN statistics and ImageNet input stats."""
    model = getattr(keras.applications, name)(
        weights=None, include_top=include_top, input_shape=(SIZE, SIZE, 3), classifier_activation=None
    )
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c)]
            )
        elif isinstance(layer, keras.layers.Normalization):
            # weights=None leaves the Normalization layer at mean 0, variance 1: give it ImageNet's.
            layer.set_weights([MEAN, STD**2, np.array(0)])
            layer.finalize_state()  # Keras computes (x − mean)/√variance from constants made here
        elif getattr(layer, "bias", None) is not None:
            layer.set_weights([layer.kernel.numpy(), rng.normal(0, 0.1, layer.bias.shape)])
    return model


def write_tf_keras2_h5(model, path, include_top=True):
    """The layout of keras.applications' downloads (written by tf.keras 2): a group per layer, the
    weights as `<layer>/<layer>/<var>:0` datasets listed in the `weight_names` attribute, input
    layer `input_1`, and the Normalization "variance" holding the std (TF issue 49930)."""
    layers = [layer for layer in model.layers if include_top or layer.name != "predictions"]
    with h5py.File(path, "w") as f:
        names = ["input_1" if isinstance(layer, keras.layers.InputLayer) else layer.name for layer in layers]
        f.attrs["layer_names"] = [n.encode() for n in names]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.9.0"
        for layer, name in zip(layers, names):
            group = f.create_group(name)
            weight_names, values = [], []
            for w in layer.weights:
                var = "depthwise_kernel" if isinstance(layer, keras.layers.DepthwiseConv2D) else w.name
                value = np.asarray(w.numpy())
                if isinstance(layer, keras.layers.Normalization) and w.name == "variance":
                    value = np.sqrt(value)
                weight_names.append(f"{name}/{var}:0")
                values.append(value)
            group.attrs["weight_names"] = [n.encode() for n in weight_names]
            for n, v in zip(weight_names, values):
                group.create_dataset(n, data=v)


@pytest.fixture(scope="module")
def b0(tmp_path_factory):
    """EfficientNet-B0 reference: logits, top feature map and its weights in three layouts."""
    d = tmp_path_factory.mktemp("b0")
    model = keras_efficientnet("EfficientNetB0")
    raw = raw_images()
    features = keras.Model(model.inputs, model.get_layer("top_activation").output)
    files = {
        "keras3": str(d / "b0.weights.h5"),
        "tf_keras2": str(d / "efficientnetb0.h5"),
        "notop": str(d / "efficientnetb0_notop.h5"),
        "keras3_legacy": str(d / "b0_full_model.h5"),
    }
    model.save_weights(files["keras3"])
    write_tf_keras2_h5(model, files["tf_keras2"])
    write_tf_keras2_h5(model, files["notop"], include_top=False)
    model.save(files["keras3_legacy"])  # Keras 3's legacy writer: `model_weights/`, names without ":0"
    return {"raw": raw, "logits": model(raw).numpy(), "features": features(raw).numpy(), "files": files}


@functools.cache
def jitted_apply(arch, method="__call__"):
    """Our gap model's `method`, jitted once per test session (a compile beats op-by-op dispatch)."""
    model = create_model(arch, num_classes=1000, head="gap")
    return jax.jit(lambda variables, images: model.apply(variables, images, method=getattr(model, method)))


def apply(arch, variables, images, method="__call__"):
    return jitted_apply(arch, method)(variables, jnp.asarray(images))


@pytest.mark.parametrize("layout", ["keras3", "tf_keras2", "keras3_legacy"])
def test_efficientnet_b0_matches_keras(b0, layout):
    variables = pretrained.load_pretrained(b0["files"][layout], "efficientnet_b0")
    assert_close(apply("efficientnet_b0", variables, normalised(b0["raw"])), b0["logits"])


def test_notop_file_loads_backbone_only(b0):
    variables = pretrained.load_pretrained(b0["files"]["notop"], "efficientnet_b0")
    assert "classifier" not in variables["params"]
    assert_close(apply("efficientnet_b0", variables, normalised(b0["raw"]), method="features"), b0["features"])


@pytest.mark.slow
def test_efficientnet_b2_matches_keras(tmp_path):
    """A scaled variant (width 1.1, depth 1.2: rounded filters and repeats), in the real download layout."""
    model = keras_efficientnet("EfficientNetB2")
    path = str(tmp_path / "efficientnetb2.h5")
    write_tf_keras2_h5(model, path)
    raw = raw_images(seed=3)
    variables = pretrained.load_pretrained(path, "efficientnet_b2")
    assert_close(apply("efficientnet_b2", variables, normalised(raw)), model(raw).numpy())


# ----------------------------------------------------------------------------------------------
# Keras errors


def copy_h5(src, dst, edit):
    """Copies an HDF5 file, then lets `edit(f)` change it."""
    with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
        for key in fin:
            fin.copy(key, fout)
        fout.attrs.update(fin.attrs)
        edit(fout)
    return str(dst)


def test_wrong_efficientnet_variant_is_named(b0):
    with pytest.raises(ValueError, match=r"layer 'block1b_\w+' that efficientnet_b1 needs is missing"):
        pretrained.load_pretrained(b0["files"]["tf_keras2"], "efficientnet_b1")


def test_keras_shape_mismatch_names_tensor(b0, tmp_path):
    def edit(f):
        del f["stem_conv/stem_conv/kernel:0"]
        f.create_dataset("stem_conv/stem_conv/kernel:0", data=np.zeros((3, 3, 3, 16), np.float32))

    path = copy_h5(b0["files"]["tf_keras2"], tmp_path / "bad.h5", edit)
    with pytest.raises(
        ValueError,
        match=r"'stem_conv/kernel:0' has shape \(3, 3, 3, 16\), efficientnet_b0 needs "
        r"\(3, 3, 3, 32\)",
    ):
        pretrained.load_pretrained(path, "efficientnet_b0")


def test_keras_missing_layer_is_named(b0, tmp_path):
    path = copy_h5(b0["files"]["tf_keras2"], tmp_path / "bad.h5", lambda f: f.__delitem__("block3b_se_reduce"))
    with pytest.raises(ValueError, match="'block3b_se_reduce' that efficientnet_b0 needs is missing"):
        pretrained.load_pretrained(path, "efficientnet_b0")


def test_keras_extra_tensor_is_named(b0, tmp_path):
    def edit(f):
        g = f.create_group("block8a_dwconv")
        g.attrs["weight_names"] = [b"block8a_dwconv/depthwise_kernel:0"]
        g.create_dataset("block8a_dwconv/depthwise_kernel:0", data=np.zeros((3, 3, 8, 1), np.float32))

    path = copy_h5(b0["files"]["tf_keras2"], tmp_path / "bad.h5", edit)
    with pytest.raises(ValueError, match="'block8a_dwconv/depthwise_kernel:0' has no place in efficientnet_b0"):
        pretrained.load_pretrained(path, "efficientnet_b0")


def test_keras_non_imagenet_input_normalisation_is_refused(b0, tmp_path):
    def edit(f):
        f["normalization/normalization/mean:0"][...] = 0.0
        f["normalization/normalization/variance:0"][...] = 1.0

    path = copy_h5(b0["files"]["tf_keras2"], tmp_path / "bad.h5", edit)
    with pytest.raises(ValueError, match="'normalization' normalises with mean"):
        pretrained.load_pretrained(path, "efficientnet_b0")


def test_file_and_arch_errors(b0, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained.load_pretrained(str(tmp_path / "nope.h5"), "efficientnet_b0")
    with pytest.raises(ValueError, match="resnet50 loads PyTorch state dicts"):
        pretrained.load_pretrained(b0["files"]["tf_keras2"], "resnet50")
    with pytest.raises(ValueError, match="Unknown arch"):
        pretrained.load_pretrained(b0["files"]["tf_keras2"], "vgg16")


# ----------------------------------------------------------------------------------------------
# ResNet-50: an independent torch implementation of the torchvision layout (bench/torch_models.py)


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    model = randomised(ResNet)
    images = normalised(raw_images(seed=5))
    with torch.no_grad():
        logits = model(nchw(images)).numpy()
    d = tmp_path_factory.mktemp("r50")
    state = model.state_dict()
    files = {"pth": str(d / "resnet50.pth"), "safetensors": str(d / "resnet50.safetensors")}
    torch.save(state, files["pth"])
    safetensors.torch.save_file(state, files["safetensors"])
    return {"images": images, "logits": logits, "state": state, "files": files}


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_resnet50_matches_torch(r50, fmt):
    variables = pretrained.load_pretrained(r50["files"][fmt], "resnet50")
    assert_close(apply("resnet50", variables, r50["images"]), r50["logits"])


def save_state(state, path):
    safetensors.torch.save_file(state, str(path))
    return str(path)


def test_torch_errors_name_the_tensor(r50, tmp_path):
    state = dict(r50["state"])
    del state["layer3.5.bn2.running_var"]
    with pytest.raises(ValueError, match=r"'layer3\.5\.bn2\.running_var' that resnet50 needs is missing"):
        pretrained.load_pretrained(save_state(state, tmp_path / "a.safetensors"), "resnet50")
    state = dict(r50["state"], **{"layer2.0.conv2.weight": torch.zeros(128, 128, 1, 1)})
    with pytest.raises(
        ValueError,
        match=r"'layer2.0.conv2.weight' has shape \(1, 1, 128, 128\), resnet50 needs "
        r"\(3, 3, 128, 128\)",
    ):
        pretrained.load_pretrained(save_state(state, tmp_path / "b.safetensors"), "resnet50")
    with pytest.raises(ValueError, match=r"'layer3\.\d+\.\w+\.\w+' that resnet101 needs is missing"):
        pretrained.load_pretrained(r50["files"]["safetensors"], "resnet101")


# ----------------------------------------------------------------------------------------------
# Files that cannot be read: one sentence naming the file and what was expected


def small_state():
    return {"weight": torch.arange(12.0).reshape(3, 4), "bias": torch.zeros(3)}


def truncated(path, fraction=0.6):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])


def make_bad_file(kind, d):
    """(path, arch, what the message must say) for one kind of unreadable file."""
    if kind == "empty_pth":
        path = d / "resnet50.pth"
        path.write_bytes(b"")
        return path, "resnet50", r"is empty \(0 bytes\); download or copy it again"
    if kind == "random_pth":
        path = d / "resnet50.pth"
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        return path, "resnet50", r"cannot be read \(.+\); expected a state dict or checkpoint written by torch\.save"
    if kind in ("truncated_zip_pth", "truncated_legacy_pth_tar"):
        path = d / ("resnet50.pth" if kind == "truncated_zip_pth" else "model_best.pth.tar")
        torch.save({"state_dict": small_state()}, path, _use_new_zipfile_serialization=kind == "truncated_zip_pth")
        truncated(path)
        return path, "resnet50", r"cannot be read \(.+\); expected a state dict or checkpoint written by torch\.save"
    if kind == "random_safetensors":
        path = d / "resnet50.safetensors"
        path.write_bytes(np.random.default_rng(1).bytes(4096))
        return path, "resnet50", r"cannot be read \(.*header too large\); expected a \.safetensors file"
    if kind == "truncated_safetensors":
        path = d / "resnet50.safetensors"
        safetensors.torch.save_file(small_state(), str(path))
        truncated(path, 0.9)
        return path, "resnet50", r"cannot be read \(.+\); expected a \.safetensors file"
    if kind == "random_h5":
        path = d / "efficientnetb0.h5"
        path.write_bytes(np.random.default_rng(2).bytes(4096))
        return path, "efficientnet_b0", r"cannot be read \(.*file signature not found.*\); expected a Keras HDF5"
    if kind == "empty_h5":
        path = d / "efficientnetb0.h5"
        path.write_bytes(b"")
        return path, "efficientnet_b0", r"is empty \(0 bytes\)"
    if kind == "wrong_extension":
        path = d / "resnet50.ckpt"
        torch.save(small_state(), path)
        return path, "resnet50", r"resnet50 loads PyTorch state dicts and checkpoints \(\.pth, .*got '.*resnet50\.ckpt'"
    if kind == "pickled_module":
        path = d / "resnet50.pth"
        torch.save(torch.nn.Linear(4, 3), path)
        return (
            path,
            "resnet50",
            r"holds a pickled model \(torch\.nn\.modules\.linear\.Linear, …\), not a state dict; save torch",
        )
    if kind == "pickled_object":
        path = d / "resnet50.pth"
        torch.save(argparse.Namespace(lr=0.1), path)
        return path, "resnet50", r"holds a pickled argparse\.Namespace, not a state dict"
    if kind == "no_tensors":
        path = d / "resnet50.pth"
        torch.save({"epoch": 3, "arch": "resnet50"}, path)
        return path, "resnet50", r"holds a dict \('epoch', 'arch'\) with no tensors and no 'state_dict' or 'model'"
    assert kind == "directory"
    return d, "resnet50", r"is a directory; give the weight file inside it"


BAD_FILES = [
    "empty_pth",
    "random_pth",
    "truncated_zip_pth",
    "truncated_legacy_pth_tar",
    "random_safetensors",
    "truncated_safetensors",
    "random_h5",
    "empty_h5",
    "wrong_extension",
    "pickled_module",
    "pickled_object",
    "no_tensors",
    "directory",
]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_unreadable_files_get_one_sentence(kind, tmp_path):
    path, arch, expected = make_bad_file(kind, tmp_path)
    with pytest.raises(ValueError) as error:
        pretrained.load_pretrained(str(path), arch)
    message = str(error.value)
    assert re.search(expected, message), message
    assert str(path) in message and "\n" not in message and message.endswith(".")
    assert type(error.value) is ValueError  # not torch's or pickle's exception types


class RunsACommand:
    """Pickles as a call of subprocess.run: what an unsafe torch.load would execute."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return subprocess.run, (["touch", str(self.marker)],)


@pytest.mark.parametrize("legacy", [False, True])
def test_extras_naming_code_load_as_placeholders_and_run_nothing(tmp_path, legacy):
    """A checkpoint's pickled extras (a would-be subprocess call, numpy scalars, a defaultdict, pickled under
    Python 2 names) load as inert placeholders: nothing runs, and the tensors load."""
    marker = tmp_path / "ran"
    state = {f"layer4.2.bn3.{k}": torch.ones(2048) for k in ("weight", "bias", "running_mean", "running_var")}
    path = tmp_path / "checkpoint.pth.tar"
    extras = {"hook": RunsACommand(marker), "best_acc": np.float64(0.9), "history": collections.defaultdict(list)}
    torch.save({"state_dict": state, **extras}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ValueError, match=r"tensor '[\w.]+' that resnet50 needs is missing"):
        pretrained.load_pretrained(str(path), "resnet50")  # read to the mapping: the tensors were loaded
    assert not marker.exists()


def test_blocked_modules_are_refused_in_one_sentence(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": small_state(), "x": SystemCall()}, path)
    with pytest.raises(
        ValueError,
        match=r"cannot be read \(Trying to load unsupported GLOBAL posix\.system whose module posix is blocked\); expected a state dict",
    ):
        pretrained.load_pretrained(str(path), "resnet50")


class SystemCall:
    def __reduce__(self):
        return os.system, ("true",)


def test_state_dict_and_model_wrappers(r50, tmp_path):
    bare = traverse_util.flatten_dict(pretrained.load_pretrained(r50["files"]["pth"], "resnet50"))
    for key in ("state_dict", "model"):
        path = str(tmp_path / f"{key}.pth")
        torch.save({key: r50["state"], "epoch": 90}, path)
        wrapped = traverse_util.flatten_dict(pretrained.load_pretrained(path, "resnet50"))
        assert wrapped.keys() == bare.keys()
        assert all(np.array_equal(wrapped[k], bare[k]) for k in bare)


# ----------------------------------------------------------------------------------------------
# init_from_pretrained: backbone into a model with another head / class count


def zero_variables(model):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_init_from_pretrained_keeps_fresh_head(r50):
    model = create_model("resnet50", num_classes=7, head="gcp", gcp={"dim": 16})
    variables, report = pretrained.init_from_pretrained(zero_variables(model), r50["files"]["safetensors"], "resnet50")
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["conv1"]["kernel"], r50["state"]["conv1.weight"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["backbone"]["layer4_2"]["bn3"]["var"], r50["state"]["layer4.2.bn3.running_var"].numpy()
    )
    assert not np.any(variables["params"]["head"]["reduce_conv"]["kernel"])
    assert not np.any(variables["params"]["classifier"]["kernel"])
    assert "params/classifier/kernel" in report.skipped and "params/head/reduce_conv/kernel" in report.skipped
    assert len(report.loaded) == 53 + 53 * 4  # the convolutions and BatchNorms, not fc
    assert str(report).startswith(f"Loaded 265 tensors from {r50['files']['safetensors']}; kept 7 at their fresh")
    assert "head/reduce_conv" in str(report) and "\n" not in str(report)


def test_init_from_pretrained_loads_matching_classifier(r50):
    model = create_model("resnet50", num_classes=1000, head="gap", last_stride=1)
    variables, report = pretrained.init_from_pretrained(zero_variables(model), r50["files"]["pth"], "resnet50")
    assert report.skipped == [] and report.file_last_stride is None  # ImageNet weights serve either stride
    np.testing.assert_array_equal(variables["params"]["classifier"]["kernel"], r50["state"]["fc.weight"].numpy().T)


def test_init_from_pretrained_wrong_model_names_tensor(r50):
    model = create_model("resnet101", num_classes=10, head="gap")
    message = r"tensor \w+/backbone/layer3_\d+/\w+/\w+ of the model's backbone is not in the file; was the model built"
    with pytest.raises(ValueError, match=message):
        pretrained.init_from_pretrained(zero_variables(model), r50["files"]["safetensors"], "resnet50")
