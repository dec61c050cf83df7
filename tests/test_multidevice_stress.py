"""8 fake CPU devices beside a process that keeps every core busy: training never hangs (gcp_jax/batched_eigh.py).

The child process (bench/tools/eigh_devices.py, `--child stress`) runs the project's train step of a small
GCP classifier on 8 devices with the demo's eigh sizes (4 covariances of 32×32 per device), then the
first steps again on one device from the same variables, while one spinning process per core competes
for the CPU. With jaxlib's batched CPU eigh on every device (the dispatch before the fix) this
deadlocked within a few steps: every intra-op thread waiting in `ParallelBatchMap` for chunks queued
behind it, the process at 0 % CPU. A deadlock is caught as soon as the child makes no CPU progress
for STALL_S seconds, not at the overall timeout.

    STRESS_DISPATCH=old python -m pytest tests/test_multidevice_stress.py   # the old dispatch: fails
"""

import json
import os
import subprocess
import time

from bench.tools import eigh_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12  # train steps on 8 devices; the old dispatch rarely got past the third
STALL_S = 20.0  # no CPU time used for this long: deadlocked (a runnable process gets CPU within ms)
TIMEOUT_S = 600.0  # compile times on a loaded 2-core host vary 2-3x; a stall fails long before this


def _run_watched(command):
    """(returncode, stdout, stderr, seconds), failing fast when the process stops using CPU."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last_cpu, last_progress = 0.0, start
    try:
        while proc.poll() is None:
            time.sleep(1.0)
            now, cpu = time.monotonic(), eigh_devices.cpu_seconds(proc.pid)
            if cpu is not None and cpu > last_cpu + 1e-3:
                last_cpu, last_progress = cpu, now
            stalled = now - last_progress > STALL_S
            if stalled or now - start > TIMEOUT_S:
                proc.kill()
                _, err = proc.communicate()
                what = (
                    f"no CPU progress for {STALL_S:.0f} s (deadlock)" if stalled else f"not done in {TIMEOUT_S:.0f} s"
                )
                raise AssertionError(f"8-device training {what} after {now - start:.0f} s; last output:\n{err[-1500:]}")
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err, time.monotonic() - start


def test_eight_device_training_beside_a_busy_process_never_hangs():
    dispatch = os.environ.get("STRESS_DISPATCH", "new")
    command = eigh_devices.child_command("stress", devices=8, dispatch=dispatch, calls=STEPS)
    with eigh_devices.busy_cores() as spinners:
        returncode, out, err, seconds = _run_watched(command)
        assert all(p.poll() is None for p in spinners), "the competing processes must run throughout"
    assert returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    print(f"8 devices beside {len(spinners)} spinning processes: {seconds:.0f} s in all, {result}")
    assert result["devices"] == 8
    # 8 devices equal 1 device: same losses and parameters after 3 steps (BatchNorm over the global batch).
    assert result["loss_gap"] < 1e-5 * max(abs(x) for x in result["losses"]), result
    assert result["param_gap"] < 1e-4, result
