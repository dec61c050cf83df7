"""Regenerate the benchmark tables of README.md and docs/benchmarks.md from bench/results/*.json.

    python -m bench report            # rewrite the tables between their markers
    python -m bench report --check    # exit 1 (naming the files) if a table differs from its record

A table in a document sits between two markers naming a record and one of its tables:

    <!-- bench:spectral.json#functions -->
    ...
    <!-- /bench -->

Everything between them is replaced by `bench.tables.render(record)[table]`, in docs/benchmarks.md
with a line saying how, where and when the record was measured (the README shows the tables
alone and links there); the text around them is left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from bench import common, tables

DOCUMENTS = {"README.md": False, "docs/benchmarks.md": True}  # document -> whether its tables say where they come from
RESULTS = os.path.join(common.ROOT, "bench", "results")
MARKED = re.compile(
    r"(?P<open><!-- bench:(?P<file>[\w.-]+)#(?P<table>\w+) -->)\n(?:.*?\n)??(?P<close><!-- /bench -->)", re.S
)


def load_records(folder: str = RESULTS) -> dict[str, dict]:
    """{file name: record} of every JSON record in `folder`."""
    records = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                records[name] = json.load(f)
    return records


def regenerate(text: str, records: dict[str, dict], *, captions: bool = True) -> str:
    """`text` with every marked table rendered afresh from `records` (with their `captions`: command, machine, date)."""

    def table(match: re.Match) -> str:
        name, which = match["file"], match["table"]
        if "<!-- bench:" in match[0][len(match["open"]) :]:
            raise ValueError(f"The marker of {name}#{which} has no <!-- /bench --> before the next table's.")
        if name not in records:
            raise KeyError(f"{name} (marked in a document) is not in bench/results.")
        rendered = tables.render(records[name])
        if which not in rendered:
            raise KeyError(f"{name} has no table {which!r}; it has {sorted(rendered)}.")
        caption = f"\n\n{tables.caption(records[name])}" if captions else ""
        return f"{match['open']}\n{rendered[which]}{caption}\n{match['close']}"

    return MARKED.sub(table, text)


def referenced(text: str) -> set[str]:
    """The record files a document's markers name."""
    return {m["file"] for m in MARKED.finditer(text)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench report", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="Change nothing; exit 1 if a document's tables are stale.")
    args = p.parse_args(argv)
    records = load_records()
    stale = []
    for doc, captions in DOCUMENTS.items():
        path = os.path.join(common.ROOT, doc)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = regenerate(text, records, captions=captions)
        if new != text:
            stale.append(doc)
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    verb = "differ from bench/results" if args.check else "rewritten"
    print(f"{', '.join(stale)}: {verb}" if stale else "every table matches bench/results")
    return 1 if args.check and stale else 0
