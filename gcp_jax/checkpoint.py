"""Orbax checkpoints of a run that can be trusted: verified on restore, the best kept across restarts.

Layout: workdir/checkpoints/<step>/{state, meta}. `state` is the train-state pytree (restored with
the shardings of a template); `meta` a small JSON dict: the loop's own (best accuracy so far, last
eval, ...) plus, under "checkpoint", this module's: the eval score of that step (None for a
checkpoint without an eval) and a fingerprint of the state's bytes.

Kept: the latest `keep` checkpoints plus the one with the best score. The scores are read back from
the checkpoints, so the best survives any number of restarts. Older checkpoints are removed only
once a newer one is completely written (Orbax's own retention is not used: it deletes even when the
new save failed).

A checkpoint is damaged when its files are missing or cannot be decoded, its state differs from the
fingerprint saved with it, or its state is not finite. `restore_newest_intact` sets a damaged one
aside (renames it to `<step>.damaged-<time>`, so Orbax no longer sees it; nothing is deleted) with
one warning and takes the next older one; a save that never completed (the process was killed while
writing it) is set aside as `<step>.incomplete-<time>`. A checkpoint whose shapes differ from the
template is not damaged: it does not fit the config (`MismatchError`); nor is a failure that says
nothing about the files (a bug, a permission): that is raised as it is. Checkpoints written before
fingerprints existed, or with another fingerprint algorithm, restore with a warning that only their
finiteness could be verified.

A save that cannot write (a full disk, a read-only or vanished folder, no permission) raises
SaveError, naming the step and the checkpoint the run would resume from, and nothing more is
written: the folder is tried before each save, and a failure of the background write surfaces at
the next `check()` (the loop calls it every step) or save.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"
CONFIG_KEY = "config"  # meta[CONFIG_KEY]: the run's config (the loop's, as a JSON dict)
CHECK_KEY = "checkpoint"  # meta[CHECK_KEY] = {"score": float | None, "fingerprint": str, "algorithm": str}
FINGERPRINT = "sha256-of-leaf-bytes/1"  # `fingerprint`'s algorithm; another one cannot be checked here
DAMAGED_SUFFIX = ".damaged-"
INCOMPLETE_SUFFIX = ".incomplete-"
UNFINISHED_SAVE = re.compile(r"(\d+)\.orbax-checkpoint-tmp(-\d+)?")  # Orbax writes here, then renames to <step>
DISK_FULL = "No space left on device"  # strerror(ENOSPC), also in TensorStore's messages
# What a save that cannot write reports: a full disk, a read-only file system, no permission, a vanished folder.
_SAVE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT)
log = logging.getLogger("gcp_jax.checkpoint")


class DamagedCheckpointError(ValueError):
    """A checkpoint whose files cannot be read or whose contents cannot be trusted."""


class MismatchError(ValueError):
    """A checkpoint whose arrays have other names or shapes than this config's state."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (its OSError is the cause); the run must stop."""


# --------------------------------------------------------------------------------------
# Fingerprints


def _host_copy(leaf: Any) -> np.ndarray:
    """A leaf on the host: this process's copy of a replicated array (every process holds one)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_data(0)
    return np.ascontiguousarray(leaf)


def fingerprint(tree: Any) -> tuple[str, bool]:
    """(SHA-256 hex digest of the bytes of every array of `tree`, in order; whether all its floats are finite).

    Any flipped bit changes the digest. Computed on the host, one array at a time (no compilation;
    about a second per GB).
    """
    digest, finite = hashlib.sha256(), True
    for leaf in jax.tree.leaves(tree):
        array = _host_copy(leaf)
        digest.update(array.reshape(-1).view(np.uint8))
        if jnp.issubdtype(array.dtype, jnp.inexact):  # numpy's own test misses bfloat16
            finite = finite and bool(np.isfinite(array).all())
    return digest.hexdigest()[:32], finite


# --------------------------------------------------------------------------------------
# Shapes: does a checkpoint fit a template?


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"params/head/reduce_conv/kernel": (shape, dtype), ...} of a state, its template or Orbax's metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_key_name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for path, leaf in leaves
    }


def _layout_difference(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """A short description of how two layouts differ ('' when equal)."""
    problems = [f"{name} is missing" for name in wanted if name not in saved]
    problems += [f"{name} is not in this config's state" for name in saved if name not in wanted]
    problems += [
        f"{name} is {saved[name][0]} {saved[name][1]} there but {wanted[name][0]} {wanted[name][1]} here"
        for name in wanted
        if name in saved and saved[name] != wanted[name]
    ]
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


# What reading a damaged or incomplete checkpoint raises: missing or truncated files, undecodable bytes.
_DAMAGE_ERRORS = (FileNotFoundError, EOFError, UnicodeDecodeError, json.JSONDecodeError)
_DAMAGE_STATUSES = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND")  # TensorStore's


def _is_damage(error: BaseException | None) -> bool:
    """Whether `error` (or a cause of it) says that a checkpoint's files are missing or corrupt.

    Other failures (a bug, an unreadable newer format, a permission) are not damage: they are raised
    as they are, and no checkpoint is set aside because of them.
    """
    while error is not None:
        if isinstance(error, _DAMAGE_ERRORS) or str(error).startswith(_DAMAGE_STATUSES):
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: BaseException) -> str:
    """The first line of the innermost cause of `error` (Orbax wraps TensorStore's precise message)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _is_write_failure(error: BaseException | None) -> bool:
    """Whether `error` (or a cause of it) is a failure to write files (`_SAVE_ERRNOS`)."""
    while error is not None:
        if DISK_FULL in str(error) or (isinstance(error, OSError) and error.errno in _SAVE_ERRNOS):
            return True
        error = error.__cause__ or error.__context__
    return False


class _NoWriteFailureReports(logging.Filter):
    """Drops Orbax's log records (with tracebacks) about a save that could not write (a full disk, a
    read-only folder, ...): the error reaches the caller of `Checkpoints.save`/`check`/`wait`, and the
    program says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return DISK_FULL not in record.getMessage() and not _is_write_failure(error)


class _NoLeftoverReadTasks(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" about TensorStore reads of a damaged
    checkpoint: the restore that failed already said so (set aside, or an error naming it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        leftover = "never retrieved" in str(record.msg) and any(s in str(error) for s in ('"zarr" driver', "OCDBT"))
        return not leftover


def _is_orbax_leftover(unraisable) -> bool:
    """Whether an unraisable error is an echo of a failed Orbax operation, already reported by its caller.

    A failed restore leaves read coroutines that raise again when garbage-collected ("Exception ignored
    in: <coroutine ...>", one per array); a failed save leaves TensorStore writes whose completion
    callbacks find Orbax's event loop closed ("RuntimeError: Event loop is closed", dozens).
    """
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
        return True
    return (
        unraisable.object is None
        and unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"
    )


def _quiet_orbax_failures() -> None:
    """Let a failed save or restore be reported once, by the caller: filter Orbax's echoes of it (idempotent)."""
    orbax_log = logging.getLogger("absl")  # Orbax logs through absl.logging
    if not any(isinstance(f, _NoWriteFailureReports) for f in orbax_log.filters):
        orbax_log.addFilter(_NoWriteFailureReports())
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _NoLeftoverReadTasks) for f in asyncio_log.filters):
        asyncio_log.addFilter(_NoLeftoverReadTasks())
    previous = sys.unraisablehook
    if getattr(previous, "quiets_orbax", False):
        return

    def hook(unraisable):
        if not _is_orbax_leftover(unraisable):
            previous(unraisable)

    hook.quiets_orbax = True
    sys.unraisablehook = hook


# --------------------------------------------------------------------------------------
# A run's checkpoint directory


class Checkpoints:
    """A run's checkpoint directory (wraps `orbax.checkpoint.CheckpointManager`).

    `read_only` (evaluation, analysis): the directory must exist and is left as it is (use `restore`).
    """

    def __init__(self, workdir: str, *, keep: int = 2, use_async: bool = True, read_only: bool = False):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"No checkpoint in {self.directory}; train first or point --workdir at a run.")
        self._keep, self._read_only = keep, read_only
        self._existed = os.path.isdir(self.directory)  # if so, and it goes, the save says so (no new empty one)
        self._pending: int | None = None  # the step being written in the background
        self._failed = False  # a save failed: nothing more is written or waited for
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=use_async,
            create=False,  # see save
            # A step folder that cannot be made fails the save at once; made in the background, the
            # failure left Orbax's other threads waiting minutes for it ("Timeout waiting for key").
            async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False),
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._scores: dict[int, float | None] = {}
        self._warned_unverified = False
        _quiet_orbax_failures()

    def steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def unfinished(self) -> list[str]:
        """Folders of saves that never completed (the process stopped while writing them)."""
        if not os.path.isdir(self.directory):
            return []
        names = [n for n in os.listdir(self.directory) if UNFINISHED_SAVE.fullmatch(n)]
        return sorted(os.path.join(self.directory, n) for n in names)

    # --- saving and pruning -------------------------------------------------------------

    def save(self, step: int, state: Any, meta: Mapping[str, Any], score: float | None = None) -> bool:
        """Start saving `state` at `step` (the files are written in the background).

        `score` (an eval top-1 of this step) makes it a candidate for the best checkpoint. The
        previous save is completed first (its errors surface here), then old checkpoints are pruned.
        The directory is created by the first save and must be writable: else SaveError, before
        anything is written. Returns False when `step` is already saved.
        """
        if step in self._manager.all_steps():
            return False
        self.wait()
        self._check_writable(step)
        digest, _ = fingerprint(state)
        record = {**meta, CHECK_KEY: {"score": score, "fingerprint": digest, "algorithm": FINGERPRINT}}
        args = ocp.args.Composite(state=ocp.args.StandardSave(_one_replica(state)), meta=ocp.args.JsonSave(record))
        with self._failing_save(step):
            self._manager.save(step, args=args, force=True)
        self._pending = step
        self._scores[step] = score
        return True

    def check(self) -> None:
        """Raise SaveError if the save being written in the background has failed (cheap: call it every step)."""
        if self._pending is not None and not self._failed:
            with self._failing_save(self._pending):
                self._manager.check_for_errors()

    def wait(self) -> None:
        """Block until pending saves are on disk, then remove the checkpoints no longer kept."""
        if self._failed:
            return
        if self._pending is not None:
            with self._failing_save(self._pending):
                self._manager.wait_until_finished()
                self._manager.check_for_errors()
            self._pending = None
        self._prune()

    def _check_writable(self, step: int) -> None:
        """Create the directory (first save) and write a file in it, or raise SaveError naming `step`."""
        with self._failing_save(step):
            if not os.path.isdir(self.directory):
                if self._existed:
                    raise FileNotFoundError(errno.ENOENT, "the folder is gone", self.directory)
                os.makedirs(self.directory, exist_ok=True)  # every process of a multi-host run tries it
                self._existed = True
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=self.directory)
            os.close(fd)
            os.remove(probe)

    @contextlib.contextmanager
    def _failing_save(self, step: int) -> Iterator[None]:
        """Turn a failure to write the checkpoint of `step` into SaveError (and write nothing more)."""
        try:
            yield
        except Exception as e:
            if not _is_write_failure(e):
                raise
            self._failed = True
            done = [s for s in _complete_steps(self.directory) if s != step]
            resume = f"step {done[-1]}, its last complete checkpoint" if done else "step 0 (no checkpoint is complete)"
            reason = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
            raise SaveError(
                f"cannot save the checkpoint of step {step} in {self.directory} ({reason}); make it "
                f"writable, then run the same command: the run resumes from {resume}, and the records of later "
                "steps in metrics.jsonl are replaced by the resumed run's."
            ) from e

    def best_step(self) -> int | None:
        """The step of the best-scoring checkpoint on disk (the earliest of equals), or None."""
        scored = [(score, -step) for step in self.steps() if (score := self._score(step)) is not None]
        return -max(scored)[1] if scored else None

    def _prune(self) -> None:
        """Remove all but the latest `keep` checkpoints and the best one (every listed save is complete)."""
        if self._read_only:
            return
        steps = self.steps()
        kept = set(steps[-self._keep :]) | {self.best_step()}
        for step in steps:
            if step not in kept:
                self._manager.delete(step)
                self._scores.pop(step, None)

    def _score(self, step: int) -> float | None:
        """The eval score saved with `step` (None: no eval at that step, or unreadable)."""
        if step not in self._scores:
            try:
                record = self._read_meta(step)
            except Exception:  # an unreadable checkpoint has no score; restore reports the damage
                record = {}
            check = record.get(CHECK_KEY)
            if check is not None:
                self._scores[step] = check.get("score")
            else:  # earlier layout: only the best step's score is known, from its own meta
                self._scores[step] = record.get("best_top1") if record.get("best_step") == step else None
        return self._scores[step]

    def _read_meta(self, step: int) -> dict[str, Any]:
        return _read_meta(self.directory, step)

    # --- restoring ------------------------------------------------------------------------

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step` (default: latest), placed like `template`, verified.

        Raises MismatchError when the checkpoint's arrays do not fit `template`, and
        DamagedCheckpointError when it cannot be read or trusted.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}; train first or point --workdir at a run.")
        self._check_fits(template, step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:
            if not _is_damage(e):
                raise
            raise self._damaged(step, f"its files cannot be read ({_first_line(e)})") from e
        record = dict(restored.meta)
        check = record.pop(CHECK_KEY, None)
        digest, finite = fingerprint(restored.state)
        if not finite:
            raise self._damaged(step, "its state holds NaN or infinite values")
        if check is None or check.get("algorithm") != FINGERPRINT:
            self._warn_unverified(step)
        elif check.get("fingerprint") != digest:
            raise self._damaged(step, "its contents differ from the fingerprint saved with it")
        return restored.state, record

    def restore_newest_intact(self, template: Any) -> tuple[Any, dict[str, Any]] | None:
        """(state, meta) of the newest intact checkpoint, setting aside unfinished saves and damaged newer
        checkpoints; None if there is none."""
        for folder in self.unfinished():
            step = UNFINISHED_SAVE.fullmatch(os.path.basename(folder))[1]
            self._set_aside(folder, f"{step}{INCOMPLETE_SUFFIX}", f"{folder} is a save that never completed")
        for step in reversed(self.steps()):
            try:
                return self.restore(template, step)
            except DamagedCheckpointError as e:
                self._set_aside(os.path.join(self.directory, str(step)), f"{step}{DAMAGED_SUFFIX}", str(e))
        return None

    def _set_aside(self, path: str, prefix: str, reason: str) -> str:
        """Rename `path` to `<prefix><time>` beside it (process 0), so Orbax no longer sees it; one warning."""
        target = os.path.join(self.directory, f"{prefix}{time.strftime('%Y%m%dT%H%M%S')}")
        if jax.process_index() == 0:
            os.rename(path, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"gcp_jax: set aside {path}")
        self._manager.reload()
        self._scores.clear()
        log.warning(f"{reason}: set aside as {target}.")
        return target

    def _check_fits(self, template: Any, step: int) -> None:
        try:
            metadata = self._manager.item_metadata(step).get("state")
        except Exception as e:
            if not _is_damage(e):
                raise
            raise self._damaged(step, f"its metadata cannot be read ({_first_line(e)})") from e
        saved = _layout(getattr(metadata, "tree", metadata)) if metadata is not None else {}
        if not saved:
            raise self._damaged(step, "its state or the state's metadata is missing")
        difference = _layout_difference(saved, _layout(template))
        if difference:
            raise MismatchError(
                f"The checkpoint at step {step} in {self.directory} does not fit this config ({difference}); "
                "use the config it was trained with, or a new --workdir."
            )

    def _damaged(self, step: int, reason: str) -> DamagedCheckpointError:
        return DamagedCheckpointError(
            f"The checkpoint at step {step} in {self.directory} is damaged or incomplete: {reason}"
        )

    def _warn_unverified(self, step: int) -> None:
        if not self._warned_unverified:
            self._warned_unverified = True
            log.warning(
                f"The checkpoint at step {step} in {self.directory} was written by another gcp_jax version, without "
                f"a {FINGERPRINT} fingerprint: it cannot be verified (only checked for NaN and infinite values)."
            )

    def close(self) -> None:
        """Finish pending saves and pruning, and release Orbax's threads."""
        try:
            if not self._read_only:
                self.wait()
        finally:
            self._manager.close()


def _one_replica(state: Any) -> Any:
    """In a single process, each replicated array as its first device's buffer (no copy).

    Given the replicated array, Orbax splits it into one slice per replica, for the processes of a
    multi-host run to write a part each; in one process that is an eager slice per array and device,
    seconds per save on a CPU mesh. Several processes keep Orbax's shared writing.
    """
    if jax.process_count() > 1:
        return state

    def first_buffer(leaf):
        replicated = isinstance(leaf, jax.Array) and len(leaf.devices()) > 1 and leaf.is_fully_replicated
        return leaf.addressable_shards[0].data if replicated else leaf

    return jax.tree.map(first_buffer, state)


def has_checkpoint(workdir: str) -> bool:
    """Whether workdir holds a checkpoint (without creating its checkpoint directory)."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        return False
    checkpoints = Checkpoints(workdir, use_async=False)
    try:
        return checkpoints.latest_step() is not None
    finally:
        checkpoints.close()


def _complete_steps(directory: str) -> list[int]:
    """The steps whose folders are in `directory`, oldest first (Orbax renames a finished save to <step>)."""
    with contextlib.suppress(OSError):
        return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    return []


def _read_meta(directory: str, step: int) -> dict[str, Any]:
    """The meta item of `step` alone (through its handler, as Orbax reads its own metrics)."""
    path = epath.Path(directory) / str(step) / "meta"
    return dict(ocp.JsonCheckpointHandler().restore(path, ocp.args.JsonRestore()))


def newest_config(workdir: str) -> tuple[int, dict[str, Any] | None] | None:
    """(step, the config the run had when it saved it) of workdir's newest checkpoint whose meta can be
    read; the config is None in a checkpoint of a version that did not keep it. None: no checkpoint."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    for step in reversed(_complete_steps(directory)):
        try:
            record = _read_meta(directory, step)
        except Exception:  # damaged: the next older one says what the run was (restore sets it aside)
            continue
        return step, record.get(CONFIG_KEY)
    return None
