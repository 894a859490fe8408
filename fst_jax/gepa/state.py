"""The search state: candidates, per-item scores, lineage, Pareto sets, counters, RNG. All plain data.

`GEPAState.to_dict()` is JSON-ready and carries everything a resumed search needs to continue exactly as the
uninterrupted one would: the `random.Random` state, the minibatch sampler, merge bookkeeping and counters.
It never holds secrets (reflection-LM keys live in the environment only).
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fst_jax.gepa.merge import MergeBook
from fst_jax.gepa.minibatch import EpochShuffledSampler
from fst_jax.gepa.pareto import front_candidates, pareto_multiplicities, remove_dominated

# Which candidates a population is drawn from: every candidate best (ties included) on some item, or those
# left after removing dominated ones (the `gepa` package's rule, which drops a prompt whose every best item
# another survivor ties, e.g. one that only ties at zero).
POPULATION_RULES = ("front", "nondominated")

SCHEMA_VERSION = 1
CALL_KINDS = ("seed", "minibatch", "full_eval", "merge")
ItemId = Hashable  # int or str, so that state round-trips through JSON


@dataclass
class EvalResult:
    """One rollout's outcome: the score, the model's output and textual feedback for reflection.

    `trace` may carry anything JSON-able; its "inputs" entry (if any) is shown to the reflection LM as the
    example's input instead of the item's default description.
    """

    score: float
    output: str = ""
    feedback: str = ""
    trace: dict[str, Any] | None = None


class EvaluateFn(Protocol):
    """`evaluate(pairs, capture_traces) -> results`: one result per (candidate, item) pair, in order."""

    def __call__(self, pairs: list[tuple[dict[str, str], Any]], capture_traces: bool) -> list[EvalResult]: ...


class StateInvariantError(RuntimeError):
    """The search state is inconsistent (a bug, or a hand-edited/corrupted saved state)."""


@dataclass
class GEPAState:
    """Everything the search knows. Candidate ids are indices into `candidates`."""

    components: list[str]
    candidates: list[dict[str, str]] = field(default_factory=list)
    parents: list[list[int]] = field(default_factory=list)
    scores: list[dict[ItemId, float]] = field(default_factory=list)  # sparse: only the items scored
    next_component: list[int] = field(default_factory=list)  # round-robin pointer per candidate
    discovered_at: list[int] = field(default_factory=list)  # metric calls spent when it was found
    found_in_iteration: list[int] = field(default_factory=list)
    best_score: dict[ItemId, float] = field(default_factory=dict)
    # Candidates tied at the best score on each item, in the order they joined (see `item_best`).
    front_order: dict[ItemId, list[int]] = field(default_factory=dict)
    iteration: int = 0
    metric_calls: int = 0
    best_aggregate: float = -math.inf
    iterations_without_improvement: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    sampler: EpochShuffledSampler = field(default_factory=EpochShuffledSampler)
    merge: MergeBook = field(default_factory=MergeBook)
    # metric_calls by what they bought: seed scoring, minibatch rollouts, full evaluations, merges
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CALL_KINDS, 0))

    # ---- updates -------------------------------------------------------------------------------------

    def add_candidate(
        self, texts: dict[str, str], parents: list[int], item_scores: dict[ItemId, float],
        discovered_at: int | None = None,
    ) -> int:
        """Append a candidate with its validation scores; update the per-item best sets. Returns its id.

        `discovered_at` (default: the current metric calls) is the budget spent when it was found.
        """
        if sorted(texts) != sorted(self.components):
            raise ValueError(f"candidate components {sorted(texts)} differ from the search's {sorted(self.components)}")
        cid = len(self.candidates)
        self.candidates.append({name: texts[name] for name in self.components})
        self.parents.append(list(parents))
        self.scores.append(dict(item_scores))
        # The child continues the round-robin where its furthest-along parent left off (reference rule).
        self.next_component.append(max((self.next_component[p] for p in parents), default=0))
        self.discovered_at.append(self.metric_calls if discovered_at is None else discovered_at)
        self.found_in_iteration.append(self.iteration)
        for item, score in item_scores.items():
            best = self.best_score.get(item, -math.inf)
            if score > best:
                self.best_score[item] = score
                self.front_order[item] = [cid]
            elif score == best:
                self.front_order[item].append(cid)
        return cid

    def components_to_update(self, parent: int, mode: str = "round_robin") -> list[str]:
        """The components to reflect on for `parent`: all, or the next in its round-robin (then advanced)."""
        if mode == "all":
            return list(self.components)
        pointer = self.next_component[parent]
        self.next_component[parent] = (pointer + 1) % len(self.components)
        return [self.components[pointer]]

    # ---- views ---------------------------------------------------------------------------------------

    def aggregate(self, cid: int) -> float:
        """Mean score over the items the candidate was scored on (-inf if none)."""
        s = self.scores[cid]
        return sum(s.values()) / len(s) if s else -math.inf

    def aggregates(self) -> list[float]:
        """`aggregate` for every candidate, indexed by id."""
        return [self.aggregate(c) for c in range(len(self.candidates))]

    def item_best(self) -> dict[ItemId, set[int]]:
        """item -> set of candidates with the best score on it.

        Each set is built by insertion in joining order and then copied, the same operations the reference
        performs: Python set iteration order depends on that history, and it decides ties during selection.
        """
        out: dict[ItemId, set[int]] = {}
        for item, order in self.front_order.items():
            built: set[int] = set()
            for cid in order:
                built.add(cid)
            out[item] = set(built)
        return out

    def pareto_front(self) -> list[int]:
        """Candidates best on at least one item, by id."""
        return front_candidates(self.item_best())

    def front_coverage(self) -> dict[int, int]:
        """Candidate -> number of items it is (one of) the best on."""
        cov: dict[int, int] = {}
        for order in self.front_order.values():
            for cid in order:
                cov[cid] = cov.get(cid, 0) + 1
        return cov

    def non_dominated_multiplicities(self) -> dict[int, int]:
        """`pareto_multiplicities` of the current state (the `pareto` selector's weights)."""
        return pareto_multiplicities(self.item_best(), self.aggregates())

    def best_id(self) -> int:
        """Highest aggregate; the earliest candidate among equals."""
        aggs = self.aggregates()
        return aggs.index(max(aggs))

    def non_dominated(self) -> list[int]:
        """Front candidates left after `remove_dominated` (the package's rule), by id."""
        return sorted(remove_dominated(self.item_best(), self.aggregates()))

    def population_ids(self, k: int, fill: bool = False, rule: str = "front") -> list[int]:
        """The top-k candidates of the Pareto front (`rule="front"`: every candidate best on some item, ties
        included) or of its non-dominated part (`rule="nondominated"`), by aggregate score, ties broken by
        coverage, then age.

        With `fill=True`, fewer than k such candidates are topped up with the best others (same order).
        """
        if k < 1:
            raise ValueError(f"population size must be >= 1, got {k}")
        if rule not in POPULATION_RULES:
            raise ValueError(f"population rule must be one of {POPULATION_RULES}, got {rule!r}")
        cov = self.front_coverage()

        def rank(c: int) -> tuple[float, int, int]:
            return (-self.aggregate(c), -cov.get(c, 0), c)

        pool = self.pareto_front() if rule == "front" else self.non_dominated()
        chosen = sorted(pool, key=rank)[:k]
        if fill and len(chosen) < k:
            rest = sorted((c for c in range(len(self.candidates)) if c not in chosen), key=rank)
            chosen += rest[: k - len(chosen)]
        return chosen

    def check_items(self, train_ids: list[ItemId], val_ids: list[ItemId]) -> None:
        """Raise if this state refers to items the given train/validation sets lack (a resume with other data)."""
        stale_train = sorted(map(str, set(self.sampler.shuffled) - set(train_ids)))
        stale_val = sorted(map(str, set(self.best_score) - set(val_ids)))
        if stale_train or stale_val:
            raise ValueError(
                f"the GEPA state refers to items missing from this search's data (train ids {stale_train[:5]}, "
                f"validation ids {stale_val[:5]}); resume with the same trainset and valset, or start a new "
                "search with GEPAEngine.init_state"
            )

    # ---- invariants ----------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise `StateInvariantError` naming the first inconsistency found."""
        n = len(self.candidates)

        def fail(msg: str) -> None:
            raise StateInvariantError(f"GEPA state is inconsistent: {msg}")

        for name in ("parents", "scores", "next_component", "discovered_at", "found_in_iteration"):
            if len(getattr(self, name)) != n:
                fail(f"{name} has {len(getattr(self, name))} entries for {n} candidates")
        if n == 0:
            fail("no candidates (initialise the search with at least one seed candidate)")
        for cid, cand in enumerate(self.candidates):
            if list(cand) != self.components:
                fail(f"candidate {cid} has components {list(cand)}, expected {self.components}")
            if any(not isinstance(t, str) for t in cand.values()):
                fail(f"candidate {cid} has a non-string component text")
            if len(self.parents[cid]) > 2 or any(not (0 <= p < cid) for p in self.parents[cid]):
                fail(f"candidate {cid} has invalid parents {self.parents[cid]} (must be 0-2 earlier ids)")
            if not 0 <= self.next_component[cid] < len(self.components):
                fail(f"candidate {cid} round-robin pointer {self.next_component[cid]} out of range")
            for item, s in self.scores[cid].items():
                if not isinstance(s, (int, float)) or math.isnan(s):
                    fail(f"candidate {cid} has a non-numeric or NaN score {s!r} on item {item!r}")
        scored = {item for s in self.scores for item in s}
        if scored != set(self.best_score) or scored != set(self.front_order):
            fail("the per-item best sets do not cover exactly the scored items")
        for item, order in self.front_order.items():
            best = self.best_score[item]
            if not order or len(set(order)) != len(order):
                fail(f"item {item!r} has an empty or repeated best set {order}")
            expected = [c for c in range(n) if self.scores[c].get(item) == best]
            if sorted(order) != expected or max(s.get(item, -math.inf) for s in self.scores) != best:
                fail(f"item {item!r}: best set {sorted(order)} != candidates scoring the best {best} ({expected})")
        if self.metric_calls < 0 or self.iteration < 0:
            fail(f"negative counters (metric_calls={self.metric_calls}, iteration={self.iteration})")

    # ---- serialisation -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (item ids kept in lists of pairs so int ids survive JSON)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "schema_version": SCHEMA_VERSION,
            "components": list(self.components),
            "candidates": [dict(c) for c in self.candidates],
            "parents": [list(p) for p in self.parents],
            "scores": [[[item, s] for item, s in sc.items()] for sc in self.scores],
            "next_component": list(self.next_component),
            "discovered_at": list(self.discovered_at),
            "found_in_iteration": list(self.found_in_iteration),
            "best_score": [[item, s] for item, s in self.best_score.items()],
            "front_order": [[item, list(o)] for item, o in self.front_order.items()],
            "iteration": self.iteration,
            "metric_calls": self.metric_calls,
            "best_aggregate": None if self.best_aggregate == -math.inf else self.best_aggregate,
            "iterations_without_improvement": self.iterations_without_improvement,
            "rng": [version, list(internal), gauss],
            "sampler": self.sampler.to_dict(),
            "merge": self.merge.to_dict(),
            "calls": dict(self.calls),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GEPAState:
        """Inverse of `to_dict`; refuses unknown schema versions."""
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"GEPA state has schema_version={version!r}; this fst_jax reads version {SCHEMA_VERSION}. "
                "Resume with the fst_jax version that wrote it, or start a new search."
            )
        rng = random.Random()
        rv, internal, gauss = d["rng"]
        rng.setstate((rv, tuple(internal), gauss))
        state = cls(
            components=list(d["components"]),
            candidates=[dict(c) for c in d["candidates"]],
            parents=[list(p) for p in d["parents"]],
            scores=[{item: s for item, s in sc} for sc in d["scores"]],
            next_component=list(d["next_component"]),
            discovered_at=list(d["discovered_at"]),
            found_in_iteration=list(d["found_in_iteration"]),
            best_score={item: s for item, s in d["best_score"]},
            front_order={item: list(o) for item, o in d["front_order"]},
            iteration=int(d["iteration"]),
            metric_calls=int(d["metric_calls"]),
            best_aggregate=-math.inf if d["best_aggregate"] is None else float(d["best_aggregate"]),
            iterations_without_improvement=int(d["iterations_without_improvement"]),
            rng=rng,
            sampler=EpochShuffledSampler.from_dict(d["sampler"]),
            merge=MergeBook.from_dict(d["merge"]),
            calls={**dict.fromkeys(CALL_KINDS, 0), **d.get("calls", {})},  # absent in states saved before it
        )
        state.check_invariants()
        return state

    def lineage(self) -> list[dict[str, Any]]:
        """One JSON-ready record per candidate: texts, parents, scores summary, when it was found."""
        aggs, cov = self.aggregates(), self.front_coverage()
        return [
            {
                "id": c,
                "components": dict(self.candidates[c]),
                "parents": list(self.parents[c]),
                "aggregate": None if aggs[c] == -math.inf else aggs[c],
                "num_items_scored": len(self.scores[c]),
                "front_items": cov.get(c, 0),
                "discovered_at_metric_calls": self.discovered_at[c],
                "found_in_iteration": self.found_in_iteration[c],
            }
            for c in range(len(self.candidates))
        ]


def save_lineage(state: GEPAState, path: str) -> None:
    """Write `state.lineage()` (candidates, parents, scores summary) to `path` as JSON, atomically."""
    write_json_atomic(path, state.lineage())


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to `path` via a temporary file in the same directory and `os.replace` (never half-written)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
