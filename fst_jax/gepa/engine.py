"""The batched GEPA search loop.

Each iteration works on `proposals_per_iteration` (P) parents at once, in four phases, each ONE call:
  1. evaluate every parent on its own minibatch (with traces)          -> evaluate(...)
  2. reflect: one prompt per (parent, component to update)              -> reflection_lm.complete(...)
  3. evaluate every usable child on its parent's minibatch              -> evaluate(...)
  4. score the accepted children on every validation item               -> evaluate(...)
so a jitted sampler sees a few large batches per iteration instead of many small ones. With P = 1 the search
makes the reference `gepa` package's decisions for the same seed and evaluation results (parents, minibatches,
acceptance, lineage, budget); tests/test_gepa_engine.py checks this against gepa's own engine.

The budget is counted in metric calls (rollouts: one per (candidate, item) pair evaluated), split by what they
bought: scoring the seeds, minibatch rollouts of parents and children, full evaluations of accepted candidates
(and merges). By default (the reference's rule) it is checked before each iteration, so no iteration starts
once it is spent and the last one may overshoot it. With `strict_budget=True` (what an FST cycle uses) the
budget is a hard cap: an iteration runs only as many proposals as leave room for one full evaluation, an
accepted child is fully evaluated only while the rollouts remain, and the search stops when not even one
proposal plus its full evaluation fits, so `metric_calls` never exceeds `max_metric_calls`.

Seeds: the reference scores its one seed on every validation item. A search seeded with K carried-over
candidates (an FST population) would pay K passes over the validation set before its first proposal; with
`seed_budget` set, the seeds share that many rollouts instead: when K · |valset| exceeds it, every seed is
scored on the same random subset of ⌊seed_budget / K⌋ validation items (the scores are sparse; aggregates are
means over the items scored). A single seed within the allowance is scored exactly as the reference does.
Other stops: iteration count, iterations without a better best aggregate, wall time, and
`max_consecutive_reflection_failures` failed reflection calls in a row (a reflection endpoint that is down).

Over 400 lines on purpose: the four phases of an iteration share the state bookkeeping that the `gepa` package's
semantics (checked by the oracle tests) tie together; the pluggable policies already live in their own modules.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fst_jax.gepa import merge as merging
from fst_jax.gepa.config import GEPAConfig
from fst_jax.gepa.acceptance import is_perfect, make_acceptance
from fst_jax.gepa.minibatch import EpochShuffledSampler
from fst_jax.gepa.proposer import DEFAULT_TEMPLATE, Proposal, Proposer
from fst_jax.gepa.reflection import ReflectionLM, ReflectionLMError
from fst_jax.gepa.selection import make_selector
from fst_jax.gepa.state import EvalResult, EvaluateFn, GEPAState, save_lineage, write_json_atomic

logger = logging.getLogger("fst_jax.gepa")
Event = dict[str, Any]


@dataclass
class GEPAResult:
    """The finished (or paused) search: its state and why it stopped."""

    state: GEPAState
    stop_reason: str

    @property
    def candidates(self) -> list[dict[str, str]]:
        return self.state.candidates

    @property
    def pareto_front(self) -> list[int]:
        return self.state.pareto_front()

    @property
    def best_candidate(self) -> dict[str, str]:
        return self.state.candidates[self.state.best_id()]

    def population(self, k: int, fill: bool = False) -> list[dict[str, str]]:
        """Top-k Pareto-front candidates by aggregate score (ties by front coverage), see `population_ids`."""
        return [self.state.candidates[c] for c in self.state.population_ids(k, fill)]

    def rollout_population_ids(self, k: int, fill_with_dominated: bool = False, rule: str = "front") -> list[int]:
        """Exactly k candidate ids for the rollouts: the top-k of the Pareto front (`rule="nondominated"`: of
        its non-dominated part, see `GEPAState.population_ids`); when it holds fewer, its members repeated in
        rank order (best first), so each still gets a whole share of every problem's rollouts.
        `fill_with_dominated=True` tops it up with the best other candidates instead (an ablation: those are
        prompts some other candidate beats or ties on every item)."""
        chosen = self.state.population_ids(k, fill=fill_with_dominated, rule=rule)
        return [chosen[i % len(chosen)] for i in range(k)]

    def rollout_population(self, k: int, fill_with_dominated: bool = False,
                           rule: str = "front") -> list[dict[str, str]]:
        """The candidates of `rollout_population_ids`."""
        return [self.state.candidates[c] for c in self.rollout_population_ids(k, fill_with_dominated, rule)]


def _as_items(data: Sequence[Any] | Mapping[Hashable, Any], name: str) -> dict[Hashable, Any]:
    items = dict(data) if isinstance(data, Mapping) else dict(enumerate(data))
    if not items or any(not isinstance(k, (int, str)) or isinstance(k, bool) for k in items):
        raise ValueError(f"{name} must be a non-empty list, or a mapping with int or str ids (saved as JSON)")
    return items


class GEPAEngine:
    """Runs the search. `evaluate` and `reflection_lm` are the only links to models.

    Args:
      evaluate: `evaluate(pairs, capture_traces) -> list[EvalResult]`, one result per (candidate, item) pair.
      reflection_lm: anything with `complete(prompts) -> list[str]`.
      trainset: items for reflection minibatches (a list: ids are positions; a mapping: ids are its keys).
      valset: items every accepted candidate is scored on (default: the trainset).
      on_event: called with each event dict (JSON-ready): "init", "proposal", "merge", "iteration".
      describe_item: renders an item as a record's Inputs when its trace has none.
    """

    def __init__(
        self,
        evaluate: EvaluateFn,
        reflection_lm: ReflectionLM,
        trainset: Sequence[Any] | Mapping[Hashable, Any],
        valset: Sequence[Any] | Mapping[Hashable, Any] | None = None,
        config: GEPAConfig | None = None,
        on_event: Callable[[Event], None] | None = None,
        describe_item: Callable[[Any], str] = str,
    ):
        self.config = config or GEPAConfig(max_metric_calls=1000)
        self.evaluate_fn = evaluate
        self.reflection_lm = reflection_lm
        self.train = _as_items(trainset, "trainset")
        self.val = _as_items(valset if valset is not None else trainset, "valset")
        self.train_ids, self.val_ids = list(self.train), list(self.val)
        self.on_event = on_event
        self.selector = make_selector(self.config.selection, self.config.epsilon)
        self.acceptance = make_acceptance(self.config.acceptance)
        self.proposer = Proposer(self.config.reflection_template or DEFAULT_TEMPLATE, self.config.max_text_chars,
                                 describe_item)
        self.evaluate_calls = 0  # totals over this engine's life, for observability and tests
        self.reflection_calls = 0
        self.reflection_failures = 0  # failed reflection calls (ReflectionLMError), and how many in a row;
        self.consecutive_reflection_failures = 0  # a caller may carry the latter over from an earlier search
        self.last_reflection_error = ""
        self._stop_requested = False

    # ---- public ---------------------------------------------------------------------------------------

    def init_state(self, seeds: dict[str, str] | Sequence[dict[str, str]]) -> GEPAState:
        """A fresh state holding the seed candidate(s), all scored on the valset in one evaluate call."""
        seeds = [seeds] if isinstance(seeds, Mapping) else list(seeds)
        if not seeds or any(not isinstance(s, Mapping) or not s for s in seeds):
            raise ValueError("seeds must be one or more non-empty dicts of component name -> text")
        names = list(seeds[0])
        for s in seeds:
            if sorted(s) != sorted(names) or any(not isinstance(t, str) for t in s.values()):
                raise ValueError(f"every seed needs the same components {names} with string texts; got {list(s)}")
        state = GEPAState(components=names, rng=random.Random(self.config.seed),
                          sampler=EpochShuffledSampler(self.config.minibatch_size))
        ids = self._seed_items(len(seeds))
        for seed, scores in zip(seeds, self._score(state, [dict(s) for s in seeds], ids, count=False)):
            state.add_candidate(dict(seed), [], scores)  # seeds are found at 0 metric calls
        state.metric_calls += len(seeds) * len(ids)
        state.calls["seed"] += len(seeds) * len(ids)
        state.best_aggregate = max(state.aggregates())
        state.check_invariants()
        self._emit({"type": "init", "num_seeds": len(seeds), "metric_calls": state.metric_calls,
                    "val_scores": [state.aggregate(c) for c in range(len(seeds))]})
        self._write_outputs(state)
        return state

    def _seed_items(self, num_seeds: int) -> list[Hashable]:
        """The validation items every seed is scored on: all of them, or a shared subset within `seed_budget`.

        The subset is drawn from its own `random.Random(seed)`, never the search's RNG, so the search's
        decisions (parents, minibatches) stay the reference's.
        """
        budget = self.config.seed_budget
        if budget is None or num_seeds * len(self.val_ids) <= budget:
            return list(self.val_ids)
        n = max(1, budget // num_seeds)
        chosen = set(random.Random(f"seed-items-{self.config.seed}").sample(range(len(self.val_ids)), n))
        return [i for k, i in enumerate(self.val_ids) if k in chosen]

    def run(self, state: GEPAState) -> GEPAResult:
        """Iterate until a stop condition holds; `state` is updated in place (and may be saved and resumed)."""
        state.check_invariants()
        state.check_items(self.train_ids, self.val_ids)
        start = time.monotonic()
        bar = self._progress_bar(state)
        try:
            while (reason := self._stop_reason(state, start)) is None:
                state.check_invariants()
                state.iteration += 1
                calls_before = (self.evaluate_calls, self.reflection_calls)
                merge_fits = self._remaining(state) >= self.config.merge_items + len(self.val_ids)
                events = self._merge_step(state) if self.config.use_merge and merge_fits else None
                if events is None:
                    events = self._reflective_step(state)
                self._end_iteration(state, events, calls_before, bar)
        finally:
            if bar is not None:
                bar.close()
        state.check_invariants()
        return GEPAResult(state, reason)

    def request_stop(self) -> None:
        """Stop after the current iteration (e.g. from an `on_event` callback)."""
        self._stop_requested = True

    # ---- phases ---------------------------------------------------------------------------------------

    def _reflective_step(self, state: GEPAState) -> list[Event]:
        proposals = [
            Proposal(state.iteration, slot, self.selector.select(state, state.rng),
                     state.sampler.next_ids(self.train_ids, state.rng))
            for slot in range(self._proposals_that_fit(state))
        ]
        self._evaluate_parents(state, proposals)  # phase 1
        self._reflect(state, proposals)  # phase 2
        children = [p for p in proposals if p.child is not None]
        self._evaluate_children(state, children)  # phase 3
        accepted = self._accept(children)
        room = len(accepted) if not self.config.strict_budget else int(self._remaining(state)) // len(self.val_ids)
        for p in accepted[room:]:  # strict budget: no rollouts left for their full evaluation
            p.finish("rejected", "budget: no rollouts left for its full evaluation")
        accepted = accepted[:room]
        val_scores = self._score(state, [p.child for p in accepted], self.val_ids, count=False)  # phase 4
        for p, scores in zip(accepted, val_scores):
            p.candidate = state.add_candidate(p.child, [p.parent], scores)
            state.metric_calls += len(scores)
            state.calls["full_eval"] += len(scores)
            p.val_score = state.aggregate(p.candidate)
        if accepted and self.config.use_merge:
            state.merge.last_iteration_found_new = True
            for _ in accepted:
                if state.merge.merges_accepted < self.config.max_merge_invocations:
                    state.merge.merges_due += 1
        return [p.event() for p in proposals]

    def _evaluate_parents(self, state: GEPAState, proposals: list[Proposal]) -> None:
        """One evaluate call (with traces) for all parents; a repeated (parent, minibatch) is evaluated once."""
        keys = list(dict.fromkeys((p.parent, tuple(p.minibatch)) for p in proposals))
        results = self._evaluate([(state.candidates[c], self.train[i]) for c, mb in keys for i in mb], True)
        state.metric_calls += len(results)
        state.calls["minibatch"] += len(results)
        by_key, pos = {}, 0
        for key in keys:
            by_key[key], pos = results[pos:pos + len(key[1])], pos + len(key[1])
        for p in proposals:
            p.parent_results = by_key[(p.parent, tuple(p.minibatch))]
            p.scores_before = [r.score for r in p.parent_results]
            if self.config.skip_perfect and is_perfect(p.scores_before, self.config.perfect_score):
                p.finish("skipped", "perfect: the parent is perfect on this minibatch")

    def _reflect(self, state: GEPAState, proposals: list[Proposal]) -> None:
        """One batched reflection call over every (proposal, component) prompt; parse replies into children."""
        prompts: list[str] = []
        for p in proposals:
            if p.status is None:
                p.components = state.components_to_update(p.parent, self.config.component_selection)
                records = self.proposer.records([self.train[i] for i in p.minibatch], p.parent_results)
                for comp in p.components:
                    p.prompt_slots.append(len(prompts))
                    prompts.append(self.proposer.render(state.candidates[p.parent][comp], records))
        replies, failure = self._complete(prompts)
        for p in proposals:
            if p.status is not None:
                continue
            parent_texts, new_texts, why = state.candidates[p.parent], {}, {}
            for comp, slot in zip(p.components, p.prompt_slots):
                text, reason = (None, failure) if replies is None else self.proposer.parse(replies[slot],
                                                                                          parent_texts[comp])
                if text is None:
                    why[comp] = reason
                else:
                    new_texts[comp] = text
            if not new_texts:
                p.finish("rejected", "; ".join(f"{c}: {r}" for c, r in why.items()))
                continue
            p.new_texts, p.component_rejections = new_texts, why or None
            p.child = {**parent_texts, **new_texts}

    def _evaluate_children(self, state: GEPAState, children: list[Proposal]) -> None:
        """One evaluate call for every child on its parent's minibatch."""
        if not children:
            return
        results = self._evaluate([(p.child, self.train[i]) for p in children for i in p.minibatch], False)
        state.metric_calls += len(results)
        state.calls["minibatch"] += len(results)
        pos = 0
        for p in children:
            p.scores_after, pos = [r.score for r in results[pos:pos + len(p.minibatch)]], pos + len(p.minibatch)

    def _accept(self, children: list[Proposal]) -> list[Proposal]:
        """Children that beat their parent on the minibatch (identical children kept once)."""
        accepted, seen = [], set()
        for p in children:
            key = tuple(p.child.items())
            if not self.acceptance.accept(p.scores_before, p.scores_after):
                p.finish("rejected", f"not better: minibatch sum {sum(p.scores_after)} vs {sum(p.scores_before)}")
            elif key in seen:
                p.finish("rejected", "duplicate: same texts as another child this iteration")
            else:
                seen.add(key)
                p.finish("accepted")
                accepted.append(p)
        return accepted

    def _merge_step(self, state: GEPAState) -> list[Event] | None:
        """A scheduled merge attempt (see merge.py); None when there is none to make (reflect instead)."""
        event = merging.merge_step(state, self._score, self.val_ids, self.config.merge_items,
                                   self.config.max_merge_invocations)
        return None if event is None else [event]

    # ---- helpers --------------------------------------------------------------------------------------

    def _score(
        self, state: GEPAState, texts: list[dict[str, str]], ids: list[Hashable], count: bool = True
    ) -> list[dict[Hashable, float]]:
        """Scores of each of `texts` on the validation items `ids`, in one evaluate call (none if no texts).

        With count=False the caller adds the rollouts to the budget itself (one candidate at a time, so that
        each records the metric calls spent before its own validation, as the reference does).
        """
        if not texts:
            return []
        results = self._evaluate([(t, self.val[i]) for t in texts for i in ids], False)
        if count:  # merges: their stratified items and their full evaluation
            state.metric_calls += len(results)
            state.calls["merge"] += len(results)
        n = len(ids)
        return [{i: r.score for i, r in zip(ids, results[k * n:(k + 1) * n])} for k in range(len(texts))]

    def _evaluate(self, pairs: list[tuple[dict[str, str], Any]], capture_traces: bool) -> list[EvalResult]:
        # Copies, so an evaluate function that edits its candidate cannot corrupt the state.
        pairs = [(dict(c), item) for c, item in pairs]
        results = list(self.evaluate_fn(pairs, capture_traces))
        self.evaluate_calls += 1
        if len(results) != len(pairs):
            raise ValueError(
                f"evaluate returned {len(results)} results for {len(pairs)} (candidate, item) pairs; it must "
                "return one EvalResult per pair, in the same order"
            )
        for k, r in enumerate(results):
            score = getattr(r, "score", None)
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise ValueError(f"evaluate result {k} has score {score!r}; scores must be finite numbers")
        return results

    def _complete(self, prompts: list[str]) -> tuple[list[str] | None, str | None]:
        if not prompts:
            return [], None
        try:
            replies = list(self.reflection_lm.complete(prompts))
        except ReflectionLMError as e:
            self.reflection_failures += 1
            self.consecutive_reflection_failures += 1
            logger.warning("reflection failed (%d in a row); this iteration's proposals are rejected: %s",
                           self.consecutive_reflection_failures, e)
            self.last_reflection_error = str(e)
            return None, f"reflection_error: {e}"
        finally:
            self.reflection_calls += 1
        self.consecutive_reflection_failures = 0
        if len(replies) != len(prompts):
            raise ValueError(f"reflection LM returned {len(replies)} replies for {len(prompts)} prompts")
        return replies, None

    def _stop_reason(self, state: GEPAState, start: float) -> str | None:
        cfg = self.config
        if self._stop_requested:
            self._stop_requested = False
            return "requested"
        if cfg.max_metric_calls is not None and state.metric_calls >= cfg.max_metric_calls:
            return "max_metric_calls"
        if cfg.strict_budget and self._proposals_that_fit(state) < 1:
            return "max_metric_calls"
        if (cfg.max_consecutive_reflection_failures is not None
                and self.consecutive_reflection_failures >= cfg.max_consecutive_reflection_failures):
            return "reflection_failures"
        if cfg.max_iterations is not None and state.iteration >= cfg.max_iterations:
            return "max_iterations"
        if (cfg.max_iterations_without_improvement is not None
                and state.iterations_without_improvement >= cfg.max_iterations_without_improvement):
            return "no_improvement"
        if cfg.max_seconds is not None and time.monotonic() - start >= cfg.max_seconds:
            return "max_seconds"
        return None

    def _remaining(self, state: GEPAState) -> float:
        """Rollouts left under a strict budget (unbounded otherwise)."""
        if not self.config.strict_budget:
            return math.inf
        return self.config.max_metric_calls - state.metric_calls

    def _proposals_that_fit(self, state: GEPAState) -> int:
        """Proposals this iteration: all P, or under a strict budget as many as leave room for the parents'
        and children's minibatch rollouts plus one accepted child's full evaluation."""
        p = self.config.proposals_per_iteration
        if not self.config.strict_budget:
            return p
        per_proposal = 2 * self.config.minibatch_size
        return max(0, min(p, int(self._remaining(state) - len(self.val_ids)) // per_proposal))

    def _end_iteration(self, state: GEPAState, events: list[Event], calls_before: tuple[int, int], bar: Any) -> None:
        best = max(state.aggregates())
        if best > state.best_aggregate:
            state.best_aggregate, state.iterations_without_improvement = best, 0
        else:
            state.iterations_without_improvement += 1
        for e in events:
            e["metric_calls"] = state.metric_calls
            self._emit(e)
        self._emit({
            "type": "iteration", "iteration": state.iteration, "metric_calls": state.metric_calls,
            "num_candidates": len(state.candidates), "best_aggregate": state.best_aggregate,
            "front_size": len(state.pareto_front()),
            "accepted": sum(e["status"] == "accepted" for e in events),
            "evaluate_calls": self.evaluate_calls - calls_before[0],
            "reflection_calls": self.reflection_calls - calls_before[1],
        })
        self._write_outputs(state)
        if bar is not None:
            bar.update(state.metric_calls - bar.n)

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _write_outputs(self, state: GEPAState) -> None:
        if self.config.output_dir is not None:
            save_lineage(state, os.path.join(self.config.output_dir, "candidates.json"))
            write_json_atomic(os.path.join(self.config.output_dir, "state.json"), state.to_dict())

    def _progress_bar(self, state: GEPAState) -> Any:
        if not self.config.progress_bar:
            return None
        from tqdm.auto import tqdm  # optional dependency: only needed when the bar is asked for

        return tqdm(total=self.config.max_metric_calls, initial=state.metric_calls, unit="rollouts", desc="GEPA")
