"""Input-pipeline throughput: images/s per CPU core of the training and evaluation preprocessing.

    python -m bench input_pipeline                 # the docs tables (2-core CPU: ~3 minutes)
    python -m bench input_pipeline --cores 1 --copies 4 --repeats 2

Generates photo-like JPEGs at two typical FGVC sizes (CUB-like 500x375, Aircraft-like 1280x853),
writes them as an image_folder and times `gcp_jax.data.train_batches` (decode, shorter side to
512, random 448 crop, flip, normalise, batch) and `eval_batches` (decode, shorter side to 512,
centre 448 crop, normalise, batch) in worker processes pinned to 1, 2, ... cores (TensorFlow sizes
its thread pools by the cores it may use). Reports the best of `--repeats` wall-clock rates and the
images per CPU-second (robust on a shared machine), and the cores a training step needs. The
workers leave malloc as glibc has it (`GCP_JAX_TUNE_MALLOC=0`), as a GPU host does: this table is
about feeding accelerators.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench import common, tables

SIZES = {"500x375": ((500, 375), "CUB-like"), "1280x853": ((1280, 853), "Aircraft-like, ~1 MP")}
STEP_RATES = (100, 200, 500)  # img/s a training step might consume.


def photo_like(rng, width: int, height: int) -> bytes:
    """A smooth random image with mild noise, JPEG quality 90 (compresses like a photograph)."""
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(pixels + rng.normal(0.0, 6.0, pixels.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_folders(root: str, distinct: int, copies: int) -> dict[str, float]:
    """One image_folder per size (two classes); returns the mean JPEG size in kB per size."""
    rng = np.random.default_rng(0)
    kilobytes = {}
    for name, ((width, height), _) in SIZES.items():
        jpegs = [photo_like(rng, width, height) for _ in range(distinct)]
        kilobytes[name] = float(np.mean([len(j) for j in jpegs])) / 1e3
        for copy in range(copies):
            for i, jpeg in enumerate(jpegs):
                folder = os.path.join(root, name, f"class{i % 2}")
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, f"{copy:03d}_{i:03d}.jpg"), "wb") as f:
                    f.write(jpeg)
    return kilobytes


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Best (images per wall second, images per CPU second of this process) over repeats."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        count = fn()
        walls.append(count / (time.perf_counter() - wall))
        cpus.append(count / (time.process_time() - cpu))
    return max(walls), max(cpus)


def worker(root: str, cores: int, batch: int, repeats: int) -> dict:
    """Runs pinned to `cores` cores: {size: {"train": (img/s, img/CPU-s), "eval": (...)}}."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    from gcp_jax import data  # TensorFlow loads after pinning.

    results = {}
    for name in SIZES:
        cfg = {
            "name": "image_folder",
            "manual_dir": os.path.join(root, name),
            "train_split": "train",
            "eval_split": "train",
            "image_size": 448,
            "resize_size": 512,
            "resize_mode": "shorter",
            "random_crop": True,
            "shuffle_buffer": 1000,
        }
        train = data.train_batches(cfg, batch_size=batch, seed=0, process_index=0, process_count=1)
        steps = 2 * train.steps_per_epoch  # Long windows: prefetched batches matter less.
        for _ in range(3):  # Warm-up (tracing, autotuning).
            next(train)

        def epochs(train=train, steps=steps):
            for _ in range(steps):
                next(train)
            return steps * batch

        evals = data.eval_batches(cfg, batch_size=batch, process_index=0, process_count=1)
        for _ in evals:  # Warm-up pass.
            pass
        results[name] = {
            "train": _timed(epochs, repeats),
            "eval": _timed(lambda evals=evals: sum(len(b["mask"]) for b in evals), repeats),
        }
    return results


def run_worker(root: str, cores: int, batch: int, repeats: int) -> dict:
    """`worker` in a child process pinned to `cores` cores, with glibc's own malloc settings."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "GCP_JAX_TUNE_MALLOC": "0"}
    argv = ["--worker", str(cores), "--root", root, "--batch", str(batch), "--repeats", str(repeats)]
    out = subprocess.run(
        [sys.executable, "-m", "bench", "input_pipeline", *argv],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=common.ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    p = common.parser("input_pipeline", __doc__, repeats=3)
    p.add_argument(
        "--cores",
        type=common.listed(int),
        default=sorted({1, len(os.sched_getaffinity(0))}),
        help="Core counts to pin the workers to (1 and all).",
    )
    p.add_argument("--distinct", type=int, default=32, help="Distinct images per size (32).")
    p.add_argument("--copies", type=int, default=8, help="Copies of each: a bigger epoch, same work (8).")
    p.add_argument("--batch", type=int, default=32, help="Batch (32).")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--root", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.root, args.worker, args.batch, args.repeats)))
        return 0
    with tempfile.TemporaryDirectory() as root:
        kilobytes = write_folders(root, args.distinct, args.copies)
        results = {cores: run_worker(root, cores, args.batch, args.repeats) for cores in args.cores}
    rows = [
        {
            "source": f"{name} ({kilobytes[name]:.0f} kB)",
            "pipeline": kind,
            "cores": cores,
            "images_per_s": rates[kind][0],
            "images_per_cpu_s": rates[kind][1],
        }
        for cores, by_size in results.items()
        for name, rates in by_size.items()
        for kind in ("train", "eval")
    ]
    fewest = results[min(results)]
    cores_needed = [
        {"source": f"{name} ({SIZES[name][1]})", "cores": [rate / fewest[name]["train"][1] for rate in STEP_RATES]}
        for name in SIZES
    ]
    machine = f"{common.host_line()}; {common.versions('tensorflow', 'tensorflow-cpu', 'pillow')}"
    rec = common.record(
        "input_pipeline", argv, machine, rows, batch=args.batch, step_rates=list(STEP_RATES), cores_needed=cores_needed
    )
    tables.print_record(rec)
    common.write_record(args.out, rec)
    return 0
