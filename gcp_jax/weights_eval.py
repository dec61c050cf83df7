"""Evaluating a weight file as loaded (eval_only without a checkpoint): a released FGVC checkpoint
against the real test split, refused with one sentence when the file does not fill the model.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ml_collections import ConfigDict

from gcp_jax import assembly, sharding, steps
from gcp_jax import config as config_lib
from gcp_jax import metrics as metrics_lib

if TYPE_CHECKING:
    from gcp_jax.pretrained import PretrainedReport


def fresh_modules_problem(report: PretrainedReport, num_classes: int) -> str:
    """One sentence when the file left modules of the model at their random init, naming them and what
    of the file did not fit (report.unused), else ""."""
    fresh = list(dict.fromkeys("/".join(leaf.split("/")[1:-1]) for leaf in report.skipped))
    if not fresh:
        return ""
    misfits = {}
    for entry in report.unused:  # "params/classifier/kernel: (32896, 200) in the file, (32896, 100) in the model"
        leaf, _, why = entry.partition(": ")
        misfits.setdefault("/".join(leaf.split("/")[1:-1]), f"{'/'.join(leaf.split('/')[1:])} is {why}")
    details = "; ".join(misfits.get(module, f"{module} is not in the file") for module in fresh)
    classes = f"; the data set has {num_classes} classes" if "classifier" in fresh else ""
    return (
        f"{report.path} cannot be evaluated as loaded: {', '.join(fresh)} would keep a random init ({details}"
        f"{classes}); build the model the file holds (model.arch, model.head, gcp.*, the data set it was "
        "trained on), or fine-tune from it without eval_only."
    )


def evaluate_weights(config: ConfigDict, workdir: str, *, mesh=None) -> assembly.RunResult:
    """Evaluate the config.model.pretrained weight file as loaded, on the eval split (eval_only when
    workdir holds no checkpoint: a released FGVC checkpoint against the real test split).

    The file must fill the whole model (backbone, GCP reduction, classifier) and the config must run it
    at the stride it was trained with; else ValueError saying what to set. The record, with
    "pretrained": path, is appended to workdir/metrics.jsonl at step 0; no checkpoint is saved.
    """
    from gcp_jax import pretrained

    metrics_lib.setup_logging()
    config_lib.validate(config)
    path = config.model.pretrained
    if not path:
        raise ValueError("Nothing to evaluate: set --config.model.pretrained to a weight file, or train first.")
    run = assembly.Run(config, mesh)
    template = run.abstract_state()  # shapes only: every leaf must come from the file
    abstract = {"params": template.params, "batch_stats": template.batch_stats}
    loaded, report = pretrained.init_from_pretrained(abstract, path, config.model.arch)
    problems = [
        fresh_modules_problem(report, run.num_classes),
        pretrained.last_stride_mismatch(report, config.model.last_stride),
    ]
    if any(problems):
        raise ValueError(" ".join(p for p in problems if p))
    metrics_lib.log(f"pretrained: {report}")
    state = steps.create_train_state(sharding.replicate(loaded, run.mesh), run.tx, run.mesh)
    result = run.evaluate(state)
    writer = metrics_lib.MetricsWriter(workdir, start_step=None)
    writer.write(0, f"{config.data.eval_split}_eval_only", {**result, "pretrained": path})
    writer.close()
    metrics_lib.log(f"evaluated {path} as loaded (no checkpoint in {workdir}): {metrics_lib.describe_eval(result)}")
    return assembly.RunResult(
        step=0,
        final=result,
        best_top1=-1.0,
        best_step=-1,
        stopped_by=None,
        state=state,
        workdir=os.path.abspath(workdir),
        checkpoints="",
    )
