"""eval_only from a weight file: a main.py checkpoint of resnet_tiny + GCP head evaluated as loaded, end to end."""

import os

import jax
import numpy as np
import pytest
import tiny_config as tiny
import torch
from flax import traverse_util

from gcp_jax import assembly, checkpoint, loop, metrics, pretrained, steps

# The model-zoo names of resnet_tiny's modules → main.py's Newmodel (features wrapped in DataParallel).
MAIN_PY_MODULES = {
    "conv1": "features.module.0",
    "bn1": "features.module.1",
    **{f"layer{i}": f"features.module.{3 + i}" for i in range(1, 5)},
    "layer_reduce": "representation.conv_dr_block.0",
    "layer_reduce_bn": "representation.conv_dr_block.1",
    "fc": "classifier",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def trained_variables(config, num_classes, seed=7):
    """Variables of the config's model with `num_classes`: random weights of a sensible scale and
    random BN statistics, unlike any fresh init (drawn in numpy from the shapes: nothing to compile)."""
    model = assembly.build_model(config, num_classes)
    size = config.data.image_size
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
    rng = np.random.default_rng(seed)
    draw = {
        "kernel": lambda s: rng.normal(0, np.sqrt(2 / np.prod(s[:-1])), s),
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "bias": lambda s: rng.normal(0, 0.1, s),
        "mean": lambda s: rng.normal(0, 0.1, s),
        "var": lambda s: rng.uniform(0.5, 1.5, s),
    }
    flat = traverse_util.flatten_dict(shapes)
    variables = {key: draw[key[-1]](leaf.shape).astype(np.float32) for key, leaf in flat.items()}
    return traverse_util.unflatten_dict(variables)


def save_main_py_checkpoint(variables, path, arch="mpncovresnet50"):
    """torch.save of what main.py writes: {'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'}."""
    state_dict = {}
    for key, value in traverse_util.flatten_dict(variables).items():
        value = np.asarray(value)
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else (value.T if value.ndim == 2 else value)
        module, _, rest = pretrained._torch_key(key).partition(".")
        state_dict[f"{MAIN_PY_MODULES[module]}.{rest}"] = torch.from_numpy(np.ascontiguousarray(value))
    checkpoint = {"epoch": 100, "arch": arch, "state_dict": state_dict, "best_prec1": 90.0, "optimizer": {}}
    torch.save(checkpoint, path)
    return str(path)


@pytest.fixture(scope="module")
def released(data_dir, tmp_path_factory):
    """(config, variables, path) of a 4-class main.py checkpoint of the tiny config's model."""
    config = tiny.get_config(data_dir)
    config.eval_only, config.eval_flip = True, True
    variables = trained_variables(config, num_classes=4)
    path = save_main_py_checkpoint(variables, tmp_path_factory.mktemp("weights") / "model_best.pth.tar")
    config.model.pretrained = path
    return config, variables, path


def test_eval_only_evaluates_a_weight_file_as_loaded(released, tmp_path, capsys):
    """No checkpoint in the workdir: the file's model is evaluated as it is, both single-crop and flip-averaged
    accuracies are recorded and printed, and nothing is saved but the record."""
    config, variables, path = released
    workdir = str(tmp_path / "run")
    result = loop.evaluate_checkpoint(config, workdir)

    state = jax.device_get({"params": result.state.params, "batch_stats": result.state.batch_stats})
    jax.tree.map(np.testing.assert_array_equal, state, variables)  # every tensor is the file's
    assert (result.step, result.checkpoints, result.final["count"]) == (0, "", 20)
    assert {"top1", "top1_flip", "loss", "loss_flip"} <= set(result.final)
    (record,) = metrics.read_metrics(workdir)
    assert record == {"step": 0, "split": "test_eval_only", **result.final, "pretrained": path}
    assert not os.path.exists(os.path.join(workdir, "checkpoints")) and not checkpoint.has_checkpoint(workdir)
    out = capsys.readouterr().out
    assert f"evaluated {path} as loaded (no checkpoint in {workdir}): top1 {result.final['top1']:.4f}" in out
    assert f"crop+flip top1 {result.final['top1_flip']:.4f}" in out


def test_eval_only_refuses_a_file_that_leaves_the_classifier_fresh(released, tmp_path):
    """A 5-class checkpoint for the 4-class data set: one sentence naming the classifier and the shapes."""
    config, *_ = released
    five_classes = trained_variables(config, num_classes=5)
    config = config.copy_and_resolve_references()
    config.model.pretrained = save_main_py_checkpoint(five_classes, tmp_path / "five.pth.tar")
    with pytest.raises(ValueError) as error:
        loop.evaluate_checkpoint(config, str(tmp_path / "run"))
    message = str(error.value)
    assert message.startswith(f"{config.model.pretrained} cannot be evaluated as loaded: classifier would keep")
    assert "classifier/kernel is (36, 5) in the file, (36, 4) in the model" in message
    assert "the data set has 4 classes" in message and "\n" not in message
    assert not os.path.exists(tmp_path / "run" / metrics.METRICS_FILE)


def test_a_file_trained_at_another_stride_says_which_to_set(released, tmp_path, capsys, monkeypatch):
    """The file's mpncovresnet ran layer4 at stride 1: eval_only at stride 2 is refused, fine-tuning warned."""
    config, variables, _ = released
    config = config.copy_and_resolve_references()
    config.model.last_stride = 2
    expected = (
        r"\(mpncovresnet50\) ran layer4 at stride 1, and model\.last_stride is 2; set --config\.model\.last_stride=1 "
    )
    with pytest.raises(ValueError, match=expected):
        loop.evaluate_checkpoint(config, str(tmp_path / "run"))
    capsys.readouterr()
    monkeypatch.setattr(steps, "init_variables", lambda *_: variables)  # any init: it is overwritten
    assembly.Run(config).initial_state()
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "set --config.model.last_stride=1 to run it as it was trained." in warnings[0]
