"""Merge (optional, off by default): combine two non-dominated candidates that share an ancestor.

Rules (the reference `gepa` package's semantics; RNG use is ours):
- the pair: two non-dominated candidates, neither an ancestor of the other, with a common ancestor whose
  aggregate score is no better than either's, and at least one component that exactly one of them changed;
- the merged text, per component: the changed descendant's text; if both changed it (differently), the text of
  the one with the higher aggregate (a random one when equal); if they agree, that text;
- a (pair, ancestor) triple and a (pair, merged-text provenance) are each tried at most once;
- acceptance: on a few validation items stratified by which parent is better (parent-1 wins, parent-2 wins,
  ties), the merged candidate's score sum must be at least the better parent's sum on those items.
Scheduling: each accepted reflective child schedules one merge (up to `max_merge_invocations` accepted
merges); a scheduled merge is tried at the start of the iteration right after one that found a new candidate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fst_jax.gepa.pareto import remove_dominated

if TYPE_CHECKING:
    from fst_jax.gepa.state import GEPAState


@dataclass
class MergeBook:
    """Merge scheduling and history; part of the saved state."""

    merges_due: int = 0
    merges_accepted: int = 0
    last_iteration_found_new: bool = False
    tried_triples: list[tuple[int, int, int]] = field(default_factory=list)
    tried_provenance: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "merges_due": self.merges_due,
            "merges_accepted": self.merges_accepted,
            "last_iteration_found_new": self.last_iteration_found_new,
            "tried_triples": [list(t) for t in self.tried_triples],
            "tried_provenance": [[i, j, list(p)] for i, j, p in self.tried_provenance],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergeBook:
        return cls(
            merges_due=int(d["merges_due"]),
            merges_accepted=int(d["merges_accepted"]),
            last_iteration_found_new=bool(d["last_iteration_found_new"]),
            tried_triples=[(int(a), int(b), int(c)) for a, b, c in d["tried_triples"]],
            tried_provenance=[(int(i), int(j), tuple(int(x) for x in p)) for i, j, p in d["tried_provenance"]],
        )


@dataclass
class MergePlan:
    """A merge to evaluate: the merged texts, its two parents, their common ancestor."""

    texts: dict[str, str]
    parent_a: int
    parent_b: int
    ancestor: int


def ancestors(parents: list[list[int]], cid: int) -> set[int]:
    """All ancestors of `cid` (not including itself)."""
    found: set[int] = set()
    stack = list(parents[cid])
    while stack:
        p = stack.pop()
        if p not in found:
            found.add(p)
            stack.extend(parents[p])
    return found


def merge_texts(
    ancestor: dict[str, str], a: dict[str, str], b: dict[str, str], agg_a: float, agg_b: float, ids: tuple[int, int],
    rng: random.Random,
) -> tuple[dict[str, str], tuple[int, ...]] | None:
    """Per-component merge of `a` and `b` over their common `ancestor` (rules in the module docstring).

    Returns (texts, provenance: which parent id each component came from), or None when no component was
    changed by exactly one of them (nothing a merge could combine).
    """
    if not any((ancestor[k] in (a[k], b[k])) and a[k] != b[k] for k in ancestor):
        return None
    texts: dict[str, str] = {}
    provenance: list[int] = []
    for k in ancestor:
        if a[k] == b[k]:
            src = ids[0]
        elif ancestor[k] == a[k]:
            src = ids[1]
        elif ancestor[k] == b[k]:
            src = ids[0]
        elif agg_a != agg_b:
            src = ids[0] if agg_a > agg_b else ids[1]
        else:
            src = rng.choice(ids)
        texts[k] = a[k] if src == ids[0] else b[k]
        provenance.append(src)
    return texts, tuple(provenance)


def find_merge(state: GEPAState, rng: random.Random, max_attempts: int = 10) -> MergePlan | None:
    """Pick a mergeable pair and build the merged candidate, or None if none is found in `max_attempts`."""
    aggs = state.aggregates()
    pool = sorted(remove_dominated(state.item_best(), aggs))
    if len(pool) < 2:
        return None
    book = state.merge
    for _ in range(max_attempts):
        i, j = sorted(rng.sample(pool, 2))
        anc_i, anc_j = ancestors(state.parents, i), ancestors(state.parents, j)
        if i in anc_j or j in anc_i:
            continue  # one descends from the other: nothing to combine
        common = sorted(
            a for a in anc_i & anc_j
            if (i, j, a) not in book.tried_triples and aggs[a] <= aggs[i] and aggs[a] <= aggs[j]
        )
        rng.shuffle(common)
        for a in common:
            merged = merge_texts(state.candidates[a], state.candidates[i], state.candidates[j], aggs[i], aggs[j],
                                 (i, j), rng)
            if merged is None or (i, j, merged[1]) in book.tried_provenance:
                continue
            book.tried_triples.append((i, j, a))
            book.tried_provenance.append((i, j, merged[1]))
            return MergePlan(merged[0], i, j, a)
    return None


def stratified_items(
    scores_a: dict[Hashable, float], scores_b: dict[Hashable, float], k: int, rng: random.Random
) -> list[Hashable]:
    """Up to k items scored by both: about k/3 where a wins, k/3 where b wins, the rest ties, then any."""
    common = [item for item in scores_a if item in scores_b]
    buckets = (
        [x for x in common if scores_a[x] > scores_b[x]],
        [x for x in common if scores_b[x] > scores_a[x]],
        [x for x in common if scores_a[x] == scores_b[x]],
    )
    per_bucket = max(1, math.ceil(k / 3))
    chosen: list[Hashable] = []
    for bucket in buckets:
        take = min(len(bucket), per_bucket, k - len(chosen))
        if take > 0:
            chosen += rng.sample(bucket, take)
    rest = [x for x in common if x not in chosen]
    if len(chosen) < k and rest:
        chosen += rng.sample(rest, min(len(rest), k - len(chosen)))
    return chosen


def merge_accepted(merged_scores: list[float], parent_a_scores: list[float], parent_b_scores: list[float]) -> bool:
    """Accept when the merged sum is at least the better parent's sum on the same items."""
    return sum(merged_scores) >= max(sum(parent_a_scores), sum(parent_b_scores))


ScoreFn = Callable[["GEPAState", list[dict[str, str]], list[Hashable]], list[dict[Hashable, float]]]


def merge_step(
    state: GEPAState, score: ScoreFn, val_ids: list[Hashable], num_items: int, max_merges: int
) -> dict[str, Any] | None:
    """Run one scheduled merge attempt; the event dict, or None when no merge is due or none can be made.

    At most `max_merges` merges are ever accepted (a hard cap: the reference can exceed its cap when several
    merges were scheduled before the first one is accepted).

    `score(state, texts, item_ids)` evaluates candidates on validation items in one call and counts the
    rollouts. The merged candidate is scored on `num_items` stratified items (one call); if accepted, on every
    validation item (one more call) and added with both parents.
    """
    book = state.merge
    due = book.merges_due > 0 and book.last_iteration_found_new and book.merges_accepted < max_merges
    book.last_iteration_found_new = False
    if not due:
        return None
    plan = find_merge(state, state.rng)
    if plan is None:
        return None
    a, b = plan.parent_a, plan.parent_b
    items = stratified_items(state.scores[a], state.scores[b], num_items, state.rng)
    if not items:
        return None
    (merged,) = score(state, [plan.texts], items)
    after = [merged[i] for i in items]
    before = [[state.scores[p][i] for i in items] for p in (a, b)]
    event: dict[str, Any] = {
        "type": "merge", "iteration": state.iteration, "parents": [a, b], "ancestor": plan.ancestor,
        "minibatch": items, "scores_before": [sum(before[0]), sum(before[1])], "scores_after": after,
        "new_texts": plan.texts, "status": "rejected", "candidate": None, "val_score": None,
        "reason": f"merged sum {sum(after)} < best parent's {max(map(sum, before))}",
    }
    if merge_accepted(after, *before):
        (scores,) = score(state, [plan.texts], val_ids)
        # Like every candidate, it is "found" at the metric calls spent before its own validation rollouts.
        found_at = state.metric_calls - len(scores)
        event["candidate"] = cid = state.add_candidate(plan.texts, [a, b], scores, discovered_at=found_at)
        book.merges_due -= 1
        book.merges_accepted += 1
        event.update(status="accepted", reason=None, val_score=state.aggregate(cid))
    return event
