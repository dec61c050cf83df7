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
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_config

from gcp_jax import assembly, cli, data, loop, metrics, run_config, sharding, writer_lock
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
    assert not glob.glob(str(tmp_path / "checkpoints" / "*"))  # nothing saved (the folder comes with a save)


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


def test_second_trainer_is_refused_and_a_killed_one_blocks_nothing(tmp_path, data_dir, jax_cache, reference):
    """Two trainers on one workdir: the second exits 1 at once naming the first, which it leaves alone;
    the first, killed by SIGKILL, leaves its lock file but no lock: the next start resumes."""
    first = Process(tmp_path, data_dir, jax_cache, "--config.log_every_steps=1", fault="hang=3")
    try:
        first.wait_for("step 2/8")  # then its third batch never arrives
        while not any(r["step"] == 2 for r in metrics.read_metrics(tmp_path)):
            time.sleep(0.05)
        time.sleep(0.5)  # its TensorBoard record of step 2 too
        before = snapshot(tmp_path)
        second = Process(tmp_path, data_dir, jax_cache)
        assert second.finish() == 1
        holder = f"pid {first._popen.pid} on host {socket.gethostname()} since "
        assert second.lines[-1].startswith(f"error: {tmp_path} is in use by another trainer ({holder}"), second.output
        assert_quiet(second.output)
        assert first.running() and snapshot(tmp_path) == before
    finally:
        first.send(signal.SIGKILL)
    assert first.finish() == -signal.SIGKILL
    lock_file = os.path.join(tmp_path, writer_lock.LOCK_FILE)
    assert os.path.exists(lock_file)  # what a kill leaves: the holder's name, no lock
    assert_same_end(str(tmp_path), data_dir, reference)
    assert not os.path.exists(lock_file)


def test_readers_are_not_blocked_by_the_trainer(tmp_path, data_dir, reference):
    """While a trainer holds the workdir: eval_only works; a trainer in this process is refused too."""
    workdir = copy_run(reference, tmp_path)
    with writer_lock.hold(workdir):
        result = loop.evaluate_checkpoint(run_config.load_config_with(workdir, {}, eval_only=True), workdir)
        assert result.final == reference[1].final
        with pytest.raises(writer_lock.WorkdirInUseError, match=f"in use by another trainer \\(pid {os.getpid()} "):
            loop.train_and_evaluate(tiny_config.get_config(data_dir), workdir)


@contextlib.contextmanager
def read_only_mount(path):
    """`path` bind-mounted read-only on itself (root only); yields whether it is."""
    if subprocess.run(["mount", "--bind", path, path], capture_output=True).returncode:
        yield False
        return
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", path, path], check=True)
        yield True
    finally:
        subprocess.run(["umount", path], check=True)


def test_read_only_checkpoints_stop_the_run_at_once(tmp_path, data_dir, jax_cache, reference, caplog):
    """The checkpoint folder turns read-only before the save of step 8: one line, exit 1, no hang; the
    records of steps after step 4 are said to be redone, and are, by the resumed run."""
    workdir = str(tmp_path / "run")
    folder = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)
    run = Process(workdir, data_dir, jax_cache, fault="erofs=8")
    try:
        assert run.finish(120) == 1
    finally:
        subprocess.run(["umount", folder], capture_output=True)  # where the fault could mount it
    assert run.lines[-1].startswith(
        f"error: cannot save the checkpoint of step 8 in {folder} (Read-only file system); make it writable, then "
        "run the same command: the run resumes from step 4, its last complete checkpoint"
    ), run.output
    assert_quiet(run.output)
    assert ckpt_lib.Checkpoints(workdir, read_only=True).steps() == [4]
    assert max(r["step"] for r in metrics.read_metrics(workdir)) == 8  # recorded, and said to be redone
    with caplog.at_level("INFO", logger="gcp_jax"):
        assert_same_end(workdir, data_dir, reference)
    assert "records after step 4 are replaced by this run's" in caplog.text
    assert without_rates(metrics.read_metrics(workdir)) == without_rates(metrics.read_metrics(reference[0]))


def test_read_only_workdir_is_one_line(tmp_path, data_dir, reference, monkeypatch):
    """A workdir that cannot be written: one sentence (train.py prints it as its error line), nothing run."""
    workdir = copy_run(reference, tmp_path, drop_steps=[8])
    with read_only_mount(workdir) as mounted:
        if not mounted:

            def read_only(workdir):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), workdir)

            monkeypatch.setattr(writer_lock, "_acquire", read_only)
        with pytest.raises(writer_lock.UnwritableWorkdirError) as refused:
            loop.train_and_evaluate(tiny_config.get_config(data_dir), workdir)
    assert cli.user_error(refused.value, workdir) == (
        f"cannot write in {workdir} (Read-only file system); make it writable, or give a --workdir that is."
    )


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


@pytest.mark.parametrize("text", ["", "{}", "[]", '{"seed": 0}'])
def test_config_json_that_is_no_run_config_is_refused(text, tmp_path, data_dir, reference):
    """An empty or truncated config.json is not read as the default config (another data set, model, ...)."""
    workdir = copy_run(reference, tmp_path)
    path = os.path.join(workdir, "config.json")
    pathlib.Path(path).write_text(text, encoding="utf-8")
    refusal = f"{path}, the run's saved config, (cannot be read|is not a config of train.py)"
    with pytest.raises(config_lib.ConfigError, match=refusal):
        run_config.load_config_with(workdir, {}, eval_only=True)
    with pytest.raises(config_lib.ConfigError, match=refusal):
        loop.train_and_evaluate(tiny_config.get_config(data_dir), workdir)


def test_empty_config_json_is_one_line_before_any_data(tmp_path, data_dir, jax_cache, reference):
    workdir = copy_run(reference, tmp_path)
    pathlib.Path(workdir, "config.json").write_text("{}", encoding="utf-8")
    before = snapshot(workdir)
    run = Process(workdir, data_dir, jax_cache)
    assert run.finish() == 1
    assert run.lines[-1].startswith(f"error: {workdir}/config.json, the run's saved config, is not a config of "), (
        run.output
    )
    assert_quiet(run.output)
    assert snapshot(workdir) == before


def test_config_json_of_another_run_is_refused(tmp_path, data_dir, reference):
    workdir = copy_run(reference, tmp_path)
    other = tiny_config.get_config(data_dir)
    other.optim.learning_rate, other.gcp.dim = 0.1, 6
    path = os.path.join(workdir, "config.json")
    pathlib.Path(path).write_text(other.to_json_best_effort(), encoding="utf-8")
    before = snapshot(workdir)
    with pytest.raises(
        config_lib.ConfigError,
        match=f"{path} describes another run than the checkpoint at step 8 .*gcp.dim \\(6 -> 8\\), "
        "optim.learning_rate \\(0.1 -> 0.05\\)",
    ):
        loop.train_and_evaluate(tiny_config.get_config(data_dir), workdir)
    assert snapshot(workdir) == before


def test_lost_config_json_comes_back_from_the_checkpoint_and_guards_the_resume(tmp_path, data_dir, reference, caplog):
    """Without config.json the newest checkpoint's config is the run's: a changed learning rate is refused,
    eval_only and a resume use it, and the resume writes config.json again."""
    workdir = copy_run(reference, tmp_path, drop_steps=[8])
    os.remove(os.path.join(workdir, "config.json"))
    changed = tiny_config.get_config(data_dir)
    changed.optim.learning_rate = 0.1
    before = snapshot(workdir)
    with pytest.raises(
        config_lib.ConfigError,
        match=r"saved config \(the checkpoint at step 4 in .*\) in optim\.learning_rate \(0\.05 -> 0\.1\)",
    ):
        loop.train_and_evaluate(changed, workdir)
    assert snapshot(workdir) == before
    assert run_config.has_saved_config(workdir)
    evaluated = run_config.load_config_with(workdir, {}, eval_only=True)
    assert not run_config._refused_changes(evaluated, tiny_config.get_config(data_dir))
    with caplog.at_level("INFO", logger="gcp_jax"):
        assert_same_end(workdir, data_dir, reference)
    assert f"{workdir}/config.json was missing: restored from the checkpoint at step 4" in caplog.text
    assert run_config.load_config(workdir).to_dict() == run_config.load_config(reference[0]).to_dict()


def test_checkpoints_without_their_config_and_no_config_json(tmp_path, data_dir, reference):
    """Checkpoints of an earlier version (no config kept) and config.json lost: nothing to check a config
    against, so a resume needs allow_config_change, and then keeps its config."""
    workdir = copy_run(reference, tmp_path)
    os.remove(os.path.join(workdir, "config.json"))
    for meta in glob.glob(os.path.join(workdir, "checkpoints", "*", "meta", "metadata")):
        record = json.loads(pathlib.Path(meta).read_text(encoding="utf-8"))
        record.pop(ckpt_lib.CONFIG_KEY)
        pathlib.Path(meta).write_text(json.dumps(record), encoding="utf-8")
    config = tiny_config.get_config(data_dir)
    with pytest.raises(config_lib.ConfigError, match=r"holds checkpoints but no config\.json.*allow_config_change"):
        loop.train_and_evaluate(config, workdir)
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        run_config.load_config_with(workdir, {}, eval_only=True)
    config.allow_config_change = True
    assert loop.train_and_evaluate(config, workdir).step == 8
    assert run_config.saved_config_path(workdir) == os.path.join(workdir, "config.json")


def test_eval_only_names_only_the_overrides_it_ignores(tmp_path, reference, caplog):
    workdir = copy_run(reference, tmp_path)
    with caplog.at_level("WARNING", logger="gcp_jax"):
        config = run_config.load_config_with(
            workdir, {"optim.learning_rate": 0.05, "batch_size": 16, "eval_flip": True}, eval_only=True
        )
    assert config.eval_flip and config.batch_size == 8
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.endswith("ignored: --config.batch_size")


def test_sigterm_during_the_final_evaluation_says_the_run_finishes(tmp_path, data_dir, monkeypatch, caplog):
    """After the last step the run finishes (final eval and checkpoint, not stopped) and says so."""
    real_eval_batches, calls = data.eval_batches, []

    def eval_batches(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the final evaluation
            os.kill(os.getpid(), signal.SIGTERM)
        return real_eval_batches(*args, **kwargs)

    monkeypatch.setattr(data, "eval_batches", eval_batches)
    with caplog.at_level("WARNING", logger="gcp_jax"):
        result = loop.train_and_evaluate(tiny_config.get_config(data_dir), str(tmp_path))
    assert result.step == 8 and result.stopped_by is None and result.final is not None
    assert ckpt_lib.Checkpoints(tmp_path, read_only=True).latest_step() == 8
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "SIGTERM: the last step is done; the run finishes with its final evaluation and checkpoint (SIGTERM again "
        "exits at once, without them)."
    ]


def test_refused_weight_file_leaves_nothing_behind(tmp_path, data_dir):
    workdir = tmp_path / "run"
    config = tiny_config.get_config(data_dir)
    config.model.pretrained = str(tmp_path / "damaged.npz")
    pathlib.Path(config.model.pretrained).write_bytes(b"not a weight file")
    with pytest.raises(ValueError, match=r"damaged\.npz"):
        loop.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


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
    with pytest.raises(ckpt_lib.SaveError, match=r"step 5 .*No space left on device"):
        checkpoints.save(5, small_state(5), {}, score=None)
    checkpoints._manager.save = real_save
    checkpoints.close()
    assert ckpt_lib.Checkpoints(tmp_path).steps() == [1, 4]


def test_save_whose_folder_cannot_be_made_fails_at_once(tmp_path, monkeypatch, capfd):
    """The folder looked writable, then Orbax cannot make the step's folder: the save raises one
    SaveError at once (no Orbax thread left waiting minutes for the folder), and nothing is printed."""
    checkpoints = ckpt_lib.Checkpoints(tmp_path)
    checkpoints.save(1, small_state(1), {})
    checkpoints.wait()
    monkeypatch.setattr(ckpt_lib.Checkpoints, "_check_writable", lambda self, step: None)
    real_makedirs = os.makedirs

    def read_only(path, *args, **kwargs):
        if str(path).startswith(checkpoints.directory):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    started = time.monotonic()
    with pytest.raises(ckpt_lib.SaveError, match=r"step 2 .*Read-only file system.*resumes from step 1, its last"):
        checkpoints.save(2, small_state(2), {})
    checkpoints.check()
    checkpoints.close()
    assert time.monotonic() - started < 10
    monkeypatch.undo()
    assert ckpt_lib.Checkpoints(tmp_path).steps() == [1]
    assert not [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def test_vanished_checkpoint_folder_stops_the_save(tmp_path):
    """The folder of a run's checkpoints is gone: SaveError, and no new empty folder is made."""
    checkpoints = ckpt_lib.Checkpoints(tmp_path)
    checkpoints.save(1, small_state(1), {})
    checkpoints.wait()
    os.rename(checkpoints.directory, f"{checkpoints.directory}.moved")
    with pytest.raises(ckpt_lib.SaveError, match=r"step 2 .*the folder is gone.*resumes from step 0"):
        checkpoints.save(2, small_state(2), {})
    checkpoints.close()
    assert not os.path.exists(checkpoints.directory)


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

        def close(self):
            self._batches.close()

    config = tiny_config.get_config(data_dir)
    monkeypatch.setattr(data, "train_batches", lambda *a, **k: OneSkipped(*a, stop_at=3, **k))
    assert loop.train_and_evaluate(config, str(tmp_path)).stopped_by == signal.SIGTERM
    monkeypatch.setattr(data, "train_batches", OneSkipped)
    assert loop.train_and_evaluate(config, str(tmp_path)).step == 8
    records = metrics.read_metrics(str(tmp_path))
    train = [(r["step"], r["skipped_images"]) for r in records if r["split"] == "train"]
    assert train == [(2, 1), (3, 1), (4, 2), (6, 2), (8, 2)]
    assert [r["skipped_images"] for r in records if r["split"] == "test"] == [0, 0]
