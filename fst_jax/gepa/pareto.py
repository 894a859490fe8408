"""Pareto logic over per-item best sets: which candidates survive, and how often each is best.

The search keeps, for every validation item, the set of candidates with the best score on it (ties kept).
A candidate is *dominated* when every item it is best on also has another surviving candidate that is best
there. Dominated candidates are removed one at a time, visiting candidates in ascending aggregate score (ties
in order of first appearance over the items), restarting the visit after each removal, until none is left to
remove. That order is the reference `gepa` package's; it decides which of two mutually covering candidates
survives, so we keep it exactly (tests/test_gepa_pareto.py checks against gepa on random score matrices).

Iteration order of the sets matters for ties: we iterate the given sets as they are, and build the filtered
per-item sets by iterating the originals, the same operations the reference performs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Union

Aggregate = Union[Mapping[int, float], Sequence[float]]


def _first_appearance(item_best: Mapping[Hashable, set[int]]) -> list[int]:
    """Candidates in order of first appearance over the items (dict order, then each set's order)."""
    seen: dict[int, None] = {}
    for best in item_best.values():
        for cand in best:
            seen.setdefault(cand, None)
    return list(seen)


def _is_covered(cand: int, others: set[int], item_best: Mapping[Hashable, set[int]]) -> bool:
    """True when every item `cand` is best on also has one of `others` among its best."""
    for best in item_best.values():
        if cand in best and not any(other in others for other in best):
            return False
    return True


def remove_dominated(item_best: Mapping[Hashable, set[int]], aggregate: Aggregate) -> set[int]:
    """The candidates left after removing dominated ones (see the module docstring for the order).

    Args:
      item_best: item id -> set of candidate ids that have the best score on that item.
      aggregate: candidate id -> aggregate score (a mapping or a list indexed by candidate id); it must
        cover every candidate that appears in `item_best`.

    Returns:
      The surviving (non-dominated) candidate ids. Every non-empty item set keeps at least one survivor.
    """
    order = _first_appearance(item_best)
    missing = [c for c in order if not _has_score(aggregate, c)]
    if missing:
        raise KeyError(f"aggregate has no score for candidate(s) {missing}; pass one score per candidate")
    # sorted() is stable, so candidates with equal aggregates keep their first-appearance order.
    order = sorted(order, key=lambda c: aggregate[c])
    alive = set(order)
    removed_one = True
    while removed_one:
        removed_one = False
        for cand in order:
            if cand in alive and _is_covered(cand, alive - {cand}, item_best):
                alive.discard(cand)
                removed_one = True
                break  # restart from the lowest aggregate, as the reference does
    return alive


def pareto_multiplicities(item_best: Mapping[Hashable, set[int]], aggregate: Aggregate) -> dict[int, int]:
    """How many items each non-dominated candidate is best on, after dominated ones are removed.

    The dict is ordered by first appearance over the filtered per-item sets; parent selection draws from the
    list that repeats each candidate by its multiplicity in this order, so the order is part of the contract.
    """
    alive = remove_dominated(item_best, aggregate)
    counts: dict[int, int] = {}
    for best in item_best.values():
        # Build the filtered set by iterating the original, as the reference does: its iteration order
        # (not sorted order) decides the sampling list's order and hence which candidate a draw picks.
        filtered = {c for c in best if c in alive}
        for cand in filtered:
            counts[cand] = counts.get(cand, 0) + 1
    return counts


def front_candidates(item_best: Mapping[Hashable, set[int]]) -> list[int]:
    """All candidates best on at least one item (dominated or not), sorted by id."""
    return sorted({c for best in item_best.values() for c in best})


def _has_score(aggregate: Aggregate, cand: int) -> bool:
    if isinstance(aggregate, Mapping):
        return cand in aggregate
    return 0 <= cand < len(aggregate)
