"""Analyse a trained run: `python -m gcp_jax.analysis {spectra,truncation,attribution} --workdir W`.

    spectra      eigenvalue spectra per image and class (spectra.png, spectra.json)
    truncation   accuracy with the n smallest / largest eigenvalues set to eps (truncation.png/.json)
    attribution  occlusion, Grad-CAM and gradient×input maps of the large vs small spectrum parts
                 (attribution.png)

Outputs go to --out (default: WORKDIR/analysis). The model and data come from the run's
config.json and its latest checkpoint (or --step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from gcp_jax import data, metrics, spectrum
from gcp_jax.analysis import attribution, plots, spectra, truncation


def load_run(workdir, step=None):
    """(run, variables) of a trained workdir: its config.json and a checkpoint (latest by default)."""
    from gcp_jax import assembly, run_config

    config = run_config.load_config(workdir)
    assembly.configure_jax(config)
    run = assembly.Run(config)
    state, _ = assembly.restore(run, workdir, step)
    return run, {"params": state.params, "batch_stats": state.batch_stats}


def eval_batches(run, batch_size=32):
    return data.eval_batches(run.config.data, batch_size=batch_size, process_index=0, process_count=1)


def default_truncation_ns(d):
    """0, 1, 2, 4, … up to d − 1: the log-spaced grid of the truncation curve."""
    ns = [0] + [2**i for i in range(int(np.log2(max(d - 1, 1))) + 1)]
    return sorted({n for n in ns if n < d} | {d - 1})


def run_spectra(run, variables, args):
    eigs, labels = spectra.collect(run.model, variables, eval_batches(run), max_images=args.max_images)
    summary = spectrum.summarize(eigs, k=args.k)
    per_class = spectra.per_class_log_spectrum(eigs, labels, run.num_classes)
    report = {
        "images": len(eigs),
        "k": args.k,
        "mean": {name: float(np.mean(v)) for name, v in summary.items()},
        "median_condition": float(np.median(summary["condition"])),
        "per_class_mean_small_share": {
            str(c): float(summary["small_share"][labels == c].mean()) for c in np.unique(labels)
        },
    }
    _write_json(args.out, "spectra.json", report)
    print(
        plots.plot_spectra(
            eigs,
            labels,
            per_class,
            os.path.join(args.out, "spectra.png"),
            class_names=run.info.class_names,
        )
    )
    print(json.dumps(report["mean"], indent=1))


def run_truncation(run, variables, args):
    d = run.model.head.dim or None
    batches = list(eval_batches(run))
    if d is None:
        d = int(spectrum.covariances(run.model, variables, batches[0]["image"][:1]).shape[-1])
    ns = args.ns or default_truncation_ns(d)
    curves = {
        which: truncation.truncation_curve(run.model, variables, batches, ns, which, progress=print)
        for which in truncation.WHICH
    }
    _write_json(args.out, "truncation.json", {which: dict(points) for which, points in curves.items()})
    print(plots.plot_truncation(curves, os.path.join(args.out, "truncation.png"), baseline=curves["smallest"][0][1]))


def run_attribution(run, variables, args):
    batch = next(iter(eval_batches(run, batch_size=max(args.num_images, 1))))
    images, labels = np.asarray(batch["image"])[: args.num_images], np.asarray(batch["label"])[: args.num_images]
    d = spectrum.covariances(run.model, variables, images[:1]).shape[-1]
    rank = args.rank or max(d // 8, 1)
    maps = []
    for i, (image, label) in enumerate(zip(images, labels)):
        maps.append(attribution.attribution_maps(run.model, variables, image, int(label), rank))
        print(f"attribution {i + 1}/{len(images)}", flush=True)
    names = run.info.class_names
    titles = [f"{names[int(y)] if names else int(y)} (rank split {rank})" for y in labels]
    print(plots.plot_attribution_grid(images, maps, os.path.join(args.out, "attribution.png"), titles=titles))


def _write_json(out, name, value):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)


COMMANDS = {"spectra": run_spectra, "truncation": run_truncation, "attribution": run_attribution}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m gcp_jax.analysis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--workdir", required=True, help="a directory written by train.py")
    parser.add_argument("--out", help="output directory (default WORKDIR/analysis)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    parser.add_argument("--max_images", type=int, default=512, help="spectra: images to read")
    parser.add_argument("--k", type=int, default=10, help="spectra: the k smallest eigenvalues' trace share")
    parser.add_argument("--ns", type=int, nargs="+", help="truncation: n values (default 0, 1, 2, 4, …, d−1)")
    parser.add_argument("--rank", type=int, help="attribution: split after the k largest eigenvalues (default d/8)")
    parser.add_argument("--num_images", type=int, default=4, help="attribution: images in the grid")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(args.workdir, "analysis")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    metrics.setup_logging()
    try:
        run, variables = load_run(args.workdir, args.step)
        COMMANDS[args.command](run, variables, args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
