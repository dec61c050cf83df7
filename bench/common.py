"""What every benchmark shares and that needs no JAX: its flags, the host's description, its JSON record.

A record is what a run measured, kept in bench/results/*.json and turned into the tables of
README.md and docs/benchmarks.md by `python -m bench report`: which benchmark, the command, the
machine, the date and one dict per table row holding every number the table prints.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser(name: str, doc: str, *, repeats: int, repeats_note: str = "") -> argparse.ArgumentParser:
    """An argument parser for `python -m bench NAME` with the flags every benchmark has: --repeats, --out."""
    p = argparse.ArgumentParser(
        prog=f"python -m bench {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help=f"Timed calls per measurement; the fastest counts ({repeats}{repeats_note}).",
    )
    p.add_argument("--out", default="", help="Also write the JSON record here (e.g. bench/results/NAME.json).")
    return p


def listed(kind: Callable = str) -> Callable[[str], list]:
    """argparse type of a comma-separated list, e.g. `--archs resnet50,efficientnet_b0`, `--sizes 224,448`."""
    return lambda text: [kind(item) for item in text.split(",") if item]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (or the machine type where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def host_line() -> str:
    """The host: CPU model, the cores this process may use, memory and Python."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        memory = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = ""
    return f"{cores}× {cpu_name()}{memory}, Python {platform.python_version()}"


def versions(*packages: str) -> str:
    """The installed ones of `packages` as "name version", comma-separated (missing ones left out)."""
    found = []
    for name in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{name} {importlib.metadata.version(name)}")
    return ", ".join(found)


def command(name: str, argv: list[str]) -> str:
    """The command line that reruns this benchmark (without --out: where the record went is not how it was made)."""
    kept, skip = [], False
    for arg in argv:
        if not skip and not arg.startswith("--out"):
            kept.append(arg)
        skip = arg == "--out"
    return shlex.join(["python", "-m", "bench", name, *kept])


def record(name: str, argv: list[str], machine: str, rows: list[dict], **extra) -> dict:
    """A benchmark's JSON record: what ran, where, when, and the table rows (plus any further tables)."""
    return {
        "benchmark": name,
        "command": command(name, argv),
        "machine": machine,
        "date": datetime.date.today().isoformat(),
        "rows": rows,
        **extra,
    }


def write_record(path: str, rec: dict) -> None:
    """Write `rec` as indented JSON (a new line per field, so that a re-measurement diffs readably)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {path}", flush=True)
