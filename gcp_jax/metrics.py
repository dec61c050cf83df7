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


def summarize_eval(totals: Mapping[str, Any]) -> dict[str, float]:
    """Accuracies from eval totals: top1, top5, mean per-class accuracy (classes present), loss, count;
    the same with the suffix `_flip` for the flip-averaged logits when the totals have them."""
    t = jax.device_get(totals)
    count = max(int(t["count"]), 1)
    present = t["class_count"] > 0
    metrics = {}
    for suffix in ("", FLIP) if "top1" + FLIP in t else ("",):
        per_class = t["class_correct" + suffix][present] / t["class_count"][present]
        metrics.update(
            {
                "loss" + suffix: float(t["loss" + suffix]) / count,
                "top1" + suffix: int(t["top1" + suffix]) / count,
                "top5" + suffix: int(t["top5" + suffix]) / count,
                "mean_class_acc" + suffix: float(per_class.mean()) if per_class.size else 0.0,
            }
        )
    metrics["count"] = int(t["count"])
    return metrics


def _plain(value: Any) -> Any:
    """Scalar arrays → Python numbers for JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch where torch is not loaded yet.

    tensorboardX imports an installed torch at its own import (1.8 s of every start on a 2-core host)
    only to accept torch tensors; this writer logs Python floats.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Writes {step, split, **metrics} to metrics.jsonl and TensorBoard ("<split>/<name>").

    metrics.jsonl is append-only. On opening, lines that are not whole JSON records (a line torn
    by a crash or a full disk) are dropped with a warning, and `start_step` (a resumed run) drops
    the records after that step, which the run will repeat; None keeps every record. Such a
    rewrite goes to a new file renamed into place, so the history survives a crash at any moment.
    """

    def __init__(self, workdir: str, *, start_step: int | None = 0):
        self._enabled = is_writer()
        self._last: dict[str, dict[str, Any]] = {}
        if not self._enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        for record in _clean(self.path, start_step):
            self._last[record.get("split")] = record
        self._jsonl = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the writer's life)
        self._tb = _summary_writer_class()(os.path.join(workdir, TENSORBOARD_DIR), purge_step=start_step or None)

    def last(self, split: str) -> dict[str, Any] | None:
        """The last record of `split` kept when the file was opened (process 0; None elsewhere or if none)."""
        return self._last.get(split)

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


def _parse(path: str) -> tuple[list[tuple[str, dict[str, Any]]], list[int], bool]:
    """([(line, record)] of the JSON records, numbers of the other non-empty lines, whether the file ends
    in a newline)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    records, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append((line, record))
        else:
            bad.append(number)
    return records, bad, text.endswith("\n") or not text


def _clean(path: str, start_step: int | None) -> list[dict[str, Any]]:
    """Drop the broken lines of the JSONL file at `path` and, given `start_step`, the records after it.

    The lines kept are kept byte for byte; a changed file is written beside it and renamed into
    place (atomic). Returns the records kept.
    """
    if not os.path.exists(path):
        return []
    records, bad, whole = _parse(path)
    kept = [(line, r) for line, r in records if start_step is None or r.get("step", 0) <= start_step]
    if bad:
        LOGGER.warning(f"{path}: dropped line(s) {', '.join(map(str, bad))}, which are not whole JSON records.")
    if len(kept) < len(records):
        log(f"{path}: {len(records) - len(kept)} records after step {start_step} are replaced by this run's.")
    if bad or len(kept) != len(records) or not whole:
        temporary = f"{path}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line, _ in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    return [r for _, r in kept]


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of workdir/metrics.jsonl, in order (lines that are not whole records are skipped)."""
    return [record for _, record in _parse(os.path.join(workdir, METRICS_FILE))[0]]


class Progress:
    """Training progress: a tqdm bar on a terminal, plain lines otherwise, with images/s and ETA.

    The rate counts training only: from `start()` (call it once the first step, which includes
    compilation, has finished) and without the time given to `exclude()` (evaluation, checkpoints).
    """

    _BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, total_steps: int, start_step: int, batch_size: int, *, tty: bool | None = None):
        self._enabled = is_writer()
        self._total, self._batch = total_steps, batch_size
        self._last_step, self._last_time = start_step, time.perf_counter()
        self._bar = None
        if self._enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, bar_format=self._BAR_FORMAT
            )

    def start(self, step: int) -> None:
        """Start timing after `step`: the steps up to it (compilation) count in no rate."""
        self._last_step, self._last_time = step, time.perf_counter()

    def update(self, step: int, metrics: Mapping[str, Any]) -> float | None:
        """Report `step` and its metrics; returns images/s since the previous update (None: no timed step yet)."""
        now = time.perf_counter()
        steps = step - self._last_step
        rate = steps * self._batch / max(now - self._last_time, 1e-9) if steps > 0 else None
        if self._enabled:
            shown = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            if rate is not None:
                shown += f" {rate:.1f} img/s ETA {_duration((self._total - step) * self._batch / rate)}"
            if self._bar is not None:
                self._bar.update(step - self._bar.n)
                self._bar.set_postfix_str(shown, refresh=True)
            else:
                log(f"step {step}/{self._total} {shown}")
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
