"""Input-pipeline throughput: images/s per CPU core of the training and evaluation preprocessing.

Generates photo-like JPEGs at two typical FGVC sizes (CUB-like 500x375, Aircraft-like 1280x853),
writes them as an image_folder and times `gcp_jax.data.train_batches` (decode, shorter side to
512, random 448 crop, flip, normalise, batch) and `eval_batches` (decode, shorter side to 512,
centre 448 crop, normalise, batch) in worker processes pinned to 1, 2, ... cores (TensorFlow sizes
its thread pools by the cores it may use). Reports the best wall-clock rate and the images per
CPU-second (robust on a shared machine), and the cores a training step needs.

    python bench/input_pipeline.py [--cores 1,2] [--distinct 32] [--copies 16] [--batch 32]
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

SIZES = {"500x375": (500, 375), "1280x853": (1280, 853)}
GPU_RATES = (100, 200, 500)  # img/s a training step might consume.


def photo_like(rng, width: int, height: int) -> bytes:
    """A smooth random image with mild noise, JPEG quality 90 (compresses like a photograph)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

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
    for name, (width, height) in SIZES.items():
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
    """Median (images per wall second, images per CPU second of this process) over repeats."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        count = fn()
        walls.append(count / (time.perf_counter() - wall))
        cpus.append(count / (time.process_time() - cpu))
    return float(np.median(walls)), float(np.median(cpus))


def worker(root: str, cores: int, batch: int, repeats: int) -> dict:
    """Runs pinned to `cores` cores: {size: {"train": (img/s, img/CPU-s), "eval": (...)}}."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    from gcp_jax import data  # pylint: disable=g-import-not-at-top  # TensorFlow loads after pinning.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cores",
        default=",".join(str(c) for c in sorted({1, len(os.sched_getaffinity(0))})),
        help="comma-separated core counts to pin the workers to",
    )
    parser.add_argument("--distinct", type=int, default=32, help="distinct images per size")
    parser.add_argument("--copies", type=int, default=8, help="copies of each (a bigger epoch, same work)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs / eval passes per measurement")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--root", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.root, args.worker, args.batch, args.repeats)))
        return

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory() as root:
        kilobytes = write_folders(root, args.distinct, args.copies)
        rows = []
        for cores in (int(c) for c in args.cores.split(",")):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(cores),
                    "--root",
                    root,
                    "--batch",
                    str(args.batch),
                    "--repeats",
                    str(args.repeats),
                ],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            rows.append((cores, json.loads(out.stdout.strip().splitlines()[-1])))

    print(
        f"\n448-px crops, batch {args.batch}, {os.cpu_count()} CPUs ({_cpu_name()}); img/s: wall-clock rate "
        f"(median of {args.repeats}); per CPU-s: images per second of CPU time the process used (all threads)\n"
    )
    print("| source JPEG | pipeline | cores | img/s | img per CPU-s |")
    print("|---|---|---|---|---|")
    for cores, results in rows:
        for name, rates in results.items():
            for kind in ("train", "eval"):
                wall, per_cpu = rates[kind]
                print(f"| {name} ({kilobytes[name]:.0f} kB) | {kind} | {cores} | {wall:.0f} | {per_cpu:.0f} |")
    print("\nCores needed to feed a training step (rate / images per CPU-s, 1-core run):\n")
    print("| source JPEG | " + " | ".join(f"{r} img/s" for r in GPU_RATES) + " |")
    print("|---|" + "---|" * len(GPU_RATES))
    for name, rates in min(rows, key=lambda row: row[0])[1].items():
        print(f"| {name} | " + " | ".join(f"{r / rates['train'][1]:.1f}" for r in GPU_RATES) + " |")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    main()
