"""Config files load and validate; impossible values and unknown fields are rejected in one sentence."""

import importlib
import os
import re

import pytest

from gcp_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOLS = ("aircraft", "cub", "cars", "dogs", "inat2017")


def load(name, *args):
    return importlib.import_module(f"configs.{name}").get_config(*args)


@pytest.mark.parametrize(
    "name,variant",
    [(p, v) for p in PROTOCOLS for v in ("efficientnet_b5", "resnet50")] + [("demo", None)],
)
def test_configs_are_valid(name, variant):
    config = load(name, variant) if variant else load(name)
    config_lib.validate(config, num_devices=1)
    if variant:
        assert config.model.arch == variant and config.model.last_stride == (1 if variant == "resnet50" else 2)
        assert config.model.head == "gcp" and config.gcp.norm == "seb" and config.gcp.dim == 256


def test_protocol_values():
    """docs/method.md §6 table."""
    air, cub, cars = load("aircraft"), load("cub"), load("cars")

    def schedule(c):
        o = c.optim
        return c.batch_size, c.num_epochs, tuple(o.decay_epochs), o.weight_decay, o.classifier_lr_factor

    assert schedule(air) == (8, 50, (21, 40), 1e-3, 5.0)
    assert schedule(cub) == (10, 200, (50, 100), 1e-4, 20.0)
    assert cars.optim.classifier_lr_factor == 10.0
    for c in (air, cub, cars):
        assert (c.optim.learning_rate, c.optim.momentum, c.optim.grad_clip_norm) == (3e-3, 0.9, 5.0)
        assert c.data.image_size == 448 and not c.data.random_crop
    assert (air.data.resize_mode, air.data.resize_size) == ("square", 512)
    assert (cub.data.resize_mode, cub.data.resize_size) == ("shorter", 448)


@pytest.mark.parametrize("name", ["aircraft", "cub", "cars"])
def test_isqrt_resnet50_is_fast_mpn_cov_finetuning_recipe(name):
    """`:isqrt_resnet50`: fast-MPN-COV's finetune.sh for mpncovresnet50, on the protocol's data transforms."""
    config, protocol = load(name, "isqrt_resnet50"), load(name)
    config_lib.validate(config, num_devices=1)
    m, g, o = config.model, config.gcp, config.optim
    assert (m.arch, m.last_stride, m.head, m.dropout_rate) == ("resnet50", 1, "gcp", 0.0)
    assert (g.dim, g.norm, g.isqrt_iters, g.dtype) == (256, "isqrt", 5, "float32")
    assert (config.batch_size, config.num_epochs, config.eval_flip) == (10, 100, True)
    assert (o.learning_rate, o.momentum, o.schedule, tuple(o.decay_epochs)) == (1.2e-3, 0.9, "step", (100,))
    assert (o.weight_decay, o.classifier_lr_factor, o.grad_clip_norm, o.warmup_epochs) == (1e-3, 5.0, 0.0, 0.0)
    assert config.data.to_dict() == protocol.data.to_dict()
    assert not protocol.eval_flip


def test_defaults_are_valid_and_every_field_is_documented_once():
    """gcp_jax/config.py assigns each field once, with a comment: `c.<field> = ...  # ...` (`d.` for data)."""
    config_lib.validate(config_lib.get_config(), num_devices=1)
    with open(os.path.join(ROOT, "gcp_jax", "config.py"), encoding="utf-8") as f:
        source = f.read()
    config = config_lib.get_config()

    def fields(node, prefix):
        for key, value in node.items():
            yield from fields(value, f"{prefix}{key}.") if hasattr(value, "keys") else [f"{prefix}{key}"]

    names = [f"c.{f}" for f in fields(config, "") if not f.startswith("data.")]
    names += [f"d.{f}" for f in fields(config.data, "")]
    assert len(names) > 50
    for name in names:
        assert len(re.findall(rf"^    {re.escape(name)} = .+  # \S", source, re.M)) == 1, name


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("batch_size", 12, "not divisible by the 8 devices"),
        ("batch_size", 0, "config.batch_size=0 must be an integer of at least 1."),
        ("num_train_steps", 0, "num_train_steps must be -1"),
        ("model.arch", "resnet_huge", "resnet_huge"),
        ("model.head", "max", "max"),
        ("model.dtype", "float16", "float16"),
        ("model.pretrained", "/nonexistent/weights.h5", "is not a file"),
        ("gcp.norm", "cholesky", "gcp.norm"),
        ("gcp.grad", "magic", "gcp.grad"),
        ("gcp.dtype", "float16", "gcp.dtype"),
        ("optim.schedule", "linear", "optim.schedule"),
        ("optim.momentum", 1.5, "optim.momentum"),
        ("optim.decay_epochs", (40, 21), "decay_epochs"),
        ("optim.decay_epochs", ("abc",), "config.optim.decay_epochs must be increasing epoch numbers, got ('abc',)."),
        ("data.on_corrupt", "ignore", "on_corrupt"),
    ],
)
def test_impossible_values_rejected(field, value, message):
    config = load("demo")
    *groups, name = field.split(".")
    target = config
    for group in groups:
        target = target[group]
    target[name] = value
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.validate(config, num_devices=8)


def test_every_problem_is_reported_at_once():
    config = load("demo")
    config.batch_size, config.eval_batch_size = 12, 20
    config.gcp.norm, config.optim.momentum = "sebb", 1.5
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, num_devices=8)
    lines = str(error.value).splitlines()
    assert lines[0] == "4 problems in the config:"
    assert "config.batch_size=12 is not divisible by the 8 devices" in lines[1]
    assert "config.eval_batch_size=20 is not divisible" in lines[2]
    assert "config.gcp.norm='sebb' is not one of sqrt, seb, isqrt, none (did you mean 'seb'?)." in lines[3]
    assert "config.optim.momentum must lie in [0, 1), got 1.5." in lines[4]


def test_override_problems_name_the_closest_field():
    """The wording train.py prints for --config.<field> overrides (tests/test_cli.py runs it)."""
    config = load("demo")
    assert config_lib.unknown_overrides(config, ["optm.learning_rate", "batch_size.x", "optim.momentum"]) == {
        "optm.learning_rate": "config.optm is not a known field (did you mean config.optim?).",
        "batch_size.x": "config.batch_size.x is not a known field: config.batch_size is a value, not a group of fields.",
    }
    assert config_lib.field_type(config, "model.dropout_rate") is float  # a None placeholder keeps its type
    assert config_lib.unreadable_override(config, "optim.decay_epochs", "x") == (
        "config.optim.decay_epochs='x' is not a tuple, e.g. --config.optim.decay_epochs='()'."
    )
    assert config_lib.unreadable_override(config, "optim", "3").startswith("config.optim is a group of fields")
