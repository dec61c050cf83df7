"""The training loop end to end on a tiny generated data set: resume, eval, logging, eval_only."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_config as tiny

from gcp_jax import assembly, data, loop, metrics, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


real_train_batches = data.train_batches


class Batches:
    """The real training batches of `data.train_batches(*args, **kwargs)`, each passed through `change(i, batch)`."""

    def __init__(self, change, *args, **kwargs):
        self._batches, self._change, self._count = real_train_batches(*args, **kwargs), change, 0

    @property
    def num_skipped(self):
        return self._batches.num_skipped

    def __next__(self):
        self._count += 1
        return self._change(self._count, next(self._batches))

    def close(self):
        self._batches.close()


def params_of(result):
    return jax.device_get((result.state.params, result.state.batch_stats, result.state.opt_state))


def eval_records(workdir):
    return [r for r in metrics.read_metrics(workdir) if r["split"] == "test"]


def test_interrupted_and_resumed_equals_uninterrupted(data_dir, tmp_path, monkeypatch):
    config = tiny.get_config(data_dir)
    full = loop.train_and_evaluate(config, str(tmp_path / "full"))
    assert full.step == 8 and not full.preempted

    def sigterm_at_3(i, batch):  # SIGTERM arrives while step 3 is being fed
        if i == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    monkeypatch.setattr(data, "train_batches", lambda *a, **k: Batches(sigterm_at_3, *a, **k))
    first = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert first.stopped_by == signal.SIGTERM and first.step == 3
    monkeypatch.setattr(data, "train_batches", real_train_batches)
    resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert resumed.step == 8 and not resumed.preempted

    jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(full))
    assert eval_records(tmp_path / "resumed") == eval_records(tmp_path / "full")
    assert [r["step"] for r in eval_records(tmp_path / "full")] == [4, 8]
    assert resumed.best_top1 == full.best_top1
    assert os.path.exists(tmp_path / "full" / "config.json")
    assert os.listdir(tmp_path / "full" / "tensorboard")

    # eval_only evaluates the latest checkpoint with the run's saved config: the run's final eval.
    overrides = {"eval_only": True, "gcp.dim": 16, "data.eval_split": "test"}  # gcp.dim: not for eval, ignored
    eval_config = run_config.load_config_with(str(tmp_path / "full"), overrides, eval_only=True)
    assert eval_config.gcp.dim == 8 and eval_config.eval_only
    again = loop.evaluate_checkpoint(eval_config, str(tmp_path / "full"))
    assert again.step == 8 and again.final == full.final
    assert again.final["count"] == 20 and again.final["skipped_images"] == 0  # 4 classes x 5 images, once each
    assert metrics.read_metrics(tmp_path / "full")[-1] == {"step": 8, "split": "test_eval_only", **full.final}


def test_nonfinite_steps_stop_the_run(data_dir, tmp_path, monkeypatch):
    def nan_images(i, batch):
        return {**batch, "image": np.full_like(batch["image"], np.nan)}

    monkeypatch.setattr(data, "train_batches", lambda *a, **k: Batches(nan_images, *a, **k))
    config = tiny.get_config(data_dir)
    config.max_nonfinite_steps = 3
    with pytest.raises(loop.NonFiniteError, match=r"Stopped at step 4: 4 steps .*max_nonfinite_steps=3"):
        loop.train_and_evaluate(config, str(tmp_path))


def test_pretrained_backbone_is_loaded(data_dir, tmp_path):
    """config.model.pretrained: a torchvision-layout state dict of resnet_tiny fills the backbone."""
    from flax import traverse_util
    from safetensors.numpy import save_file

    from gcp_jax import models, pretrained

    imagenet = models.create_model("resnet_tiny", num_classes=1000, head="gap")
    variables = jax.jit(imagenet.init)(jax.random.key(7), np.zeros((1, 32, 32, 3), np.float32))
    state_dict = {}
    for key, value in traverse_util.flatten_dict(jax.device_get(variables)).items():
        value = np.asarray(value)
        value = (
            value.transpose(3, 2, 0, 1) if value.ndim == 4 else (value.T if value.ndim == 2 else value)
        )  # torch layouts
        state_dict[pretrained._torch_key(key)] = np.ascontiguousarray(value)
    path = str(tmp_path / "resnet_tiny.safetensors")
    save_file(state_dict, path)

    config = tiny.get_config(data_dir)
    config.model.pretrained = path
    state = assembly.Run(config).initial_state()
    np.testing.assert_array_equal(
        state.params["backbone"]["conv1"]["kernel"], variables["params"]["backbone"]["conv1"]["kernel"]
    )
    np.testing.assert_array_equal(
        state.batch_stats["backbone"]["bn1"]["var"], variables["batch_stats"]["backbone"]["bn1"]["var"]
    )


def test_metrics_writer_leaves_torch_unloaded_and_writes_tensorboard_scalars(tmp_path):
    """tensorboardX would import an installed torch (1.8 s of every start); the writer keeps it out, and a
    torch imported afterwards still works."""
    script = (
        "import sys; from gcp_jax import metrics\n"
        f"w = metrics.MetricsWriter({str(tmp_path)!r}); w.write(3, 'train', {{'loss': 0.5}}); w.close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import torch; assert float(torch.ones(2).sum()) == 2.0\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120)
    (events,) = os.listdir(tmp_path / "tensorboard")
    assert b"train/loss" in (tmp_path / "tensorboard" / events).read_bytes()
    assert metrics.read_metrics(tmp_path) == [{"step": 3, "split": "train", "loss": 0.5}]
