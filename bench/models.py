"""Benchmark: forward and training-step time per image and peak memory of the classifiers.

    python -m bench.models                                 # EfficientNet-B0/B5, ResNet-50 × gap, gcp(seb) × 224, 448
    python -m bench.models --archs resnet50 --sizes 448 --batch 8 --repeats 10

Synthetic in-memory batches and random weights (no TensorFlow, no download). Times are the
fastest of `--repeats` calls after one warm-up, divided by the batch. Peak memory is XLA's buffer
assignment for the compiled step (arguments + outputs + temporaries, donated buffers counted
once): the same on every backend, and per step rather than per process. The training step is
the real thing: cross-entropy, backward through the spectral layer, SGD with momentum,
BatchNorm statistics updated, state donated.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.common import compiled_memory_bytes, machine_line, print_table, time_call
from gcp_jax.models import create_model

NUM_CLASSES = 200


def random_variables(model, size, seed=0):
    """Random weights and BatchNorm statistics by shape, without compiling an init."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))

    def fill(path, s):
        if path[-1].key in ("var", "scale"):
            return np.ones(s.shape, s.dtype)
        if len(s.shape) == 1:  # biases, BN offsets and means
            return np.zeros(s.shape, s.dtype)
        return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def make_steps(model, tx):
    """(forward, train_step), both jitted; the train step donates its state."""

    def forward(variables, images):
        return model.apply(variables, images)

    def train_step(state, images, labels, key):
        variables, opt_state = state

        def loss_fn(params):
            logits, updates = model.apply(
                {**variables, "params": params}, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        step, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], step)
        return ({**variables, "params": params, **updates}, opt_state), loss

    return jax.jit(forward), jax.jit(train_step, donate_argnums=0)


def bench_one(arch, head, size, batch, repeats, last_stride):
    gcp = {"norm": "seb", "dim": 256}
    model = create_model(
        arch,
        num_classes=NUM_CLASSES,
        head=head,
        gcp=gcp,
        dropout_rate=0.0,
        last_stride=last_stride if arch.startswith("resnet") else 2,
    )
    tx = optax.sgd(3e-3, momentum=0.9)
    variables = jax.device_put(random_variables(model, size))
    images = jnp.asarray(np.random.default_rng(1).normal(size=(batch, size, size, 3)), jnp.float32)
    labels = jnp.arange(batch) % NUM_CLASSES
    key = jax.random.key(0)
    forward, train_step = make_steps(model, tx)

    fwd_compiled = forward.lower(variables, images).compile()
    fwd_s = time_call(fwd_compiled, variables, images, repeats=repeats)

    state = (variables, tx.init(variables["params"]))
    train_compiled = train_step.lower(state, images, labels, key).compile()
    holder = [state]

    def run_train():
        holder[0], loss = train_compiled(holder[0], images, labels, key)
        return loss

    train_s = time_call(run_train, repeats=repeats)
    return [
        arch,
        "gap" if head == "gap" else "gcp(seb)",
        size,
        batch,
        f"{1e3 * fwd_s / batch:.1f}",
        f"{1e3 * train_s / batch:.1f}",
        f"{compiled_memory_bytes(fwd_compiled) / 2**20:.0f}",
        f"{compiled_memory_bytes(train_compiled) / 2**20:.0f}",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["efficientnet_b0", "efficientnet_b5", "resnet50"])
    parser.add_argument("--heads", nargs="+", default=["gap", "gcp"], choices=["gap", "gcp"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 448])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--last_stride", type=int, default=2, help="ResNet layer4 stride (1 = the GCP protocol).")
    args = parser.parse_args()
    print(
        f"# {machine_line()}; batch {args.batch}, fastest of {args.repeats}; "
        "gcp = 256-d reduction + SEB (exact grad, float32)"
    )
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            for head in args.heads:
                start = time.perf_counter()
                rows.append(bench_one(arch, head, size, args.batch, args.repeats, args.last_stride))
                print(f"# {arch} {head} {size}px done in {time.perf_counter() - start:.0f} s", flush=True)
    print_table(
        [
            "arch",
            "head",
            "px",
            "batch",
            "forward ms/img",
            "train step ms/img",
            "forward peak MiB",
            "train step peak MiB",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
