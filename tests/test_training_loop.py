"""The training loop end to end on a tiny generated data set: resume, eval, logging, eval_only."""

import os
import signal

import jax
import numpy as np
import pytest

from configs import demo
from gcp_jax import data, metrics, training


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Each run jits its own steps; a persistent cache lets the later runs reuse the first's executables."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(names[1], 0)
    jax.config.update(names[2], 0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def tiny_config(data_dir):
    """resnet_tiny + 8-d SEB head, 4 classes x 8 train / 5 test images of 32 px: 4 steps per epoch."""
    c = demo.get_config()
    c.data.data_dir = data_dir
    c.data.synthetic.update(num_classes=4, train_per_class=8, test_per_class=5, image_size=32)
    c.data.resize_size = c.data.image_size = 32
    c.gcp.dim = 8
    c.batch_size = c.eval_batch_size = 8
    c.num_epochs, c.log_every_steps = 2, 2
    return c


def params_of(result):
    return jax.device_get((result.state.params, result.state.batch_stats, result.state.opt_state))


def eval_records(workdir):
    return [r for r in metrics.read_metrics(workdir) if r["split"] == "test"]


def test_interrupted_and_resumed_equals_uninterrupted(data_dir, tmp_path, monkeypatch):
    config = tiny_config(data_dir)
    full = training.train_and_evaluate(config, str(tmp_path / "full"))
    assert full.step == 8 and not full.preempted

    real_batches = data.train_batches

    def preempted_after_3(*args, **kwargs):  # SIGTERM arrives while step 3 is being fed
        for i, batch in enumerate(real_batches(*args, **kwargs)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(data, "train_batches", preempted_after_3)
    first = training.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert first.preempted and first.step == 3
    monkeypatch.setattr(data, "train_batches", real_batches)
    resumed = training.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert resumed.step == 8 and not resumed.preempted

    jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(full))
    assert eval_records(tmp_path / "resumed") == eval_records(tmp_path / "full")
    assert [r["step"] for r in eval_records(tmp_path / "full")] == [4, 8]
    assert resumed.best_top1 == full.best_top1
    assert os.path.exists(tmp_path / "full" / "config.json")
    assert os.listdir(tmp_path / "full" / "tensorboard")

    # eval_only evaluates the latest checkpoint: the same numbers as the run's final eval.
    config.eval_only = True
    again = training.evaluate_checkpoint(config, str(tmp_path / "full"))
    assert again.step == 8 and again.final == full.final
    assert again.final["count"] == 20  # 4 classes x 5 test images, each counted once


def test_nonfinite_steps_stop_the_run(data_dir, tmp_path, monkeypatch):
    real_batches = data.train_batches

    def nan_batches(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            yield {**batch, "image": np.full_like(batch["image"], np.nan)}

    monkeypatch.setattr(data, "train_batches", nan_batches)
    config = tiny_config(data_dir)
    config.max_nonfinite_steps = 3
    with pytest.raises(training.NonFiniteError, match=r"Stopped at step 4: 4 steps .*max_nonfinite_steps=3"):
        training.train_and_evaluate(config, str(tmp_path))


def test_pretrained_backbone_is_loaded(data_dir, tmp_path):
    """config.model.pretrained: a torchvision-layout state dict of resnet_tiny fills the backbone."""
    from flax import traverse_util  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

    from gcp_jax import models, pretrained  # pylint: disable=g-import-not-at-top

    imagenet = models.create_model("resnet_tiny", num_classes=1000, head="gap")
    variables = jax.jit(imagenet.init)(jax.random.key(7), np.zeros((1, 32, 32, 3), np.float32))
    state_dict = {}
    for key, value in traverse_util.flatten_dict(jax.device_get(variables)).items():
        value = np.asarray(value)
        value = (
            value.transpose(3, 2, 0, 1) if value.ndim == 4 else (value.T if value.ndim == 2 else value)
        )  # torch layouts
        state_dict[pretrained._torch_key(key)] = np.ascontiguousarray(value)  # pylint: disable=protected-access
    path = str(tmp_path / "resnet_tiny.safetensors")
    save_file(state_dict, path)

    config = tiny_config(data_dir)
    config.model.pretrained = path
    state = training.Run(config).initial_state()
    np.testing.assert_array_equal(
        state.params["backbone"]["conv1"]["kernel"], variables["params"]["backbone"]["conv1"]["kernel"]
    )
    np.testing.assert_array_equal(
        state.batch_stats["backbone"]["bn1"]["var"], variables["batch_stats"]["backbone"]["bn1"]["var"]
    )
