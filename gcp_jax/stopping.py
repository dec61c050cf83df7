"""How a run stops: SIGINT and SIGTERM, exit codes, and the step watchdog.

`install()` (train.py calls it first, before the heavy imports) routes SIGINT and SIGTERM to a
watcher thread through `signal.set_wakeup_fd`, so a signal is acted on even while the main thread
is blocked inside XLA, and Python never raises KeyboardInterrupt. What a signal does depends on
the phase:

- start-up, compilation of the first step, evaluation-only runs: nothing is lost by stopping, so
  the process exits at once with 128 + the signal number (130 for SIGINT, 143 for SIGTERM);
- training (`graceful()`): the first signal asks the loop to stop at the next step boundary with a
  checkpoint (`requested()`); a second one exits at once. After the last step (`finishing()`) the
  first signal only says that the run finishes (its final evaluation and checkpoint, exit 0).

Exiting at once is `os._exit` after flushing stdout and stderr: no interpreter teardown. An
interrupted first compilation otherwise crashed at exit (a KeyboardInterrupt abandons jaxlib's
compile future; its thread pool finishes the compile during teardown and dereferences a freed
device: SIGSEGV, exit 139).

`Watchdog` exits with EXIT_HUNG after dumping every thread's Python stack when no step finishes in
time, so that a scheduler restarts a hung run from its last checkpoint.

Only the standard library is imported here, so that train.py can install the handlers before
JAX, TensorFlow and the config are loaded.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time

EXIT_HUNG = 124  # The watchdog's exit status (as coreutils `timeout`).
SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOGGER = logging.getLogger("gcp_jax.stopping")

_lock = threading.RLock()  # re-entrant: without install(), the SIGTERM handler runs in the main thread
_graceful = False  # Inside `graceful()`: the first signal only asks the loop to stop.
_requested: signal.Signals | None = None  # The first signal received in graceful mode.
_finishing = False  # Inside `graceful()`, after the last step: the run finishes anyway.
_installed = False


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by `signum`: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def install() -> bool:
    """Handle SIGINT and SIGTERM as described above, for the whole process (main thread; idempotent).

    For entry points that own the process (train.py). Returns whether the handlers are installed.
    """
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for signum in SIGNALS:
        signal.signal(signum, _ignore_in_main_thread)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), name="gcp_jax-signals", daemon=True).start()
    _installed = True
    return True


def _ignore_in_main_thread(signum, frame):
    """The Python-level handler: a no-op; the watcher thread reads the signal from the wakeup fd."""


def _watch(read_fd: int) -> None:
    while True:
        for signum in os.read(read_fd, 64):
            if signum in SIGNALS:
                _on_signal(signal.Signals(signum))


def _on_signal(sig: signal.Signals) -> None:
    """First signal while training: ask the loop to stop. Otherwise: exit at once."""
    global _requested
    with _lock:
        if _graceful and _requested is None:
            _requested = sig
            again = "Ctrl-C" if sig == signal.SIGINT else sig.name
            if _finishing:
                LOGGER.warning(
                    f"{sig.name}: the last step is done; the run finishes with its final evaluation and checkpoint "
                    f"({again} again exits at once, without them)."
                )
            else:
                LOGGER.warning(
                    f"{sig.name}: stopping at the end of this step with a checkpoint; run the same command to "
                    f"resume ({again} again exits at once)."
                )
            return
    if _requested is not None:
        reason = f"{sig.name} again: exiting at once; the steps since the last checkpoint are lost."
    else:
        reason = f"{sig.name}: exiting (nothing to save yet)."
    exit_now(reason, exit_code(sig))


def exit_now(message: str, code: int) -> None:
    """Print `message` on stderr and end the process with `code` at once (flushed, no teardown)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        if message:
            sys.stderr.write(message + "\n")
        sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def graceful():
    """While inside, the first SIGINT/SIGTERM sets `requested()` instead of exiting.

    Without `install()` (gcp_jax used as a library, e.g. from a notebook), SIGTERM alone is handled,
    and only while inside: its previous handler is restored on exit.
    """
    global _graceful, _requested, _finishing
    previous = None
    if not _installed and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: _on_signal(signal.Signals(signum)))
    with _lock:
        _graceful, _requested, _finishing = True, None, False
    try:
        yield
    finally:
        with _lock:
            _graceful = False
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def finishing() -> None:
    """Inside `graceful()`: the last step is done, so a first signal lets the run finish (and says so)."""
    global _finishing
    with _lock:
        _finishing = True


def requested() -> signal.Signals | None:
    """The signal that asked the run to stop (inside `graceful()`), or None."""
    return _requested


class Watchdog:
    """Ends the process with EXIT_HUNG, after dumping every thread's Python stack to stderr, when
    `kick()` is not called for `timeout_s` seconds (times the allowance of the last kick).

    A daemon thread waits on a deadline; `timeout_s <= 0` turns it off. Use as a context manager.
    """

    def __init__(self, timeout_s: float):
        self._timeout = float(timeout_s)
        self._deadline = time.monotonic() + self._timeout
        self._waited = self._timeout
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = None

    def __enter__(self) -> Watchdog:
        if self._timeout > 0:
            self._thread = threading.Thread(target=self._run, name="gcp_jax-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()

    def kick(self, allowance: float = 1.0) -> None:
        """Progress: the next deadline is `allowance` timeouts from now (e.g. several for an evaluation)."""
        with self._wake:
            self._waited = self._timeout * allowance
            self._deadline = time.monotonic() + self._waited

    def _run(self) -> None:
        with self._wake:
            while not self._stopped:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self._fire()
                self._wake.wait(left)

    def _fire(self) -> None:
        sys.stderr.write(
            f"error: no step finished in {self._waited:.0f} s (config.step_timeout_s={self._timeout:g}); "
            f"the stack of every thread follows. Exiting with status {EXIT_HUNG}: run the same command to "
            "resume from the last checkpoint.\n"
        )
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        exit_now("", EXIT_HUNG)
