"""The wording of invalid-option messages, shared by the library's functions and the run config.

A problem is one sentence that starts with the option's name (`norm='chol' is not one of …`), so
that `gcp_jax.config.validate` can prefix it with the config path (`config.gcp.`) and list all
problems of a config at once, while a library call raises the same sentence on its own.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate `name` was most likely meant to be, or None."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return matches[0] if matches else None


def not_one_of(name: str, value, choices: Iterable) -> str:
    """`name=value is not one of a, b, c (did you mean 'b'?).`"""
    choices = tuple(choices)
    hint = closest(value, choices) if isinstance(value, str) else None
    suffix = f" (did you mean {hint!r}?)" if hint else ""
    return f"{name}={value!r} is not one of {', '.join(map(str, choices))}{suffix}."


def integer_at_least(name: str, value, low: int) -> list[str]:
    """[] for an integer (not a bool) of at least `low`, else [`name=value must be an integer of at least low.`]."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
    return [] if ok else [f"{name}={value!r} must be an integer of at least {low}."]


def unknown_fields(names: Iterable[str], known: Iterable[str], prefix: str = "", noun: str = "field") -> list[str]:
    """One problem per name that is not in `known` (a `noun`), with the closest known name."""
    known = tuple(known)
    problems = []
    for name in sorted(set(names) - set(known)):
        hint = closest(name, known)
        problems.append(
            f"{prefix}{name} is not a known {noun}"
            + (f" (did you mean {prefix}{hint}?)." if hint else f"; the {noun}s are {', '.join(sorted(known))}.")
        )
    return problems


def raise_if_any(problems: list[str], where: str = "") -> None:
    """ValueError with every problem, one per line (a single problem stays one sentence)."""
    if not problems:
        return
    head = f"{where}: " if where else ""
    if len(problems) == 1:
        raise ValueError(head + problems[0])
    raise ValueError(head + f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
