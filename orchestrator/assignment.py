"""Placement of replicas on workers: distinct workers and owners per job, random among the least loaded."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping

_system_random = random.SystemRandom()


def choose_workers(
    owners: Mapping[str, str],
    *,
    count: int,
    exclude_workers: set[str],
    exclude_owners: set[str],
    load: Counter,
    rng: random.Random = _system_random,
) -> list[str]:
    """Return up to `count` workers of distinct owners, none excluded, least loaded first.

    `owners` maps each eligible worker to its owner. Workers of equal load are taken in a
    random order, so no worker can predict or steer which jobs it receives.
    """
    candidates = [w for w in owners if w not in exclude_workers and owners[w] not in exclude_owners]
    rng.shuffle(candidates)
    candidates.sort(key=lambda worker: load[worker])  # stable: keeps the random order among ties
    chosen: list[str] = []
    taken = set(exclude_owners)
    for worker in candidates:
        if len(chosen) == count:
            break
        if owners[worker] not in taken:
            chosen.append(worker)
            taken.add(owners[worker])
    return chosen


def choose_class(
    members: Mapping[str, tuple[str, str]],
    *,
    count: int,
    load: Counter,
    rng: random.Random = _system_random,
) -> str | None:
    """Return the numerical class a new job's replicas go to, or None when no class has a worker.

    `members` maps each eligible worker to (owner, class). Classes that can take all `count`
    replicas on distinct owners come first. Among them, the class whose least loaded workers
    carry the least load wins, and ties are broken at random.
    """
    by_class: dict[str, dict[str, str]] = {}
    for worker, (owner, klass) in members.items():
        by_class.setdefault(klass, {})[worker] = owner
    if not by_class:
        return None
    ranked = []
    for klass, owners in by_class.items():
        chosen = choose_workers(owners, count=count, exclude_workers=set(), exclude_owners=set(), load=load, rng=rng)
        ranked.append((-len(chosen), sum(load[worker] for worker in chosen), rng.random(), klass))
    return min(ranked)[3]
