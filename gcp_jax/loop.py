"""The training loop (`train_and_evaluate`) and the evaluation of a run's checkpoint (`evaluate_checkpoint`).

The loop adds to a `Run`'s (`gcp_jax.assembly`) jitted steps the input pipeline (`gcp_jax.data`, which imports
TensorFlow only when first read), Orbax checkpoints, logging, a step watchdog and the graceful
stop on SIGINT/SIGTERM. The command line is `train.py`; the config is `gcp_jax.config`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from gcp_jax import assembly, run_config, sharding, steps, stopping, weights_eval, writer_lock
from gcp_jax import checkpoint as ckpt_lib
from gcp_jax import config as config_lib
from gcp_jax import metrics as metrics_lib


class NonFiniteError(RuntimeError):
    """Too many steps had a non-finite loss or gradient."""


def _stop_signal(step: int) -> signal.Signals | None:
    """The signal that asks the run to stop after `step`, if any.

    One process: SIGINT or SIGTERM (gcp_jax.stopping). Several: JAX's preemption sync service
    (started by jax.distributed) picks a step at which every process stops together on SIGTERM.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(step) else None
    return stopping.requested()


def _train_record(run: assembly.Run, step: int, pending: list[dict], nonfinite: int) -> dict[str, float]:
    """The train metrics logged at `step`: step metrics averaged since the last log, lr, epoch, skipped steps."""
    host = jax.device_get(pending)
    record = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    record.update(lr=float(run.schedule(step - 1)), epoch=step / run.steps_per_epoch, nonfinite_steps=nonfinite)
    return record


def _evaluate(run: assembly.Run, state: steps.TrainState, step: int, meta: dict[str, Any], writer) -> dict[str, float]:
    """Evaluate at `step`: the eval record, the best and last eval in `meta`, one line of log."""
    result = run.evaluate(state)
    writer.write(step, run.config.data.eval_split, result)
    if result["top1"] > meta["best_top1"]:
        meta.update(best_top1=result["top1"], best_step=step)
    meta["final"] = result
    metrics_lib.log(f"eval step {step}: {metrics_lib.describe_eval(result)} (best top1 {meta['best_top1']:.4f})")
    return result


def _resume(run: assembly.Run, checkpoints: ckpt_lib.Checkpoints) -> tuple[steps.TrainState, dict[str, Any]]:
    """(state, meta) of the newest intact checkpoint (unfinished saves and damaged newer ones set aside),
    or of step 0."""
    restored = checkpoints.restore_newest_intact(run.abstract_state())
    if restored is None:
        return run.initial_state(), {"best_top1": -1.0, "best_step": -1, "final": None}
    state, meta = restored
    metrics_lib.log(f"resumed from step {int(state.step)} of {run.total_steps} ({checkpoints.directory})")
    return state, meta


def train_and_evaluate(config: ConfigDict, workdir: str, *, mesh=None) -> assembly.RunResult:
    """Train (resuming from the newest intact checkpoint in workdir), evaluate, checkpoint.

    Stops early, with a checkpoint, on SIGINT/SIGTERM (`RunResult.stopped_by`); a config that
    differs from the run's saved one is refused unless only RESUME_MAY_CHANGE fields differ.
    """
    metrics_lib.setup_logging()
    config_lib.validate(config)
    with writer_lock.hold(workdir):  # a second trainer on workdir is refused before anything is read
        return _train_and_evaluate(config, workdir, mesh)


def _train_and_evaluate(config: ConfigDict, workdir: str, mesh) -> assembly.RunResult:
    run_config.check_config_change(config, workdir)
    run = assembly.Run(config, mesh)
    checkpoints = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
    try:
        state, meta = _resume(run, checkpoints)
    except BaseException:
        checkpoints.close()
        raise
    meta[ckpt_lib.CONFIG_KEY] = run_config.config_record(config)  # a lost config.json comes back from it
    start = int(state.step)
    run_config.save_config(config, workdir, start)
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
                checkpoints.check()  # a save that failed in the background stops the run now
                if (
                    config.spectrum_every_steps
                    and config.model.head == "gcp"
                    and step % config.spectrum_every_steps == 0
                ):
                    writer.write(step, "spectrum", run.spectrum_summary(state, batch))
                pending.append(step_metrics)
                stopped_by = _stop_signal(step) if step < run.total_steps else None  # the last step: done
                if step == run.total_steps:
                    stopping.finishing()
                if step % config.log_every_steps == 0 or step == run.total_steps or stopped_by:
                    record = _train_record(run, step, pending, int(jax.device_get(state.nonfinite)))
                    record["skipped_images"] = skipped_before + sharding.total_over_processes(batches.num_skipped)
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
            batches.close()
            progress.close()
            watchdog.kick(eval_allowance)
            checkpoints.close()
            writer.close()
    return assembly.RunResult(
        step=int(state.step),
        final=meta["final"],
        best_top1=meta["best_top1"],
        best_step=meta["best_step"],
        stopped_by=stopped_by,
        state=state,
        workdir=os.path.abspath(workdir),
        checkpoints=checkpoints.directory,
    )


def evaluate_checkpoint(config: ConfigDict, workdir: str, *, mesh=None) -> assembly.RunResult:
    """Evaluate the latest checkpoint of workdir on config's eval split (config.eval_only); without
    one, the weight file of config.model.pretrained as loaded (`evaluate_weights`).

    `config` should be the run's own: `run_config.load_config_with(path, overrides, eval_only=True)`. The eval
    record is appended to metrics.jsonl as split "<eval_split>_eval_only".
    """
    if config.model.pretrained and not ckpt_lib.has_checkpoint(workdir):  # none: the weight file as loaded
        return weights_eval.evaluate_weights(config, workdir, mesh=mesh)
    metrics_lib.setup_logging()
    config_lib.validate(config)
    run = assembly.Run(config, mesh)
    state, meta = assembly.restore(run, workdir)
    step = int(state.step)
    result = run.evaluate(state)
    writer = metrics_lib.MetricsWriter(workdir, start_step=None)
    writer.write(step, f"{config.data.eval_split}_eval_only", result)
    writer.close()
    metrics_lib.log(f"eval of step {step}: {metrics_lib.describe_eval(result)}")
    return assembly.RunResult(
        step=step,
        final=result,
        best_top1=meta.get("best_top1", -1.0),
        best_step=meta.get("best_step", -1),
        stopped_by=None,
        state=state,
        workdir=os.path.abspath(workdir),
        checkpoints=os.path.join(os.path.abspath(workdir), ckpt_lib.CHECKPOINT_DIR),
    )
