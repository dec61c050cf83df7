"""The train state and the jitted, sharded train and eval steps.

Steps are `jax.jit` functions over global arrays (see `gcp_jax.sharding`): parameters and
optimiser state replicated, the batch split over the "data" mesh axis, the state donated.
BatchNorm statistics and the loss are therefore over the global batch, whatever the number of
devices or processes. This module needs only jax, flax and optax: a benchmark or a device check
can run the project's own step without the input pipeline or the config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gcp_jax import metrics, sharding


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint must hold to continue a run exactly."""

    step: jax.Array  # batches consumed (int32)
    params: Any
    batch_stats: Any
    opt_state: Any
    nonfinite: jax.Array  # steps skipped for a non-finite loss or gradient (int32)


def init_variables(model, image_size: int, seed: int, mesh) -> dict[str, Any]:
    """Model variables {"params", "batch_stats"}, initialised on-device and replicated over `mesh`."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    keys = {"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}
    init = jax.jit(
        sharding.traced_for(mesh, lambda k, x: model.init(k, x, train=False)), out_shardings=sharding.replicated(mesh)
    )
    variables = dict(init(keys, images))
    variables.setdefault("batch_stats", {})
    return variables


def create_train_state(variables: Mapping[str, Any], tx: optax.GradientTransformation, mesh) -> TrainState:
    """A step-0 state (optimiser initialised on-device, replicated)."""
    params = variables["params"]
    opt_state = jax.jit(tx.init, out_shardings=sharding.replicated(mesh))(params)
    step, nonfinite = sharding.replicate((np.zeros((), np.int32), np.zeros((), np.int32)), mesh)  # distinct buffers
    return TrainState(
        step=step, params=params, batch_stats=variables.get("batch_stats", {}), opt_state=opt_state, nonfinite=nonfinite
    )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _where_tree(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def make_train_step(
    model, tx: optax.GradientTransformationExtraArgs, mesh, seed: int = 0
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """jit(state, batch) -> (state, metrics); batch = {"image" [B,S,S,3], "label" [B]} global arrays.

    A step whose loss or gradient is not finite leaves params, BatchNorm statistics and optimiser
    state unchanged and increments `state.nonfinite`. Dropout keys are fold_in(seed, step), so a
    resumed run draws the same masks as an uninterrupted one. The state is donated. Metrics:
    loss, top1 and grad_norm of the batch.
    """
    dropout_key = jax.random.key(seed + 2)

    def loss_fn(params, batch_stats, images, labels, rng):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        return jnp.mean(cross_entropy(logits, labels)), (logits, updates.get("batch_stats", {}))

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(dropout_key, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, batch_stats)), grads = grad_fn(
            state.params, state.batch_stats, batch["image"], batch["label"], rng
        )
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, step=state.step)
        new = state.replace(
            step=state.step + 1,
            params=_where_tree(finite, optax.apply_updates(state.params, updates), state.params),
            batch_stats=_where_tree(finite, batch_stats, state.batch_stats),
            opt_state=_where_tree(finite, opt_state, state.opt_state),
            nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
        )
        metrics = {"loss": loss, "top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"]), "grad_norm": grad_norm}
        return new, metrics

    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(
        sharding.traced_for(mesh, step), in_shardings=(repl, batch_sh), out_shardings=(repl, repl), donate_argnums=0
    )


def eval_totals(num_classes: int, mesh, *, flip: bool = False, abstract: bool = False) -> dict[str, jax.Array]:
    """Zero accumulators for `make_eval_step` (with `flip`: also those of the flip-averaged logits);
    `abstract`: their shapes, dtypes and shardings only (to lower the step without devices)."""

    def view():
        return {
            "loss": np.zeros((), np.float32),
            "top1": np.zeros((), np.int32),
            "top5": np.zeros((), np.int32),
            "class_correct": np.zeros((num_classes,), np.int32),
        }

    zeros = {"count": np.zeros((), np.int32), "class_count": np.zeros((num_classes,), np.int32), **view()}
    if flip:
        zeros.update({name + metrics.FLIP: value for name, value in view().items()})
    if abstract:
        repl = sharding.replicated(mesh)
        return jax.tree.map(lambda z: jax.ShapeDtypeStruct(z.shape, z.dtype, sharding=repl), zeros)
    return sharding.replicate(zeros, mesh)


def _view_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int) -> dict[str, jax.Array]:
    """One view's sums over the examples whose mask is True: loss, top-1 and top-5 hits, hits per class."""
    maski = mask.astype(jnp.int32)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.int32) * maski
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    return {
        "loss": jnp.sum(jnp.where(mask, cross_entropy(logits, labels), 0.0)),
        "top1": jnp.sum(correct),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1).astype(jnp.int32) * maski),
        "class_correct": jnp.sum(jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * correct[:, None], 0),
    }


def make_eval_step(model, num_classes: int, mesh, *, flip: bool = False) -> Callable[[TrainState, dict, dict], dict]:
    """jit(state, batch, totals) -> totals: sums over the examples whose batch["mask"] is True.

    Padded examples (mask False) count nowhere, so totals over a padded eval split count every
    example exactly once. With `flip`, the model also sees each image mirrored left-right, and the
    `*_flip` totals are those of the mean of the two views' logits (fast-MPN-COV's CenterCropWithFlip
    evaluation); the others stay the single view's. The totals are donated.
    """

    def step(state: TrainState, batch, totals):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        images, labels, mask = batch["image"], batch["label"], batch["mask"]
        logits = model.apply(variables, images, train=False)
        maski = mask.astype(jnp.int32)
        batch_totals = {
            "count": jnp.sum(maski),
            "class_count": jnp.sum(jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * maski[:, None], 0),
            **_view_sums(logits, labels, mask, num_classes),
        }
        if flip:
            mirrored = model.apply(variables, jnp.flip(images, axis=2), train=False)  # NHWC: W is axis 2
            averaged = _view_sums(0.5 * (logits + mirrored), labels, mask, num_classes)
            batch_totals.update({name + metrics.FLIP: value for name, value in averaged.items()})
        return jax.tree.map(jnp.add, totals, batch_totals)

    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(
        sharding.traced_for(mesh, step), in_shardings=(repl, batch_sh, repl), out_shardings=repl, donate_argnums=2
    )


def evaluate(
    eval_step,
    state: TrainState,
    batches: Iterable[Mapping[str, np.ndarray]],
    num_classes: int,
    mesh,
    *,
    flip: bool = False,
) -> dict[str, float]:
    """Eval metrics over host-local batches {"image", "label", "mask"} (the whole split); `flip` as the
    eval step was made."""
    totals = eval_totals(num_classes, mesh, flip=flip)
    for local in batches:
        totals = eval_step(state, sharding.global_batch(local, mesh), totals)
    return metrics.summarize_eval(totals)
