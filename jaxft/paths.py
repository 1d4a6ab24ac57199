"""The one place that matches parameter paths against ordered regex rules (freeze, sharding, load lists).

Paths are tuples in code and '/'-joined strings in config, logs and errors; everyone else takes masks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

Path = tuple


class RuleError(ValueError):
    """Rules that leave a parameter uncovered, or a rule that matches nothing."""


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def compile_patterns(patterns: Iterable[str], what: str) -> list[re.Pattern]:
    out = []
    for i, p in enumerate(patterns):
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise RuleError(f"{what}[{i}]: {p!r} is not a valid regex ({e})") from None
    return out


def match_first(
    paths: Sequence[str], patterns: Sequence[str], what: str, require_cover: bool = True, require_used: bool = True
) -> dict[str, int | None]:
    """Maps each path to the index of the first pattern that fully matches it.

    Raises RuleError listing every uncovered path (when require_cover) or every pattern that matched
    nothing (when require_used), so one run shows the whole problem.
    """
    compiled = compile_patterns(patterns, what)
    taken: dict[str, int | None] = {}
    for p in paths:
        taken[p] = next((i for i, rx in enumerate(compiled) if rx.fullmatch(p)), None)
    if require_cover:
        missing = [p for p, i in taken.items() if i is None]
        if missing:
            shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
            raise RuleError(f"{what}: no rule covers {len(missing)} parameter(s): {shown}")
    if require_used:
        used = set(taken.values())
        unused = [f"{patterns[i]!r}" for i in range(len(patterns)) if i not in used]
        if unused:
            raise RuleError(f"{what}: rule(s) matched no parameter: {', '.join(unused)}")
    return taken


def matches_any(path: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)
