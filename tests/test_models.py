"""Backbones and create_model: parameter counts, shapes, the GCP head's forward and backward, dtypes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcp_jax.models import ARCHS, create_model
from gcp_jax.models.classifier import Linear
from gcp_jax.models.efficientnet import block_specs, round_filters, round_repeats

# Trainable parameters with 1000 classes: keras.applications EfficientNetB0…B7 (its trainable
# weights) and torchvision resnet50/resnet101.
PUBLISHED_PARAMS = {
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
}


def shapes(model, size=64, batch=1):
    """Variable shapes, without running an init."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, size, size, 3))))


def num_params(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("arch", list(PUBLISHED_PARAMS))
def test_parameter_counts_match_published(arch):
    assert num_params(shapes(create_model(arch, num_classes=1000, head="gap"))) == PUBLISHED_PARAMS[arch]


@pytest.mark.parametrize(
    "arch, channels",
    [
        ("efficientnet_b0", 1280),
        ("efficientnet_b2", 1408),
        ("efficientnet_b5", 2048),
        ("efficientnet_b7", 2560),
        ("resnet50", 2048),
        ("resnet101", 2048),
    ],
)
def test_feature_maps_have_output_stride_32(arch, channels):
    model = create_model(arch, num_classes=3, head="gap")
    features = jax.eval_shape(
        lambda v, x: model.apply(v, x, method=model.features), shapes(model), jnp.zeros((1, 64, 96, 3))
    )
    assert features.shape == (1, 2, 3, channels)


@pytest.mark.parametrize(
    "arch, size, last_stride, side",
    [("resnet50", 448, 1, 28), ("resnet50", 448, 2, 14), ("resnet_tiny", 64, 2, 4), ("resnet_tiny", 64, 1, 8)],
)
def test_resnet_last_stride(arch, size, last_stride, side):
    model = create_model(arch, num_classes=3, head="gap", last_stride=last_stride)
    variables = shapes(model)
    assert num_params(variables) == num_params(shapes(create_model(arch, num_classes=3, head="gap")))
    features = jax.eval_shape(
        lambda v, x: model.apply(v, x, method=model.features), variables, jnp.zeros((1, size, size, 3))
    )
    assert features.shape[1:3] == (side, side)


def test_efficientnet_scaling_rules():
    assert [round_filters(32, w) for w in (1.0, 1.1, 1.6, 2.0)] == [32, 32, 48, 64]
    assert round_filters(1280, 1.6) == 2048 and round_filters(16, 1.8) == 32  # never 10 % below
    assert [round_repeats(r, 2.2) for r in (1, 2, 3, 4)] == [3, 5, 7, 9]
    specs = block_specs(1.0, 1.0, 0.2)
    assert [s.name for s in specs][:4] == ["block1a", "block2a", "block2b", "block3a"] and len(specs) == 16
    assert [s.drop_rate for s in specs] == pytest.approx([0.2 * i / 16 for i in range(16)])
    assert len(block_specs(1.6, 2.2, 0.2)) == 39  # EfficientNet-B5


def test_variable_tree_and_classifier_init():
    model = create_model("resnet_tiny", num_classes=5, head="gcp", gcp={"dim": 8})
    variables = shapes(model, 32)
    assert set(variables["params"]) == {"backbone", "head", "classifier"}
    assert set(variables["batch_stats"]) == {"backbone", "head"}
    assert variables["params"]["classifier"]["kernel"].shape == (36, 5)
    params = Linear(5).init(jax.random.key(0), jnp.zeros((1, 36)))["params"]
    bound = 1 / np.sqrt(36)
    for x in (params["kernel"], params["bias"]):  # both U(±1/√fan_in), as PyTorch's nn.Linear
        assert bound / 2 < np.abs(x).max() <= bound


def random_variables(model, size, seed=0):
    """Random weights and BN statistics by shape: as good as an init for testing, and compiles nothing."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        if name == "scale":
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        fan_in = np.prod(s.shape[:-1]) if len(s.shape) > 1 else 10
        return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes(model, size))


def loss_and_grads(model, variables, images, labels, rng):
    def loss(params):
        logits, updates = model.apply(
            {**variables, "params": params}, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
        )
        log_p = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1)), updates

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def test_gcp_model_forward_and_backward():
    model = create_model("resnet_tiny", num_classes=5, head="gcp", gcp={"dim": 8}, dropout_rate=0.1)
    variables = random_variables(model, 32)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
    (loss, updates), grads = loss_and_grads(model, variables, images, jnp.arange(4) % 5, jax.random.key(1))
    assert np.isfinite(loss)
    for part in ("backbone", "head", "classifier"):
        leaves = jax.tree.leaves(grads[part])
        assert all(np.all(np.isfinite(g)) for g in leaves) and any(np.any(g != 0) for g in leaves), part
    head_stats = lambda tree: tree["batch_stats"]["head"]["reduce_bn"]["mean"]
    assert not np.allclose(head_stats(variables), head_stats(updates))
    pooled, logits = model.apply(variables, images, method=lambda m, x: (m.pooled(x), m(x)))
    assert pooled.shape == (4, 36) and logits.shape == (4, 5) and logits.dtype == jnp.float32


@pytest.mark.slow
def test_efficientnet_gcp_train_step():
    """EfficientNet-B0 with drop-connect, dropout and the SEB head: finite loss and gradients."""
    model = create_model("efficientnet_b0", num_classes=3, head="gcp", gcp={"dim": 8}, dropout_rate=0.2)
    variables = random_variables(model, 64)
    images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64, 64, 3)), jnp.float32)
    (loss, _), grads = loss_and_grads(model, variables, images, jnp.array([0, 2]), jax.random.key(0))
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_gap_pooling_and_dropout():
    model = create_model("resnet_tiny", num_classes=4, head="gap", dropout_rate=0.5)
    variables = random_variables(model, 32)
    images = jnp.ones((2, 32, 32, 3))
    assert model.apply(variables, images, method=model.pooled).shape == (2, 128)
    train = lambda key: model.apply(variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0]
    assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))
    np.testing.assert_array_equal(model.apply(variables, images), model.apply(variables, images))


def test_bfloat16_backbone():
    model = create_model("resnet_tiny", num_classes=4, head="gcp", gcp={"dim": 8}, dtype="bfloat16")
    variables = random_variables(model, 32)
    images = jnp.ones((2, 32, 32, 3))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    features, pooled, logits = model.apply(variables, images, method=lambda m, x: (m.features(x), m.pooled(x), m(x)))
    assert features.dtype == jnp.bfloat16 and pooled.dtype == jnp.float32 and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_every_arch_is_registered():
    assert set(ARCHS) == set(PUBLISHED_PARAMS) | {"resnet_tiny"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(arch="vgg16"), "create_model: arch='vgg16' is not one of efficientnet_b0"),
        (dict(head="max"), "create_model: head='max' is not one of gap, gcp."),
        (dict(dtype="float16"), "dtype='float16' is not one of float32, bfloat16, float64 (did you mean 'bfloat16'?)"),
        (dict(last_stride=4), "last_stride=4 must be 1 or 2"),
        (dict(last_stride=1), "last_stride=1 applies to ResNets only"),
        (dict(arch="resnet50", drop_connect_rate=0.2), "drop_connect_rate applies to EfficientNets only"),
        (dict(gcp={"norm": "svd"}), "gcp: norm='svd' is not one of"),
    ],
)
def test_create_model_errors(kwargs, message):
    kwargs = {"arch": "efficientnet_b0", "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        create_model(kwargs.pop("arch"), **kwargs)
