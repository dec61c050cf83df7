"""One writer per workdir: the trainer of a run holds an operating-system lock on it.

`hold(workdir)` takes an exclusive `flock` on workdir/.writer.lock for as long as the trainer runs;
a second trainer on the same workdir is refused at once (`WorkdirInUseError`, one sentence naming
the workdir and the pid and host of the holder) before it reads or writes anything else there.
The lock is the kernel's: it goes with the process that holds it (exit, crash, kill -9), so no
lock left behind ever blocks the next start; the pid, host and start time written in the file only
name the holder. The file is removed when the trainer ends. Readers of a run (eval_only, the
analysis, TensorBoard) take no lock and are never blocked.

Several processes (multi-host runs): process 0, which alone writes the run's files, takes the
lock and tells the others whether it got it, so that every process of a refused run stops.

Shared file systems: Linux NFS clients implement flock as a whole-file lock kept by the server
(NLM for NFSv3, NFSv4 natively), so trainers on different hosts exclude each other; the lock of a
crashed host is released when its lease expires (90 s by default for NFSv4). Where the file system
keeps no locks across hosts (NFS mounted with `nolock` or `local_lock=flock`, Lustre without the
`flock` mount option) the lock protects against a second trainer on the same host only; where it
keeps none at all (the lock call fails: ENOLCK, EOPNOTSUPP, ENOSYS, e.g. some FUSE file systems),
the run goes on unlocked with one warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

import jax
import numpy as np

from gcp_jax import metrics as metrics_lib

LOCK_FILE = ".writer.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # the file system keeps no locks


class WorkdirInUseError(ValueError):
    """Another trainer holds the workdir."""


class UnwritableWorkdirError(ValueError):
    """The workdir cannot be created or written (read-only, permission denied)."""


def _holder(fd: int) -> str:
    """'pid 123 on host h since 01:02:03 UTC' from the lock file, or what is known of it."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = json.loads(os.read(fd, 4096).decode("utf-8"))
        return f"pid {record['pid']} on host {record['host']} since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is still writing it
        return "a process that is just starting"


def _is_same_file(fd: int, path: str) -> bool:
    """Whether `path` still names the file open as `fd` (a holder that ended removes it)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _acquire(workdir: str) -> int | None:
    """The locked lock file's descriptor (None where the file system keeps no locks)."""
    path = os.path.join(workdir, LOCK_FILE)
    os.makedirs(workdir, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise WorkdirInUseError(
                f"{workdir} is in use by another trainer ({holder}); wait for it to end or stop it, or give this "
                "run its own --workdir."
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_LOCKS:
                raise
            metrics_lib.LOGGER.warning(
                f"{workdir}: its file system keeps no locks ({e.strerror}), so nothing stops a second trainer on "
                "it; start one trainer per workdir."
            )
            return None
        if _is_same_file(fd, path):
            break
        os.close(fd)  # locked a file its holder had just removed: take the one there now
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode("utf-8"))
    return fd


def _release(fd: int | None, workdir: str) -> None:
    """Remove the lock file (while still holding it, so no one locks a removed file), then unlock."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.remove(os.path.join(workdir, LOCK_FILE))
    os.close(fd)


def _take(workdir: str) -> int | None:
    """`_acquire`, with a workdir that cannot be written reported in one sentence."""
    try:
        return _acquire(workdir)
    except OSError as e:
        raise UnwritableWorkdirError(
            f"cannot write in {workdir} ({e.strerror}); make it writable, or give a --workdir that is."
        ) from e


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Hold workdir's writer lock inside (process 0 for every process); raises WorkdirInUseError when
    another trainer holds it, UnwritableWorkdirError when the workdir cannot be written.

    A workdir this call created is removed again if it is still empty at the end (a run refused at
    its start leaves nothing behind).
    """
    workdir = os.path.abspath(workdir)
    created = not os.path.isdir(workdir)
    fd, refusal = None, None
    if metrics_lib.is_writer():
        try:
            fd = _take(workdir)
        except ValueError as e:
            refusal = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
        if refused and refusal is None:
            refusal = WorkdirInUseError(f"{workdir} cannot be used by this run: process 0 says why.")
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        _release(fd, workdir)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(workdir)  # only when empty
