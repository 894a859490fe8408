"""The GEPA budget of an FST cycle at the recipe's sizes: it buys proposals, and a cycle never exceeds it.

A scripted evaluator and reflector (tests/gepa_helpers.py) stand in for the model; cycles are chained the way
fst.py chains them: each cycle's search is seeded with the previous cycle's rollout population (the Pareto
front, repeated by rank to K prompts) and runs on a fresh window of T·B problems.
"""

from __future__ import annotations

import pytest

from fst_jax.gepa.engine import GEPAConfig, GEPAEngine
from fst_jax.gepa.reflection import CallableReflectionLM, ReflectionLMError
from gepa_helpers import ScriptedEvaluate, ScriptedReflection

T, B, BUDGET, P, MINIBATCH = 6, 32, 960, 8, 3
WINDOW = T * B


def run_cycles(K, cycles=4, strict=True, seed_budget=WINDOW, fill_with_dominated=False):
    population, records = [{"p": "Solve it."}], []
    for cycle in range(cycles):
        window = list(range(cycle * 1000, cycle * 1000 + WINDOW))  # a fresh window each cycle
        evaluate, events = ScriptedEvaluate(), []
        config = GEPAConfig(max_metric_calls=BUDGET, proposals_per_iteration=P, minibatch_size=MINIBATCH,
                            seed=cycle, seed_budget=seed_budget, strict_budget=strict)
        engine = GEPAEngine(evaluate, ScriptedReflection(), window, window, config, on_event=events.append)
        result = engine.run(engine.init_state(list({c["p"]: c for c in population}.values())))
        proposals = [e for e in events if e["type"] == "proposal"]
        records.append(dict(
            seeds=len({c["p"] for c in population}), metric_calls=result.state.metric_calls,
            rollouts=sum(len(pairs) for pairs, _ in evaluate.calls), calls=dict(result.state.calls),
            proposals=len(proposals), skipped=sum(e["status"] == "skipped" for e in proposals),
            accepted=sum(e["status"] == "accepted" for e in proposals), front=set(result.pareto_front),
            population_ids=result.rollout_population_ids(K)))
        population = result.rollout_population(K, fill_with_dominated)
        assert len(population) == K
    return records


@pytest.mark.parametrize("K", [4, 8])
def test_every_cycle_proposes_within_its_budget(K):
    records = run_cycles(K)
    assert any(r["seeds"] == K for r in records[1:]), "later cycles must start from a carried-over population"
    for r in records:
        assert r["proposals"] >= 8 and r["proposals"] - r["skipped"] >= 1, r  # skipped: parent perfect there
        assert r["metric_calls"] <= BUDGET and r["metric_calls"] == r["rollouts"] == sum(r["calls"].values()), r
        assert r["calls"]["seed"] <= WINDOW  # the seeds share one pass over the window, whatever K is
        # the rest buys proposals (minibatch rollouts) and full evaluations of accepted children
        assert r["calls"]["minibatch"] + r["calls"]["full_eval"] >= BUDGET - WINDOW - (2 * P * MINIBATCH + WINDOW)
        assert r["calls"]["full_eval"] == WINDOW * r["accepted"]
        assert set(r["population_ids"]) <= r["front"]  # front members only


def test_without_the_seed_allowance_k8_never_proposes_and_without_the_cap_it_overshoots():
    # what the accounting replaces: K = 8 seeds scored on the whole window cost 1,536 > 960 rollouts
    assert all(r["proposals"] == 0 for r in run_cycles(8, cycles=3, seed_budget=None)[1:])
    loose = run_cycles(4, cycles=2, strict=False)
    assert max(r["metric_calls"] for r in loose) > BUDGET  # the reference rule: the last iteration overshoots


def test_carried_seeds_share_one_pass_on_the_same_items():
    seeds = [{"p": f"prompt {i}"} for i in range(8)]
    window = list(range(WINDOW))
    engine = GEPAEngine(ScriptedEvaluate(), ScriptedReflection(), window, window,
                        GEPAConfig(max_metric_calls=BUDGET, seed=5, seed_budget=WINDOW, strict_budget=True))
    state = engine.init_state(seeds)
    items = [sorted(s) for s in state.scores]
    assert all(len(i) == WINDOW // 8 for i in items) and all(i == items[0] for i in items)
    assert state.metric_calls == state.calls["seed"] == WINDOW
    one = GEPAEngine(ScriptedEvaluate(), ScriptedReflection(), window, window,
                     GEPAConfig(max_metric_calls=BUDGET, seed=5, seed_budget=WINDOW)).init_state(seeds[0])
    assert sorted(one.scores[0]) == window  # a single seed: the whole window, as the reference scores it


def test_population_repeats_front_members_by_rank_or_tops_up_with_dominated():
    records = run_cycles(8, cycles=2)
    r = records[-1]
    ranked = list(dict.fromkeys(r["population_ids"]))
    if len(ranked) < 8:  # repeated in rank order: best first, each a whole share of G
        assert r["population_ids"] == [ranked[i % len(ranked)] for i in range(8)]


def test_consecutive_reflection_failures_stop_the_search():
    def down(prompts):
        raise ReflectionLMError("connection refused")

    window = list(range(30))
    engine = GEPAEngine(ScriptedEvaluate(), CallableReflectionLM(down), window, window,
                        GEPAConfig(max_metric_calls=10_000, max_consecutive_reflection_failures=3, seed=0))
    engine.consecutive_reflection_failures = 1  # carried over from an earlier search
    result = engine.run(engine.init_state({"p": "Solve it."}))
    assert result.stop_reason == "reflection_failures"
    assert engine.reflection_failures == 2 and engine.consecutive_reflection_failures == 3
    assert "connection refused" in engine.last_reflection_error
