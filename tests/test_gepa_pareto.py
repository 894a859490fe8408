"""Pareto logic and parent selection, with the reference `gepa` package as the oracle.

Random sparse score matrices with many ties (scores drawn from a few levels, items left unscored at random) go
through both our functions and gepa's (gepa_utils.remove_dominated_programs / find_dominator_programs /
select_program_candidate_from_pareto_front); survivors, multiplicities and seeded parent draws must agree.
"""

from __future__ import annotations

import math
import random

import pytest

gepa_utils = pytest.importorskip("gepa.gepa_utils")

from fst_jax.gepa.minibatch import EpochShuffledSampler  # noqa: E402
from fst_jax.gepa.pareto import front_candidates, pareto_multiplicities, remove_dominated  # noqa: E402
from fst_jax.gepa.selection import (  # noqa: E402
    CurrentBestSelector,
    EpsilonGreedySelector,
    ParetoSelector,
    make_selector,
)
from fst_jax.gepa.state import GEPAState  # noqa: E402

NUM_MATRICES = 600


def random_matrix(rng: random.Random):
    """(item_best, aggregate list, per-candidate sparse scores) built the way the search builds them."""
    n_cands = rng.randint(1, 40)
    n_items = rng.randint(1, 12)
    levels = rng.choice([[0.0, 1.0], [0.0, 0.5, 1.0], [0.0, 0.25, 0.5, 0.75, 1.0]])
    density = rng.choice([0.3, 0.7, 1.0])
    scores = []
    for c in range(n_cands):
        row = {i: rng.choice(levels) for i in range(n_items) if c == 0 or rng.random() < density}
        scores.append(row)
    state = GEPAState(components=["p"])
    for row in scores:
        state.add_candidate({"p": "x"}, [], row)
    agg = state.aggregates()
    # Sometimes use a coarse aggregate so that many candidates tie on it too.
    if rng.random() < 0.3:
        agg = [math.floor(a * 2) / 2 if a != -math.inf else a for a in agg]
    return state.item_best(), agg, scores


def gepa_survivors(item_best, agg):
    return set(gepa_utils.find_dominator_programs({k: set(v) for k, v in item_best.items()}, agg))


def gepa_multiplicities(item_best, agg):
    filtered = gepa_utils.remove_dominated_programs({k: set(v) for k, v in item_best.items()}, scores=agg)
    counts: dict[int, int] = {}
    for front in filtered.values():
        for c in front:
            counts[c] = counts.get(c, 0) + 1
    return counts


def test_survivors_and_multiplicities_match_gepa_on_random_matrices():
    rng = random.Random(1234)
    dominated_seen = 0
    for _ in range(NUM_MATRICES):
        item_best, agg, _ = random_matrix(rng)
        ours = remove_dominated(item_best, agg)
        assert ours == gepa_survivors(item_best, agg)
        mult = pareto_multiplicities(item_best, agg)
        theirs = gepa_multiplicities(item_best, agg)
        assert mult == theirs
        assert list(mult) == list(theirs)  # same order: it decides which candidate a seeded draw picks
        dominated_seen += len(front_candidates(item_best)) - len(ours)
    assert dominated_seen > 100  # the matrices really exercise removal, not just trivial fronts


def test_dict_aggregate_equals_list_aggregate():
    rng = random.Random(7)
    for _ in range(50):
        item_best, agg, _ = random_matrix(rng)
        as_dict = {c: a for c, a in enumerate(agg)}
        assert remove_dominated(item_best, as_dict) == remove_dominated(item_best, agg)
        assert pareto_multiplicities(item_best, as_dict) == pareto_multiplicities(item_best, agg)


def test_seeded_pareto_draws_match_gepa():
    rng = random.Random(99)
    for trial in range(200):
        _, _, scores = random_matrix(rng)
        state = GEPAState(components=["p"])
        for row in scores:
            state.add_candidate({"p": str(len(state.candidates))}, [], row)
        ours_rng, theirs_rng = random.Random(trial), random.Random(trial)
        for _ in range(5):
            ours = ParetoSelector().select(state, ours_rng)
            theirs = gepa_utils.select_program_candidate_from_pareto_front(
                {k: set(v) for k, v in state.item_best().items()}, state.aggregates(), theirs_rng
            )
            assert ours == theirs


def test_hand_computed_domination_order():
    # Candidates 1 and 2 cover each other's only item; 1 has the lower aggregate, so it is visited (and
    # removed) first. Candidate 0 is best alone on item "c", so it always survives.
    item_best = {"a": {1, 2}, "b": {2}, "c": {0}}
    assert remove_dominated(item_best, {0: 0.1, 1: 0.2, 2: 0.9}) == {0, 2}
    # Two candidates with identical best sets and equal aggregates: the one appearing first is removed.
    item_best = {"a": {3, 5}, "b": {3, 5}}
    assert remove_dominated(item_best, {3: 0.5, 5: 0.5}) == {5}
    assert pareto_multiplicities(item_best, {3: 0.5, 5: 0.5}) == {5: 2}
    assert pareto_multiplicities({"a": {0}, "b": {0, 1}, "c": {1}}, [0.5, 0.5]) == {0: 2, 1: 2}


def test_missing_aggregate_is_a_clear_error():
    with pytest.raises(KeyError, match="no score for candidate"):
        remove_dominated({"a": {0, 4}}, [0.1, 0.2])


def test_simple_selectors_and_factory():
    state = GEPAState(components=["p"])
    for row in ({0: 0.0, 1: 1.0}, {0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0}):
        state.add_candidate({"p": "x"}, [], row)
    assert CurrentBestSelector().select(state, random.Random(0)) == 1  # first of the tied best
    picks = [EpsilonGreedySelector(0.5).select(state, r) for r in [random.Random(s) for s in range(200)]]
    assert {0, 1, 2} <= set(picks) and picks.count(1) > 100
    assert isinstance(make_selector("epsilon_greedy", 0.3), EpsilonGreedySelector)
    with pytest.raises(ValueError, match="choose one of pareto, current_best, epsilon_greedy"):
        make_selector("best")
    with pytest.raises(ValueError, match="epsilon"):
        EpsilonGreedySelector(1.5)


def test_epsilon_greedy_matches_gepa():
    strategies = pytest.importorskip("gepa.strategies.candidate_selector")

    class FakeGepaState:
        def __init__(self, s: GEPAState):
            self.program_candidates = s.candidates
            self.program_full_scores_val_set = s.aggregates()

    rng = random.Random(3)
    for trial in range(50):
        _, _, scores = random_matrix(rng)
        state = GEPAState(components=["p"])
        for row in scores:
            state.add_candidate({"p": "x"}, [], row)
        theirs = strategies.EpsilonGreedyCandidateSelector(0.3, random.Random(trial))
        ours_rng = random.Random(trial)
        for _ in range(10):
            assert EpsilonGreedySelector(0.3).select(state, ours_rng) == theirs.select_candidate_idx(
                FakeGepaState(state)
            )


@pytest.mark.parametrize("num_items,size", [(10, 3), (7, 3), (2, 3), (9, 4), (1, 1)])
def test_minibatches_match_gepa_sampler(num_items, size):
    sampler_mod = pytest.importorskip("gepa.strategies.batch_sampler")
    loader_mod = pytest.importorskip("gepa.core.data_loader")

    class FakeGepaState:
        i = -1

    theirs_rng, ours_rng = random.Random(5), random.Random(5)
    theirs = sampler_mod.EpochShuffledBatchSampler(size, rng=theirs_rng)
    ours = EpochShuffledSampler(size)
    loader = loader_mod.ListDataLoader(list(range(num_items)))
    fake = FakeGepaState()
    for _ in range(40):
        fake.i += 1
        assert ours.next_ids(list(range(num_items)), ours_rng) == theirs.next_minibatch_ids(loader, fake)
        # Each epoch covers every item (padding only repeats the least used ones).
    assert ours.to_dict() == EpochShuffledSampler.from_dict(ours.to_dict()).to_dict()


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="empty training set"):
        EpochShuffledSampler(3).next_ids([], random.Random(0))
    with pytest.raises(ValueError, match="minibatch_size"):
        EpochShuffledSampler(0)
