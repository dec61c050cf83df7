"""Training: config validation, the optimiser, the train state, jitted sharded steps, the loop.

Steps are `jax.jit` functions over global arrays (see `gcp_jax.sharding`): parameters and
optimiser state replicated, the batch split over the "data" mesh axis, the state donated.
BatchNorm statistics and the loss are therefore over the global batch, whatever the number of
devices or processes. The step functions need only jax, flax and optax; the loop adds the
input pipeline (`gcp_jax.data`), Orbax checkpoints and logging.
"""

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from gcp_jax import checkpoint as ckpt_lib
from gcp_jax import metrics as metrics_lib
from gcp_jax import sharding

SCHEDULES = ("step", "cosine")
CLASSIFIER = "classifier"  # params[CLASSIFIER] gets the classifier learning-rate factor
CONFIG_FILE = "config.json"


class NonFiniteError(RuntimeError):
    """Too many steps had a non-finite loss or gradient."""


# --------------------------------------------------------------------------------------
# Config


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _one_of(value: Any, choices: Iterable[Any], name: str) -> None:
    choices = tuple(choices)
    _check(value in choices, f"config.{name}={value!r} is not one of {', '.join(map(str, choices))}.")


def validate_config(config: ConfigDict, *, num_devices: int | None = None) -> None:
    """Reject impossible values up front with one sentence (ValueError / FileNotFoundError).

    Unknown field names are rejected earlier, by `ml_collections` (the config is locked).
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    for name in ("batch_size", "log_every_steps", "keep_checkpoints"):
        _check(config[name] >= 1, f"config.{name} must be at least 1, got {config[name]}.")
    for name in (
        "eval_batch_size",
        "eval_every_epochs",
        "checkpoint_every_steps",
        "max_nonfinite_steps",
        "spectrum_every_steps",
    ):
        _check(config[name] >= 0, f"config.{name} must be 0 or more, got {config[name]}.")
    _check(
        config.num_train_steps == -1 or config.num_train_steps >= 1,
        f"config.num_train_steps must be -1 (train num_epochs) or at least 1, got {config.num_train_steps}.",
    )
    _check(
        config.num_train_steps >= 1 or config.num_epochs > 0,
        f"config.num_epochs must be positive when num_train_steps is -1, got {config.num_epochs}.",
    )
    for name, size in (("batch_size", config.batch_size), ("eval_batch_size", eval_batch_size(config))):
        _check(
            size % num_devices == 0,
            f"config.{name}={size} is not divisible by the {num_devices} devices; use a multiple of {num_devices}.",
        )

    m = config.model
    if m.pretrained and not os.path.exists(m.pretrained):
        raise FileNotFoundError(f"config.model.pretrained={m.pretrained!r} does not exist; give a weights file or ''.")
    for name in ("dropout_rate", "drop_connect_rate"):
        value = m[name]
        _check(value is None or 0 <= value < 1, f"config.model.{name} must be in [0, 1), got {value}.")
    g = config.gcp
    _check(g.dim >= 0, f"config.gcp.dim must be 0 (no reduction) or positive, got {g.dim}.")
    _check(g.isqrt_iters >= 1, f"config.gcp.isqrt_iters must be at least 1, got {g.isqrt_iters}.")
    _check(g.eps is None or g.eps > 0, f"config.gcp.eps must be positive or None (relative default), got {g.eps}.")
    build_model(config, num_classes=2)  # arch, head, dtypes, gcp.norm/grad/seb_variant: ValueError naming the field

    o = config.optim
    _one_of(o.schedule, SCHEDULES, "optim.schedule")
    _check(o.learning_rate > 0, f"config.optim.learning_rate must be positive, got {o.learning_rate}.")
    _check(0 <= o.momentum < 1, f"config.optim.momentum must be in [0, 1), got {o.momentum}.")
    _check(
        o.classifier_lr_factor > 0, f"config.optim.classifier_lr_factor must be positive, got {o.classifier_lr_factor}."
    )
    _check(o.weight_decay >= 0, f"config.optim.weight_decay must be 0 or more, got {o.weight_decay}.")
    _check(o.grad_clip_norm >= 0, f"config.optim.grad_clip_norm must be 0 (off) or more, got {o.grad_clip_norm}.")
    _check(0 < o.decay_factor <= 1, f"config.optim.decay_factor must be in (0, 1], got {o.decay_factor}.")
    _check(o.warmup_epochs >= 0, f"config.optim.warmup_epochs must be 0 or more, got {o.warmup_epochs}.")
    epochs = list(o.decay_epochs)
    _check(
        all(e >= 0 for e in epochs) and epochs == sorted(epochs),
        f"config.optim.decay_epochs must be increasing epoch numbers, got {tuple(epochs)}.",
    )
    _validate_data(config.data)


def _validate_data(data_cfg: ConfigDict) -> None:
    """The input pipeline's own checks of config.data (choices, sizes)."""
    from gcp_jax.data import config as data_config  # pylint: disable=g-import-not-at-top

    data_config.resolve(data_cfg)


def eval_batch_size(config: ConfigDict) -> int:
    """The global eval batch (config.eval_batch_size, or batch_size when 0)."""
    return config.eval_batch_size or config.batch_size


def build_model(config: ConfigDict, num_classes: int):
    """The classifier of `config.model` and `config.gcp` (see gcp_jax.models.create_model)."""
    from gcp_jax import models  # pylint: disable=g-import-not-at-top

    m = config.model
    return models.create_model(
        m.arch,
        num_classes=num_classes,
        head=m.head,
        gcp=config.gcp.to_dict(),
        dropout_rate=m.dropout_rate,
        drop_connect_rate=m.drop_connect_rate,
        dtype=m.dtype,
        last_stride=m.last_stride,
    )


# --------------------------------------------------------------------------------------
# Optimiser


def learning_rate_schedule(optim_cfg: ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """lr(step): step decay (x decay_factor at each of decay_epochs) or cosine to 0, after a linear warmup.

    Decay boundaries are at absolute epochs (epoch e starts at step e * steps_per_epoch), as
    PyTorch's MultiStepLR stepped once per epoch.
    """
    base = optim_cfg.learning_rate
    warmup = int(round(optim_cfg.warmup_epochs * steps_per_epoch))
    boundaries = jnp.asarray([int(round(e * steps_per_epoch)) for e in optim_cfg.decay_epochs], jnp.int32)
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
    """The reference SGD (PyTorch `clip_grad_norm_` then `SGD(momentum, weight_decay)` with two param groups).

    g <- clip(g, grad_clip_norm) + weight_decay * theta   (all parameters)
    b <- momentum * b + g                                  (PyTorch form, no dampening)
    theta <- theta - lr(step) * f * b,   f = classifier_lr_factor on params["classifier"], else 1.
    Call `update(grads, opt_state, params, step=global_step)`.
    """
    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.grad_clip_norm) if optim_cfg.grad_clip_norm else optax.identity(),
        optax.add_decayed_weights(optim_cfg.weight_decay) if optim_cfg.weight_decay else optax.identity(),
        optax.trace(decay=optim_cfg.momentum, nesterov=optim_cfg.nesterov),
        optax.masked(optax.scale(optim_cfg.classifier_lr_factor), _classifier_mask),
        scale_by_step_schedule(schedule),
    )


# --------------------------------------------------------------------------------------
# State and steps


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
    init = jax.jit(lambda k, x: model.init(k, x, train=False), out_shardings=sharding.replicated(mesh))
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
    model, tx: optax.GradientTransformationExtraArgs, schedule: optax.Schedule, mesh, seed: int = 0
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """jit(state, batch) -> (state, metrics); batch = {"image" [B,S,S,3], "label" [B]} global arrays.

    A step whose loss or gradient is not finite leaves params, BatchNorm statistics and optimiser
    state unchanged and increments `state.nonfinite`. Dropout keys are fold_in(seed, step), so a
    resumed run draws the same masks as an uninterrupted one. The state is donated.
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
        metrics = {
            "loss": loss,
            "top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
        }
        return new, metrics

    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(step, in_shardings=(repl, batch_sh), out_shardings=(repl, repl), donate_argnums=0)


def eval_totals(num_classes: int, mesh) -> dict[str, jax.Array]:
    """Zero accumulators for `make_eval_step`."""
    zeros = {
        "count": np.zeros((), np.int32),
        "loss": np.zeros((), np.float32),
        "top1": np.zeros((), np.int32),
        "top5": np.zeros((), np.int32),
        "class_count": np.zeros((num_classes,), np.int32),
        "class_correct": np.zeros((num_classes,), np.int32),
    }
    return sharding.replicate(zeros, mesh)


def make_eval_step(model, num_classes: int, mesh) -> Callable[[TrainState, dict, dict], dict]:
    """jit(state, batch, totals) -> totals: sums over the examples whose batch["mask"] is True.

    Padded examples (mask False) count nowhere, so totals over a padded eval split count every
    example exactly once. The totals are donated.
    """
    k = min(5, num_classes)

    def step(state: TrainState, batch, totals):
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
        labels, mask = batch["label"], batch["mask"]
        maski = mask.astype(jnp.int32)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.int32) * maski
        in_top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.int32) * maski
        onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * maski[:, None]
        batch_totals = {
            "count": jnp.sum(maski),
            "loss": jnp.sum(jnp.where(mask, cross_entropy(logits, labels), 0.0)),
            "top1": jnp.sum(correct),
            "top5": jnp.sum(in_top5),
            "class_count": jnp.sum(onehot, 0),
            "class_correct": jnp.sum(onehot * correct[:, None], 0),
        }
        return jax.tree.map(jnp.add, totals, batch_totals)

    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(step, in_shardings=(repl, batch_sh, repl), out_shardings=repl, donate_argnums=2)


def summarize_eval(totals: Mapping[str, Any]) -> dict[str, float]:
    """Accuracies from eval totals: top1, top5, mean per-class accuracy (classes present), loss."""
    t = jax.device_get(totals)
    count = max(int(t["count"]), 1)
    present = t["class_count"] > 0
    per_class = t["class_correct"][present] / t["class_count"][present]
    return {
        "loss": float(t["loss"]) / count,
        "top1": int(t["top1"]) / count,
        "top5": int(t["top5"]) / count,
        "mean_class_acc": float(per_class.mean()) if per_class.size else 0.0,
        "count": int(t["count"]),
    }


def evaluate(
    eval_step, state: TrainState, batches: Iterable[Mapping[str, np.ndarray]], num_classes: int, mesh
) -> dict[str, float]:
    """Eval metrics over host-local batches {"image", "label", "mask"} (the whole split)."""
    totals = eval_totals(num_classes, mesh)
    for local in batches:
        totals = eval_step(state, sharding.global_batch(local, mesh), totals)
    return summarize_eval(totals)


# --------------------------------------------------------------------------------------
# The loop


class _Preemption:
    """SIGTERM → stop after the current step with a checkpoint.

    One process: a Python signal handler sets a flag. Several: JAX's preemption sync service
    (started by jax.distributed) picks a step at which every process stops together.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag.is_set()


class Run:
    """What a run needs besides the config: mesh, data set info, model, optimiser, jitted steps."""

    def __init__(self, config: ConfigDict, mesh=None):
        from gcp_jax import data  # pylint: disable=g-import-not-at-top

        if config.gcp.dtype == "float64" and not jax.config.jax_enable_x64:
            jax.config.update("jax_enable_x64", True)
        self.config, self.data = config, data
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        self.info = data.dataset_info(config.data)
        self.num_classes = self.info.num_classes
        self.steps_per_epoch = self.info.num_train // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"config.batch_size={config.batch_size} exceeds the {self.info.num_train} training examples."
            )
        self.total_steps = (
            config.num_train_steps
            if config.num_train_steps > 0
            else int(round(config.num_epochs * self.steps_per_epoch))
        )
        self.model = build_model(config, self.num_classes)
        self.schedule = learning_rate_schedule(config.optim, self.steps_per_epoch, self.total_steps)
        self.tx = make_optimizer(config.optim, self.schedule)
        self.train_step = make_train_step(self.model, self.tx, self.schedule, self.mesh, config.seed)
        self.eval_step = make_eval_step(self.model, self.num_classes, self.mesh)
        self._eigenvalues = None  # jitted on first use by spectrum_summary

    def spectrum_summary(self, state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, float]:
        """Mean covariance-spectrum statistics of a (global) batch, eval mode (gcp_jax.analysis.spectra)."""
        from gcp_jax.analysis import spectra  # pylint: disable=g-import-not-at-top

        if self._eigenvalues is None:
            self._eigenvalues = jax.jit(
                lambda v, x: spectra.eigenvalues(self.model, v, x), out_shardings=sharding.replicated(self.mesh)
            )
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return spectra.mean_summary(np.asarray(self._eigenvalues(variables, batch["image"])))

    def initial_state(self) -> TrainState:
        """Step-0 state: random init, then the pretrained backbone when config.model.pretrained is set."""
        variables = init_variables(self.model, self.config.data.image_size, self.config.seed, self.mesh)
        if self.config.model.pretrained:
            from gcp_jax import pretrained  # pylint: disable=g-import-not-at-top

            loaded, report = pretrained.init_from_pretrained(
                jax.device_get(variables), self.config.model.pretrained, self.config.model.arch
            )
            metrics_lib.log(f"pretrained: {report}")
            variables = sharding.replicate(loaded, self.mesh)
        else:
            metrics_lib.log(
                "model.pretrained is empty: random initialisation (the FGVC protocols fine-tune ImageNet "
                "weights: --config.model.pretrained=FILE)."
            )
        return create_train_state(variables, self.tx, self.mesh)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        local = sharding.local_batch_size(eval_batch_size(self.config), self.mesh)
        batches = self.data.eval_batches(
            self.config.data, batch_size=local, process_index=jax.process_index(), process_count=jax.process_count()
        )
        return evaluate(self.eval_step, state, batches, self.num_classes, self.mesh)

    def train_batches(self, start_step: int):
        local = sharding.local_batch_size(self.config.batch_size, self.mesh)
        return self.data.train_batches(
            self.config.data,
            batch_size=local,
            seed=self.config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def is_eval_step(self, step: int) -> bool:
        every = self.config.eval_every_epochs * self.steps_per_epoch
        return step == self.total_steps or (every > 0 and step % every == 0)


def save_config(config: ConfigDict, workdir: str) -> None:
    """workdir/config.json (process 0), the config of the run beside its checkpoints."""
    if metrics_lib.is_writer():
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def train_and_evaluate(config: ConfigDict, workdir: str, *, mesh=None) -> dict[str, Any]:
    """Train (resuming from the latest checkpoint in workdir), evaluate, checkpoint; returns a summary.

    Summary: {"step", "final" (last eval metrics), "best_top1", "best_step", "preempted", "state",
    "workdir", "checkpoints"}.
    """
    validate_config(config)
    run = Run(config, mesh)
    checkpoints = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
    state, meta = run.initial_state(), {"best_top1": -1.0, "best_step": -1, "final": None}
    if checkpoints.latest_step() is not None:
        state, meta = checkpoints.restore(state)
        metrics_lib.log(f"resumed from step {int(state.step)} of {run.total_steps} ({checkpoints.directory})")
    save_config(config, workdir)
    start = int(state.step)
    if start >= run.total_steps:
        metrics_lib.log(f"the run in {workdir} is already complete; give a new --workdir to train again.")
    writer = metrics_lib.MetricsWriter(workdir, start_step=start)
    metrics_lib.log(
        f"{config.model.arch}/{config.model.head} on {config.data.name}: {run.num_classes} classes, "
        f"{run.info.num_train} train images, {run.steps_per_epoch} steps/epoch, {run.total_steps} steps, "
        f"batch {config.batch_size} over {run.mesh.devices.size} devices, {jax.process_count()} processes"
    )
    progress = metrics_lib.Progress(run.total_steps, start, config.batch_size)
    pending, preempted = [], False
    batches = run.train_batches(start)
    try:
        with _Preemption() as preemption:
            for step in range(start + 1, run.total_steps + 1):
                batch = sharding.global_batch(next(batches), run.mesh)
                state, step_metrics = run.train_step(state, batch)
                if (
                    config.spectrum_every_steps
                    and config.model.head == "gcp"
                    and step % config.spectrum_every_steps == 0
                ):
                    writer.write(step, "spectrum", run.spectrum_summary(state, batch))
                pending.append(step_metrics)
                preempted = preemption.requested(step)
                if step % config.log_every_steps == 0 or step == run.total_steps or preempted:
                    _log_train(
                        step, step / run.steps_per_epoch, pending, state, progress, writer, config.max_nonfinite_steps
                    )
                    pending = []
                eval_metrics, pause_start = None, time.perf_counter()
                if run.is_eval_step(step):
                    eval_metrics = run.evaluate(state)
                    writer.write(step, config.data.eval_split, eval_metrics)
                    if eval_metrics["top1"] > meta["best_top1"]:
                        meta.update(best_top1=eval_metrics["top1"], best_step=step)
                    meta["final"] = eval_metrics
                    metrics_lib.log(
                        f"eval step {step}: " + _describe(eval_metrics) + f" (best top1 {meta['best_top1']:.4f})"
                    )
                if (
                    eval_metrics is not None
                    or preempted
                    or step == run.total_steps
                    or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
                ):
                    checkpoints.save(step, state, meta, metrics=eval_metrics)
                    progress.exclude(time.perf_counter() - pause_start)
                if preempted:
                    metrics_lib.log(
                        f"SIGTERM: stopped at step {step} with a checkpoint; run the same command to resume."
                    )
                    break
    finally:
        progress.close()
        checkpoints.wait()
        checkpoints.close()
        writer.close()
    return {
        "step": int(state.step),
        "final": meta["final"],
        "best_top1": meta["best_top1"],
        "best_step": meta["best_step"],
        "preempted": preempted,
        "state": state,
        "workdir": os.path.abspath(workdir),
        "checkpoints": checkpoints.directory,
    }


def _log_train(step, epoch, pending, state, progress, writer, max_nonfinite) -> None:
    """Average the step metrics since the last log, write them, stop the run past max_nonfinite."""
    host = jax.device_get(pending)
    averaged = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    averaged.update(lr=float(host[-1]["lr"]), epoch=epoch)
    nonfinite = int(jax.device_get(state.nonfinite))
    averaged["images_per_s"] = progress.update(step, {k: averaged[k] for k in ("loss", "top1", "lr")})
    averaged["nonfinite_steps"] = nonfinite
    writer.write(step, "train", averaged)
    if nonfinite > max_nonfinite:
        raise NonFiniteError(
            f"Stopped at step {step}: {nonfinite} steps had a non-finite loss or gradient (more than "
            f"config.max_nonfinite_steps={max_nonfinite}); lower optim.learning_rate or try gcp.dtype=float64."
        )


def _describe(m: Mapping[str, float]) -> str:
    return (
        f"top1 {m['top1']:.4f} top5 {m['top5']:.4f} mean-class {m['mean_class_acc']:.4f} "
        f"loss {m['loss']:.4f} ({m['count']} images)"
    )


def evaluate_checkpoint(config: ConfigDict, workdir: str, *, mesh=None) -> dict[str, Any]:
    """Evaluate the latest checkpoint of workdir on the eval split (config.eval_only)."""
    validate_config(config)
    run = Run(config, mesh)
    checkpoints = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
    try:
        state, meta = checkpoints.restore(run.initial_state())
    finally:
        checkpoints.close()
    step = int(state.step)
    result = run.evaluate(state)
    writer = metrics_lib.MetricsWriter(workdir, start_step=None)
    writer.write(step, f"{config.data.eval_split}_eval_only", result)
    writer.close()
    metrics_lib.log(f"eval of step {step}: " + _describe(result))
    return {
        "step": step,
        "final": result,
        "best_top1": meta.get("best_top1"),
        "best_step": meta.get("best_step"),
        "state": state,
        "workdir": os.path.abspath(workdir),
        "checkpoints": checkpoints.directory,
    }
