"""Optimiser, schedule, train/eval steps (inline tiny model, no data pipeline)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcp_jax import config, metrics, optim, sharding, steps


class Tiny(nn.Module):
    """conv + BN + mean pool + "classifier": the variable layout of the real classifiers."""

    num_classes: int = 5

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=2, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = nn.Dropout(0.1, deterministic=not train)(jnp.mean(nn.relu(x), axis=(1, 2)))
        return nn.Dense(self.num_classes, name="classifier")(x)


def optim_config(**overrides):
    cfg = config.get_config().optim
    cfg.update(overrides)
    return cfg


def tiny_setup(mesh, optim_cfg=None, steps_per_epoch=4, total_steps=12, num_classes=5):
    optim_cfg = optim_cfg or optim_config(learning_rate=0.05, decay_epochs=(1, 2))
    model = Tiny(num_classes)
    schedule = optim.learning_rate_schedule(optim_cfg, steps_per_epoch, total_steps)
    tx = optim.make_optimizer(optim_cfg, schedule)
    state = steps.create_train_state(steps.init_variables(model, 16, 0, mesh), tx, mesh)
    return model, tx, state


def batches(n, size=8, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.normal(size=(size, 16, 16, 3)).astype(np.float32),
            "label": rng.integers(0, classes, size).astype(np.int32),
        }
        for _ in range(n)
    ]


def eval_split(images, labels, batch=16):
    """Host batches of an eval split, the last one padded (mask False)."""
    split = []
    for i in range(0, len(labels), batch):
        pad = batch - len(labels[i : i + batch])
        split.append(
            {
                "image": np.pad(images[i : i + batch], ((0, pad), (0, 0), (0, 0), (0, 0))),
                "label": np.pad(labels[i : i + batch], (0, pad)),
                "mask": np.arange(batch) < batch - pad,
            }
        )
    return split


def test_optimizer_matches_pytorch_recipe():
    """clip_grad_norm_ -> SGD(momentum, weight_decay, two param groups) -> MultiStepLR, step for step."""
    import torch  # only this test needs it

    cfg = optim_config(
        learning_rate=0.1,
        classifier_lr_factor=5.0,
        weight_decay=0.01,
        grad_clip_norm=1.0,
        decay_epochs=(1,),
        decay_factor=0.1,
    )
    steps_per_epoch = 2
    schedule = optim.learning_rate_schedule(cfg, steps_per_epoch, 4)
    tx = optim.make_optimizer(cfg, schedule)
    rng = np.random.default_rng(0)
    params = {"backbone": {"w": rng.normal(size=(3, 2))}, "classifier": {"kernel": rng.normal(size=(2, 4))}}
    grads = [
        {k: {n: 3 * rng.normal(size=v.shape) for n, v in group.items()} for k, group in params.items()}
        for _ in range(4)
    ]

    tb, tc = (torch.tensor(params[k][n], requires_grad=True) for k, n in (("backbone", "w"), ("classifier", "kernel")))
    opt = torch.optim.SGD([{"params": [tb]}, {"params": [tc], "lr": 0.5}], lr=0.1, momentum=0.9, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.1)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for step, g in enumerate(grads):
        tb.grad, tc.grad = torch.tensor(g["backbone"]["w"]), torch.tensor(g["classifier"]["kernel"])
        torch.nn.utils.clip_grad_norm_([tb, tc], 1.0)
        opt.step()
        if (step + 1) % steps_per_epoch == 0:
            sched.step()
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p, step=step)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    np.testing.assert_allclose(p["backbone"]["w"], tb.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(p["classifier"]["kernel"], tc.detach().numpy(), rtol=1e-5)


def test_schedules():
    step = optim.learning_rate_schedule(optim_config(learning_rate=1.0, decay_epochs=(2, 3)), 10, 50)
    assert [float(step(s)) for s in (0, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    warm = optim.learning_rate_schedule(optim_config(learning_rate=1.0, decay_epochs=(), warmup_epochs=1), 10, 50)
    assert [float(warm(s)) for s in (0, 4, 9, 30)] == pytest.approx([0.1, 0.5, 1, 1])
    cos = optim.learning_rate_schedule(optim_config(learning_rate=1.0, schedule="cosine"), 10, 50)
    assert [float(cos(s)) for s in (0, 25, 50)] == pytest.approx([1, 0.5, 0], abs=1e-6)


def test_nonfinite_step_never_updates():
    mesh = sharding.make_mesh()
    model, tx, state = tiny_setup(mesh)
    step = steps.make_train_step(model, tx, mesh)
    before = jax.device_get((state.params, state.batch_stats))
    bad = batches(1)[0]
    bad["image"][3, 0, 0, 0] = np.nan
    state, metrics = step(state, sharding.global_batch(bad, mesh))
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1 and int(state.nonfinite) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((state.params, state.batch_stats)), before)
    state, metrics = step(state, sharding.global_batch(batches(1)[0], mesh))
    assert np.isfinite(float(metrics["loss"])) and int(state.nonfinite) == 1
    assert not np.array_equal(jax.device_get(state.params["conv"]["kernel"]), before[0]["conv"]["kernel"])


def _train(mesh, data):
    model, tx, state = tiny_setup(mesh)
    step = steps.make_train_step(model, tx, mesh)
    losses = []
    for batch in data:
        state, metrics = step(state, sharding.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get((state.params, state.batch_stats, state.opt_state))


def test_eight_devices_equal_one_device():
    """Same global batches: same losses and parameters (BatchNorm over the global batch, same dropout)."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    data = batches(6, size=16)
    losses1, state1 = _train(sharding.make_mesh(jax.devices()[:1]), data)
    losses8, state8 = _train(sharding.make_mesh(), data)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state8, state1)


def test_eval_counts_every_example_once():
    """Padded last batch on 8 devices: totals equal a direct count over the unpadded split."""
    mesh = sharding.make_mesh()
    model, _, state = tiny_setup(mesh, num_classes=5)
    rng = np.random.default_rng(1)
    n = 37
    images = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, 5, n).astype(np.int32)
    split = eval_split(images, labels)
    result = steps.evaluate(steps.make_eval_step(model, 5, mesh), state, split, 5, mesh)
    logits = np.asarray(model.apply({"params": state.params, "batch_stats": state.batch_stats}, images))
    correct = logits.argmax(-1) == labels
    per_class = [correct[labels == c].mean() for c in range(5) if (labels == c).any()]
    assert result["count"] == n
    assert result["top1"] == pytest.approx(correct.mean())
    assert result["top5"] == 1.0  # 5 classes
    assert result["mean_class_acc"] == pytest.approx(np.mean(per_class))


@pytest.fixture(scope="module")
def flip_eval():
    """evaluate(images, labels) with one jitted eval_flip step of the tiny model (compiled once), and the
    tiny model's apply."""
    mesh = sharding.make_mesh()
    model, _, state = tiny_setup(mesh)
    step = steps.make_eval_step(model, 5, mesh, flip=True)

    def evaluate(images, labels):
        return steps.evaluate(step, state, eval_split(images, labels), 5, mesh, flip=True)

    def apply(images):
        return np.asarray(model.apply({"params": state.params, "batch_stats": state.batch_stats}, images), np.float64)

    return evaluate, apply


def test_eval_flip_averages_the_logits_of_the_image_and_its_mirror(flip_eval):
    """top1_flip, loss_flip, … are those of 0.5 * (logits(x) + logits(x mirrored left-right)); top1, … stay
    the single crop's, from the same pass."""
    evaluate, apply = flip_eval
    rng = np.random.default_rng(2)
    images = rng.normal(size=(37, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, 5, 37).astype(np.int32)
    result = evaluate(images, labels)

    def loss(z):
        z = z - z.max(-1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), labels]))

    single, averaged = apply(images), 0.5 * (apply(images) + apply(images[:, :, ::-1]))
    assert result["loss"] == pytest.approx(loss(single), rel=1e-5)
    assert result["top1"] == pytest.approx(np.mean(single.argmax(-1) == labels))
    assert result["loss_flip"] == pytest.approx(loss(averaged), rel=1e-5)
    assert abs(loss(averaged) - loss(single)) > 1e-3  # the mirror image changes the logits
    assert result["top1_flip"] == pytest.approx(np.mean(averaged.argmax(-1) == labels))
    assert result["top5_flip"] == 1.0 and 0 <= result["mean_class_acc_flip"] <= 1 and result["count"] == 37
    line = metrics.describe_eval(result)
    assert f"top1 {result['top1']:.4f}" in line and f"crop+flip top1 {result['top1_flip']:.4f}" in line


def test_eval_flip_changes_nothing_on_mirror_symmetric_images(flip_eval):
    """Images symmetric left-right (but not top-bottom): both views are the same image, so the numbers agree."""
    evaluate, _ = flip_eval
    rng = np.random.default_rng(3)
    half = rng.normal(size=(21, 16, 8, 3)).astype(np.float32)
    images = np.concatenate([half, half[:, :, ::-1]], axis=2)
    labels = rng.integers(0, 5, 21).astype(np.int32)
    result = evaluate(images, labels)
    for name in ("loss", "top1", "top5", "mean_class_acc"):
        assert result[name + "_flip"] == result[name], name
