"""`python train.py` with a fault injected, for tests/test_reliability.py (a script, not a test module).

  python tests/faulty_train.py FAULT [train.py flags]

The run uses the first device only, as the in-process runs of the tests do: with the same devices
(XLA_FLAGS) both compute bit-identical steps and share their compilation cache.

FAULT:
  none      no fault
  slow=S    every training batch arrives S seconds late (a signal then lands mid-run)
  hang=N    the N-th training batch of the process never arrives: the main thread blocks inside
            XLA (a host callback that waits forever), as in a real hang
  enospc=N  saving the checkpoint of step N fails with "No space left on device" (a full disk,
            where no small file system can be mounted)
  erofs=N   the checkpoint folder is read-only from the save of step N on: bind-mounted read-only
            where mounts are allowed (the test unmounts it), else its writes fail with EROFS
"""

import errno
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402  (after the repository root is importable)


class _Batches:
    """Training batches with a delay or a hang; `num_skipped` as the real ones."""

    def __init__(self, batches, *, delay: float = 0.0, hang_at: int = 0):
        self._batches, self._delay, self._hang_at, self._count = batches, delay, hang_at, 0

    @property
    def num_skipped(self) -> int:
        return self._batches.num_skipped

    def __iter__(self):
        return self

    def __next__(self):
        self._count += 1
        if self._count == self._hang_at:
            _block_inside_xla()
        time.sleep(self._delay)
        return next(self._batches)

    def close(self) -> None:
        self._batches.close()


def _block_inside_xla() -> None:
    import jax
    import numpy as np

    never = threading.Event()

    def wait_forever(x):
        never.wait()
        return x

    callback = jax.jit(lambda x: jax.pure_callback(wait_forever, jax.ShapeDtypeStruct((), np.float32), x))
    jax.block_until_ready(callback(np.float32(0)))


def _read_only(folder: str) -> None:
    """Make `folder` read-only: a read-only bind mount, or (no mounts allowed) EROFS from its writes."""
    mount = subprocess.run(["mount", "--bind", folder, folder], capture_output=True)
    if not mount.returncode:
        subprocess.run(["mount", "-o", "remount,ro,bind", folder, folder], check=True)
        return
    from gcp_jax import checkpoint

    def mkstemp(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), folder)

    checkpoint.tempfile.mkstemp = mkstemp


def _one_device() -> None:
    import jax

    from gcp_jax import sharding

    every_device = sharding.make_mesh
    sharding.make_mesh = lambda devices=None: every_device(jax.devices()[:1] if devices is None else devices)


def _inject(fault: str) -> None:
    from gcp_jax import checkpoint, data

    name, _, value = fault.partition("=")
    if name in ("slow", "hang"):
        real = data.train_batches
        options = {"delay": float(value)} if name == "slow" else {"hang_at": int(value)}
        data.train_batches = lambda *args, **kwargs: _Batches(real(*args, **kwargs), **options)
    elif name == "enospc":
        real_save = checkpoint.Checkpoints.save

        def save(self, step, *args, **kwargs):
            if step == int(value):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.directory)
            return real_save(self, step, *args, **kwargs)

        checkpoint.Checkpoints.save = save
    elif name == "erofs":
        real_check = checkpoint.Checkpoints._check_writable

        def check_writable(self, step):
            if step == int(value):
                _read_only(self.directory)
            return real_check(self, step)

        checkpoint.Checkpoints._check_writable = check_writable
    elif name != "none":
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    FAULT = sys.argv.pop(1)
    real_main = train.main

    def main(argv):
        _one_device()
        _inject(FAULT)
        return real_main(argv)

    train.main = main
    train.start()
