"""Training: the train state, jitted sharded steps, evaluation, restore, and the loop.

Steps are `jax.jit` functions over global arrays (see `gcp_jax.sharding`): parameters and
optimiser state replicated, the batch split over the "data" mesh axis, the state donated.
BatchNorm statistics and the loss are therefore over the global batch, whatever the number of
devices or processes. The step functions need only jax, flax and optax; the loop adds the
input pipeline (`gcp_jax.data`, which imports TensorFlow only when first read), Orbax
checkpoints and logging. The command line is `train.py`; the config is `gcp_jax.config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from gcp_jax import checkpoint as ckpt_lib
from gcp_jax import compile_cache, data, models, optim, sharding, spectrum, stopping
from gcp_jax import config as config_lib
from gcp_jax import metrics as metrics_lib

if TYPE_CHECKING:
    from gcp_jax.pretrained import PretrainedReport

CONFIG_FILE = "config.json"


class NonFiniteError(RuntimeError):
    """Too many steps had a non-finite loss or gradient."""


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint must hold to continue a run exactly."""

    step: jax.Array  # batches consumed (int32)
    params: Any
    batch_stats: Any
    opt_state: Any
    nonfinite: jax.Array  # steps skipped for a non-finite loss or gradient (int32)


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a training run (or an eval_only) ended with."""

    step: int  # the state's step
    final: dict[str, float] | None  # the last eval's metrics (None before the first eval)
    best_top1: float  # the best eval top-1 so far (-1 before the first eval)
    best_step: int  # its step (-1 before the first eval)
    stopped_by: signal.Signals | None  # the signal that stopped the run before its last step, if any
    state: TrainState
    workdir: str
    checkpoints: str  # the checkpoint directory ("" when a weight file was evaluated: evaluate_weights)

    @property
    def preempted(self) -> bool:
        """Stopped by a signal before the last step."""
        return self.stopped_by is not None


def configure_jax(config: ConfigDict) -> None:
    """Process-wide JAX settings a run of `config` needs: the persistent compilation cache
    (config.compile_cache_dir) and 64-bit types for a float64 head or backbone.

    Called by the entry points (train.py, the analysis CLI) before anything is traced.
    """
    compile_cache.enable(config.compile_cache_dir)
    if "float64" in (config.gcp.dtype, config.model.dtype):
        jax.config.update("jax_enable_x64", True)


def build_model(config: ConfigDict, num_classes: int):
    """The classifier of `config.model` and `config.gcp` (see gcp_jax.models.create_model)."""
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
# State and steps


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


FLIP = metrics_lib.FLIP  # suffix of the totals and metrics of the flip-averaged logits (eval_flip)


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
        zeros.update({name + FLIP: value for name, value in view().items()})
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
            batch_totals.update({name + FLIP: value for name, value in averaged.items()})
        return jax.tree.map(jnp.add, totals, batch_totals)

    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(
        sharding.traced_for(mesh, step), in_shardings=(repl, batch_sh, repl), out_shardings=repl, donate_argnums=2
    )


def summarize_eval(totals: Mapping[str, Any]) -> dict[str, float]:
    """Accuracies from eval totals: top1, top5, mean per-class accuracy (classes present), loss, count;
    the same with the suffix `_flip` for the flip-averaged logits when the totals have them."""
    t = jax.device_get(totals)
    count = max(int(t["count"]), 1)
    present = t["class_count"] > 0
    metrics = {}
    for suffix in ("", FLIP) if "top1" + FLIP in t else ("",):
        per_class = t["class_correct" + suffix][present] / t["class_count"][present]
        metrics.update(
            {
                "loss" + suffix: float(t["loss" + suffix]) / count,
                "top1" + suffix: int(t["top1" + suffix]) / count,
                "top5" + suffix: int(t["top5" + suffix]) / count,
                "mean_class_acc" + suffix: float(per_class.mean()) if per_class.size else 0.0,
            }
        )
    metrics["count"] = int(t["count"])
    return metrics


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
    return summarize_eval(totals)


# --------------------------------------------------------------------------------------
# A run: what it needs besides the config, and its checkpoints


class Run:
    """What a run of `config` needs: mesh, data set info, model, optimiser, jitted steps.

    `info` replaces the data set's own (gcp_jax.aot compiles the steps without the data).
    """

    def __init__(self, config: ConfigDict, mesh=None, info: data.DatasetInfo | None = None):
        self.config = config
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        self.info = data.dataset_info(config.data) if info is None else info
        self.num_classes = self.info.num_classes
        self.steps_per_epoch = data.steps_per_epoch(self.info.num_train, config.batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"config.batch_size={config.batch_size} exceeds the {self.info.num_train} training examples."
            )
        self.total_steps = (
            config.num_train_steps if config.num_train_steps > 0 else round(config.num_epochs * self.steps_per_epoch)
        )
        self.model = build_model(config, self.num_classes)
        self.schedule = optim.learning_rate_schedule(config.optim, self.steps_per_epoch, self.total_steps)
        self.tx = optim.make_optimizer(config.optim, self.schedule)
        self.train_step = make_train_step(self.model, self.tx, self.mesh, config.seed)
        self.eval_step = make_eval_step(self.model, self.num_classes, self.mesh, flip=config.eval_flip)
        self._eigenvalues = jax.jit(
            sharding.traced_for(self.mesh, lambda v, x: spectrum.eigenvalues(self.model, v, x)),
            out_shardings=sharding.replicated(self.mesh),
        )

    def initial_state(self) -> TrainState:
        """Step-0 state: random init, then the pretrained weights when config.model.pretrained is set."""
        variables = init_variables(self.model, self.config.data.image_size, self.config.seed, self.mesh)
        if self.config.model.pretrained:
            from gcp_jax import pretrained

            loaded, report = pretrained.init_from_pretrained(
                jax.device_get(variables), self.config.model.pretrained, self.config.model.arch
            )
            metrics_lib.log(f"pretrained: {report}")
            if mismatch := last_stride_mismatch(report, self.config.model.last_stride):
                metrics_lib.log(f"warning: {mismatch}")
            variables = sharding.replicate(loaded, self.mesh)
        else:
            metrics_lib.log(
                "model.pretrained is empty: random initialisation (the FGVC protocols fine-tune ImageNet "
                "weights: --config.model.pretrained=FILE)."
            )
        return create_train_state(variables, self.tx, self.mesh)

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings, without computing it (a restore template)."""
        image = jax.ShapeDtypeStruct((1, self.config.data.image_size, self.config.data.image_size, 3), jnp.float32)

        def init(image):
            keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
            variables = self.model.init(keys, image, train=False)
            params = variables["params"]
            zero = jnp.zeros((), jnp.int32)
            return TrainState(zero, params, variables.get("batch_stats", {}), self.tx.init(params), zero)

        repl = sharding.replicated(self.mesh)
        shapes = jax.eval_shape(init, image)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        local = sharding.local_batch_size(config_lib.eval_batch_size(self.config), self.mesh)
        batches = data.eval_batches(
            self.config.data, batch_size=local, process_index=jax.process_index(), process_count=jax.process_count()
        )
        result = evaluate(self.eval_step, state, batches, self.num_classes, self.mesh, flip=self.config.eval_flip)
        return {**result, "skipped_images": _total_over_processes(batches.num_skipped)}  # after the pass

    def train_batches(self, start_step: int):
        local = sharding.local_batch_size(self.config.batch_size, self.mesh)
        return data.train_batches(
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

    def spectrum_summary(self, state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, float]:
        """Mean covariance-spectrum statistics of a (global) batch, eval mode (gcp_jax.spectrum)."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return spectrum.mean_summary(np.asarray(self._eigenvalues(variables, batch["image"])))


def restore(run: Run, workdir: str, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """(state, meta) of the checkpoint at `step` (default: the latest) in workdir, placed as `run` places it.

    Read-only and verified (see gcp_jax.checkpoint): a damaged checkpoint raises an error naming it.
    The template is `run.abstract_state()`: nothing is initialised or loaded only to be overwritten.
    """
    checkpoints = ckpt_lib.Checkpoints(workdir, use_async=False, read_only=True)
    try:
        return checkpoints.restore(run.abstract_state(), step)
    except ckpt_lib.DamagedCheckpointError as e:
        raise ckpt_lib.DamagedCheckpointError(
            f"{e}. Resume training in {workdir} to set it aside and continue from the newest intact checkpoint."
        ) from e
    finally:
        checkpoints.close()


# --------------------------------------------------------------------------------------
# The run's config: saved in the workdir, changed on resume only explicitly

# Fields a resumed run may change freely: run length and logging/eval/checkpoint cadence, where
# the data live, and switches of this program. Any other change needs config.allow_config_change.
RESUME_MAY_CHANGE = (
    "num_epochs",
    "num_train_steps",
    "log_every_steps",
    "eval_every_epochs",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "spectrum_every_steps",
    "max_nonfinite_steps",
    "step_timeout_s",
    "eval_batch_size",
    "eval_flip",
    "eval_only",
    "allow_config_change",
    "compile_cache_dir",
    "data.data_dir",
    "data.manual_dir",
    "data.cache",
)
# Command-line overrides that apply to an evaluation of a saved run (eval_only); others are ignored.
EVAL_MAY_CHANGE = (
    "eval_only",
    "compile_cache_dir",
    "eval_batch_size",
    "eval_flip",
    "data.eval_split",
    "data.data_dir",
    "data.manual_dir",
    "data.cache",
    "data.on_corrupt",
)
_CONFIG_FILE_RE = re.compile(r"config(?:\.(\d+))?\.json")


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """{"optim.learning_rate": 0.05, ...}: every leaf field of a config (lists as tuples)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def config_changes(old: ConfigDict, new: ConfigDict) -> dict[str, tuple[Any, Any]]:
    """{field: (old value, new value)} of the fields whose values differ."""
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def saved_config_path(workdir: str) -> str | None:
    """The file of the config in effect in workdir: the newest config.<step>.json, else config.json; None."""
    if not os.path.isdir(workdir):
        return None
    found = []
    for name in os.listdir(workdir):
        match = _CONFIG_FILE_RE.fullmatch(name)
        if match:
            found.append((-1 if match[1] is None else int(match[1]), os.path.join(workdir, name)))
    return max(found)[1] if found else None


def load_config(workdir: str) -> ConfigDict:
    """The config a run in workdir uses now (its newest saved config), over this version's defaults."""
    path = saved_config_path(workdir)
    if path is None:
        raise FileNotFoundError(
            f"{os.path.join(workdir, CONFIG_FILE)} not found: point --workdir at a directory that train.py wrote."
        )
    try:
        with open(path, encoding="utf-8") as f:
            saved = _flat(json.load(f))
    except ValueError as e:
        raise config_lib.ConfigError(
            f"{path}, the run's saved config, cannot be read ({e}); repair it, or give a new --workdir."
        ) from e
    config, unknown = config_lib.get_config(), []
    for name, value in saved.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, ConfigDict) else None
        if not isinstance(node, ConfigDict) or leaf not in node:
            unknown.append(name)
        else:
            node[leaf] = tuple(value) if isinstance(node[leaf], tuple) and value is not None else value
    if unknown:
        metrics_lib.LOGGER.warning(f"{path}: ignored fields this version does not know: {', '.join(unknown)}.")
    return config


def run_config(workdir: str, overrides: Mapping[str, Any], *, eval_only: bool = False) -> ConfigDict:
    """The saved config of the run in workdir with command-line `overrides` ({"data.eval_split": ...}) on top.

    eval_only: only the overrides of EVAL_MAY_CHANGE apply; the others are named and ignored.
    """
    metrics_lib.setup_logging()
    config = load_config(workdir)
    ignored = [k for k in overrides if eval_only and k not in EVAL_MAY_CHANGE]
    config.update_from_flattened_dict({k: v for k, v in overrides.items() if k not in ignored})
    if eval_only:
        config.eval_only = True
        if ignored:
            metrics_lib.LOGGER.warning(
                f"eval_only evaluates with the run's saved config ({saved_config_path(workdir)}); ignored: "
                + ", ".join(f"--config.{k}" for k in ignored)
            )
    return config


def check_config_change(config: ConfigDict, workdir: str) -> None:
    """Refuse (ConfigError), before any file is touched, a config that differs from the run's saved one
    in more than RESUME_MAY_CHANGE, unless config.allow_config_change."""
    if saved_config_path(workdir) is None:
        return
    changes = config_changes(load_config(workdir), config)
    refused = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
    if refused and not config.allow_config_change:
        shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in list(refused.items())[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise config_lib.ConfigError(
            f"The config differs from the run's saved config ({saved_config_path(workdir)}) in {shown}{more}; "
            "run with the saved config, give a new --workdir, or pass --config.allow_config_change=True to "
            "continue this run with the new values."
        )


def save_config(config: ConfigDict, workdir: str, step: int = 0) -> str | None:
    """Keep `config` in workdir (process 0): config.json for a new run; for a resumed run whose config
    differs from the one in effect, config.<step>.json. Nothing is overwritten: a file of the same
    name with other contents is renamed `<name>.replaced-<time>` first. Returns the path written, if any."""
    if not metrics_lib.is_writer():
        return None
    os.makedirs(workdir, exist_ok=True)
    if saved_config_path(workdir) is None:
        path = os.path.join(workdir, CONFIG_FILE)
    elif config_changes(load_config(workdir), config):
        path = os.path.join(workdir, f"config.{step}.json")
        if os.path.exists(path):
            os.rename(path, f"{path}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
    else:
        return None
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
    return path


# --------------------------------------------------------------------------------------
# The loop


def _stop_signal(step: int) -> signal.Signals | None:
    """The signal that asks the run to stop after `step`, if any.

    One process: SIGINT or SIGTERM (gcp_jax.stopping). Several: JAX's preemption sync service
    (started by jax.distributed) picks a step at which every process stops together on SIGTERM.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(step) else None
    return stopping.requested()


def _total_over_processes(count: int) -> int:
    """The sum of a per-process count over all processes (every process must call this)."""
    if jax.process_count() == 1:
        return int(count)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int32(count))))


def _train_record(run: Run, step: int, pending: list[dict], nonfinite: int) -> dict[str, float]:
    """The train metrics logged at `step`: step metrics averaged since the last log, lr, epoch, skipped steps."""
    host = jax.device_get(pending)
    record = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    record.update(lr=float(run.schedule(step - 1)), epoch=step / run.steps_per_epoch, nonfinite_steps=nonfinite)
    return record


def _evaluate(run: Run, state: TrainState, step: int, meta: dict[str, Any], writer) -> dict[str, float]:
    """Evaluate at `step`: the eval record, the best and last eval in `meta`, one line of log."""
    result = run.evaluate(state)
    writer.write(step, run.config.data.eval_split, result)
    if result["top1"] > meta["best_top1"]:
        meta.update(best_top1=result["top1"], best_step=step)
    meta["final"] = result
    metrics_lib.log(f"eval step {step}: {metrics_lib.describe_eval(result)} (best top1 {meta['best_top1']:.4f})")
    return result


def _resume(run: Run, checkpoints: ckpt_lib.Checkpoints) -> tuple[TrainState, dict[str, Any]]:
    """(state, meta) of the newest intact checkpoint (unfinished saves and damaged newer ones set aside),
    or of step 0."""
    restored = checkpoints.restore_newest_intact(run.abstract_state())
    if restored is None:
        return run.initial_state(), {"best_top1": -1.0, "best_step": -1, "final": None}
    state, meta = restored
    metrics_lib.log(f"resumed from step {int(state.step)} of {run.total_steps} ({checkpoints.directory})")
    return state, meta


def train_and_evaluate(config: ConfigDict, workdir: str, *, mesh=None) -> RunResult:
    """Train (resuming from the newest intact checkpoint in workdir), evaluate, checkpoint.

    Stops early, with a checkpoint, on SIGINT/SIGTERM (`RunResult.stopped_by`); a config that
    differs from the run's saved one is refused unless only RESUME_MAY_CHANGE fields differ.
    """
    metrics_lib.setup_logging()
    config_lib.validate(config)
    check_config_change(config, workdir)
    run = Run(config, mesh)
    checkpoints = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
    try:
        state, meta = _resume(run, checkpoints)
    except BaseException:
        checkpoints.close()
        raise
    start = int(state.step)
    save_config(config, workdir, start)
    if start >= run.total_steps:
        metrics_lib.log(f"the run in {workdir} is already complete; give a new --workdir to train again.")
    batches = run.train_batches(start)
    writer = metrics_lib.MetricsWriter(workdir, start_step=start)
    metrics_lib.log(
        f"{config.model.arch}/{config.model.head} on {config.data.name}: {run.num_classes} classes, "
        f"{run.info.num_train} train images, {run.steps_per_epoch} steps/epoch, {run.total_steps} steps, "
        f"batch {config.batch_size} over {run.mesh.devices.size} devices, {jax.process_count()} processes"
    )
    progress = metrics_lib.Progress(run.total_steps, start, config.batch_size)
    skipped_before = (writer.last("train") or {}).get("skipped_images", 0)
    eval_allowance = 1 + math.ceil(run.info.num_eval / config.batch_size)  # eval steps, in train-step timeouts
    pending, stopped_by = [], None
    with stopping.Watchdog(config.step_timeout_s) as watchdog, contextlib.ExitStack() as graceful:
        try:
            for step in range(start + 1, run.total_steps + 1):
                batch = sharding.global_batch(next(batches), run.mesh)
                state, step_metrics = run.train_step(state, batch)
                if step == start + 1:  # compiled and done: from here on a signal stops at a step boundary
                    jax.block_until_ready(state)
                    progress.start(step)
                    if jax.process_count() == 1:
                        graceful.enter_context(stopping.graceful())
                watchdog.kick()
                if (
                    config.spectrum_every_steps
                    and config.model.head == "gcp"
                    and step % config.spectrum_every_steps == 0
                ):
                    writer.write(step, "spectrum", run.spectrum_summary(state, batch))
                pending.append(step_metrics)
                stopped_by = _stop_signal(step) if step < run.total_steps else None  # the last step: done
                if step % config.log_every_steps == 0 or step == run.total_steps or stopped_by:
                    record = _train_record(run, step, pending, int(jax.device_get(state.nonfinite)))
                    record["skipped_images"] = skipped_before + _total_over_processes(batches.num_skipped)
                    rate = progress.update(step, {k: record[k] for k in ("loss", "top1", "lr")})
                    if rate is not None:
                        record["images_per_s"] = rate
                    writer.write(step, "train", record)
                    pending = []
                    if record["nonfinite_steps"] > config.max_nonfinite_steps:
                        raise NonFiniteError(
                            f"Stopped at step {step}: {record['nonfinite_steps']} steps had a non-finite loss or "
                            f"gradient (more than config.max_nonfinite_steps={config.max_nonfinite_steps}); lower "
                            "optim.learning_rate or try gcp.dtype=float64."
                        )
                eval_metrics, pause_start = None, time.perf_counter()
                if run.is_eval_step(step):
                    watchdog.kick(eval_allowance)
                    eval_metrics = _evaluate(run, state, step, meta, writer)
                periodic = config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
                if eval_metrics is not None or stopped_by or step == run.total_steps or periodic:
                    watchdog.kick(eval_allowance)
                    checkpoints.save(step, state, meta, score=eval_metrics["top1"] if eval_metrics else None)
                progress.exclude(time.perf_counter() - pause_start)
                if stopped_by:
                    break
        finally:
            progress.close()
            watchdog.kick(eval_allowance)
            checkpoints.close()
            writer.close()
    return RunResult(
        step=int(state.step),
        final=meta["final"],
        best_top1=meta["best_top1"],
        best_step=meta["best_step"],
        stopped_by=stopped_by,
        state=state,
        workdir=os.path.abspath(workdir),
        checkpoints=checkpoints.directory,
    )


def evaluate_checkpoint(config: ConfigDict, workdir: str, *, mesh=None) -> RunResult:
    """Evaluate the latest checkpoint of workdir on config's eval split (config.eval_only); without
    one, the weight file of config.model.pretrained as loaded (`evaluate_weights`).

    `config` should be the run's own: `run_config(workdir, overrides, eval_only=True)`. The eval
    record is appended to metrics.jsonl as split "<eval_split>_eval_only".
    """
    if config.model.pretrained and not has_checkpoint(workdir):  # none: the weight file as loaded
        return evaluate_weights(config, workdir, mesh=mesh)
    metrics_lib.setup_logging()
    config_lib.validate(config)
    run = Run(config, mesh)
    state, meta = restore(run, workdir)
    step = int(state.step)
    result = run.evaluate(state)
    writer = metrics_lib.MetricsWriter(workdir, start_step=None)
    writer.write(step, f"{config.data.eval_split}_eval_only", result)
    writer.close()
    metrics_lib.log(f"eval of step {step}: {metrics_lib.describe_eval(result)}")
    return RunResult(
        step=step,
        final=result,
        best_top1=meta.get("best_top1", -1.0),
        best_step=meta.get("best_step", -1),
        stopped_by=None,
        state=state,
        workdir=os.path.abspath(workdir),
        checkpoints=os.path.join(os.path.abspath(workdir), ckpt_lib.CHECKPOINT_DIR),
    )


# --------------------------------------------------------------------------------------
# Evaluating a weight file (eval_only without a checkpoint)


def has_checkpoint(workdir: str) -> bool:
    """Whether workdir holds a checkpoint (without creating its checkpoint directory)."""
    if not os.path.isdir(os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)):
        return False
    checkpoints = ckpt_lib.Checkpoints(workdir, use_async=False)
    try:
        return checkpoints.latest_step() is not None
    finally:
        checkpoints.close()


def last_stride_mismatch(report: PretrainedReport, last_stride: int) -> str:
    """One sentence when the file's model ran layer4 at another stride than `last_stride`, else ""."""
    trained = report.file_last_stride
    if trained is None or trained == last_stride:
        return ""
    return (
        f"The model in {report.path} ({report.file_arch}) ran layer4 at stride {trained}, and model.last_stride is "
        f"{last_stride}; set --config.model.last_stride={trained} to run it as it was trained."
    )


def fresh_modules_problem(report: PretrainedReport, num_classes: int) -> str:
    """One sentence when the file left modules of the model at their random init, naming them and what
    of the file did not fit (report.unused), else ""."""
    fresh = list(dict.fromkeys("/".join(leaf.split("/")[1:-1]) for leaf in report.skipped))
    if not fresh:
        return ""
    misfits = {}
    for entry in report.unused:  # "params/classifier/kernel: (32896, 200) in the file, (32896, 100) in the model"
        leaf, _, why = entry.partition(": ")
        misfits.setdefault("/".join(leaf.split("/")[1:-1]), f"{'/'.join(leaf.split('/')[1:])} is {why}")
    details = "; ".join(misfits.get(module, f"{module} is not in the file") for module in fresh)
    classes = f"; the data set has {num_classes} classes" if "classifier" in fresh else ""
    return (
        f"{report.path} cannot be evaluated as loaded: {', '.join(fresh)} would keep a random init ({details}"
        f"{classes}); build the model the file holds (model.arch, model.head, gcp.*, the data set it was "
        "trained on), or fine-tune from it without eval_only."
    )


def evaluate_weights(config: ConfigDict, workdir: str, *, mesh=None) -> RunResult:
    """Evaluate the config.model.pretrained weight file as loaded, on the eval split (eval_only when
    workdir holds no checkpoint: a released FGVC checkpoint against the real test split).

    The file must fill the whole model (backbone, GCP reduction, classifier) and the config must run it
    at the stride it was trained with; else ValueError saying what to set. The record, with
    "pretrained": path, is appended to workdir/metrics.jsonl at step 0; no checkpoint is saved.
    """
    from gcp_jax import pretrained

    metrics_lib.setup_logging()
    config_lib.validate(config)
    path = config.model.pretrained
    if not path:
        raise ValueError("Nothing to evaluate: set --config.model.pretrained to a weight file, or train first.")
    run = Run(config, mesh)
    template = run.abstract_state()  # shapes only: every leaf must come from the file
    abstract = {"params": template.params, "batch_stats": template.batch_stats}
    loaded, report = pretrained.init_from_pretrained(abstract, path, config.model.arch)
    problems = [
        fresh_modules_problem(report, run.num_classes),
        last_stride_mismatch(report, config.model.last_stride),
    ]
    if any(problems):
        raise ValueError(" ".join(p for p in problems if p))
    metrics_lib.log(f"pretrained: {report}")
    state = create_train_state(sharding.replicate(loaded, run.mesh), run.tx, run.mesh)
    result = run.evaluate(state)
    writer = metrics_lib.MetricsWriter(workdir, start_step=None)
    writer.write(0, f"{config.data.eval_split}_eval_only", {**result, "pretrained": path})
    writer.close()
    metrics_lib.log(f"evaluated {path} as loaded (no checkpoint in {workdir}): {metrics_lib.describe_eval(result)}")
    return RunResult(
        step=0,
        final=result,
        best_top1=-1.0,
        best_step=-1,
        stopped_by=None,
        state=state,
        workdir=os.path.abspath(workdir),
        checkpoints="",
    )
