"""Fault injection: a run never hangs and never loses work.

Each fault is done for real on the demo model at test sizes (tests/tiny_config.py): kills, signals
and a full disk to real `train.py` processes (tests/faulty_train.py injects hangs and delays),
damaged checkpoints and metrics files and changed configs in process. Every interrupted run is then
resumed to its end and must finish with the same evaluations as one uninterrupted reference run.
In-process runs and subprocesses use the first device of the same fake devices, so they compute
bit-identical steps and share one persistent compilation cache.
"""

import contextlib
import errno
import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_config

from gcp_jax import assembly, data, loop, metrics, run_config, sharding
from gcp_jax import checkpoint as ckpt_lib
from gcp_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTY_TRAIN = os.path.join(ROOT, "tests", "faulty_train.py")
TINY_CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")
NOISE = ("Traceback", "Fatal Python error", "Exception ignored", "Error writing", "RuntimeError", "Segmentation")


# --------------------------------------------------------------------------------------
# Fixtures: data, one compilation cache, one device, Run objects reused, the reference run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def jax_cache():
    """The session's persistent compilation cache (tests/conftest.py), shared with every subprocess."""
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture(scope="module", autouse=True)
def one_device_runs(jax_cache):
    """Runs in this process use one device, and one Run per config: its jitted steps compile once."""
    mesh = sharding.make_mesh(jax.devices()[:1])
    runs = {}
    real_run = assembly.Run

    def run(config, _mesh=None):
        key = config.to_json_best_effort(sort_keys=True)
        if key not in runs:
            runs[key] = real_run(config, mesh)
        return runs[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(assembly, "Run", run)
        yield


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run: (workdir, RunResult)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    return workdir, loop.train_and_evaluate(tiny_config.get_config(data_dir), workdir)


def evals(workdir):
    return [r for r in metrics.read_metrics(workdir) if r["split"] == "test"]


def without_rates(records):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def assert_same_end(workdir, data_dir, reference):
    """Resume `workdir` to its end in this process: the same evaluations and state as the reference.

    (Train records may differ: a stopped run logs the step it stopped at.)
    """
    ref_dir, ref = reference
    result = loop.train_and_evaluate(tiny_config.get_config(data_dir), workdir)
    assert result.step == 8 and not result.preempted
    assert result.final == ref.final and evals(workdir) == evals(ref_dir)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.state), jax.device_get(ref.state))
    assert (result.best_top1, result.best_step) == (ref.best_top1, ref.best_step)
    assert os.path.isdir(os.path.join(result.checkpoints, str(result.best_step)))
    return result


def copy_run(reference, tmp_path, *, drop_steps=()):
    """A copy of the reference workdir, without the checkpoints of `drop_steps` (never written)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference[0], workdir)
    for step in drop_steps:
        shutil.rmtree(os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR, str(step)))
    return workdir


# --------------------------------------------------------------------------------------
# Real processes


class Process:
    """tests/faulty_train.py on the tiny config (its output collected line by line); `jax_cache` None: no cache."""

    def __init__(self, workdir, data_dir, jax_cache, *flags, fault="none"):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the devices and the compile cache of this process
        command = [sys.executable, FAULTY_TRAIN, fault, "--config", f"{TINY_CONFIG}:{data_dir}"]
        command += ["--workdir", str(workdir), *flags, f"--config.compile_cache_dir={jax_cache or ''}"]
        self._popen = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self._popen.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()

    def wait_for(self, text: str, timeout: float = 240) -> None:
        """Block until a line containing `text` was printed."""
        with self._new_line:
            found = self._new_line.wait_for(
                lambda: any(text in line for line in self.lines) or self._popen.poll() is not None, timeout
            )
        assert found and any(text in line for line in self.lines), f"no {text!r} in:\n" + self.output

    def send(self, sig: int) -> float:
        self._popen.send_signal(sig)
        return time.monotonic()

    def running(self) -> bool:
        return self._popen.poll() is None

    def finish(self, timeout: float = 240) -> int:
        """The exit status (the process is killed after `timeout` seconds)."""
        try:
            return self._popen.wait(timeout)
        finally:
            if self._popen.poll() is None:
                self._popen.kill()

    @property
    def output(self) -> str:
        time.sleep(0.2)  # the reader's last lines
        return "\n".join(self.lines)


def assert_quiet(output: str) -> None:
    """No traceback, crash, Orbax or absl log line (E1202 ..., W1202 ...) or echo of an async error."""
    noisy = [
        line
        for line in output.splitlines()
        if any(n in line for n in NOISE) or (line[:1] in "EW" and line[1:5].isdigit())
    ]
    assert not noisy, output


def test_sigint_during_compilation_exits_at_once(tmp_path, data_dir, jax_cache):
    """Before the first step has finished there is nothing to save: exit 130 at once, no crash."""
    run = Process(tmp_path, data_dir, None)  # no compilation cache: compiling takes seconds
    run.wait_for("steps/epoch")  # the loop starts: the first batch, tracing, compiling (where 139 happened)
    time.sleep(3.0)
    sent = run.send(signal.SIGINT)
    assert run.finish(30) == 130
    assert time.monotonic() - sent < 10
    assert "SIGINT: exiting (nothing to save yet)." in run.output
    assert_quiet(run.output)
    assert not os.listdir(tmp_path / "checkpoints")


def test_sigint_then_sigterm_stop_at_a_step_boundary_and_resume(tmp_path, data_dir, jax_cache, reference):
    """Each signal: one line, a checkpoint at the next step boundary, exit 130 / 143; then the same end."""
    run = Process(tmp_path, data_dir, jax_cache, "--config.log_every_steps=1", fault="slow=0.3")
    run.wait_for("step 2/8")
    run.send(signal.SIGINT)
    assert run.finish() == 130
    assert "SIGINT: stopping at the end of this step with a checkpoint" in run.output
    assert "stopped by SIGINT at step" in run.output
    assert_quiet(run.output)
    stopped = ckpt_lib.Checkpoints(tmp_path, read_only=True).latest_step()
    assert 2 <= stopped < 8

    run = Process(tmp_path, data_dir, jax_cache, "--config.log_every_steps=1", fault="slow=0.3")
    run.wait_for(f"resumed from step {stopped} of 8")
    run.wait_for(f"step {stopped + 1}/8")
    run.send(signal.SIGTERM)
    assert run.finish() == 143
    assert "SIGTERM: stopping at the end of this step with a checkpoint" in run.output
    assert_quiet(run.output)
    assert stopped < ckpt_lib.Checkpoints(tmp_path, read_only=True).latest_step() < 8

    assert_same_end(str(tmp_path), data_dir, reference)


def test_second_ctrl_c_exits_at_once_from_a_hung_step(tmp_path, data_dir, jax_cache):
    """The main thread is stuck inside XLA: the first Ctrl-C cannot be honoured, the second exits."""
    run = Process(tmp_path, data_dir, jax_cache, "--config.step_timeout_s=0", fault="hang=3")
    run.wait_for("step 2/8")
    run.send(signal.SIGINT)
    run.wait_for("SIGINT: stopping at the end of this step")
    sent = run.send(signal.SIGINT)
    assert run.finish(30) == 130
    assert time.monotonic() - sent < 10
    assert "SIGINT again: exiting at once" in run.output
    assert_quiet(run.output)


def test_watchdog_dumps_every_stack_and_exits(tmp_path, data_dir, jax_cache):
    """No step within config.step_timeout_s: every thread's stack in the log, exit 124."""
    run = Process(tmp_path, data_dir, jax_cache, "--config.step_timeout_s=2", fault="hang=1")
    assert run.finish(120) == 124
    output = run.output
    assert "error: no step finished in 2 s (config.step_timeout_s=2)" in output
    assert "most recent call first" in output and "_block_inside_xla" in output
    assert output.count("Thread 0x") >= 2


def test_kill_9_during_a_save_then_resume(tmp_path, data_dir, jax_cache, reference, caplog):
    """SIGKILL while a checkpoint is being written: the unfinished save is set aside, nothing else lost."""
    folder = tmp_path / "checkpoints"
    run = Process(tmp_path, data_dir, jax_cache, "--config.checkpoint_every_steps=1")
    run.wait_for("steps/epoch")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and run.running():
        unfinished = glob.glob(str(folder / "*.orbax-checkpoint-tmp*"))
        if unfinished and not unfinished[0].startswith(str(folder / "1.")):  # a checkpoint is left to resume from
            run.send(signal.SIGKILL)
            break
        time.sleep(0.001)
    assert run.finish() == -signal.SIGKILL, run.output
    (unfinished,) = ckpt_lib.Checkpoints(tmp_path, read_only=True).unfinished()
    with caplog.at_level("WARNING", logger="gcp_jax"):
        assert_same_end(str(tmp_path), data_dir, reference)
    (aside,) = glob.glob(str(folder / f"*{ckpt_lib.INCOMPLETE_SUFFIX}*"))
    assert [r.getMessage() for r in caplog.records if "never completed" in r.getMessage()] == [
        f"{unfinished} is a save that never completed: set aside as {aside}."
    ]


@contextlib.contextmanager
def small_disk(path, megabytes):
    """A tmpfs of `megabytes` at `path` (root only); yields a function that resizes it, or None."""
    os.makedirs(path)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", path], capture_output=True
    ).returncode:
        yield None
        return
    try:
        yield lambda size: subprocess.run(["mount", "-o", f"remount,size={size}m", path], check=True)
    finally:
        subprocess.run(["umount", path], check=True)


def test_full_disk_is_one_line_then_resume(tmp_path, data_dir, jax_cache, reference):
    """The second checkpoint does not fit on the disk: one line, exit 1; after freeing space, the same end."""
    mount = str(tmp_path / "disk")
    with small_disk(mount, 4) as resize:  # room for the first checkpoint (2.5 MB), not the second
        workdir = os.path.join(mount, "run")
        run = Process(workdir, data_dir, jax_cache, fault="none" if resize else "enospc=8")
        assert run.finish() == 1
        lines = run.output.splitlines()
        assert lines[-1].startswith(f"error: no space left on the disk holding {workdir}; free some space")
        assert_quiet(run.output)
        assert ckpt_lib.Checkpoints(workdir, read_only=True).steps() == [4]
        if resize:
            resize(32)
        assert_same_end(workdir, data_dir, reference)


# --------------------------------------------------------------------------------------
# Damaged checkpoints and metrics files (in process)


def _largest_array_file(step_dir):
    return max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)


def truncate(step_dir):
    path = _largest_array_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def flip_a_bit(step_dir):
    path = _largest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x04]))


def remove_array_files(step_dir):
    for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        os.remove(path)


@pytest.mark.parametrize("damage", [truncate, flip_a_bit, remove_array_files])
def test_damaged_newest_checkpoint_is_set_aside(damage, tmp_path, data_dir, reference, caplog):
    """The newest checkpoint is damaged: one warning naming it, renamed (kept), resume from the older one."""
    workdir = copy_run(reference, tmp_path)
    damage(os.path.join(workdir, "checkpoints", "8"))
    with caplog.at_level("WARNING", logger="gcp_jax"):
        assert_same_end(workdir, data_dir, reference)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and "step 8" in warnings[0] and "does not fit" not in warnings[0]
    assert not [r for r in caplog.records if r.name == "asyncio"], "Orbax's leftover read tasks are not reported"
    (aside,) = glob.glob(os.path.join(workdir, "checkpoints", f"8{ckpt_lib.DAMAGED_SUFFIX}*"))
    assert aside in warnings[0] and os.listdir(os.path.join(aside, "state"))


def test_torn_metrics_line_is_dropped_and_the_rewind_is_atomic(tmp_path, data_dir, reference, caplog, monkeypatch):
    """A run died while writing metrics.jsonl (and before its last checkpoint): its restart works."""
    workdir = copy_run(reference, tmp_path, drop_steps=[8])
    path = os.path.join(workdir, metrics.METRICS_FILE)
    with open(path, "rb+") as f:  # tear the last line in the middle
        f.truncate(os.path.getsize(path) - 25)
    before = pathlib.Path(path).read_text(encoding="utf-8")

    def dying_replace(src, dst):
        raise KeyboardInterrupt("killed between writing the new file and renaming it")

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        metrics.MetricsWriter(workdir, start_step=4)
    assert pathlib.Path(path).read_text(encoding="utf-8") == before  # the history was not touched in place
    monkeypatch.undo()

    with caplog.at_level("WARNING", logger="gcp_jax"):
        assert_same_end(workdir, data_dir, reference)
    assert any("not whole JSON records" in r.getMessage() for r in caplog.records)
    assert without_rates(metrics.read_metrics(workdir)) == without_rates(metrics.read_metrics(reference[0]))


# --------------------------------------------------------------------------------------
# Config changes on resume


def snapshot(workdir):
    return {
        os.path.relpath(os.path.join(d, n), workdir): os.stat(os.path.join(d, n)).st_mtime_ns
        for d, _, names in os.walk(workdir)
        for n in names
    }


def test_config_change_on_resume_is_refused_or_kept(tmp_path, data_dir, reference):
    workdir = copy_run(reference, tmp_path)
    changed = tiny_config.get_config(data_dir)
    changed.optim.learning_rate = 0.1
    before = snapshot(workdir)
    with pytest.raises(config_lib.ConfigError, match=r"optim\.learning_rate \(0\.05 -> 0\.1\).*allow_config_change"):
        loop.train_and_evaluate(changed, workdir)
    assert snapshot(workdir) == before  # refused before any file was touched

    cadence = tiny_config.get_config(data_dir)
    cadence.log_every_steps, cadence.num_epochs = 1, 3  # run length and cadence: no flag needed
    assert run_config.config_changes(run_config.load_config(workdir), cadence)
    run_config.check_config_change(cadence, workdir)

    changed.allow_config_change = True
    result = loop.train_and_evaluate(changed, workdir)  # complete: nothing to train
    assert result.step == 8
    assert run_config.load_config(workdir).optim.learning_rate == 0.1
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["optim"]["learning_rate"] == 0.05  # the first config is kept
    assert os.path.exists(os.path.join(workdir, "config.8.json"))


def test_checkpoint_of_another_shape_does_not_fit(tmp_path, data_dir, reference, capfd):
    """An allowed change that does not fit the checkpoints: one sentence, no checkpoint set aside."""
    workdir = copy_run(reference, tmp_path)
    changed = tiny_config.get_config(data_dir)
    changed.gcp.dim, changed.allow_config_change = 6, True
    with pytest.raises(
        ckpt_lib.MismatchError,
        match=r"step 8 .* does not fit this config \(.*head/reduce_bn/bias is \(8,\) float32 there but \(6,\)",
    ):
        loop.train_and_evaluate(changed, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    assert "Exception ignored" not in capfd.readouterr().err


# --------------------------------------------------------------------------------------
# Checkpoint retention and verification (tiny pytrees)


def small_state(value):
    return {"w": jnp.full((4, 4), value, jnp.float32), "step": jnp.int32(value)}


def test_best_checkpoint_survives_restarts_and_failed_saves(tmp_path):
    """keep=1: the best-by-eval stays through restarts; nothing is removed before a newer save is complete."""
    checkpoints = ckpt_lib.Checkpoints(tmp_path, keep=1)
    for step, score in ((1, 0.9), (2, 0.5)):
        checkpoints.save(step, small_state(step), {}, score=score)
    checkpoints.close()
    for step, score in ((3, 0.4), (4, None)):  # two more restarts
        checkpoints = ckpt_lib.Checkpoints(tmp_path, keep=1)
        checkpoints.save(step, small_state(step), {}, score=score)
        checkpoints.close()
    checkpoints = ckpt_lib.Checkpoints(tmp_path, keep=1)
    assert checkpoints.steps() == [1, 4] and checkpoints.best_step() == 1

    real_save = checkpoints._manager.save

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoints._manager.save = full_disk
    with pytest.raises(OSError):
        checkpoints.save(5, small_state(5), {}, score=None)
    checkpoints._manager.save = real_save
    checkpoints.close()
    assert ckpt_lib.Checkpoints(tmp_path).steps() == [1, 4]


def test_checkpoint_of_the_previous_version_restores_with_one_warning(tmp_path, caplog):
    """No fingerprint: restored (not set aside), one warning that it cannot be verified."""
    import orbax.checkpoint as ocp

    folder = os.path.join(tmp_path, "checkpoints")
    manager = ocp.CheckpointManager(folder, item_names=("state", "meta"))  # the previous version's layout
    for step in (3, 6):
        meta = {"best_top1": 0.5, "best_step": 3, "final": None}
        manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(small_state(step)), meta=ocp.args.JsonSave(meta))
        )
    manager.wait_until_finished()
    manager.close()
    checkpoints = ckpt_lib.Checkpoints(tmp_path)
    real_restore = checkpoints._manager.restore

    def cannot_read(*args, **kwargs):
        raise RuntimeError("a format this Orbax cannot read")

    checkpoints._manager.restore = cannot_read  # a failure that is not damage: raised, nothing set aside
    with pytest.raises(RuntimeError, match="a format this Orbax cannot read"):
        checkpoints.restore_newest_intact(small_state(0))
    checkpoints._manager.restore = real_restore
    with caplog.at_level("WARNING", logger="gcp_jax"):
        state, meta = checkpoints.restore_newest_intact(small_state(0))
    checkpoints.close()
    assert int(state["step"]) == 6 and meta["best_step"] == 3
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot be verified" in warnings[0]
    assert sorted(os.listdir(folder)) == ["3", "6"]
    assert ckpt_lib.Checkpoints(tmp_path).best_step() == 3  # its score is known from the newest meta


# --------------------------------------------------------------------------------------
# Progress and skipped images


def test_progress_rate_leaves_compilation_out(monkeypatch):
    clock = iter([0.0, 30.0, 31.0, 32.0])  # created, first step done after 30 s of compilation, ...
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    progress = metrics.Progress(total_steps=100, start_step=0, batch_size=8, tty=False)
    progress.start(1)
    assert progress.update(1, {}) is None  # nothing timed yet
    assert progress.update(3, {}) == pytest.approx(16.0)  # 2 steps x 8 images in 1 s


def test_skipped_images_reach_train_and_eval_records_across_a_resume(tmp_path, data_dir, monkeypatch):
    """train records: skipped images summed over the run's sessions; eval records: that pass's count."""
    real_batches = data.train_batches

    class OneSkipped:  # each session's stream reports one skipped image; the first is stopped at step 3
        def __init__(self, *args, stop_at=0, **kwargs):
            self._batches, self._stop_at, self._count, self.num_skipped = real_batches(*args, **kwargs), stop_at, 0, 1

        def __next__(self):
            self._count += 1
            if self._count == self._stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return next(self._batches)

    config = tiny_config.get_config(data_dir)
    monkeypatch.setattr(data, "train_batches", lambda *a, **k: OneSkipped(*a, stop_at=3, **k))
    assert loop.train_and_evaluate(config, str(tmp_path)).stopped_by == signal.SIGTERM
    monkeypatch.setattr(data, "train_batches", OneSkipped)
    assert loop.train_and_evaluate(config, str(tmp_path)).step == 8
    records = metrics.read_metrics(str(tmp_path))
    train = [(r["step"], r["skipped_images"]) for r in records if r["split"] == "train"]
    assert train == [(2, 1), (3, 1), (4, 2), (6, 2), (8, 2)]
    assert [r["skipped_images"] for r in records if r["split"] == "test"] == [0, 0]
