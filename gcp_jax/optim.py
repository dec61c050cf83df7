"""The protocols' optimisers: SGD with PyTorch-form momentum (or PyTorch's AdamW), two lr groups.

`learning_rate_schedule(config.optim, steps_per_epoch, total_steps)` is lr(step);
`make_optimizer(config.optim, schedule)` the optax transformation, updated with the run's global
step (`tx.update(grads, opt_state, params, step=step)`), so that a skipped step never shifts the
schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

SCHEDULES = ("step", "cosine")
OPTIMIZERS = ("sgd", "adamw")
ADAM_B2, ADAM_EPS = 0.999, 1e-8  # PyTorch AdamW's defaults (the iSICE recipe keeps them)
CLASSIFIER = "classifier"  # params[CLASSIFIER] gets the classifier learning-rate factor


def learning_rate_schedule(optim_cfg: ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """lr(step): step decay (x decay_factor at each of decay_epochs) or cosine to 0, after a linear warmup.

    Decay boundaries are at absolute epochs (epoch e starts at step e * steps_per_epoch), as
    PyTorch's MultiStepLR stepped once per epoch.
    """
    base = optim_cfg.learning_rate
    warmup = round(optim_cfg.warmup_epochs * steps_per_epoch)
    boundaries = jnp.asarray([round(e * steps_per_epoch) for e in optim_cfg.decay_epochs], jnp.int32)
    factor, cosine = optim_cfg.decay_factor, optim_cfg.schedule == "cosine"

    def schedule(step):
        step = jnp.asarray(step)
        if cosine:
            t = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
            lr = 0.5 * base * (1.0 + jnp.cos(jnp.pi * t))
        else:
            lr = base * factor ** jnp.sum(step >= boundaries)
        if warmup:
            lr = lr * jnp.minimum(1.0, (step + 1) / warmup)
        return jnp.asarray(lr, jnp.float32)

    return schedule


def _classifier_mask(params: Mapping[str, Any]) -> Any:
    """True on the leaves of params["classifier"], False elsewhere."""
    return {k: jax.tree.map(lambda _, c=(k == CLASSIFIER): c, v) for k, v in params.items()}


def scale_by_step_schedule(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """updates * -schedule(step), with `step` the run's global step passed to `update(..., step=)`.

    The learning rate follows the number of batches seen, so a skipped (non-finite) step does not
    shift the schedule.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, step, **extra):
        del params, extra
        lr = schedule(step)
        return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(optim_cfg: ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """The reference optimiser: PyTorch `clip_grad_norm_`, then `SGD(momentum, weight_decay)` or `AdamW`.

    Two param groups: f = classifier_lr_factor on params["classifier"], else 1.
    sgd:   g <- clip(g, grad_clip_norm) + weight_decay * theta   (all parameters)
           b <- momentum * b + g                                  (PyTorch form, no dampening)
           theta <- theta - lr(step) * f * b
    adamw: theta <- theta - lr(step) * f * (adam(clip(g)) + weight_decay * theta), adam with
           beta1 = momentum, beta2 = 0.999, eps = 1e-8 and bias correction (decoupled decay).
    Call `update(grads, opt_state, params, step=global_step)`.
    """
    decay = optax.add_decayed_weights(optim_cfg.weight_decay) if optim_cfg.weight_decay else optax.identity()
    if optim_cfg.name == "adamw":
        direction = (optax.scale_by_adam(b1=optim_cfg.momentum, b2=ADAM_B2, eps=ADAM_EPS), decay)
    else:
        direction = (decay, optax.trace(decay=optim_cfg.momentum, nesterov=optim_cfg.nesterov))
    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.grad_clip_norm) if optim_cfg.grad_clip_norm else optax.identity(),
        *direction,
        optax.masked(optax.scale(optim_cfg.classifier_lr_factor), _classifier_mask),
        scale_by_step_schedule(schedule),
    )
