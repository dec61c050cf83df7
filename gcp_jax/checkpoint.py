"""Orbax checkpoints of a run: periodic, final and best-by-eval, saved asynchronously.

Layout: workdir/checkpoints/<step>/{state, meta}. `state` is the train-state pytree (restored
with the shardings of a template), `meta` a small JSON dict (best accuracy so far, ...).
Kept: the latest `keep` checkpoints, plus the one with the highest eval top-1.
"""

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "top1"


class Checkpoints:
    """A run's checkpoint directory (wraps `orbax.checkpoint.CheckpointManager`)."""

    def __init__(self, workdir: str, *, keep: int = 2, use_async: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        keep_policy = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep_policy,
            enable_async_checkpointing=use_async,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> bool:
        """Start saving `state` at `step` (returns at once; the files are written in the background).

        `metrics` (with "top1") marks an eval checkpoint, a candidate for the best one.
        Returns False when `step` is already saved.
        """
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta)))
        return self._manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=True)

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step` (default: latest), placed like `template` (a state of the same shapes)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}; train first or point --workdir at a run.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"The checkpoint at step {step} in {self.directory} does not fit this config ({e}); "
                "use the config it was trained with, or a new --workdir."
            ) from e
        return restored.state, dict(restored.meta)

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
