"""Placement of replicas on workers: distinct workers per job, load spread evenly."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


def choose_workers(
    eligible: Iterable[str], *, count: int, exclude: set[str], load: Counter, offset: int = 0
) -> list[str]:
    """Return `count` distinct workers outside `exclude`, least loaded first.

    Ties are broken by name, rotated by `offset` so that equal loads spread over segments.
    Returns fewer than `count` names when too few workers are available.
    """
    candidates = sorted(set(eligible) - exclude)
    if not candidates:
        return []
    shift = offset % len(candidates)
    rotated = candidates[shift:] + candidates[:shift]
    ranked = sorted(rotated, key=lambda worker: load[worker])  # stable: keeps the rotation among ties
    return ranked[:count]
