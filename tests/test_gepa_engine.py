"""The batched GEPA engine: parity with the reference, batching, acceptance, merge, budget, resume, outputs.

Parity with the reference `gepa` package's own engine (gepa.optimize) is checked directly: both are driven by
the same scripted evaluation and reflection (tests/gepa_helpers.py) and the same seed, and with one proposal
per iteration they must pick the same parents and minibatches, evaluate the same (candidate, item) pairs in the
same order, accept the same children and end with identical candidates, lineage, scores and budget. This works
because our search draws from its `random.Random` exactly where gepa draws from its shared one (parent
selection, then the minibatch sampler's epoch shuffles) and builds its per-item best sets with the same
operations, so even tie-breaks that depend on set iteration order agree. Merge is excluded from engine parity:
its RNG use is ours (its rules are tested on their own below).
"""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from fst_jax.gepa import merge as merging
from fst_jax.gepa.engine import GEPAConfig, GEPAEngine, GEPAResult
from fst_jax.gepa.reflection import ReflectionLMError
from fst_jax.gepa.state import EvalResult, GEPAState, StateInvariantError
from gepa_helpers import ScriptedEvaluate, ScriptedReflection, one_result, reflect_reply

import gepa  # noqa: E402  (the oracle: a missing gepa must fail these tests, never skip them)
from gepa.core.adapter import EvaluationBatch  # noqa: E402
from gepa.core.data_loader import ListDataLoader  # noqa: E402
from gepa.gepa_utils import select_program_candidate_from_pareto_front  # noqa: E402
from gepa.strategies.batch_sampler import EpochShuffledBatchSampler  # noqa: E402
from gepa.strategies.instruction_proposal import InstructionProposalSignature  # noqa: E402

TRAIN, VAL = list(range(10)), list(range(100, 108))
ONE, THREE = {"p": "Solve it."}, {"a": "Think.", "b": "Answer.", "c": "Check."}


def run_ours(seeds, budget, seed, train=TRAIN, val=VAL, **config):
    evaluate, reflection, events = ScriptedEvaluate(), ScriptedReflection(), []
    engine = GEPAEngine(evaluate, reflection, train, val, GEPAConfig(max_metric_calls=budget, seed=seed, **config),
                        on_event=events.append)
    result = engine.run(engine.init_state(seeds))
    return result, evaluate, reflection, events


# ---- parity with the reference ---------------------------------------------------------------------------


class ScriptedGepaAdapter:
    """gepa adapter over the same scripted evaluation; records every evaluated (candidate, item) pair."""

    propose_new_texts = None

    def __init__(self):
        self.pairs = []

    def evaluate(self, batch, candidate, capture_traces=False):
        results = [one_result(candidate, item) for item in batch]
        self.pairs += [(dict(candidate), item) for item in batch]
        traces = [{"item": i, "out": r.output, "fb": r.feedback} for i, r in zip(batch, results)]
        return EvaluationBatch(outputs=[r.output for r in results], scores=[r.score for r in results],
                               trajectories=traces if capture_traces else None)

    def make_reflective_dataset(self, candidate, eval_batch, components):
        records = [{"Inputs": str(t["item"]), "Generated Outputs": t["out"], "Feedback": t["fb"]}
                   for t in eval_batch.trajectories]
        return {c: records for c in components}


class Silent:
    def log(self, *args, **kwargs):
        pass


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("seeds,budget", [(ONE, 400), (THREE, 400)])
def test_one_proposal_per_iteration_matches_gepa_engine(seeds, budget, seed):
    adapter = ScriptedGepaAdapter()
    theirs = gepa.optimize(seed_candidate=seeds, trainset=TRAIN, valset=VAL, adapter=adapter,
                           reflection_lm=reflect_reply, max_metric_calls=budget, seed=seed, logger=Silent(),
                           track_best_outputs=False)
    ours, evaluate, _, events = run_ours(seeds, budget, seed)
    assert [p for call, _ in evaluate.calls for p in call] == adapter.pairs  # same rollouts, same order
    assert ours.state.candidates == theirs.candidates
    assert ours.state.parents == [[p for p in ps if p is not None] for ps in theirs.parents]
    assert ours.state.scores == theirs.val_subscores
    assert ours.state.metric_calls == theirs.total_metric_calls
    assert ours.state.discovered_at == theirs.discovery_eval_counts
    assert len(ours.state.candidates) > 3 and any(e.get("status") == "skipped" for e in events)


def test_long_search_matches_gepa_engine_with_large_tied_fronts():
    adapter = ScriptedGepaAdapter()
    train, val = list(range(13)), list(range(50, 70))
    theirs = gepa.optimize(seed_candidate=ONE, trainset=train, valset=val, adapter=adapter,
                           reflection_lm=reflect_reply, max_metric_calls=2500, seed=3, logger=Silent(),
                           track_best_outputs=False)
    ours, evaluate, _, _ = run_ours(ONE, 2500, 3, train, val)
    assert ours.state.candidates == theirs.candidates and len(theirs.candidates) > 50
    assert [p for call, _ in evaluate.calls for p in call] == adapter.pairs
    assert max(len(o) for o in ours.state.front_order.values()) > 8  # big tie sets: set order matters


def sequential_reference(seeds, budget, seed, train=TRAIN, val=VAL):
    """A straightforward one-proposal loop built from the reference's primitives (selection, sampler, extractor)."""
    rng = random.Random(seed)
    sampler, loader = EpochShuffledBatchSampler(3, rng=rng), ListDataLoader(train)
    names = list(seeds)
    cands, parents, scores, pointer, best, fronts = [], [], [], [], {}, {}

    def add(cand, ps, sc):
        cands.append(cand), parents.append(ps), scores.append(sc)
        pointer.append(max((pointer[p] for p in ps), default=0))
        for k, s in sc.items():
            if s > best.get(k, -math.inf):
                best[k], fronts[k] = s, {len(cands) - 1}
            elif s == best[k]:
                fronts[k].add(len(cands) - 1)

    def ev(cand, ids, data):
        return [one_result(cand, data[i]).score for i in ids]

    add(dict(seeds), [], dict(enumerate(ev(seeds, range(len(val)), val))))
    calls = len(val)

    class Iteration:
        i = -1

    while calls < budget:
        Iteration.i += 1
        aggregates = [sum(s.values()) / len(s) for s in scores]
        parent = select_program_candidate_from_pareto_front({k: set(v) for k, v in fronts.items()}, aggregates, rng)
        minibatch = sampler.next_minibatch_ids(loader, Iteration)
        results = [one_result(cands[parent], train[i]) for i in minibatch]
        calls += len(minibatch)
        if all(r.score >= 1.0 for r in results):
            continue
        comp = names[pointer[parent]]
        pointer[parent] = (pointer[parent] + 1) % len(names)
        prompt = f"```\n{cands[parent][comp]}\n```\n" + "\n".join(r.feedback for r in results)
        text = InstructionProposalSignature.output_extractor(reflect_reply(prompt))["new_instruction"]
        child = {**cands[parent], comp: text}
        after = ev(child, minibatch, train)
        calls += len(minibatch)
        if sum(after) > sum(r.score for r in results):
            add(child, [parent], dict(enumerate(ev(child, range(len(val)), val))))
            calls += len(val)
    return cands, parents, scores, calls


@pytest.mark.parametrize("seed", range(6))
def test_one_proposal_per_iteration_matches_sequential_loop(seed):
    cands, parents, scores, calls = sequential_reference(THREE, 500, seed)
    ours, _, _, _ = run_ours(THREE, 500, seed)
    assert (ours.state.candidates, ours.state.parents, ours.state.scores, ours.state.metric_calls) == (
        cands, parents, scores, calls)


# ---- batching ----------------------------------------------------------------------------------------------


def test_eight_proposals_use_one_evaluate_call_per_phase():
    ours, evaluate, reflection, events = run_ours(ONE, 3000, 0, train=list(range(30)), val=list(range(200, 216)),
                                                  proposals_per_iteration=8)
    iterations = [e for e in events if e["type"] == "iteration"]
    assert len(iterations) >= 5
    assert 1 + sum(e["evaluate_calls"] for e in iterations) == len(evaluate.calls)
    for e in iterations:
        assert 1 <= e["evaluate_calls"] <= 3 and e["reflection_calls"] <= 1
    assert len(reflection.calls) == sum(e["reflection_calls"] for e in iterations)
    # Phase 1 of every iteration: one call with traces covering all 8 parents' minibatches.
    phase1 = [call for call, traces in evaluate.calls if traces]
    assert len(phase1) == len(iterations) and all(len(c) == 8 * 3 for c in phase1)
    proposals = [e for e in events if e["type"] == "proposal"]
    assert len(proposals) == 8 * len(iterations)
    # Each of the 8 proposals of an iteration gets its own fresh minibatch chunk (30 items = 10 chunks).
    first = [tuple(e["minibatch"]) for e in proposals if e["iteration"] == 1]
    assert len(set(first)) == 8
    accepted = [e for e in proposals if e["status"] == "accepted"]
    assert len(accepted) >= 5 and len(ours.state.candidates) == 1 + len(accepted)
    # The number reported in the closing note.
    per_iteration = [e["evaluate_calls"] for e in iterations]
    print(f"\nP=8: evaluate calls per iteration: max {max(per_iteration)}, mean {statistics.mean(per_iteration):.2f}, "
          f"{len(iterations)} iterations, {len(proposals)} proposals, 1 reflection call per iteration")
    assert max(per_iteration) == 3


def test_batched_search_improves_and_keeps_invariants():
    ours, _, _, _ = run_ours(THREE, 2000, 1, proposals_per_iteration=4)
    ours.state.check_invariants()
    assert ours.state.best_aggregate > ours.state.aggregate(0)


# ---- acceptance, skipping, budget ---------------------------------------------------------------------------


def table_evaluate(table):
    """Scores from {text: [score per item index]}; records calls."""
    calls = []

    def evaluate(pairs, capture_traces):
        calls.append(pairs)
        return [EvalResult(score=table[c["p"]][item], output="o", feedback=f"item={item}") for c, item in pairs]

    evaluate.calls = calls
    return evaluate


class FixedReflection:
    def __init__(self, reply):
        self.reply, self.calls = reply, 0

    def complete(self, prompts):
        self.calls += 1
        return [self.reply for _ in prompts]


@pytest.mark.parametrize("child_scores,accepted", [([1.0, 0.0, 0.0], False), ([0.5, 0.5, 0.5], True),
                                                   ([0.0, 0.0, 0.0], False), ([1.0, 0.0, 0.5], True)])
def test_child_accepted_only_when_minibatch_sum_strictly_greater(child_scores, accepted):
    evaluate = table_evaluate({"seed": [1.0, 0.0, 0.0], "child": child_scores})
    events = []
    engine = GEPAEngine(evaluate, FixedReflection("```\nchild\n```"), [0, 1, 2],
                        config=GEPAConfig(max_iterations=1), on_event=events.append)
    result = engine.run(engine.init_state({"p": "seed"}))
    (proposal,) = [e for e in events if e["type"] == "proposal"]
    assert proposal["status"] == ("accepted" if accepted else "rejected")
    assert len(result.state.candidates) == (2 if accepted else 1)
    # Rollouts: seed on valset (3) + parent minibatch (3) + child minibatch (3) [+ child on valset (3)].
    assert result.state.metric_calls == (12 if accepted else 9)
    assert len(evaluate.calls) == (4 if accepted else 3)


def test_parents_perfect_on_the_minibatch_are_skipped():
    evaluate = table_evaluate({"seed": [1.0, 1.0, 1.0]})
    reflection, events = FixedReflection("```\nchild\n```"), []
    engine = GEPAEngine(evaluate, reflection, [0, 1, 2], config=GEPAConfig(max_iterations=4), on_event=events.append)
    result = engine.run(engine.init_state({"p": "seed"}))
    assert reflection.calls == 0 and len(result.state.candidates) == 1
    assert [e["status"] for e in events if e["type"] == "proposal"] == ["skipped"] * 4
    assert result.state.metric_calls == 3 + 4 * 3  # parents' minibatch rollouts still count
    # With skipping off (or no perfect score), the same parent is reflected on.
    engine = GEPAEngine(table_evaluate({"seed": [1.0, 1.0, 1.0], "child": [1.0] * 3}), reflection, [0, 1, 2],
                        config=GEPAConfig(max_iterations=1, perfect_score=None))
    engine.run(engine.init_state({"p": "seed"}))
    assert reflection.calls == 1


@pytest.mark.parametrize("budget", [8, 30, 101, 250])
def test_no_iteration_starts_once_the_budget_is_spent(budget):
    result, evaluate, _, events = run_ours(ONE, budget, 0, proposals_per_iteration=2)
    marks = [e["metric_calls"] for e in events if e["type"] in ("init", "iteration")]
    assert all(m < budget for m in marks[:-1]) and marks[-1] >= budget  # started only while under budget
    assert result.stop_reason == "max_metric_calls"
    assert result.state.metric_calls == sum(len(call) for call, _ in evaluate.calls)


def test_other_stop_conditions():
    result, _, _, events = run_ours(ONE, None, 0, max_iterations=4)
    assert result.stop_reason == "max_iterations" and result.state.iteration == 4
    result, _, _, _ = run_ours(ONE, None, 0, max_seconds=0.0)
    assert result.stop_reason == "max_seconds" and result.state.iteration == 0
    # Children that never beat the seed: stops after N iterations without a better best aggregate.
    engine = GEPAEngine(table_evaluate({"seed": [0.5] * 3, "child": [0.0] * 3}), FixedReflection("```\nchild\n```"),
                        [0, 1, 2], config=GEPAConfig(max_iterations_without_improvement=3))
    result = engine.run(engine.init_state({"p": "seed"}))
    assert result.stop_reason == "no_improvement" and result.state.iteration == 3
    with pytest.raises(ValueError, match="needs a stop condition"):
        GEPAConfig()


# ---- merge -------------------------------------------------------------------------------------------------


def merge_state():
    state = GEPAState(components=["a", "b"])
    state.add_candidate({"a": "A0", "b": "B0"}, [], {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0})
    state.add_candidate({"a": "A1", "b": "B0"}, [0], {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0})
    state.add_candidate({"a": "A0", "b": "B2"}, [0], {0: 0.0, 1: 1.0, 2: 1.0, 3: 0.0})
    return state


def test_merge_takes_each_changed_component():
    state = merge_state()
    plan = merging.find_merge(state, random.Random(0))
    assert (plan.parent_a, plan.parent_b, plan.ancestor) == (1, 2, 0)
    assert plan.texts == {"a": "A1", "b": "B2"}
    assert merging.find_merge(state, random.Random(0)) is None  # the same merge is never tried twice


def test_merge_text_rules():
    anc = {"x": "0", "y": "0", "z": "0"}
    texts, prov = merging.merge_texts(anc, {"x": "1", "y": "0", "z": "s"}, {"x": "0", "y": "2", "z": "s"},
                                      0.5, 0.6, (1, 2), random.Random(0))
    assert texts == {"x": "1", "y": "2", "z": "s"} and prov == (1, 2, 1)
    # Both changed the same component differently: the better aggregate's text.
    two = ({"x": "0", "y": "0"}, {"x": "1", "y": "1"}, {"x": "2", "y": "0"})
    assert merging.merge_texts(*two, 0.9, 0.1, (1, 2), random.Random(0)) == ({"x": "1", "y": "1"}, (1, 1))
    assert merging.merge_texts(*two, 0.1, 0.9, (1, 2), random.Random(0)) == ({"x": "2", "y": "1"}, (2, 1))
    tied = {merging.merge_texts(*two, 0.5, 0.5, (1, 2), random.Random(s))[0]["x"] for s in range(20)}
    assert tied == {"1", "2"}  # equal aggregates: a random one of the two
    # Nothing changed by exactly one of them: no merge.
    assert merging.merge_texts(anc, {"x": "1", "y": "0", "z": "0"}, {"x": "1", "y": "0", "z": "0"}, 1, 1, (1, 2),
                               random.Random(0)) is None


def test_merge_pair_rules():
    state = merge_state()
    # An ancestor better than a descendant disqualifies the triple.
    state.scores[0] = {0: 0.9, 1: 0.9, 2: 0.9, 3: 1.0}
    state.best_score, state.front_order = {}, {}
    for cid, sc in enumerate(list(state.scores)):
        for item, s in sc.items():
            if s > state.best_score.get(item, -1):
                state.best_score[item], state.front_order[item] = s, [cid]
            elif s == state.best_score[item]:
                state.front_order[item].append(cid)
    assert merging.find_merge(state, random.Random(0)) is None
    # A descendant of the other candidate is never its merge partner.
    assert merging.ancestors([[], [0], [1]], 2) == {0, 1}


def test_merge_acceptance_and_stratified_items():
    assert merging.merge_accepted([1, 1], [1, 0], [0, 1]) and merging.merge_accepted([1, 0], [1, 0], [0, 0])
    assert not merging.merge_accepted([0, 0], [1, 0], [0, 0])
    a = {0: 1.0, 1: 0.0, 2: 0.5, 3: 1.0, 4: 0.0}
    b = {0: 0.0, 1: 1.0, 2: 0.5, 3: 0.0, 5: 1.0}
    items = merging.stratified_items(a, b, 3, random.Random(0))
    assert len(items) == 3 and {a[i] > b[i] for i in items} == {True, False} and 2 in items
    assert merging.stratified_items(a, {9: 1.0}, 3, random.Random(0)) == []


def test_engine_runs_merges_when_enabled():
    result, evaluate, _, events = run_ours(THREE, 1500, 2, use_merge=True)
    merges = [e for e in events if e["type"] == "merge"]
    assert merges and all(len(e["parents"]) == 2 for e in merges)
    for e in merges:
        if e["status"] == "accepted":
            assert result.state.parents[e["candidate"]] == e["parents"]
    off, _, _, off_events = run_ours(THREE, 1500, 2)
    assert not [e for e in off_events if e["type"] == "merge"]  # off by default


# ---- save / resume ------------------------------------------------------------------------------------------


# seed 2 with merge: merges accepted at ~104, ~162 and ~223 rollouts, so the split at 130 falls between two.
@pytest.mark.parametrize("p,use_merge,seed,split", [(1, False, 4, 400), (3, False, 4, 250), (1, True, 2, 130)])
def test_resume_through_json_equals_uninterrupted(p, use_merge, seed, split):
    whole, _, _, whole_events = run_ours(THREE, 900, seed, proposals_per_iteration=p, use_merge=use_merge)

    first, _, _, first_events = run_ours(THREE, split, seed, proposals_per_iteration=p, use_merge=use_merge)
    saved = json.loads(json.dumps(first.state.to_dict()))
    events = []
    engine = GEPAEngine(ScriptedEvaluate(), ScriptedReflection(), TRAIN, VAL,
                        GEPAConfig(max_metric_calls=900, seed=seed, proposals_per_iteration=p, use_merge=use_merge),
                        on_event=events.append)
    resumed = engine.run(GEPAState.from_dict(saved))
    assert resumed.state.to_dict() == whole.state.to_dict()
    assert first_events + events == whole_events
    assert first.state.iteration > 2 and resumed.state.iteration > first.state.iteration
    if use_merge:
        assert [e for e in events if e["type"] == "merge" and e["status"] == "accepted"]


def test_state_rejects_unknown_schema_and_corruption():
    result, _, _, _ = run_ours(ONE, 300, 0)
    d = result.state.to_dict()
    with pytest.raises(ValueError, match="schema_version=99"):
        GEPAState.from_dict({**d, "schema_version": 99})
    state = GEPAState.from_dict(d)
    state.front_order[next(iter(state.front_order))].append(0 if 0 not in state.pareto_front() else 1)
    with pytest.raises(StateInvariantError, match="best set"):
        state.check_invariants()
    state = GEPAState.from_dict(d)
    state.parents[1] = [5]
    with pytest.raises(StateInvariantError, match="invalid parents"):
        state.check_invariants()


# ---- results, events, outputs -----------------------------------------------------------------------------


def test_population_is_top_k_of_front_with_ties_by_coverage():
    state = GEPAState(components=["p"])
    for name, sc in [("s", {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}), ("a", {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0}),
                     ("b", {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}), ("c", {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}),
                     ("d", {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5})]:
        state.add_candidate({"p": name}, [], sc)
    # Front: a (items 0,1), b (2,3), c (0,2,3). d and s are best nowhere.
    assert state.pareto_front() == [1, 2, 3]
    assert state.population_ids(3) == [3, 1, 2]  # c 0.75; a, b tie at 0.5 -> a covers 2 items, b covers 2 -> age
    assert state.population_ids(5) == [3, 1, 2]
    assert state.population_ids(5, fill=True) == [3, 1, 2, 4, 0]
    state.add_candidate({"p": "e"}, [], {0: 0.0, 1: 1.0, 2: 0.0, 3: 1.0})  # ties a and b at 0.5, covers 2
    assert state.population_ids(2) == [3, 1]


def test_population_rule_nondominated_drops_a_prompt_best_only_by_ties_at_zero():
    state = GEPAState(components=["p"])
    for name, sc in [("seed", {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}), ("a", {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0}),
                     ("b", {0: 0.0, 1: 0.0, 2: 1.0, 3: 0.0})]:
        state.add_candidate({"p": name}, [], sc)
    # item 3: everyone ties at zero, so the seed prompt is on the front though it earns nothing anywhere
    assert state.pareto_front() == [0, 1, 2] and state.non_dominated() == [1, 2]
    assert state.population_ids(4) == [1, 2, 0]
    assert state.population_ids(4, rule="nondominated") == [1, 2]
    assert state.population_ids(4, fill=True, rule="nondominated") == [1, 2, 0]
    result = GEPAResult(state, "budget")
    assert result.rollout_population_ids(4) == [1, 2, 0, 1]
    assert result.rollout_population_ids(4, rule="nondominated") == [1, 2, 1, 2]
    with pytest.raises(ValueError, match="population rule"):
        state.population_ids(2, rule="best")
    # all tied at zero on every item: the front is everyone, the non-dominated set one candidate
    flat = GEPAState(components=["p"])
    for name in ("seed", "x", "y"):
        flat.add_candidate({"p": name}, [], {0: 0.0, 1: 0.0})
    assert flat.pareto_front() == [0, 1, 2] and len(flat.population_ids(3, rule="nondominated")) == 1


def test_events_lineage_json_and_progress_bar(tmp_path, capsys):
    result, _, _, events = run_ours(ONE, 300, 1, output_dir=str(tmp_path), progress_bar=True)
    proposal = next(e for e in events if e["type"] == "proposal" and e["status"] == "accepted")
    for key in ("iteration", "parent", "minibatch", "scores_before", "scores_after", "reason", "new_texts",
                "candidate", "metric_calls"):
        assert key in proposal
    json.dumps(events)  # events are JSON-ready for the metrics stream
    lineage = json.loads((tmp_path / "candidates.json").read_text())
    assert [c["parents"] for c in lineage] == result.state.parents
    assert lineage[proposal["candidate"]]["components"] == result.state.candidates[proposal["candidate"]]
    restored = GEPAState.from_dict(json.loads((tmp_path / "state.json").read_text()))
    assert restored.to_dict() == result.state.to_dict()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # atomic writes leave nothing behind
    assert "rollouts" in capsys.readouterr().err
    assert result.population(2) == [result.state.candidates[c] for c in result.state.population_ids(2)]


def test_unusable_reflections_are_rejected_with_reasons():
    evaluate, events = ScriptedEvaluate(), []
    engine = GEPAEngine(evaluate, ScriptedReflection(bad_every=2), TRAIN, VAL, GEPAConfig(max_metric_calls=600),
                        on_event=events.append)
    engine.run(engine.init_state(ONE))
    reasons = [e["reason"] for e in events if e["type"] == "proposal" and e["status"] == "rejected"]
    assert any(r.startswith("p: unfenced") for r in reasons)
    # Rejected reflections cost no child rollouts: every child evaluated came from a usable reply.
    assert all("forgot" not in c["p"] for call, _ in evaluate.calls for c, _ in call)


def test_reflection_failure_rejects_the_iteration_and_search_goes_on():
    class Flaky:
        def __init__(self):
            self.n = 0

        def complete(self, prompts):
            self.n += 1
            if self.n == 1:
                raise ReflectionLMError("endpoint down")
            return [reflect_reply(p) for p in prompts]

    events = []
    engine = GEPAEngine(ScriptedEvaluate(), Flaky(), TRAIN, VAL, GEPAConfig(max_iterations=6), on_event=events.append)
    engine.run(engine.init_state(ONE))
    reasons = [e["reason"] for e in events if e["type"] == "proposal"]
    assert any(r and "reflection_error: endpoint down" in r for r in reasons)
    assert any(e["type"] == "proposal" and e["status"] == "accepted" for e in events)


def test_bad_evaluate_output_is_a_clear_error():
    engine = GEPAEngine(lambda pairs, traces: [], ScriptedReflection(), TRAIN, config=GEPAConfig(max_iterations=1))
    with pytest.raises(ValueError, match="returned 0 results for 10"):
        engine.init_state(ONE)
    engine = GEPAEngine(lambda pairs, traces: [EvalResult(float("nan"))] * len(pairs), ScriptedReflection(), TRAIN,
                        config=GEPAConfig(max_iterations=1))
    with pytest.raises(ValueError, match="finite"):
        engine.init_state(ONE)
    with pytest.raises(ValueError, match="same components"):
        GEPAEngine(ScriptedEvaluate(), ScriptedReflection(), TRAIN, config=GEPAConfig(max_iterations=1)).init_state(
            [ONE, THREE])


def test_several_seed_candidates_start_the_population():
    seeds = [{"p": "Solve it."}, {"p": "Think first."}, {"p": "Be brief."}]
    result, evaluate, _, _ = run_ours(seeds, 500, 0, proposals_per_iteration=2)
    assert result.state.candidates[:3] == seeds and result.state.parents[:3] == [[], [], []]
    assert len(evaluate.calls[0][0]) == 3 * len(VAL)  # all seeds scored in one call


def proposals_of(events):
    return [e for e in events if e["type"] == "proposal"]


def test_config_fields_take_effect():
    _, _, _, events = run_ours(THREE, 300, 0, minibatch_size=2, component_selection="all")
    assert all(len(e["minibatch"]) == 2 for e in proposals_of(events))
    assert all(e["components"] == ["a", "b", "c"] for e in proposals_of(events) if e["status"] != "skipped")
    seeds = [{"p": "Solve it."}, {"p": "Be brief."}, {"p": "Think first."}]
    best = max(range(3), key=lambda c: sum(one_result(seeds[c], v).score for v in VAL))
    _, _, _, events = run_ours(seeds, 60, 0, selection="current_best")
    assert proposals_of(events)[0]["parent"] == best
    _, _, _, events = run_ours(seeds, 300, 0, selection="epsilon_greedy", epsilon=1.0)
    assert len({e["parent"] for e in proposals_of(events)}) >= 3  # uniform picks, not only the best
    _, _, _, events = run_ours(ONE, 300, 0, skip_perfect=False)
    assert not [e for e in proposals_of(events) if e["status"] == "skipped"]
    _, _, reflection, events = run_ours(ONE, 200, 0, reflection_template="Fix:\n```\n<current_text>\n```\n<records>")
    assert reflection.calls[0][0].startswith("Fix:\n```\nSolve it.\n```\n# Example 1")
    _, _, _, events = run_ours(ONE, 200, 0, max_text_chars=12)
    assert any(e["reason"].startswith("p: too_long") for e in proposals_of(events) if e["reason"])
    result, _, _, events = run_ours(THREE, 1500, 2, use_merge=True, max_merge_invocations=1, merge_items=2)
    merges = [e for e in events if e["type"] == "merge"]
    assert sum(e["status"] == "accepted" for e in merges) == 1 and all(len(e["minibatch"]) == 2 for e in merges)


def test_improvement_or_equal_acceptance_and_request_stop():
    events = []
    engine = GEPAEngine(table_evaluate({"seed": [1.0, 0.0, 0.0], "child": [0.0, 1.0, 0.0]}),
                        FixedReflection("```\nchild\n```"), [0, 1, 2],
                        config=GEPAConfig(max_iterations=5, acceptance="improvement_or_equal"),
                        on_event=lambda e: (events.append(e), e["type"] == "iteration" and engine.request_stop()))
    result = engine.run(engine.init_state({"p": "seed"}))
    assert proposals_of(events)[0]["status"] == "accepted" and result.stop_reason == "requested"
    assert result.state.iteration == 1
    with pytest.raises(ValueError, match="choose one of strict_improvement, improvement_or_equal"):
        GEPAConfig(max_iterations=1, acceptance="better")


def test_resume_with_other_data_is_a_clear_error():
    result, _, _, _ = run_ours(ONE, 100, 0)
    engine = GEPAEngine(ScriptedEvaluate(), ScriptedReflection(), {f"x{i}": i for i in range(10)}, VAL,
                        GEPAConfig(max_metric_calls=200))
    with pytest.raises(ValueError, match="resume with the same trainset and valset"):
        engine.run(GEPAState.from_dict(result.state.to_dict()))
