"""What a run of a config is made of: its model, optimiser, mesh, data set and jitted steps (`Run`),
and what a run ends with (`RunResult`). The loop (`gcp_jax.loop`) and the evaluation of a weight
file (`gcp_jax.weights_eval`) both start from a `Run`; the analysis CLI restores one's checkpoint.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from gcp_jax import checkpoint as ckpt_lib
from gcp_jax import compile_cache, data, models, optim, sharding, spectrum, steps
from gcp_jax import config as config_lib
from gcp_jax import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a training run (or an eval_only) ended with."""

    step: int  # the state's step
    final: dict[str, float] | None  # the last eval's metrics (None before the first eval)
    best_top1: float  # the best eval top-1 so far (-1 before the first eval)
    best_step: int  # its step (-1 before the first eval)
    stopped_by: signal.Signals | None  # the signal that stopped the run before its last step, if any
    state: steps.TrainState
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
        self.train_step = steps.make_train_step(self.model, self.tx, self.mesh, config.seed)
        self.eval_step = steps.make_eval_step(self.model, self.num_classes, self.mesh, flip=config.eval_flip)
        self._eigenvalues = jax.jit(
            sharding.traced_for(self.mesh, lambda v, x: spectrum.eigenvalues(self.model, v, x)),
            out_shardings=sharding.replicated(self.mesh),
        )

    def initial_state(self) -> steps.TrainState:
        """Step-0 state: random init, then the pretrained weights when config.model.pretrained is set."""
        variables = steps.init_variables(self.model, self.config.data.image_size, self.config.seed, self.mesh)
        if self.config.model.pretrained:
            from gcp_jax import pretrained

            loaded, report = pretrained.init_from_pretrained(
                jax.device_get(variables), self.config.model.pretrained, self.config.model.arch
            )
            metrics_lib.log(f"pretrained: {report}")
            if mismatch := pretrained.last_stride_mismatch(report, self.config.model.last_stride):
                metrics_lib.log(f"warning: {mismatch}")
            variables = sharding.replicate(loaded, self.mesh)
        else:
            metrics_lib.log(
                "model.pretrained is empty: random initialisation (the FGVC protocols fine-tune ImageNet "
                "weights: --config.model.pretrained=FILE)."
            )
        return steps.create_train_state(variables, self.tx, self.mesh)

    def abstract_state(self) -> steps.TrainState:
        """The state's shapes, dtypes and shardings, without computing it (a restore template)."""
        image = jax.ShapeDtypeStruct((1, self.config.data.image_size, self.config.data.image_size, 3), jnp.float32)

        def init(image):
            keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
            variables = self.model.init(keys, image, train=False)
            params = variables["params"]
            zero = jnp.zeros((), jnp.int32)
            return steps.TrainState(zero, params, variables.get("batch_stats", {}), self.tx.init(params), zero)

        repl = sharding.replicated(self.mesh)
        shapes = jax.eval_shape(init, image)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)

    def evaluate(self, state: steps.TrainState) -> dict[str, float]:
        local = sharding.local_batch_size(config_lib.eval_batch_size(self.config), self.mesh)
        batches = data.eval_batches(
            self.config.data, batch_size=local, process_index=jax.process_index(), process_count=jax.process_count()
        )
        result = steps.evaluate(self.eval_step, state, batches, self.num_classes, self.mesh, flip=self.config.eval_flip)
        return {**result, "skipped_images": sharding.total_over_processes(batches.num_skipped)}  # after the pass

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

    def spectrum_summary(self, state: steps.TrainState, batch: Mapping[str, jax.Array]) -> dict[str, float]:
        """Mean covariance-spectrum statistics of a (global) batch, eval mode (gcp_jax.spectrum)."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return spectrum.mean_summary(np.asarray(self._eigenvalues(variables, batch["image"])))


def restore(run: Run, workdir: str, step: int | None = None) -> tuple[steps.TrainState, dict[str, Any]]:
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
