"""The GCP field's PyTorch files load into gcp_jax models that compute the same logits.

fast-MPN-COV's `mpncovresnet50` and DifferentiableSVD's ResNet-50 + SEB are rebuilt in PyTorch
(bench/torch_models.py, independent of gcp_jax) with random weights and random BatchNorm
statistics, saved in each layout their code writes (model-zoo state dict in torch's legacy format;
`main.py` checkpoints with `features.module.`, with `module.` on every key and without prefix, from
scratch and after `--pretrained`, with an argparse.Namespace and optimizer state beside the weights),
and loaded into `create_model("resnet50", head="gcp", ...)`. Broken mappings are shown to fail.
"""

import argparse
import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from pretrained_reference import assert_close, nchw, normalised, randomised, raw_images, relative_error
from torch import nn

from bench.torch_models import SEB, ISqrtCov, MPNCOVResNet, Newmodel, covariance, resnet50_trunk, seb
from gcp_jax import linalg, pretrained
from gcp_jax.models import create_model

NUM_CLASSES = 10
ISQRT = {"dim": 256, "norm": "isqrt", "isqrt_iters": 5}  # fast-MPN-COV's mpncovresnet50 (with last_stride=1)


def checkpoint(model, arch):
    """What main.py saves: the state dict beside training extras, an argparse.Namespace among them."""
    return {
        "epoch": 3,
        "arch": arch,
        "state_dict": model.state_dict(),
        "best_prec1": torch.tensor(88.1),
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 1.2e-3}]},
        "args": argparse.Namespace(arch=arch, lr=1.2e-3, pretrained=True),
    }


def save(obj, path, legacy):
    """torch.save in the zip format, or in the legacy format of torch < 1.6 (the model-zoo files)."""
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


def main_py_features(net, pretrained_layout):
    """Newmodel around mpncovresnet50 as main.py builds it: with `--pretrained` the reduction stays in
    `features` (8, 9, 10) and the representation has no tensors; from scratch `features` ends at layer4
    and the representation owns the reduction (`conv_dr_block`). Weights are shared with `net`."""
    children = list(net.children())
    if pretrained_layout:
        return Newmodel(nn.Sequential(*children[:-1]), ISqrtCov(256), net.fc)
    representation = ISqrtCov(2048)
    representation.conv_dr_block = nn.Sequential(*children[8:11])
    return Newmodel(nn.Sequential(*children[:8]), representation, net.fc)


def data_parallel_features(model):
    """main.py's default wrapping: DataParallel around `features` only (keys `features.module.<i>…`)."""
    model.features = nn.DataParallel(model.features)
    return model


@pytest.fixture(scope="module")
def mpncov(tmp_path_factory):
    """mpncovresnet50 (random, 10 classes), its logits, and its weights in four layouts with their logits."""
    d = tmp_path_factory.mktemp("mpncov")
    net = randomised(lambda: MPNCOVResNet(num_classes=NUM_CLASSES), seed=1)
    layouts = {
        "model_zoo": (net, lambda m: m.state_dict(), "mpncovresnet50-0123abcd.pth", True),
        "features_module": (
            data_parallel_features(main_py_features(net, False)),
            lambda m: checkpoint(m, "mpncovresnet50"),
            "checkpoint.pth.tar",
            True,
        ),
        "module_everywhere": (
            nn.DataParallel(main_py_features(net, False)),
            lambda m: checkpoint(m, "mpncovresnet50"),
            "net-epoch-3.pth.tar",
            False,
        ),
        "pretrained_features_8_9": (
            data_parallel_features(main_py_features(net, True)),
            lambda m: checkpoint(m, "mpncovresnet50"),
            "model_best.pth.tar",
            False,
        ),
    }
    images = normalised(raw_images(seed=11))
    files, logits, states = {}, {}, {}
    for name, (model, content, filename, legacy) in layouts.items():
        files[name] = save(content(model), d / filename, legacy)
        states[name] = model.state_dict()
        with torch.no_grad():
            logits[name] = model(nchw(images)).numpy()
    return {"images": images, "files": files, "logits": logits, "states": states}


@functools.cache
def compiled(gcp_items, last_stride, dtype="float32", method="__call__"):
    """A jitted gcp model `method` (compiled once per configuration and x64 setting)."""
    model = create_model(
        "resnet50", num_classes=NUM_CLASSES, head="gcp", gcp=dict(gcp_items), last_stride=last_stride, dtype=dtype
    )
    fn = jax.jit(lambda variables, images: model.apply(variables, images, method=getattr(model, method)))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    return fn, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def isqrt_model():
    return compiled(tuple(ISQRT.items()), 1)


@pytest.fixture(scope="module")
def zoo_variables(mpncov):
    _, zeros = isqrt_model()
    variables, _ = pretrained.init_from_pretrained(zeros, mpncov["files"]["model_zoo"], "resnet50")
    return variables


def test_layouts_have_the_keys_of_their_code(mpncov):
    """The reference models write the key layouts that gcp_jax.pretrained documents."""
    keys = {name: list(state) for name, state in mpncov["states"].items()}
    assert "layer_reduce.weight" in keys["model_zoo"] and "fc.weight" in keys["model_zoo"]
    assert "features.module.6.0.downsample.1.running_var" in keys["features_module"]
    assert "representation.conv_dr_block.1.running_mean" in keys["features_module"]
    assert "module.features.0.weight" in keys["module_everywhere"]
    assert "module.classifier.weight" in keys["module_everywhere"]
    assert "features.module.8.weight" in keys["pretrained_features_8_9"]
    assert "features.module.9.num_batches_tracked" in keys["pretrained_features_8_9"]
    assert not any(k.startswith("representation") for k in keys["pretrained_features_8_9"])


@pytest.mark.parametrize("layout", ["model_zoo", "features_module", "module_everywhere", "pretrained_features_8_9"])
def test_mpncovresnet50_logits_match(mpncov, layout):
    apply, zeros = isqrt_model()
    variables, report = pretrained.init_from_pretrained(zeros, mpncov["files"][layout], "resnet50")
    assert report.skipped == [] and report.unused == []
    assert report.file_last_stride == 1  # the zoo's layout, or the checkpoint's arch 'mpncovresnet50'
    assert str(report).endswith(f"kept 0 at their fresh init; the file's model is {report.file_arch} (last_stride=1).")
    assert_close(apply(variables, mpncov["images"]), mpncov["logits"][layout], rtol=1e-4)


def _triu_read_by_columns(kernel):
    """The classifier rows in column-major upper-triangle order: a loader that got the triu order wrong."""
    rows, cols = np.triu_indices(256)
    return kernel[np.lexsort((rows, cols))]


def _swap_mean_var(stats):
    return {"mean": stats["var"], "var": stats["mean"]}


def _fresh_reduction():
    """The reduction as a fresh model has it: Kaiming-normal (fan-out) kernel, BatchNorm at identity."""
    kernel = np.random.default_rng(3).normal(0, np.sqrt(2 / 256), (1, 1, 2048, 256)).astype(np.float32)
    ones, zeros = np.ones(256, np.float32), np.zeros(256, np.float32)
    return {"reduce_conv": {"kernel": kernel}, "reduce_bn": {"scale": ones, "bias": zeros}}, {
        "reduce_bn": {"mean": zeros, "var": ones}
    }


@pytest.mark.parametrize("broken", ["triu_order_transposed", "bn_mean_var_swapped", "reduction_left_fresh"])
def test_broken_mappings_fail_the_parity_check(mpncov, zoo_variables, broken):
    apply, _ = isqrt_model()
    variables = jax.tree.map(np.asarray, zoo_variables)
    if broken == "triu_order_transposed":
        variables["params"]["classifier"]["kernel"] = _triu_read_by_columns(variables["params"]["classifier"]["kernel"])
    elif broken == "bn_mean_var_swapped":
        variables["batch_stats"]["head"]["reduce_bn"] = _swap_mean_var(variables["batch_stats"]["head"]["reduce_bn"])
    else:
        variables["params"]["head"], variables["batch_stats"]["head"] = _fresh_reduction()
    reference = mpncov["logits"]["model_zoo"]
    assert relative_error(apply(zoo_variables, mpncov["images"]), reference) <= 1e-4
    # NaN (a negative "variance") fails the check as well as a wrong number does.
    assert not relative_error(apply(variables, mpncov["images"]), reference) <= 1e-4


def test_new_classes_keep_a_fresh_classifier_and_say_so(mpncov):
    """Fine-tuning mpncovresnet50 to 7 classes: backbone and reduction load, the classifier stays fresh."""
    model = create_model("resnet50", num_classes=7, head="gcp", gcp=ISQRT, last_stride=1)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    variables, report = pretrained.init_from_pretrained(zeros, mpncov["files"]["model_zoo"], "resnet50")
    assert sorted(report.skipped) == ["params/classifier/bias", "params/classifier/kernel"]
    assert sorted(report.unused) == [
        "params/classifier/bias: (10,) in the file, (7,) in the model",
        "params/classifier/kernel: (32896, 10) in the file, (32896, 7) in the model",
    ]
    assert str(report).endswith(
        "kept 2 at their fresh init (classifier); the file's classifier did not fit the model (other shape or "
        "no such layer) and went unused; the file's model is mpncovresnet (last_stride=1)."
    )
    assert not np.any(variables["params"]["classifier"]["kernel"])
    state = torch.load(mpncov["files"]["model_zoo"], weights_only=True)
    np.testing.assert_array_equal(
        variables["params"]["head"]["reduce_conv"]["kernel"][0, 0], state["layer_reduce.weight"][:, :, 0, 0].numpy().T
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["head"]["reduce_bn"]["var"], state["layer_reduce_bn.running_var"].numpy()
    )


def test_gap_model_takes_the_backbone_and_reports_the_head_unused(mpncov):
    model = create_model("resnet50", num_classes=NUM_CLASSES, head="gap")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    _, report = pretrained.init_from_pretrained(zeros, mpncov["files"]["pretrained_features_8_9"], "resnet50")
    assert len(report.loaded) == 265 and len(report.skipped) == 2
    assert "params/head/reduce_conv/kernel: no such layer in the model" in report.unused
    assert "params/classifier/kernel: (32896, 10) in the file, (2048, 10) in the model" in report.unused
    assert "params/classifier/bias: (10,) fits, but other tensors of its layer do not" in report.unused
    unused = str(report).split("; the file's ")[1]
    assert all(m in unused for m in ("head/reduce_conv", "head/reduce_bn", "classifier"))


def test_load_pretrained_names_the_layers_of_a_main_py_checkpoint(mpncov):
    variables = pretrained.load_pretrained(mpncov["files"]["features_module"], "resnet50")
    flat = traverse_util.flatten_dict(variables)
    assert flat["params", "head", "reduce_conv", "kernel"].shape == (1, 1, 2048, 256)
    assert flat["batch_stats", "head", "reduce_bn", "mean"].shape == (256,)
    assert flat["params", "classifier", "kernel"].shape == (32896, NUM_CLASSES)
    assert len(flat) == 265 + 5 + 2


def test_damaged_checkpoints_are_errors_naming_the_tensor(mpncov, tmp_path):
    state = dict(mpncov["states"]["features_module"], **{"features.module.6.2.bn1.running_var": torch.ones(7)})
    path = save({"state_dict": state}, tmp_path / "bad_shape.pth.tar", legacy=False)
    with pytest.raises(
        ValueError, match=r"'features\.module\.6\.2\.bn1\.running_var' has shape \(7,\), resnet50 needs"
    ):
        pretrained.load_pretrained(path, "resnet50")
    state = dict(mpncov["states"]["features_module"])
    del state["representation.conv_dr_block.1.running_var"]
    path = save({"state_dict": state}, tmp_path / "half_bn.pth.tar", legacy=False)
    with pytest.raises(
        ValueError, match=r"has 'representation\.conv_dr_block\.1\.weight' but not 'layer_reduce_bn\.running_var'"
    ):
        pretrained.load_pretrained(path, "resnet50")
    state = dict(mpncov["states"]["model_zoo"], **{"classifier.bias": torch.zeros(NUM_CLASSES)})
    path = save(state, tmp_path / "two_classifiers.pth", legacy=False)
    with pytest.raises(ValueError, match=r"tensors 'fc\.bias' and 'classifier\.bias' are both 'fc\.bias'"):
        pretrained.load_pretrained(path, "resnet50")


# ----------------------------------------------------------------------------------------------
# DifferentiableSVD: ResNet-50 (layer4 stride 2) + SEB, trained from scratch, saved with `--gpu` (no prefix)

# 128 px: 4×4 maps, 16 positions. An 8-d reduction keeps Σ full rank (a 256-d one would have rank 15:
# its 241 null eigenvalues are float64 noise, ≈1e-14, whose square roots, ≈1e-7, enter Σ^{1/2} and cap
# any two float64 implementations' agreement near 1e-6). The 256-d layout is the iSQRT tests' above.
SEB_DIM = 8
SEB_CODE = {"dim": SEB_DIM, "norm": "seb", "seb_variant": "code", "dtype": "float64"}  # DifferentiableSVD's


@pytest.fixture(scope="module")
def seb_checkpoint(tmp_path_factory):
    """Newmodel(resnet50, SEB) and its main.py checkpoint; logits as the code runs it (float32 backbone and
    reduction, float64 spectral part, float32 classifier) and the triu vector of the all-float64 model."""

    def factory():
        features = nn.Sequential(*[m for _, m in resnet50_trunk(last_stride=2)])
        return Newmodel(features, SEB(2048, SEB_DIM), nn.Linear(SEB_DIM * (SEB_DIM + 1) // 2, NUM_CLASSES))

    model = randomised(factory, seed=2)
    with torch.no_grad():  # No reduced channel zero at every position: the code's forward is NaN there (see below).
        model.representation.conv_dr_block[1].bias.uniform_(1.0, 2.0)
    path = save(checkpoint(model, "resnet50"), tmp_path_factory.mktemp("seb") / "model_best.pth.tar", legacy=True)
    images = normalised(raw_images(size=128, seed=12))
    double = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model(nchw(images)).numpy()
        features = double.features(nchw(images, torch.float64))
        sigma = covariance(double.representation.conv_dr_block(features))
        pooled64 = double.representation(features).numpy()
    return {"path": path, "images": images, "logits": logits, "pooled64": pooled64, "sigma64": sigma.numpy()}


def test_seb_checkpoint_matches_differentiable_svd(seb_checkpoint):
    """As configured for reproduction (x64, float64 head, float32 backbone): logits to 1e-4. With every
    variable and the backbone in float64 as well, the triu vector of SEB(Σ) agrees to float64 rounding."""
    eigenvalues = np.linalg.eigvalsh(seb_checkpoint["sigma64"])
    assert eigenvalues.min() > 1e-4 * eigenvalues.max()  # a well-conditioned Σ: the comparison is meaningful
    with jax.enable_x64(True):
        apply, zeros = compiled(tuple(SEB_CODE.items()), 2)
        variables, report = pretrained.init_from_pretrained(zeros, seb_checkpoint["path"], "resnet50")
        logits = apply(variables, seb_checkpoint["images"])
        pooled64, _ = compiled(tuple(SEB_CODE.items()), 2, dtype=jnp.float64, method="pooled")
        # Flax's BatchNorm normalises in its statistics' dtype: float64 variables for a float64 model.
        pooled = pooled64(jax.tree.map(lambda a: np.asarray(a, np.float64), variables), seb_checkpoint["images"])
    assert not jax.config.jax_enable_x64
    assert report.skipped == [] and report.unused == []
    assert (report.file_arch, report.file_last_stride) == ("resnet50", 2)
    assert_close(logits, seb_checkpoint["logits"], rtol=1e-4)
    assert pooled.dtype == np.float64
    assert_close(pooled, seb_checkpoint["pooled64"], rtol=1e-11)


def test_a_dead_channel_makes_the_released_seb_forward_nan_but_not_ours():
    """A reduced channel that is zero at every position (ReLU) gives Σ a zero row and column; the SVD then
    leaves exact zeros in Q Sᵀ, and the code's A ⊘ N is 0/0 there. gcp_jax evaluates the closed form
    (1 + ‖Q Sᵀ‖_F)·Q, which is what the code computes wherever it is defined."""
    features = np.maximum(np.random.default_rng(0).normal(size=(1, 6, 4, 4)), 0)
    features[:, 0] = 0
    sigma = covariance(torch.from_numpy(features))
    assert torch.isnan(seb(sigma)).any()
    with jax.enable_x64(True):
        ours = np.asarray(linalg.seb(jnp.asarray(sigma.numpy())))
    assert np.isfinite(ours).all()
    live = np.ix_([0], range(1, 6), range(1, 6))
    assert_close(ours[live], seb(sigma[:, 1:, 1:]).numpy(), rtol=1e-12)
