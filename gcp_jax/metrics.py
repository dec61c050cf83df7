"""Run logging: TensorBoard event files, workdir/metrics.jsonl, a progress bar, messages.

Only process 0 writes or prints; the other processes get silent no-op objects, so callers
never branch on the process index. Every message of gcp_jax goes through the `gcp_jax` logger
(the input pipeline's through its child `gcp_jax.data`); `setup_logging()` prints it on stdout,
above the progress bar, whatever absl or the root logger are set to.
"""

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOGGER = logging.getLogger("gcp_jax")


def is_writer() -> bool:
    """Whether this process writes logs and files shared by the run (process 0)."""
    return jax.process_index() == 0


class _AboveProgressBar(logging.Handler):
    """Writes records on stdout through tqdm, so that a progress bar stays below them."""

    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stdout)
        sys.stdout.flush()


def setup_logging() -> None:
    """Show gcp_jax's messages: INFO and above on process 0, warnings and errors on the others (idempotent)."""
    if not any(isinstance(h, _AboveProgressBar) for h in LOGGER.handlers):
        handler = _AboveProgressBar()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    LOGGER.setLevel(logging.INFO if is_writer() else logging.WARNING)


def log(message: str) -> None:
    """One line of information about the run (process 0 prints it once `setup_logging` ran)."""
    LOGGER.info(message)


FLIP = "_flip"  # suffix of the eval metrics of the flip-averaged logits (config.eval_flip): top1_flip, ...


def describe_eval(m: Mapping[str, Any]) -> str:
    """One line of eval metrics: top-1, top-5, mean per-class accuracy, loss and image count; with the
    flip-averaged ones (`top1_flip`, … of eval_flip) after the single-crop ones when present."""

    def accuracies(suffix):
        return (
            f"top1 {m['top1' + suffix]:.4f} top5 {m['top5' + suffix]:.4f} "
            f"mean-class {m['mean_class_acc' + suffix]:.4f} loss {m['loss' + suffix]:.4f}"
        )

    flip = f"; crop+flip {accuracies(FLIP)}" if "top1" + FLIP in m else ""
    return f"{accuracies('')}{flip} ({m['count']} images)"


def _plain(value: Any) -> Any:
    """Scalar arrays → Python numbers for JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Writes {step, split, **metrics} to metrics.jsonl and TensorBoard ("<split>/<name>").

    `start_step` (a resumed run) drops records after that step, which the run will repeat;
    None appends without dropping anything.
    """

    def __init__(self, workdir: str, *, start_step: int | None = 0):
        self._enabled = is_writer()
        if not self._enabled:
            return
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        if start_step is not None:
            _truncate_after(self.path, start_step)
        self._jsonl = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the writer's life)
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=start_step or None)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Record one set of scalar metrics of `split` ("train", "test", ...) at `step`."""
        if not self._enabled:
            return
        record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if name not in ("step", "split") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{name}", value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Keep only the records of steps <= `step` in the JSONL file at `path`, if it exists."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of workdir/metrics.jsonl, in order."""
    with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """Training progress: a tqdm bar with images/s and ETA on a terminal, plain lines otherwise."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int, *, tty: bool | None = None):
        self._enabled = is_writer()
        self._total, self._batch = total_steps, batch_size
        self._last_step, self._last_time = start_step, time.perf_counter()
        self._bar = None
        if self._enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm  # pylint: disable=g-import-not-at-top

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: Mapping[str, Any]) -> float:
        """Report `step` and its metrics; returns images/s since the previous update."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        rate = steps * self._batch / max(now - self._last_time, 1e-9)
        eta = (self._total - step) * self._batch / rate
        if self._enabled:
            shown = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            if self._bar is not None:
                self._bar.update(step - self._last_step)
                self._bar.set_postfix_str(f"{shown} {rate:.1f} img/s", refresh=True)
            else:
                log(f"step {step}/{self._total} {shown} {rate:.1f} img/s ETA {_duration(eta)}")
        self._last_step, self._last_time = step, now
        return rate

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an eval, a checkpoint) out of the images/s and ETA."""
        self._last_time += seconds

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fmt(value: Any) -> str:
    value = _plain(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds) if math.isfinite(seconds) else 0
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
