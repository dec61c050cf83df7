"""What fits where: the largest per-device train batch of the 448 px protocol runs on each accelerator, by compiling.

    python -m bench fits --out bench/results/fits.json                 # every cell (hours on a 2-core CPU)
    python -m bench fits --archs resnet50 --dtypes bfloat16 --targets h100,v5e-1 --out bench/results/fits.json

Each cell is `python -m gcp_jax.aot --config configs/cub.py[:resnet50] --target T --max_batch` with
the backbone dtype set (ResNet-50 with layer4 at stride 1, EfficientNet-B5; SEB head; 448 px;
CUB's 200 classes): two compiles of the train step fit its memory line, then compiles refine the
boundary (at most --compiles). Compile-time facts on a CPU host, not measured speed: XLA:GPU
cannot autotune without the device. Cells are written to --out as they finish, and a rerun with
the same --out skips those already there (and tries failed ones again), so a long job can be
stopped and continued.
"""

from __future__ import annotations

import json
import os
import sys

from bench import common

ARCHS = {"resnet50": "configs/cub.py:resnet50", "efficientnet_b5": "configs/cub.py:efficientnet_b5"}
DTYPES = ("bfloat16", "float32")
# One device of each (the smallest slice of v4/v5p has 4 chips): the per-device batch is the same on larger slices.
TARGETS = ("h100", "a100-40gb", "l4", "v5e-1", "v6e-1", "v4-8", "v5p-8")
FIRST = (8, 32)  # the two batches of the memory line


def cell(arch: str, dtype: str, target_name: str, compiles: int) -> dict:
    """The row of one (backbone, dtype, target): the largest per-device batch that fits and what it took."""
    from gcp_jax import aot

    target = aot.parse_target(target_name)
    argv = ["--config", ARCHS[arch], "--target", target_name, f"--config.model.dtype={dtype}", "--num_classes=200"]
    argv += [f"--per_device_batch={FIRST[0]}"]
    if problem := aot.missing_plugin(target):
        raise aot.AotError(problem)

    def compile_train(batches):
        return [aot.with_fits(target, r) for r in aot.compile_in_child(argv, [("train", b) for b in batches])]

    best, exact, records = aot.largest_fitting(compile_train, target.usable_bytes, FIRST, budget=compiles)
    at_best = next((r for r in records if r["per_device_batch"] == best), None)
    return {
        "arch": arch,
        "dtype": dtype,
        "target": target_name,
        "device_kind": records[0].get("device_kind", target.device.kind),
        "usable_bytes": target.usable_bytes,
        "max_per_device_batch": best,
        "exact": exact,
        "peak_bytes": at_best["peak_bytes"] if at_best else None,
        "compile_s": sum(r["compile_s"] for r in records) / len(records),
        "compiles": len(records),
        "points": {r["per_device_batch"]: r["peak_bytes"] for r in records},
    }


def fits_record(compiles: int, rows: list[dict]) -> dict:
    """The record of every cell so far (several runs may have filled it): the command that fills the rest."""
    return common.record("fits", [f"--compiles={compiles}"], f"compiled on {common.host_line()}", rows)


def main(argv: list[str]) -> int:
    p = common.parser("fits", __doc__, repeats=1, repeats_note="; unused: nothing is timed but the compiles")
    p.add_argument("--archs", type=common.listed(), default=list(ARCHS), help="Backbones (resnet50,efficientnet_b5).")
    p.add_argument("--dtypes", type=common.listed(), default=list(DTYPES), help="Backbone dtypes.")
    p.add_argument("--targets", type=common.listed(), default=list(TARGETS), help="gcp_jax.aot targets.")
    p.add_argument("--compiles", type=int, default=4, help="Train-step compiles per cell at most (4).")
    args = p.parse_args(argv)
    from bench import tables
    from gcp_jax import aot

    rows = []
    if args.out and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
    key = lambda r: (r["arch"], r["dtype"], r["target"])
    done = {key(r) for r in rows if "error" not in r}  # a failed cell is tried again
    # Cells in priority order: each backbone and dtype on every target before the next dtype.
    for arch in args.archs:
        for dtype in args.dtypes:
            for target in args.targets:
                if (arch, dtype, target) in done:
                    continue
                try:
                    row = cell(arch, dtype, target, args.compiles)
                except aot.AotError as e:
                    row = {"arch": arch, "dtype": dtype, "target": target, "error": str(e)}
                print(json.dumps(row), flush=True)
                rows = [r for r in rows if key(r) != key(row)] + [row]
                common.write_record(args.out, fits_record(args.compiles, rows))
    rec = fits_record(args.compiles, rows)
    tables.print_record(rec)
    common.write_record(args.out, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
