"""Time to the first training step: a first start against a restart, with and without the compile cache.

    python -m bench startup                                     # EfficientNet-B0 + SEB, 448 px (~2 min, 2 cores)
    python -m bench startup --archs efficientnet_b0,efficientnet_b5
    python -m bench startup --archs resnet_tiny --image-size 64 # a quick look

Every row is `python train.py` as a user runs it, in a fresh process, timed from its launch until
the first training step is recorded in WORKDIR/metrics.jsonl (train metrics every step); then the
process gets SIGTERM, checkpoints and exits, as a preempted job does. Per architecture:

* `first start`: an empty workdir and an empty compile cache: imports, data set, parameter init,
  compilation of the train step, the step itself;
* `restart`: the same command again: the run resumes from its checkpoint, and the compiled
  executables come from the cache (gcp_jax.compile_cache);
* `restart, no cache`: once more with --config.compile_cache_dir='' (every restart before the cache).

`imports` is `python -c "import train; from gcp_jax import loop"` alone. The data set is the
demo's generated one at 64 px (upscaled to --image-size by the input pipeline), generated before
the timing; batch 4, random init, the default 256-d SEB head. With --repeats N all three starts
run N times from scratch; each row shows the fastest (other load on a shared host only adds time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from bench import common

FIRST_STEP_TIMEOUT_S = 1200
BATCH = 4


def train_flags(arch: str, image_size: int, data_dir: str) -> list[str]:
    """The demo config with `arch` at `image_size` px, a small generated data set, a record every step."""
    return [
        "--config",
        os.path.join(common.ROOT, "configs", "demo.py"),
        f"--config.model.arch={arch}",
        "--config.model.last_stride=2",
        "--config.gcp.dim=256",
        f"--config.data.data_dir={data_dir}",
        "--config.data.synthetic.train_per_class=4",
        "--config.data.synthetic.test_per_class=2",
        f"--config.data.resize_size={image_size}",
        f"--config.data.image_size={image_size}",
        f"--config.batch_size={BATCH}",
        f"--config.eval_batch_size={BATCH}",
        "--config.num_epochs=1000",
        "--config.log_every_steps=1",
        "--config.spectrum_every_steps=0",
    ]


def prepare_data(data_dir: str) -> None:
    """Generate the data set once, untimed (each timed process then only opens it)."""
    subprocess.run(
        [
            sys.executable,
            "train.py",
            *train_flags("resnet_tiny", 64, data_dir),
            "--config.num_train_steps=1",
            "--config.compile_cache_dir=",  # leaves the user's compile cache alone
        ],
        cwd=common.ROOT,
        check=True,
        capture_output=True,
    )


def train_steps(workdir: str) -> list[int]:
    """The steps of the complete "train" records in WORKDIR/metrics.jsonl, in order."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []
    return [r["step"] for r in records if r["split"] == "train"]


def time_to_first_step(flags: list[str], workdir: str) -> tuple[float, int]:
    """(seconds from launch to the run's first newly recorded step, that step); then SIGTERM and wait."""
    known = len(train_steps(workdir))
    with tempfile.TemporaryFile("w+") as stderr:  # a file, not a pipe: a long stderr cannot block the run
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "train.py", *flags, "--workdir", workdir],
            cwd=common.ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            while len(steps := train_steps(workdir)) == known:
                if process.poll() is not None:
                    stderr.seek(0)
                    raise RuntimeError(f"train.py exited with {process.returncode} before a step:\n{stderr.read()}")
                if time.perf_counter() - start > FIRST_STEP_TIMEOUT_S:
                    raise TimeoutError(f"no training step within {FIRST_STEP_TIMEOUT_S} s")
                time.sleep(0.05)
            elapsed = time.perf_counter() - start
            process.send_signal(signal.SIGTERM)  # checkpoints at the next step boundary, exits 143
            process.wait(timeout=FIRST_STEP_TIMEOUT_S)
            return elapsed, steps[known]
        finally:
            if process.poll() is None:
                process.kill()


def time_imports() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import train; from gcp_jax import loop"], cwd=common.ROOT, check=True)
    return time.perf_counter() - start


STARTS = ("first start", "restart", "restart, no cache")


def measure(arch: str, image_size: int, data_dir: str, scratch: str) -> dict[str, float]:
    """Seconds to the first step of each of STARTS of one architecture, each a fresh process, with a
    new cache and workdir in `scratch`."""
    cache, workdir = os.path.join(scratch, "xla"), os.path.join(scratch, "run")
    flags = train_flags(arch, image_size, data_dir)
    caches = (f"--config.compile_cache_dir={cache}",) * 2 + ("--config.compile_cache_dir=",)
    seconds = {}
    for start, cache_flag in zip(STARTS, caches):
        seconds[start], step = time_to_first_step([*flags, cache_flag], workdir)
        print(f"{arch}: {start} {seconds[start]:.1f} s (step {step})", flush=True)
    return seconds


def rows_of(arch: str, image_size: int, repeats: list[dict[str, float]]) -> list[dict]:
    """One row per start, its fastest repeat; the speed-up against the fastest first start."""
    fastest = {start: min(r[start] for r in repeats) for start in STARTS}
    return [
        {
            "arch": arch,
            "image_size": image_size,
            "batch": BATCH,
            "start": start,
            "seconds": fastest[start],
            "speed_up": fastest["first start"] / fastest[start],
            "all_seconds": [r[start] for r in repeats],
        }
        for start in STARTS
    ]


def main(argv: list[str]) -> int:
    p = common.parser("startup", __doc__, repeats=1, repeats_note="; all three starts again, from scratch")
    p.add_argument(
        "--archs", type=common.listed(), default=["efficientnet_b0"], help="Architectures (efficientnet_b0)."
    )
    p.add_argument("--image-size", type=int, default=448, help="Training resolution in px (448).")
    args = p.parse_args(argv)
    from bench import tables, timing  # after parsing: --help stays fast

    with tempfile.TemporaryDirectory(prefix="gcp_jax_startup_") as scratch:
        data_dir = os.path.join(scratch, "tfds")
        prepare_data(data_dir)
        imports_s = min(time_imports() for _ in range(max(args.repeats, 1)))
        print(f"imports {imports_s:.1f} s", flush=True)
        rows = []
        for arch in args.archs:
            repeats = [
                measure(arch, args.image_size, data_dir, os.path.join(scratch, f"{arch}_{i}"))
                for i in range(max(args.repeats, 1))
            ]
            rows += rows_of(arch, args.image_size, repeats)
    machine = timing.machine_line()
    rec = common.record("startup", argv, machine, rows, imports_s=imports_s)
    tables.print_record(rec)
    common.write_record(args.out, rec)
    return 0
